"""The k3s host's backup role, `katforge-backup-writer`, with its own policy inside the permissions
boundary it carries: it adds, finds and reads back its dumps (the backup's HEAD after a lost upload
answer, the monthly drill, `sudo katforge-restore` on the host), and no other identity the boundary
bounds does either, whatever its own policy or a bucket policy grants it.

principalmapper decides (as in tests/test_deploy_role.py): it evaluates the boundary, explicit denies,
the aws:PrincipalArn condition that exempts the writer, and bucket policies. moto cannot: it ignores
boundaries and conditions (tests/s3_sandbox.py gives its writer the boundary's denials as they apply
to the writer; that the boundary allows too is shown here only)."""
from __future__ import annotations

import json

import pytest
from principalmapper.common import Node, Policy

from infra.settings import STAGES
from tests.s3_sandbox import Backups
from tests.test_deploy_role import ACCOUNT, BACKUPS, BOUNDARY, DEPLOY, REAL_ARNS, allowed, node, plan_document, role
from tools.offline import evaluate_cached, unwrap

pytest_plugins = ["tests.s3_sandbox"]

WRITER = role("katforge-backup-writer")
BUCKET = f"arn:aws:s3:::{BACKUPS}"
ADMIN = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def writer_document() -> str:
    """The writer role's inline policy as the prod plan declares it, with the bucket's real ARN."""
    [resource] = [r for r in evaluate_cached("prod").resources
                  if r.type == "aws:iam/rolePolicy:RolePolicy" and r.name == "backups-writer"]
    text = unwrap(resource.raw_inputs["policy"])
    for stand_in, real in REAL_ARNS.items():
        text = text.replace(stand_in, real)
    return text


@pytest.fixture(scope="module")
def boundary() -> str:
    return plan_document("permissions-boundary")


@pytest.fixture(scope="module")
def writer(boundary):
    return node(WRITER, [writer_document()], boundary)


def dump(stage: str, name: str = "katforge/20270115T033000Z.dump") -> str:
    return f"{BUCKET}/{stage}/{name}"


@pytest.mark.parametrize("stage", STAGES)
def test_the_writer_adds_finds_and_reads_back_its_dumps_within_the_boundary(writer, stage):
    """Before the fix the boundary's NoDatabaseDumps denied every s3:GetObject on the bucket: the restore
    on the host, the drill and the backup's HEAD check (s3:GetObject authorizes HEAD) all failed."""
    assert allowed(writer, "s3:PutObject", dump(stage))
    assert allowed(writer, "s3:PutObject", dump(stage, "katforge/20270115T033000Z.manifest.json"))
    assert allowed(writer, "s3:PutObject", dump(stage, "drill/latest.json"))
    assert allowed(writer, "s3:GetObject", dump(stage))  # GET, and HEAD (HeadObject needs s3:GetObject)
    assert allowed(writer, "s3:GetObject", dump(stage, "drill/latest.json"))  # hearth status, the drill
    assert allowed(writer, "s3:ListBucket", BUCKET)


def test_the_writer_still_cannot_delete_rewrite_history_or_open_the_bucket(writer):
    for action in ("s3:DeleteObject", "s3:DeleteObjectVersion", "s3:GetObjectVersion"):
        assert not allowed(writer, action, dump("prod")), action
    assert not allowed(writer, "s3:PutObject", f"{BUCKET}/elsewhere/katforge.dump")
    for action in ("s3:PutBucketPolicy", "s3:PutBucketPublicAccessBlock", "s3:PutLifecycleConfiguration"):
        assert not allowed(writer, action, BUCKET), action


def test_even_with_administrator_access_inside_the_writer_only_keeps_its_dumps(boundary):
    """The boundary is what lets the writer at the dumps, and no further: deleting stays denied."""
    widened = node(WRITER, [ADMIN], boundary)
    assert allowed(widened, "s3:GetObject", dump("prod"))
    assert not allowed(widened, "s3:DeleteObject", dump("prod"))
    assert not allowed(widened, "s3:GetObject", "arn:aws:s3:::someone-elses-bucket/data.csv")


