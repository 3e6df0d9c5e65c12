"""The IAM user whose key lets Traefik answer Let's Encrypt's DNS-01 challenge in Route53.

A live user of that name is imported (`katforge:imports`): IAM names are unique in the account. Its
inline policy gets a name of Pulumi's own, so it never meets a live one, and its key is a new one.
What the live user was granted besides goes (`sole_policy`).
"""
from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.policies import dns_challenge_policy

USER = "traefik-dns-challenge"  # the live user's name


def sole_policy(name: str, user: aws.iam.User, policy: aws.iam.UserPolicy, parent: pulumi.Resource) -> None:
    """Make `policy` the user's only grant. An adopted user keeps whatever it was granted live unless
    told otherwise (the spec's DNS-challenge user has AmazonRoute53FullAccess): these detach every
    managed policy and delete every other inline one when created, and again whenever a refresh finds
    more. The provider reads the live lists and changes only the difference; deleting them changes
    nothing on the user (terraform-provider-aws iam/user_policy_attachments_exclusive.go @0ac6a8e1d84d,
    iam/user_policies_exclusive.go @0eb381a26e8a)."""
    opts = pulumi.ResourceOptions(parent=parent)
    aws.iam.UserPolicyAttachmentsExclusive(name, user_name=user.name, policy_arns=[], opts=opts)
    aws.iam.UserPoliciesExclusive(name, user_name=user.name, policy_names=[policy.name], opts=opts)


class DnsChallengeUser(pulumi.ComponentResource):
    def __init__(self, name: str, zone_arns: dict[str, str], hosts: list[str],
                 permissions_boundary: pulumi.Input[str] | None = None, opts: pulumi.ResourceOptions | None = None):
        """`hosts`: every name Traefik gets a certificate for; only their challenge records are writable.
        `permissions_boundary`: the estate's boundary policy (infra/pipeline.py), the most the user can do."""
        super().__init__("katforge:iam:DnsChallengeUser", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        user = aws.iam.User(name, name=USER, permissions_boundary=permissions_boundary,
                            opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("User", name)))
        policy = aws.iam.UserPolicy(name, user=user.name,
                                    policy=dns_challenge_policy(list(zone_arns.values()), hosts), opts=child)
        sole_policy(name, user, policy, self)
        key = aws.iam.AccessKey(name, user=user.name,
                                opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["secret"]))
        self.access_key_id = pulumi.Output.secret(key.id)
        self.secret_access_key = pulumi.Output.secret(key.secret)
        self.register_outputs({"user": user.name})
