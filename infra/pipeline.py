"""GitHub Actions' way into AWS: the OIDC provider and the two roles the workflows assume.

IAM is account-wide, so only the prod stack declares this. Each role trusts exactly one kind of
GitHub token of one repository: a pull request's preview may only read, and only a push to main may
change the estate. No long-lived AWS key is stored in GitHub.

The provider (one per URL in an account) and the roles have account-unique names: live ones are
imported (`katforge:imports`). A role's inline denials get a name of Pulumi's own, so they never meet a
live inline policy, and attaching a managed policy that is attached already changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra import adopt
from infra.policies import document
from infra.settings import PipelineSettings

ISSUER = "token.actions.githubusercontent.com"
AUDIENCE = "sts.amazonaws.com"  # what aws-actions/configure-aws-credentials asks GitHub for


def _managed(name: str) -> str:
    return f"arn:aws:iam::aws:policy/{name}"


# What `pulumi up` manages (see infra/): hosts, addresses and security groups; the zones' records;
# the SES identity; IAM users, keys and roles (this module's roles among them); the backup bucket and
# the S3 state backend. IAM write access makes this role as strong as an administrator in practice:
# any role that can apply this program can grant itself more. What guards it is its trust policy:
# only the main branch, i.e. reviewed and merged code, gets it.
DEPLOY_POLICIES = tuple(_managed(name) for name in (
    "AmazonEC2FullAccess",
    "AmazonRoute53FullAccess",
    "AmazonSESFullAccess",
    "IAMFullAccess",
    "AmazonS3FullAccess",
))
# `pulumi preview` only reads: the cloud's current state and the stack's state objects (a preview
# against an S3 backend takes no lock and writes nothing).
PREVIEW_POLICIES = (_managed("ReadOnlyAccess"),)


@dataclass(frozen=True)
class CiRole:
    name: str
    subject: str  # the token's `sub` claim this role accepts
    policies: tuple[str, ...]
    description: str
    denials: str | None = None  # an inline policy that carves out of the managed ones


def preview_denials(backup_bucket: str) -> str:
    """ReadOnlyAccess reads every S3 object; pull requests must not download production data."""
    return document({"Sid": "NoDatabaseDumps", "Effect": "Deny", "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                     "Resource": f"arn:aws:s3:::{backup_bucket}/*"})


def ci_roles(repository: str, backup_bucket: str) -> tuple[CiRole, ...]:
    return (
        CiRole("katforge-github-preview", f"repo:{repository}:pull_request", PREVIEW_POLICIES,
               f"pulumi preview for pull requests of {repository}: read-only", preview_denials(backup_bucket)),
        CiRole("katforge-github-deploy", f"repo:{repository}:ref:refs/heads/main", DEPLOY_POLICIES,
               f"pulumi up for pushes to main of {repository}"),
    )


def trust_policy(provider_arn: str, subject: str) -> str:
    """Only GitHub tokens minted for AWS with exactly this subject may assume the role."""
    return document({
        "Effect": "Allow",
        "Principal": {"Federated": provider_arn},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {f"{ISSUER}:aud": AUDIENCE, f"{ISSUER}:sub": subject}},
    })


class Pipeline(pulumi.ComponentResource):
    def __init__(self, name: str, settings: PipelineSettings, backup_bucket: str,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("katforge:pipeline:Pipeline", name, None, opts)
        # No thumbprint: for GitHub, IAM validates the issuer against its own trusted CAs, and this
        # provider version no longer requires the list.
        provider = aws.iam.OpenIdConnectProvider(
            "github-actions", url=f"https://{ISSUER}", client_id_lists=[AUDIENCE],
            opts=pulumi.ResourceOptions(parent=self,
                                        import_=adopt.import_id("OpenIdConnectProvider", "github-actions")))
        preview, deploy = (self._role(spec, provider.arn) for spec in ci_roles(settings.github_repository, backup_bucket))
        self.preview_role_arn = preview.arn
        self.deploy_role_arn = deploy.arn
        self.register_outputs({"preview_role_arn": self.preview_role_arn, "deploy_role_arn": self.deploy_role_arn,
                               "oidc_provider_arn": provider.arn})

    def _role(self, spec: CiRole, provider_arn: pulumi.Output[str]) -> aws.iam.Role:
        role = aws.iam.Role(
            spec.name,
            name=spec.name,
            description=spec.description,
            assume_role_policy=provider_arn.apply(lambda arn: trust_policy(arn, spec.subject)),
            opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("Role", spec.name)),
        )
        for policy in spec.policies:
            aws.iam.RolePolicyAttachment(f"{spec.name}-{policy.rsplit('/', 1)[1]}", role=role.name,
                                         policy_arn=policy, opts=pulumi.ResourceOptions(parent=role))
        if spec.denials:
            aws.iam.RolePolicy(f"{spec.name}-denials", role=role.name, policy=spec.denials,
                               opts=pulumi.ResourceOptions(parent=role))
        return role