def user(name: str, document: str, boundary: str) -> Node:
    """A bounded IAM user (tests/test_deploy_role.py's `node` makes roles)."""
    arn = f"arn:aws:iam::{ACCOUNT}:user/{name}"
    return Node(arn, "AIDAEXAMPLE", [Policy(f"{arn}-policy", "policy", json.loads(document))], [], None, None, 1,
                False, False, Policy(BOUNDARY, "katforge-permissions-boundary", json.loads(boundary)), False, {})


def others(boundary: str) -> dict[str, object]:
    """Every other identity the boundary bounds: the CI roles with their own policies, and any role or user
    of the estate (whatever the deploy role could put in its policy: AdministratorAccess), including one
    whose name only begins like the writer's."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data
    read_only = json.dumps(json.loads(aws_managed_policies_data)["ReadOnlyAccess"]["Document"])
    return {
        "deploy": node(DEPLOY, [plan_document("katforge-github-deploy-policy")], boundary),
        "preview": node(role("katforge-github-preview"), [read_only, plan_document("katforge-github-preview-policy")],
                        boundary),
        "estate role": node(role("katforge-made"), [ADMIN], boundary),
        "writer look-alike": node(role("katforge-backup-writer-2"), [ADMIN], boundary),
        "estate user": user("katforge-backup-alerts", ADMIN, boundary),
        "dns user": user("traefik-dns-challenge", ADMIN, boundary),
    }


def test_no_other_identity_of_the_estate_reads_or_writes_a_dump(boundary):
    for name, principal in others(boundary).items():
        # A bucket policy naming it (only an operator may write one) does not help either.
        grant = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": principal.arn}, "Action": ["s3:GetObject", "s3:PutObject"],
             "Resource": f"{BUCKET}/*"}]}
        for action in ("s3:GetObject", "s3:PutObject"):
            assert not allowed(principal, action, dump("prod")), (name, action)
            assert not allowed(principal, action, dump("prod"), grant), (name, action, "bucket policy")


# --- the restore script: a refused download is not a missing dump ---------------------------------------

@pytest.fixture
def listing_only(s3, pg, tmp_path):
    """A bucket holding one dump and its manifest, and credentials that may list it but not download:
    what the host's role met while the boundary denied it s3:GetObject."""
    backups = Backups(s3, pg, tmp_path)
    for suffix in (".dump", ".manifest.json"):
        backups.put(f"prod/katforge/20270115T033000Z{suffix}", b"{}")
    return backups, s3.user(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{backups.bucket}"}]}))


@pytest.mark.parametrize("at", ["20270115T033000Z", "latest"])
def test_a_denied_download_reaches_the_operator_and_stops_the_restore(listing_only, at):
    """Before the fix `aws s3 cp ... || true` turned AccessDenied into "the dump is not in the bucket", and
    `latest` passed over every dump to "no dump passes its checks"."""
    backups, credentials = listing_only
    result = backups.restore("--stage", "prod", "--database", "katforge", "--at", at, "--target", "never_made",
                             credentials=credentials)
    assert result.returncode == 1, result.stderr
    assert "AccessDenied" in result.stderr
    assert f"REFUSED: s3://{backups.bucket}/prod/katforge/20270115T033000Z.dump could not be downloaded" \
        in result.stderr
    assert "not in the bucket" not in result.stderr and "passing over" not in result.stderr


def test_a_dump_that_is_not_there_is_still_named_as_missing(listing_only):
    backups, _ = listing_only
    result = backups.restore("--stage", "prod", "--database", "katforge", "--at", "20270116T033000Z",
                             "--target", "never_made")
    assert result.returncode == 1
    assert "20270116T033000Z.dump: the dump is not in the bucket; nothing changed" in result.stderr
