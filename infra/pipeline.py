"""GitHub Actions' way into AWS: the OIDC provider, the two roles the workflows assume, and the
permissions boundary every estate role and user carries.

IAM is account-wide, so only the prod stack declares this. Each role trusts the tokens of one GitHub
environment of one repository, and only reviewed code reaches either: `preview` (required reviewers)
and `deploy` (main only), configured in the repository's settings (README, "Setting up CI"). The deploy
role also pins `job_workflow_ref` to the reusable workflow on main, so no other workflow on main gets
it. No long-lived AWS key is stored in GitHub.

The deploy role may change the estate and nothing else (infra/policies.py `deploy_policy`): it cannot
give itself or anything it creates more than the boundary, cannot lift the boundary, and cannot change
itself. Changes to these roles or to the boundary are therefore applied by an operator's `pulumi up`, as
are new roles, trust policies, roles handed to instances, managed policies' versions and the bucket policy
and public access block (infra/policies.py `guard_statements`, OperatorsOnly).

The provider (one per URL in an account) and the roles have account-unique names: live ones are
imported (`katforge:imports`). The roles' inline policies get names of Pulumi's own, so they never meet
a live inline policy, and attaching a managed policy that is attached already changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra import adopt, dns, email, iam
from infra.policies import (BOUNDARY_POLICY, DEPLOY_ROLE, GITHUB_OIDC, EstateScope, boundary_policy, deploy_policy,
                            document, preview_policy)
from infra.settings import REGION, PipelineSettings

ISSUER = GITHUB_OIDC
AUDIENCE = "sts.amazonaws.com"  # what aws-actions/configure-aws-credentials asks GitHub for
PREVIEW_ENVIRONMENT = "preview"
DEPLOY_ENVIRONMENT = "deploy"
# The one workflow that runs `pulumi up` (.github/workflows/pulumi.yml, called by deploy.yml on main).
DEPLOY_WORKFLOW = ".github/workflows/pulumi.yml"
DEPLOY_REF = "refs/heads/main"
READ_ONLY = "arn:aws:iam::aws:policy/ReadOnlyAccess"


@dataclass(frozen=True)
class CiRole:
    name: str
    claims: dict[str, str]  # the token claims this role requires, exactly
    policies: tuple[str, ...]  # managed policies attached
    inline: str  # its inline policy
    description: str


def token_claims(repository: str, environment: str, workflow: str | None = None) -> dict[str, str]:
    """What a GitHub token must say: a job of `environment` in `repository` (the `sub` claim of a job that
    declares an environment), and with `workflow`, that job running the reusable workflow at main.
    Both claims are GitHub's (docs.github.com, "OpenID Connect reference": `sub` with
    `environment:<name>`, and `job_workflow_ref`, "the ref path to the reusable workflow"); STS checks
    `job_workflow_ref` as a condition key since January 2026 (AWS What's New, "AWS STS supports
    validation of identity provider claims")."""
    claims = {"aud": AUDIENCE, "sub": f"repo:{repository}:environment:{environment}"}
    if workflow:
        claims["job_workflow_ref"] = f"{repository}/{workflow}@{DEPLOY_REF}"
    return claims


def ci_roles(repository: str, scope: EstateScope) -> tuple[CiRole, ...]:
    return (
        CiRole("katforge-github-preview", token_claims(repository, PREVIEW_ENVIRONMENT), (READ_ONLY,),
               preview_policy(scope),
               f"pulumi preview for reviewed pull requests of {repository}: read-only"),
        CiRole(DEPLOY_ROLE, token_claims(repository, DEPLOY_ENVIRONMENT, DEPLOY_WORKFLOW), (), deploy_policy(scope),
               f"pulumi up from main of {repository}: the estate only"),
    )


def trust_policy(provider_arn: str, claims: dict[str, str]) -> str:
    """Only GitHub tokens minted for AWS whose claims are exactly these may assume the role."""
    return document({
        "Effect": "Allow",
        "Principal": {"Federated": provider_arn},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {f"{ISSUER}:{claim}": value for claim, value in claims.items()}},
    })


def estate_scope(settings: PipelineSettings, backup_bucket: str, rds: bool = False) -> EstateScope:
    return EstateScope(region=REGION, domains=dns.ZONES, ses_identity=email.IDENTITY,
                       ses_configuration_set=email.CONFIGURATION_SET, buckets=(backup_bucket,),
                       state_bucket=settings.state_bucket, users=(iam.USER, email.SENDER), rds=rds)


class Pipeline(pulumi.ComponentResource):
    def __init__(self, name: str, settings: PipelineSettings, backup_bucket: str, rds: bool = False,
                 opts: pulumi.ResourceOptions | None = None):
        """`rds`: the stack declares the RDS instance, which CI's refresh must then read."""
        super().__init__("katforge:pipeline:Pipeline", name, None, opts)
        scope = estate_scope(settings, backup_bucket, rds)
        # A managed policy of the estate's, new (no live one to adopt): every role and user names it as
        # its boundary.
        boundary = aws.iam.Policy(
            "permissions-boundary", name=BOUNDARY_POLICY, policy=boundary_policy(scope),
            description="The most any Katforge role or user may do (infra/policies.py boundary_policy).",
            opts=pulumi.ResourceOptions(parent=self))
        # No thumbprint: for GitHub, IAM validates the issuer against its own trusted CAs, and this
        # provider version no longer requires the list.
        provider = aws.iam.OpenIdConnectProvider(
            "github-actions", url=f"https://{ISSUER}", client_id_lists=[AUDIENCE],
            opts=pulumi.ResourceOptions(parent=self,
                                        import_=adopt.import_id("OpenIdConnectProvider", "github-actions")))
        preview, deploy = (self._role(spec, provider.arn, boundary.arn)
                           for spec in ci_roles(settings.github_repository, scope))
        self.boundary_arn = boundary.arn
        self.preview_role_arn = preview.arn
        self.deploy_role_arn = deploy.arn
        self.register_outputs({"preview_role_arn": self.preview_role_arn, "deploy_role_arn": self.deploy_role_arn,
                               "oidc_provider_arn": provider.arn, "boundary_arn": self.boundary_arn})

    def _role(self, spec: CiRole, provider_arn: pulumi.Output[str], boundary_arn: pulumi.Output[str]) -> aws.iam.Role:
        role = aws.iam.Role(
            spec.name,
            name=spec.name,
            description=spec.description,
            assume_role_policy=provider_arn.apply(lambda arn: trust_policy(arn, spec.claims)),
            permissions_boundary=boundary_arn,
            opts=pulumi.ResourceOptions(parent=self, import_=adopt.import_id("Role", spec.name)),
        )
        for policy in spec.policies:
            aws.iam.RolePolicyAttachment(f"{spec.name}-{policy.rsplit('/', 1)[1]}", role=role.name,
                                         policy_arn=policy, opts=pulumi.ResourceOptions(parent=role))
        aws.iam.RolePolicy(f"{spec.name}-policy", role=role.name, policy=spec.inline,
                           opts=pulumi.ResourceOptions(parent=role))
        return role
