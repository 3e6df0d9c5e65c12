"""The GitHub OIDC provider and the CI roles, checked in the offline plan of each stack."""
import json

import pytest

from infra.settings import SettingsError
from tools.offline import evaluate, evaluate_cached

ROLE = "aws:iam/role:Role"
ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"
PROVIDER = "aws:iam/openIdConnectProvider:OpenIdConnectProvider"
READ_ONLY = "arn:aws:iam::aws:policy/ReadOnlyAccess"


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


def test_the_github_issuer_is_trusted_for_sts_tokens_only():
    (provider,) = evaluate_cached("prod").of_type(PROVIDER)
    assert provider.inputs["url"] == "https://token.actions.githubusercontent.com"
    assert provider.inputs["clientIdLists"] == ["sts.amazonaws.com"]


@pytest.mark.parametrize("suffix, subject", [
    ("preview", "repo:katforge/estate:pull_request"),
    ("deploy", "repo:katforge/estate:ref:refs/heads/main"),
])
def test_each_role_accepts_exactly_one_kind_of_github_token(suffix, subject):
    plan = evaluate_cached("prod")
    (provider,) = plan.of_type(PROVIDER)
    role = role_named(plan, suffix)
    statement = trust_statement(role)
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert provider.urn in role.options["depends_on"]
    assert statement["Principal"]["Federated"].endswith(":" + provider.name)
    # Exact matches only: a StringLike with wildcards would let any branch or fork in.
    assert statement["Condition"] == {"StringEquals": {
        "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
        "token.actions.githubusercontent.com:sub": subject,
    }}


def test_the_preview_role_only_reads_and_the_deploy_role_is_another_role():
    plan = evaluate_cached("prod")
    preview, deploy = role_named(plan, "preview"), role_named(plan, "deploy")
    assert preview.urn != deploy.urn
    assert policies_of(plan, preview) == {READ_ONLY}
    deploy_policies = policies_of(plan, deploy)
    assert deploy_policies and READ_ONLY not in deploy_policies
    assert "arn:aws:iam::aws:policy/AdministratorAccess" not in deploy_policies


def test_the_preview_role_may_not_download_database_dumps():
    plan = evaluate_cached("prod")
    denials = {r.name: json.loads(r.inputs["policy"]) for r in plan.of_type("aws:iam/rolePolicy:RolePolicy")}
    [statement] = denials["katforge-github-preview-denials"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert "s3:GetObject" in statement["Action"]
    bucket = plan.outputs["backupBucket"]
    assert statement["Resource"] == f"arn:aws:s3:::{bucket}/*"
    assert not any(name.startswith("katforge-github-deploy") for name in denials)


def test_both_role_arns_are_stack_outputs():
    outputs = evaluate_cached("prod").outputs
    assert outputs["previewRoleArn"].endswith(":katforge-github-preview")
    assert outputs["deployRoleArn"].endswith(":katforge-github-deploy")


def test_only_the_prod_stack_declares_the_pipeline():
    plan = evaluate_cached("qa")
    assert not plan.of_type("katforge:pipeline:Pipeline") and not plan.of_type(PROVIDER)
    assert not [r for r in plan.of_type(ROLE) if "github" in r.name]
    assert "previewRoleArn" not in plan.outputs and "deployRoleArn" not in plan.outputs


def test_the_trusted_repository_comes_from_config():
    plan = evaluate("prod", {"katforge:githubRepository": "katforge/estate-fork"})
    subjects = {trust_statement(role_named(plan, suffix))["Condition"]["StringEquals"][
        "token.actions.githubusercontent.com:sub"] for suffix in ("preview", "deploy")}
    assert subjects == {"repo:katforge/estate-fork:pull_request", "repo:katforge/estate-fork:ref:refs/heads/main"}


def test_a_repository_that_is_not_owner_slash_name_is_refused():
    with pytest.raises(SettingsError, match=r"katforge:githubRepository = estate: .*owner/name"):
        evaluate("prod", {"katforge:githubRepository": "estate"})
