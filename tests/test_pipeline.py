"""The GitHub OIDC provider, the CI roles and the permissions boundary, checked in the offline plan of each
stack. What the roles' policies allow is tested with a policy evaluator in tests/test_deploy_role.py."""
import json

import pytest

from infra.settings import SettingsError
from tools.offline import evaluate, evaluate_cached

ROLE = "aws:iam/role:Role"
ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"
PROVIDER = "aws:iam/openIdConnectProvider:OpenIdConnectProvider"
POLICY = "aws:iam/policy:Policy"
READ_ONLY = "arn:aws:iam::aws:policy/ReadOnlyAccess"
ISSUER = "token.actions.githubusercontent.com"


def role_named(plan, suffix):
    found = [r for r in plan.of_type(ROLE) if r.name.endswith(suffix)]
    assert len(found) == 1, [r.name for r in plan.of_type(ROLE)]
    return found[0]


def trust_statement(role):
    statements = json.loads(role.inputs["assumeRolePolicy"])["Statement"]
    assert len(statements) == 1
    return statements[0]


def policies_of(plan, role):
    return {a.inputs["policyArn"] for a in plan.of_type(ATTACHMENT) if a.inputs["role"] == role.inputs["name"]}


def inline_of(plan, role):
    (policy,) = [r for r in plan.of_type("aws:iam/rolePolicy:RolePolicy") if r.inputs["role"] == role.inputs["name"]]
    return json.loads(policy.inputs["policy"])


def test_the_github_issuer_is_trusted_for_sts_tokens_only():
    (provider,) = evaluate_cached("prod").of_type(PROVIDER)
    assert provider.inputs["url"] == f"https://{ISSUER}"
    assert provider.inputs["clientIdLists"] == ["sts.amazonaws.com"]


@pytest.mark.parametrize("suffix, claims", [
    ("preview", {"sub": "repo:katforge/estate:environment:preview"}),
    # Only the reusable workflow on main, in a job of the `deploy` environment, gets the deploy role.
    ("deploy", {"sub": "repo:katforge/estate:environment:deploy",
                "job_workflow_ref": "katforge/estate/.github/workflows/pulumi.yml@refs/heads/main"}),
])
def test_each_role_accepts_only_tokens_of_its_github_environment(suffix, claims):
    plan = evaluate_cached("prod")
    (provider,) = plan.of_type(PROVIDER)
    role = role_named(plan, suffix)
    statement = trust_statement(role)
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert provider.urn in role.options["depends_on"]
    assert statement["Principal"]["Federated"].endswith(":" + provider.name)
    # Exact matches only: a StringLike with wildcards would let any branch, environment or fork in.
    assert statement["Condition"] == {"StringEquals": {
        f"{ISSUER}:aud": "sts.amazonaws.com", **{f"{ISSUER}:{claim}": value for claim, value in claims.items()}}}


def test_the_deploy_workflow_the_role_pins_is_the_one_that_runs_pulumi_up():
    """The claim names .github/workflows/pulumi.yml; deploy.yml must call exactly that file."""
    from tests.test_workflows import load  # the workflow files as the workflow tests read them
    deploy = load("deploy.yml")
    assert {job["uses"] for job in deploy["jobs"].values() if job.get("with", {}).get("command") == "up"} == {
        "./.github/workflows/pulumi.yml"}


def test_the_preview_role_reads_and_the_deploy_role_holds_the_estate_policy_only():
    plan = evaluate_cached("prod")
    preview, deploy = role_named(plan, "preview"), role_named(plan, "deploy")
    assert policies_of(plan, preview) == {READ_ONLY}
    # No managed policy at all: no *FullAccess, no AdministratorAccess, only its own inline policy.
    assert policies_of(plan, deploy) == set()
    sids = {s["Sid"] for s in inline_of(plan, deploy)["Statement"]}
    assert {"Ec2ManageTagged", "DnsRecordsOfTheEstate", "EstateBuckets", "IamGrantWithinBoundary",
            "CiRolesAreFixed", "NoDatabaseDumps"} <= sids
    # The preview's own grant is its WireGuard peer leases; the boundary keeps it from the dumps.
    [lease] = inline_of(plan, preview)["Statement"]
    assert lease["Resource"] == "arn:aws:s3:::katforge-pulumi-state/katforge-ci-locks/*"


