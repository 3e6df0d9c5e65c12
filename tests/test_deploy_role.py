"""What the CI roles can do, decided by real evaluators, never by reading our own documents back:

- parliament lints every policy document the plans declare (the boundary among them), statement by
  statement; each finding it keeps is named below with why it stands.
- principalmapper's local IAM evaluator (NCC Group's PMapper: explicit denies, conditions, permissions
  boundaries, resource policies) decides the escalation claims, which all rest on conditions and the
  boundary: the deploy role cannot create a role or user without the boundary, cannot attach
  AdministratorAccess or a *FullAccess policy, cannot lift the boundary or change the CI roles, cannot
  touch EC2 objects without the estate's tag, other zones' records, other buckets or the dumps, and a
  role it makes, whatever its own policy says, can do no more.
- moto's server with IAM enforced answers real API calls for what moto evaluates: the resource ARNs of
  S3 buckets and objects and of IAM roles named in a request (moto/core/responses.py `_determine_resource`),
  not conditions (moto treats a statement whose condition it cannot evaluate as a denial), not
  boundaries, and every other service's requests as resource "*". So moto checks that the deploy role
  reaches the estate's buckets and roles and no others, and that the preview role's peer lease works
  (tools/lock.py) with exactly its grant; the condition and boundary claims rest on principalmapper.
"""
from __future__ import annotations

import collections
import collections.abc
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from parliament import analyze_policy_string

from tools import lock
from tools.offline import evaluate_cached, unwrap

# principalmapper 1.1.5 imports Mapping and MutableMapping from `collections`, whence Python 3.10 removed
# them; they are the collections.abc classes.
for _name in ("Mapping", "MutableMapping"):
    setattr(collections, _name, getattr(collections.abc, _name))
from principalmapper.common import Node, Policy  # noqa: E402
from principalmapper.querying.query_interface import local_check_authorization_full  # noqa: E402

ACCOUNT = "123456789012"
REGION = "us-east-2"
DEPLOY = f"arn:aws:iam::{ACCOUNT}:role/katforge-github-deploy"
BOUNDARY = f"arn:aws:iam::{ACCOUNT}:policy/katforge-permissions-boundary"
TAGGED = {"aws:ResourceTag/Project": "katforge"}
BACKUPS, STATE = "katforge-db-backups", "katforge-pulumi-state"


def plan_document(name: str) -> str:
    """A policy document as the prod plan declares it."""
    resource = next(r for r in evaluate_cached("prod").resources if r.name == name)
    return unwrap(resource.raw_inputs["policy"])


# --- parliament ----------------------------------------------------------------------------------

# The mocks' stand-ins for ARNs only a deployment knows, as AWS forms them (parliament checks ARN forms).
REAL_ARNS = {
    "arn:aws:s3:us-east-2:123456789012:backups": f"arn:aws:s3:::{BACKUPS}",
    "arn:aws:ses:us-east-2:123456789012:katforge.com": "arn:aws:ses:us-east-2:123456789012:identity/katforge.com",
    'arn:aws:ses:us-east-2:123456789012:katforge"': 'arn:aws:ses:us-east-2:123456789012:configuration-set/katforge"',
    "arn:aws:iam:us-east-2:123456789012:github-actions":
        "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com",
}
# (resource, statement's Sid or first action, finding) -> why it stands.
ACCEPTED = {
    ("katforge-github-deploy-policy", "Ec2Read", "RESOURCE_STAR"):
        "ec2:Describe* has no resource-level permissions for most of its actions",
    ("permissions-boundary", "ec2:Describe*", "RESOURCE_STAR"): "the same",
    **{(doc, sid, "RESOURCE_MISMATCH"): "RunInstances and the calls that name several resource types are split "
       "into one statement per type, so each type gets its own condition (tag, owner)"
       for doc in ("katforge-github-deploy-policy",)
       for sid in ("Ec2CreateTagged", "Ec2LaunchInto", "Ec2UbuntuImagesOnly")},
    ("permissions-boundary", "ec2:RunInstances", "RESOURCE_MISMATCH"): "the same statements in the boundary",
    ("katforge-github-deploy-policy", "SesConfigurationSet", "RESOURCE_MISMATCH"):
        "parliament's database has no ARN form for SES's configuration-set; the Service Authorization Reference "
        "(Amazon SES v2) lists configuration-set* for these actions",
    ("katforge-github-deploy-policy", "IamRead", "RESOURCE_MISMATCH"):
        "iam:Get*/List* also name account-wide reads, which these resources leave out on purpose",
    ("permissions-boundary", "s3:*", "RESOURCE_POLICY_PRIVILEGE_ESCALATION"):
        "the boundary's OperatorsOnly denies every bounded identity the bucket policy, and NoDatabaseDumps the dumps",
    **{("permissions-boundary", first, "RESOURCE_MISMATCH"): "the boundary is a ceiling in service-wide actions over "
       "the estate's resources: each action applies where its resource type is listed"
       for first in ("ec2:*", "ses:*", "s3:*", "iam:Update*")},
    ("permissions-boundary", "ses:Get*", "RESOURCE_STAR"): "SES v1's identity settings have no resource types; held "
                                                           "to the region",
    **{(role, "sts:AssumeRoleWithWebIdentity", "UNKNOWN_FEDERATION_SOURCE"): "GitHub's OIDC provider is not in "
       "parliament's list of identity providers" for role in ("katforge-github-deploy", "katforge-github-preview")},
    **{(role, action, "MALFORMED"): "a trust policy names no Resource (parliament reads every document as an "
       "identity policy)" for role, action in (("katforge-github-deploy", "sts:AssumeRoleWithWebIdentity"),
                                               ("katforge-github-preview", "sts:AssumeRoleWithWebIdentity"),
                                               ("backups-writer", "sts:AssumeRole"))},
}


