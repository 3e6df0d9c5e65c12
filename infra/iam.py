"""The IAM user whose key lets Traefik answer Let's Encrypt's DNS-01 challenge in Route53.

A live user of that name is imported (`katforge:imports`): IAM names are unique in the account. Its
inline policy gets a name of Pulumi's own, so it never meets a live one, and its key is a new one.
"""
from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.policies import dns_challenge_policy


class DnsChallengeUser(pulumi.ComponentResource):
    def __init__(self, name: str, zone_arns: dict[str, str], hosts: list[str],
                 opts: pulumi.ResourceOptions | None = None):
        """`hosts`: every name Traefik gets a certificate for; only their challenge records are writable."""
        super().__init__("katforge:iam:DnsChallengeUser", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        user = aws.iam.User(name, name="traefik-dns-challenge",
                            opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("User", name)))
        aws.iam.UserPolicy(name, user=user.name, policy=dns_challenge_policy(list(zone_arns.values()), hosts),
                           opts=child)
        key = aws.iam.AccessKey(name, user=user.name,
                                opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["secret"]))
        self.access_key_id = pulumi.Output.secret(key.id)
        self.secret_access_key = pulumi.Output.secret(key.secret)
        self.register_outputs({"user": user.name})