def test_every_ci_role_carries_the_permissions_boundary():
    plan = evaluate_cached("prod")
    boundary = plan.named("permissions-boundary", POLICY)
    assert boundary.inputs["name"] == "katforge-permissions-boundary"
    for suffix in ("preview", "deploy"):
        role = role_named(plan, suffix)
        assert boundary.urn in role.options["property_dependencies"]["permissionsBoundary"]
    assert plan.outputs["deployRoleArn"].endswith(":katforge-github-deploy")


def test_the_boundary_fits_a_managed_policy():
    """IAM's quota: 6,144 characters per managed policy, whitespace not counted (IAM User Guide, "IAM and
    AWS STS quotas"). Checked with bucket names of S3's greatest length."""
    from infra.pipeline import estate_scope
    from infra.policies import boundary_policy
    from infra.settings import PipelineSettings
    longest = "b" * 63
    text = boundary_policy(estate_scope(PipelineSettings("katforge/estate", "s" * 63), longest))
    assert len("".join(text.split())) <= 6144
    plan_text = evaluate_cached("prod").named("permissions-boundary", POLICY).inputs["policy"]
    assert len("".join(plan_text.split())) <= 6144


def test_both_role_arns_are_stack_outputs():
    outputs = evaluate_cached("prod").outputs
    assert outputs["previewRoleArn"].endswith(":katforge-github-preview")
    assert outputs["deployRoleArn"].endswith(":katforge-github-deploy")


def test_only_the_prod_stack_declares_the_pipeline():
    plan = evaluate_cached("qa")
    assert not plan.of_type("katforge:pipeline:Pipeline") and not plan.of_type(PROVIDER)
    assert not [r for r in plan.of_type(ROLE) if "github" in r.name] and not plan.of_type(POLICY)
    assert "previewRoleArn" not in plan.outputs and "deployRoleArn" not in plan.outputs


def test_the_trusted_repository_and_the_state_bucket_come_from_config():
    plan = evaluate("prod", {"katforge:githubRepository": "katforge/estate-fork",
                             "katforge:stateBucket": "other-state"})
    conditions = [trust_statement(role_named(plan, suffix))["Condition"]["StringEquals"]
                  for suffix in ("preview", "deploy")]
    assert [c[f"{ISSUER}:sub"] for c in conditions] == ["repo:katforge/estate-fork:environment:preview",
                                                       "repo:katforge/estate-fork:environment:deploy"]
    assert conditions[1][f"{ISSUER}:job_workflow_ref"].startswith("katforge/estate-fork/")
    [lease] = inline_of(plan, role_named(plan, "preview"))["Statement"]
    assert lease["Resource"].startswith("arn:aws:s3:::other-state/")


@pytest.mark.parametrize("key, value, message", [
    ("githubRepository", "estate", r"katforge:githubRepository = estate: .*owner/name"),
    ("stateBucket", "s3://state", r"katforge:stateBucket = s3://state: expected an S3 bucket name"),
])
def test_a_bad_pipeline_setting_is_refused(key, value, message):
    with pytest.raises(SettingsError, match=message):
        evaluate("prod", {f"katforge:{key}": value})


def test_every_role_and_user_of_the_estate_carries_the_boundary():
    """The deploy role may only grant within the boundary, so each role and user must have it."""
    plan = evaluate_cached("prod")
    boundary = plan.named("permissions-boundary", POLICY)
    missing = [r.name for r in plan.resources if r.type in (ROLE, "aws:iam/user:User")
               and boundary.urn not in r.options["property_dependencies"].get("permissionsBoundary", [])]
    assert missing == []