def declared_documents():
    """Every IAM or bucket policy document of both plans, with the mocks' ARNs made real."""
    for stack in ("prod", "qa"):
        for resource in evaluate_cached(stack).resources:
            for key in ("policy", "assumeRolePolicy"):
                text = unwrap(resource.raw_inputs.get(key))
                if isinstance(text, str) and text.startswith("{"):
                    for stand_in, real in REAL_ARNS.items():
                        text = text.replace(stand_in, real)
                    yield resource.name, text


@pytest.fixture(scope="module")
def parliament_findings():
    found, documents = {}, set()
    for name, text in declared_documents():
        documents.add(name)
        for statement in json.loads(text)["Statement"]:
            label = statement.get("Sid") or statement.get("Action") or statement.get("NotAction")
            label = label if isinstance(label, str) else label[0]
            policy = analyze_policy_string(json.dumps({"Version": "2012-10-17", "Statement": [statement]}),
                                           ignore_private_auditors=True)
            for finding in policy.findings:
                found.setdefault((name, label, finding.issue), finding.detail)
    return found, documents


def test_parliament_finds_nothing_but_what_is_accepted(parliament_findings):
    found, documents = parliament_findings
    assert documents >= {"katforge-github-deploy", "katforge-github-deploy-policy", "katforge-github-preview",
                         "katforge-github-preview-policy", "permissions-boundary", "dns-challenge", "ses-sender",
                         "backups-writer", "backups-restore", "backups"}
    assert {key: detail for key, detail in found.items() if key not in ACCEPTED} == {}


def test_every_accepted_finding_still_occurs(parliament_findings):
    """An acceptance that no longer matches anything goes: the list stays what parliament says today."""
    found, _ = parliament_findings
    assert set(ACCEPTED) - set(found) == set()


def test_parliament_would_see_a_broad_grant():
    """The lint catches what it is here for: a deploy statement widened to every resource."""
    statement = {"Effect": "Allow", "Action": ["iam:PutRolePolicy", "iam:AttachRolePolicy"], "Resource": "*"}
    policy = analyze_policy_string(json.dumps({"Version": "2012-10-17", "Statement": [statement]}),
                                   ignore_private_auditors=True)
    assert {f.issue for f in policy.findings} & {"RESOURCE_STAR", "PERMISSIONS_MANAGEMENT_ACTIONS"}


# --- principalmapper: conditions and the boundary ----------------------------------------------------

def node(arn: str, documents: list[str], boundary: str | None) -> Node:
    policies = [Policy(f"{arn}-policy-{i}", f"policy-{i}", json.loads(doc)) for i, doc in enumerate(documents)]
    trust = {"Version": "2012-10-17", "Statement": []}  # principalmapper wants one for a role; unused here
    return Node(arn, "AROAEXAMPLE", policies, [], trust, None, 0, False, False,
                Policy(BOUNDARY, "katforge-permissions-boundary", json.loads(boundary)) if boundary else None,
                False, {})


@pytest.fixture(scope="module")
def deploy():
    return node(DEPLOY, [plan_document("katforge-github-deploy-policy")], plan_document("permissions-boundary"))


def allowed(principal: Node, action: str, resource: str, resource_policy: dict | None = None, **context) -> bool:
    return local_check_authorization_full(principal, action, resource, context, resource_policy,
                                          ACCOUNT if resource_policy else None)


def role(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


def ec2(kind: str, name: str) -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:{kind}/{name}"


WITH_BOUNDARY = {"iam:PermissionsBoundary": BOUNDARY}
# What `pulumi up` does, each allowed: the controls that show every denial below is the policy's doing.
ESTATE_WORK = [
    ("iam:CreateUser", f"arn:aws:iam::{ACCOUNT}:user/ses-sender", WITH_BOUNDARY),
    ("iam:UpdateRoleDescription", role("katforge-backup-writer"), {}),
    ("iam:PutRolePolicy", role("katforge-backup-writer"), WITH_BOUNDARY),
    ("iam:PutRolePermissionsBoundary", role("katforge-backup-writer"), WITH_BOUNDARY),
    ("iam:AttachRolePolicy", role("katforge-backup-writer"),
     {**WITH_BOUNDARY, "iam:PolicyARN": f"arn:aws:iam::{ACCOUNT}:policy/katforge-backup-restore"}),
    ("iam:DetachUserPolicy", f"arn:aws:iam::{ACCOUNT}:user/traefik-dns-challenge",
     {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/AmazonRoute53FullAccess"}),
    ("iam:CreatePolicy", f"arn:aws:iam::{ACCOUNT}:policy/katforge-new", {}),
    ("ec2:ModifyInstanceAttribute", ec2("instance", "i-0abc12345def67890"), TAGGED),
    ("ec2:AuthorizeSecurityGroupIngress", ec2("security-group", "sg-0abc"), TAGGED),
    ("ec2:RunInstances", ec2("instance", "*"), {"aws:RequestTag/Project": "katforge"}),
    ("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-0ubuntu", {"ec2:Owner": "099720109477"}),
    ("ec2:AssociateAddress", ec2("elastic-ip", "eipalloc-0123"), TAGGED),
    ("route53:ChangeResourceRecordSets", "arn:aws:route53:::hostedzone/Z0292557263L1FJT7JXXS",
     {"route53:ChangeResourceRecordSetsNormalizedRecordNames": ["qa.katforge.com", "_acme-challenge.stumper.gg"]}),
    ("ses:VerifyDomainDkim", "*", {"aws:RequestedRegion": REGION}),
    ("s3:PutBucketVersioning", f"arn:aws:s3:::{BACKUPS}", {}),
    ("s3:PutObject", f"arn:aws:s3:::{STATE}/.pulumi/stacks/katforge/prod.json", {}),
]


@pytest.mark.parametrize("action, resource, context", ESTATE_WORK, ids=lambda v: v if isinstance(v, str) else "")
def test_the_deploy_role_does_the_estates_work_within_its_boundary(deploy, action, resource, context):
    assert allowed(deploy, action, resource, **context)


ESCALATIONS = [
    # No role or user without the boundary, nor with another.
    ("iam:CreateRole", role("katforge-new"), {}),
    ("iam:CreateRole", role("katforge-new"), {"iam:PermissionsBoundary": f"arn:aws:iam::{ACCOUNT}:policy/katforge-x"}),
    ("iam:CreateUser", f"arn:aws:iam::{ACCOUNT}:user/ses-sender", {}),
    ("iam:PutRolePolicy", role("katforge-backup-writer"), {}),
    # No AdministratorAccess or *FullAccess, even on a bounded estate role.
    ("iam:AttachRolePolicy", role("katforge-backup-writer"),
     {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/AdministratorAccess"}),
    ("iam:AttachRolePolicy", role("katforge-backup-writer"),
     {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/IAMFullAccess"}),
    ("iam:AttachUserPolicy", f"arn:aws:iam::{ACCOUNT}:user/ses-sender",
     {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/AmazonS3FullAccess"}),
    # The boundary stays, unchanged; the CI roles stay as the operator made them.
    ("iam:DeleteRolePermissionsBoundary", role("katforge-backup-writer"), WITH_BOUNDARY),
    ("iam:CreatePolicyVersion", BOUNDARY, {}),
    ("iam:DeletePolicy", BOUNDARY, {}),
    ("iam:PutRolePolicy", DEPLOY, WITH_BOUNDARY),
    ("iam:UpdateAssumeRolePolicy", DEPLOY, {}),
    ("iam:UpdateAssumeRolePolicy", role("katforge-github-preview"), {}),
    ("iam:AttachRolePolicy", role("katforge-github-preview"),
     {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/ReadOnlyAccess"}),
    # No other identity's credentials.
    ("sts:AssumeRole", role("katforge-backup-writer"), {}),
    ("iam:CreateAccessKey", f"arn:aws:iam::{ACCOUNT}:user/ses-sender", {}),
    ("iam:PassRole", role("katforge-backup-writer"), {"iam:PassedToService": "lambda.amazonaws.com"}),
    # Only an operator's `pulumi up` (README, "Setting up CI"): what would leak or plant a dump or widen
    # another identity. A public bucket: its policy and public access block, and ACLs.
    *((action, f"arn:aws:s3:::{BACKUPS}", {}) for action in (
        "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketPublicAccessBlock", "s3:PutBucketAcl",
        "s3:PutBucketOwnershipControls")),
    ("s3:PutObjectAcl", f"arn:aws:s3:::{BACKUPS}/prod/katforge/20270115T033000Z.dump", {}),
    # Who may become a role: a new role (it could take the backup writer's name, and with it the dumps),
    # a changed trust policy (the writer's, or a hand-made katforge role's without a boundary).
    ("iam:CreateRole", role("katforge-new"), WITH_BOUNDARY),
    ("iam:CreateRole", role("katforge-backup-writer"), WITH_BOUNDARY),
    ("iam:UpdateAssumeRolePolicy", role("katforge-backup-writer"), {}),
    ("iam:UpdateAssumeRolePolicy", role("katforge-handmade-admin"), {}),
    # A role handed to an instance whose user data CI chose (RunInstances with an instance profile needs
    # iam:PassRole), or to an instance profile.
    ("iam:PassRole", role("katforge-backup-writer"), {"iam:PassedToService": "ec2.amazonaws.com"}),
    ("iam:AddRoleToInstanceProfile", f"arn:aws:iam::{ACCOUNT}:instance-profile/katforge-k3s-host", {}),
    ("ec2:AssociateIamInstanceProfile", ec2("instance", "i-0abc12345def67890"), TAGGED),
    ("ec2:ReplaceIamInstanceProfileAssociation", ec2("instance", "i-0abc12345def67890"), TAGGED),
    # A managed policy operators attach (no boundary on them): a new default version would be theirs.
    *((action, f"arn:aws:iam::{ACCOUNT}:policy/katforge-backup-restore", {}) for action in (
        "iam:CreatePolicyVersion", "iam:SetDefaultPolicyVersion", "iam:DeletePolicyVersion")),
    # What destroys data, for any bounded identity (a user whose policy the deploy role writes): the k3s
    # host or its volume (PostgreSQL's data), a k3s agent too, the dumps by a short lifecycle expiry.
    ("ec2:TerminateInstances", ec2("instance", "i-0abc12345def67890"), TAGGED),
    ("ec2:TerminateInstances", ec2("instance", "i-0agent"), {**TAGGED, "aws:ResourceTag/Role": "k3s-agent"}),
    ("ec2:DeleteVolume", ec2("volume", "vol-0abc"), TAGGED),
    ("s3:PutLifecycleConfiguration", f"arn:aws:s3:::{BACKUPS}", {}),
]
OUTSIDE_THE_ESTATE = [
    ("iam:PutRolePolicy", role("admin"), WITH_BOUNDARY),
    ("iam:UpdateAssumeRolePolicy", role("OrganizationAccountAccessRole"), {}),
    ("iam:CreatePolicyVersion", f"arn:aws:iam::{ACCOUNT}:policy/billing", {}),
    ("ec2:StopInstances", ec2("instance", "i-0another"), {}),
    ("ec2:ModifyInstanceAttribute", ec2("instance", "i-0another"), {"aws:ResourceTag/Project": "other"}),
    ("ec2:RunInstances", ec2("instance", "*"), {}),
    ("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-0else", {"ec2:Owner": "111111111111"}),
    ("ec2:AuthorizeSecurityGroupIngress", ec2("security-group", "sg-0other"), {}),
    ("route53:ChangeResourceRecordSets", "arn:aws:route53:::hostedzone/Z0OTHER",
     {"route53:ChangeResourceRecordSetsNormalizedRecordNames": ["www.example.org"]}),
    ("route53:ChangeResourceRecordSets", "arn:aws:route53:::hostedzone/Z0292557263L1FJT7JXXS",
     {"route53:ChangeResourceRecordSetsNormalizedRecordNames": ["qa.katforge.com", "katforge.com.evil.org"]}),
    ("ses:VerifyDomainIdentity", "*", {"aws:RequestedRegion": "eu-west-1"}),
    ("ses:CreateConfigurationSet", f"arn:aws:ses:{REGION}:{ACCOUNT}:configuration-set/other", {}),
    ("s3:PutBucketPolicy", "arn:aws:s3:::someone-elses-bucket", {}),
    ("s3:GetObject", f"arn:aws:s3:::{STATE}/other-project/state.json", {}),
    ("s3:GetObject", f"arn:aws:s3:::{BACKUPS}/prod/katforge/20270115T033000Z.dump", {}),  # no one reads a dump
]
# Within the estate, but not the deploy role's to do: what protect and the runbooks keep to operators.
RDS_DB = f"arn:aws:rds:{REGION}:{ACCOUNT}:db:katforge-postgres"
RDS_CHANGES = [*((action, RDS_DB, {}) for action in ("rds:CreateDBInstance", "rds:ModifyDBInstance",
                                                     "rds:DeleteDBInstance", "rds:RestoreDBInstanceFromDBSnapshot")),
               ("rds:ModifyDBParameterGroup", f"arn:aws:rds:{REGION}:{ACCOUNT}:pg:katforge-postgres", {})]
NOT_THE_DEPLOYS = [
    ("s3:DeleteBucket", f"arn:aws:s3:::{BACKUPS}", {}),
    ("s3:PutObject", f"arn:aws:s3:::{BACKUPS}/prod/katforge/planted.dump", {}),
    # The RDS instance holds the data: making, changing or deleting it is an operator's `pulumi up`.
    *RDS_CHANGES,
]


@pytest.mark.parametrize("action, resource, context", ESCALATIONS + OUTSIDE_THE_ESTATE + NOT_THE_DEPLOYS,
                         ids=lambda v: v if isinstance(v, str) else "")
def test_the_deploy_role_cannot_escalate_or_leave_the_estate(deploy, action, resource, context):
    assert not allowed(deploy, action, resource, **context)


def test_a_bucket_policy_cannot_hand_the_deploy_role_the_dumps(deploy):
    """It may write the backup bucket's policy; what that policy grants it is still denied."""
    dump = f"arn:aws:s3:::{BACKUPS}/prod/katforge/20270115T033000Z.dump"
    grant = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": DEPLOY}, "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": f"arn:aws:s3:::{BACKUPS}/*"}]}
    assert not allowed(deploy, "s3:GetObject", dump, grant)
    assert not allowed(deploy, "s3:PutObject", dump, grant)
    # The same grant on a state object (no denial there) is honoured: the evaluator reads bucket policies.
    state_grant = json.loads(json.dumps(grant).replace(f"{BACKUPS}/*", f"{STATE}/other/*"))
    assert allowed(deploy, "s3:GetObject", f"arn:aws:s3:::{STATE}/other/x", state_grant)


def test_a_role_the_deploy_role_makes_can_do_no_more_than_the_boundary_allows():
    """Even with AdministratorAccess inside (which the deploy role cannot attach anyway)."""
    admin = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    made = node(role("katforge-made"), [admin], plan_document("permissions-boundary"))
    for action, resource, context in ESCALATIONS + OUTSIDE_THE_ESTATE:
        assert not allowed(made, action, resource, **context), (action, resource)
    assert allowed(made, "ec2:StopInstances", ec2("instance", "i-0abc"), **TAGGED)  # within the estate


def test_without_the_boundary_the_same_role_could_do_anything():
    """The control: the evaluator does apply the boundary (principalmapper honours it)."""
    admin = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    assert allowed(node(role("katforge-made"), [admin], None), "iam:CreateRole", role("x"))


def test_the_preview_role_reads_the_state_but_never_a_dump():
    """ReadOnlyAccess (moto's copy of AWS's managed policy) inside the boundary."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data
    read_only = json.dumps(json.loads(aws_managed_policies_data)["ReadOnlyAccess"]["Document"])
    preview = node(role("katforge-github-preview"), [read_only, plan_document("katforge-github-preview-policy")],
                   plan_document("permissions-boundary"))
    assert allowed(preview, "s3:GetObject", f"arn:aws:s3:::{STATE}/.pulumi/stacks/katforge/prod.json")
    assert allowed(preview, "ec2:DescribeInstances", "*")
    assert allowed(preview, "s3:PutObject", f"arn:aws:s3:::{STATE}/katforge-ci-locks/wireguard-ci-preview-prod.json")
    assert not allowed(preview, "s3:GetObject", f"arn:aws:s3:::{BACKUPS}/prod/katforge/20270115T033000Z.dump")
    assert not allowed(preview, "s3:PutObject", f"arn:aws:s3:::{STATE}/.pulumi/stacks/katforge/prod.json")
    assert not allowed(preview, "s3:GetObject", "arn:aws:s3:::someone-elses-bucket/data.csv")


# --- moto: real requests -----------------------------------------------------------------------------

_SERVE = """
import logging, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Event().wait()
"""


class EnforcingMoto:
    """moto's server on 127.0.0.1 in a process of its own, answering only requests an IAM policy allows."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, text=True)
        port = self.process.stdout.readline().strip()
        assert port.isdigit(), "moto's server did not start"
        self.endpoint = f"http://127.0.0.1:{port}"
        self.admin = self.user("admin", json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]}), {"AWS_ACCESS_KEY_ID": "bootstrap",
                                                                    "AWS_SECRET_ACCESS_KEY": "bootstrap"})
        # From here on every request must be signed by a user whose policies allow it.
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request).close()

    def client(self, service: str, credentials: dict):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])

    def user(self, name: str, policy: str, as_who: dict | None = None) -> dict:
        iam = self.client("iam", as_who or self.admin)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def moto():
    server = EnforcingMoto()
    s3, iam = server.client("s3", server.admin), server.client("iam", server.admin)
    for bucket in (BACKUPS, STATE, "someone-elses-bucket"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket=BACKUPS, Key="prod/katforge/20270115T033000Z.dump", Body=b"dump")
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    for name in ("katforge-backup-writer", "katforge-github-deploy", "admin"):
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)
    server.deploy = server.user("deploy", plan_document("katforge-github-deploy-policy"))
    server.preview = server.user("preview", plan_document("katforge-github-preview-policy"))
    yield server
    server.stop()


def denied(call) -> bool:
    try:
        call()
    except ClientError as error:
        return error.response["Error"]["Code"] in ("AccessDenied", "AccessDeniedException")
    return False


def test_moto_lets_the_deploy_role_reach_the_estates_buckets_and_no_others(moto):
    s3 = moto.client("s3", moto.deploy)
    versioning = {"VersioningConfiguration": {"Status": "Enabled"}}
    s3.put_bucket_versioning(Bucket=BACKUPS, **versioning)
    s3.put_object(Bucket=STATE, Key=".pulumi/stacks/katforge/prod.json", Body=b"{}")
    assert denied(lambda: s3.put_bucket_versioning(Bucket="someone-elses-bucket", **versioning))
    assert denied(lambda: s3.get_object(Bucket=BACKUPS, Key="prod/katforge/20270115T033000Z.dump"))
    assert denied(lambda: s3.put_object(Bucket=BACKUPS, Key="prod/katforge/planted.dump", Body=b"x"))
    assert denied(lambda: s3.put_object(Bucket=STATE, Key="other-project/state.json", Body=b"{}"))


def test_moto_lets_the_deploy_role_change_estate_roles_but_not_itself_or_others(moto):
    iam = moto.client("iam", moto.deploy)
    iam.update_role_description(RoleName="katforge-backup-writer", Description="changed by the deploy role")
    assert denied(lambda: iam.update_role_description(RoleName="admin", Description="x"))
    assert denied(lambda: iam.update_role_description(RoleName="katforge-github-deploy", Description="x"))


class BotoS3(lock.S3):
    """The lease's three calls through boto3 (no process per call), for the contention tests; the AWS CLI
    path tools/lock.py takes in CI is tested once, below."""

    def __init__(self, bucket: str, client):
        super().__init__(bucket)
        self.s3 = client

    def _error(self, error: ClientError) -> lock.S3Error:
        return lock.S3Error(error.response["Error"]["Code"], str(error))

    def put(self, key, body, condition):
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), **condition)
        except ClientError as error:
            raise self._error(error) from None

    def get(self, key):
        try:
            found = self.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if error.response["Error"]["Code"] == "NoSuchKey":
                return None
            raise self._error(error) from None
        return json.loads(found["Body"].read()), found["ETag"]

    def delete(self, key):
        self.s3.delete_object(Bucket=self.bucket, Key=key)


@pytest.fixture
def preview_s3(moto):
    return BotoS3(STATE, moto.client("s3", moto.preview))


def test_the_lease_takes_turns_through_the_aws_cli_with_the_preview_roles_grant(moto, monkeypatch, preview_s3):
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**moto.preview, "AWS_ENDPOINT_URL": moto.endpoint, "AWS_DEFAULT_REGION": REGION,
                       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    cli = lock.S3(STATE, aws=str(Path(sys.executable).parent / "aws"))
    lock.acquire(cli, "ci-preview-prod", "run-1", ttl=600, wait=0)
    with pytest.raises(SystemExit, match="still held by run-1"):
        lock.acquire(preview_s3, "ci-preview-prod", "run-2", ttl=600, wait=0, poll=0)
    lock.release(cli, "ci-preview-prod", "run-1")
    assert preview_s3.get(lock.lease_key("ci-preview-prod")) is None


def test_one_preview_at_a_time_holds_a_peer_and_the_next_takes_it_after(preview_s3):
    s3 = preview_s3
    lock.acquire(s3, "ci-preview-prod", "run-1", ttl=600, wait=0)
    with pytest.raises(SystemExit, match="still held by run-1"):
        lock.acquire(s3, "ci-preview-prod", "run-2", ttl=600, wait=0, poll=0)
    lock.acquire(s3, "ci-preview-qa", "run-2", ttl=600, wait=0)  # the other stack's peer is free
    lock.release(s3, "ci-preview-prod", "run-2")  # not its lease: left alone
    with pytest.raises(SystemExit):
        lock.acquire(s3, "ci-preview-prod", "run-3", ttl=600, wait=0, poll=0)
    lock.release(s3, "ci-preview-prod", "run-1")
    lock.acquire(s3, "ci-preview-prod", "run-3", ttl=600, wait=0)
    for peer, owner in (("ci-preview-prod", "run-3"), ("ci-preview-qa", "run-2")):
        lock.release(s3, peer, owner)
    assert s3.get(lock.lease_key("ci-preview-prod")) is None


def test_a_waiter_gets_the_peer_once_the_holder_releases_it(preview_s3):
    lock.acquire(preview_s3, "ci-preview-prod", "run-1", ttl=600, wait=0)
    looks = []

    def sleep(seconds):  # the holder finishes while the waiter waits
        looks.append(seconds)
        lock.release(preview_s3, "ci-preview-prod", "run-1")

    lock.acquire(preview_s3, "ci-preview-prod", "run-2", ttl=600, wait=60, poll=15, sleep=sleep)
    assert looks == [15] and preview_s3.get(lock.lease_key("ci-preview-prod"))[0]["owner"] == "run-2"
    lock.release(preview_s3, "ci-preview-prod", "run-2")


def test_a_lease_whose_runner_died_is_taken_over_once_expired(preview_s3):
    s3 = preview_s3
    lock.acquire(s3, "ci-preview-qa", "died", ttl=-1, wait=0)
    lock.acquire(s3, "ci-preview-qa", "next", ttl=600, wait=0)
    assert s3.get(lock.lease_key("ci-preview-qa"))[0]["owner"] == "next"
    lock.release(s3, "ci-preview-qa", "next")


def test_the_preview_role_may_write_leases_and_nothing_else(moto, preview_s3):
    with pytest.raises(lock.S3Error) as refused:
        BotoS3(BACKUPS, preview_s3.s3).put("katforge-ci-locks/x.json", "{}", {"IfNoneMatch": "*"})
    assert refused.value.code == "AccessDenied"
    with pytest.raises(lock.S3Error):
        preview_s3.put(".pulumi/stacks/katforge/prod.json", "{}", {"IfNoneMatch": "*"})


# What the deploy role does for each AWS resource type the prod plan declares: its create or update call,
# on an estate object. A type missing here fails the test below: a new kind of resource needs its grant
# (infra/policies.py) before CI can deploy it. None: an operator's `pulumi up` does it (README).
ZONE = "arn:aws:route53:::hostedzone/Z0292557263L1FJT7JXXS"
WORK_BY_TYPE = {
    "aws:ec2/instance:Instance": ("ec2:ModifyInstanceAttribute", ec2("instance", "i-0abc"), TAGGED),
    "aws:ec2/eip:Eip": ("ec2:AllocateAddress", ec2("elastic-ip", "*"), {"aws:RequestTag/Project": "katforge"}),
    "aws:ec2/eipAssociation:EipAssociation": ("ec2:AssociateAddress", ec2("elastic-ip", "eipalloc-0123"), TAGGED),
    "aws:ec2/keyPair:KeyPair": ("ec2:ImportKeyPair", ec2("key-pair", "katforge-operators"), {}),
    "aws:ec2/securityGroup:SecurityGroup": ("ec2:CreateSecurityGroup", ec2("security-group", "*"),
                                            {"aws:RequestTag/Project": "katforge"}),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ec2:AuthorizeSecurityGroupIngress",
                                                                  ec2("security-group", "sg-0abc"), TAGGED),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("ec2:AuthorizeSecurityGroupEgress",
                                                                ec2("security-group", "sg-0abc"), TAGGED),
    "aws:iam/accessKey:AccessKey": None,  # a new key's secret would be the deploy role's to read
    "aws:iam/instanceProfile:InstanceProfile": None,  # it hands a role to instances
    "aws:iam/openIdConnectProvider:OpenIdConnectProvider": (
        "iam:AddClientIDToOpenIDConnectProvider",
        f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com", {}),
    # A new managed policy; a changed one (a new version) is an operator's.
    "aws:iam/policy:Policy": ("iam:CreatePolicy", f"arn:aws:iam::{ACCOUNT}:policy/katforge-new", {}),
    # Its description and tags; a new role or a changed trust policy is an operator's.
    "aws:iam/role:Role": ("iam:UpdateRoleDescription", role("katforge-backup-writer"), {}),
    "aws:iam/rolePolicy:RolePolicy": ("iam:PutRolePolicy", role("katforge-backup-writer"), WITH_BOUNDARY),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": (
        "iam:AttachRolePolicy", role("katforge-backup-writer"),
        {**WITH_BOUNDARY, "iam:PolicyARN": "arn:aws:iam::aws:policy/ReadOnlyAccess"}),
    "aws:iam/user:User": ("iam:TagUser", f"arn:aws:iam::{ACCOUNT}:user/katforge-backup-alerts", {}),
    "aws:iam/userPolicy:UserPolicy": ("iam:PutUserPolicy", f"arn:aws:iam::{ACCOUNT}:user/ses-sender", WITH_BOUNDARY),
    "aws:iam/userPoliciesExclusive:UserPoliciesExclusive": ("iam:DeleteUserPolicy",
                                                            f"arn:aws:iam::{ACCOUNT}:user/ses-sender", WITH_BOUNDARY),
    "aws:iam/userPolicyAttachmentsExclusive:UserPolicyAttachmentsExclusive": (
        "iam:DetachUserPolicy", f"arn:aws:iam::{ACCOUNT}:user/traefik-dns-challenge", WITH_BOUNDARY),
    "aws:route53/record:Record": ("route53:ChangeResourceRecordSets", ZONE,
                                  {"route53:ChangeResourceRecordSetsNormalizedRecordNames": ["k3s.katforge.com"]}),
    "aws:s3/bucket:Bucket": ("s3:PutBucketTagging", f"arn:aws:s3:::{BACKUPS}", {}),
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": None,  # a short expiry deletes every dump
    "aws:s3/bucketPolicy:BucketPolicy": None,  # what could make a dump public
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": None,
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration": (
        "s3:PutEncryptionConfiguration", f"arn:aws:s3:::{BACKUPS}", {}),
    "aws:s3/bucketVersioning:BucketVersioning": ("s3:PutBucketVersioning", f"arn:aws:s3:::{BACKUPS}", {}),
    "aws:ses/configurationSet:ConfigurationSet": ("ses:PutConfigurationSetDeliveryOptions",
                                                  f"arn:aws:ses:{REGION}:{ACCOUNT}:configuration-set/katforge", {}),
    "aws:ses/domainDkim:DomainDkim": ("ses:VerifyDomainDkim", "*", {"aws:RequestedRegion": REGION}),
    "aws:ses/domainIdentity:DomainIdentity": ("ses:VerifyDomainIdentity", "*", {"aws:RequestedRegion": REGION}),
    "aws:ses/mailFrom:MailFrom": ("ses:SetIdentityMailFromDomain", "*", {"aws:RequestedRegion": REGION}),
}


def test_the_deploy_role_can_do_its_work_on_every_aws_resource_type_of_the_plan(deploy):
    types = {r.type for r in evaluate_cached("prod").resources if r.type.startswith("aws:")}
    assert types - WORK_BY_TYPE.keys() == set(), "a resource type without a grant for CI: see WORK_BY_TYPE"
    for type_, work in WORK_BY_TYPE.items():
        if work:
            action, resource, context = work
            assert allowed(deploy, action, resource, **context), type_


def test_moto_refuses_the_deploy_role_the_backup_buckets_policy(moto):
    """A real request: the bucket policy (a Principal "*" grant would make every dump public) is an operator's.
    moto names the public access block's action s3:PutPublicAccessBlock, not IAM's
    s3:PutBucketPublicAccessBlock, so that one rests on principalmapper (ESCALATIONS)."""
    s3 = moto.client("s3", moto.deploy)
    public = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BACKUPS}/*"}]})
    assert denied(lambda: s3.put_bucket_policy(Bucket=BACKUPS, Policy=public))
    assert denied(lambda: s3.delete_bucket_policy(Bucket=BACKUPS))
    s3.put_bucket_tagging(Bucket=BACKUPS, Tagging={"TagSet": [{"Key": "Project", "Value": "katforge"}]})  # control


def test_ci_reads_rds_once_the_stack_declares_it_and_changes_nothing_there():
    """Every run refreshes, so CI's roles read the RDS instance of a stack that declares it (and only then:
    the default estate's documents stay as they were); making or changing it stays an operator's."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data
    from tests import scaled
    read_only = json.dumps(json.loads(aws_managed_policies_data)["ReadOnlyAccess"]["Document"])

    def document(plan, name: str) -> str:
        return unwrap(next(r for r in plan.resources if r.name == name).raw_inputs["policy"])

    for plan, declared in ((evaluate_cached("prod"), False), (scaled.rds(), True)):
        boundary = document(plan, "permissions-boundary")
        deploy = node(DEPLOY, [document(plan, "katforge-github-deploy-policy")], boundary)
        preview = node(role("katforge-github-preview"), [read_only, document(plan, "katforge-github-preview-policy")],
                       boundary)
        for principal in (deploy, preview):
            assert allowed(principal, "rds:DescribeDBInstances", RDS_DB) is declared
            for action, resource, context in RDS_CHANGES:
                assert not allowed(principal, action, resource, **context), action
        assert ("rds:" in boundary) is declared
