"""moto's S3 and IAM on 127.0.0.1 with IAM enforced, a bucket per use, and the backup, restore and drill
scripts wired to it and to a PostgreSQL cluster: the host writes with exactly the writer policy that
infra/backups.py attaches to the instance role, and the permissions boundary's denials as they apply to
that role; operators read with exactly their policy.

What moto cannot show: it ignores permissions boundaries and treats every statement with a condition as a
denial. So the boundary's denials are decided here for the writer's role ARN (`boundary_denials`), and
that the boundary also *allows* what the writer policy grants (a boundary is a ceiling) rests on
principalmapper in tests/test_writer_role.py.

A plugin module (`pytest_plugins = ["tests.s3_sandbox"]`): the session fixture `s3` is one moto server
for every module that uses it."""
from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from infra.backups import restore_policy, writer_policy
from infra.pipeline import estate_scope
from infra.policies import BACKUP_WRITER_ROLE, boundary_policy
from infra.settings import STAGES, PipelineSettings
from tests.pgcluster import SERVER_USER, free_port

HOST = Path(__file__).resolve().parent.parent / "infra" / "host"
BACKUP = HOST / "backup-databases.sh"
RESTORE = HOST / "restore-database.sh"
DRILL = HOST / "drill-database.sh"
REGION = "us-east-2"
STAGE = "prod"
ADMIN_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
# As on the host, PostgreSQL's programs run as the server's OS user over the socket (there: postgres).
RUN_AS = SERVER_USER if os.geteuid() == 0 else ""


class S3Sandbox:
    """moto's S3 and IAM on 127.0.0.1, answering only signed requests that an IAM policy allows."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.admin = self._user("admin", ADMIN_POLICY, client=boto3.client("iam", **self._anonymous()))
        # From here on every request must be signed by a user whose policies allow it.
        self._moto_api("reset-auth", b"0")

    def _moto_api(self, action: str, data: bytes) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/{action}", data=data,
                                         headers={"Content-Type": "text/plain"})  # a raw body, not a form
        urllib.request.urlopen(request).close()

    def _anonymous(self) -> dict:
        return dict(endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                    aws_secret_access_key="bootstrap")

    def _user(self, name: str, policy: str, client=None) -> dict[str, str]:
        iam = client or self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def user(self, policy: str, *more: str) -> dict[str, str]:
        """A new user holding `policy` and each of `more` as inline policies."""
        name = f"u{uuid.uuid4().hex[:12]}"
        credentials = self._user(name, policy)
        for i, document in enumerate(more):
            self.client("iam").put_user_policy(UserName=name, PolicyName=f"{name}-{i}", PolicyDocument=document)
        return credentials

    def client(self, service: str, credentials: dict[str, str] | None = None):
        credentials = credentials or self.admin
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])

    def environment(self, credentials: dict[str, str], endpoint: str | None = None) -> dict[str, str]:
        """What the AWS CLI in the scripts needs to reach this sandbox, and nothing from the caller's setup."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_EC2_METADATA_DISABLED": "true", **credentials}

    def stop(self) -> None:
        # moto's settings are process-wide: leave it as other tests expect it.
        self._moto_api("reset-auth", b"inf")
        self._moto_api("reset", b"")
        self.server.stop()


class Backups:
    """One bucket with the host's writer and an operator, and the scripts wired to them and to `pg`."""

    def __init__(self, s3: S3Sandbox, pg, work: Path):
        self.s3, self.pg, self.work = s3, pg, work
        self.bucket = f"backups-{uuid.uuid4().hex[:12]}"
        self.admin = s3.client("s3")
        self.admin.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        self.admin.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        arn = f"arn:aws:s3:::{self.bucket}"
        self.writer = s3.user(writer_policy(arn, STAGES), boundary_denials(self.bucket, WRITER_ARN))
        self.operator = s3.user(restore_policy(arn))
        self.endpoint = s3.endpoint  # a test may put a proxy in front of moto

    def env(self, credentials: dict[str, str], **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.pg.env().items() if not k.startswith(("AWS_", "ALERT_"))}
        # The AWS CLI pinned in requirements-test.txt, installed beside this Python.
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        return {**env, **self.s3.environment(credentials, self.endpoint), "BACKUP_BUCKET": self.bucket,
                "BACKUP_STATE_DIR": str(self.work / "state"), "KATFORGE_ENV_FILE": "/dev/null",
                "ALERT_COMMAND": str(self.work / "no-alert-configured"), **extra}

    def backup(self, *targets: str, **env: str) -> subprocess.CompletedProcess:
        env = {"BACKUP_RUN_AS": RUN_AS, "BACKUP_LOCK": str(self.work / "backup.lock"), **env}
        return subprocess.run(["bash", str(BACKUP), *targets], env=self.env(self.writer, **env),
                              capture_output=True, text=True, timeout=60)

    def restore(self, *args: str, credentials: dict[str, str] | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(RESTORE), *args],
                              env=self.env(credentials or self.operator, **{"RESTORE_RUN_AS": RUN_AS, **env}),
                              capture_output=True, text=True, timeout=60)

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.admin.list_object_versions(Bucket=self.bucket, Prefix=prefix)
        return sorted(v["Key"] for v in listing.get("Versions", []))

    def dumps(self, database: str, stage: str = STAGE) -> list[str]:
        return [k for k in self.keys(f"{stage}/{database}/") if k.endswith(".dump")]

    def get(self, key: str) -> bytes:
        return self.admin.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.admin.put_object(Bucket=self.bucket, Key=key, Body=body)

    def manifest(self, dump_key: str) -> dict:
        return json.loads(self.get(dump_key.removesuffix(".dump") + ".manifest.json"))


WRITER_ARN = f"arn:aws:iam::123456789012:role/{BACKUP_WRITER_ROLE}"


def boundary_denials(bucket: str, principal: str) -> str:
    """The permissions boundary's Deny statements (infra/policies.py) for an estate whose backup bucket is
    `bucket`, as they apply to `principal`, in a form moto enforces: a condition on aws:PrincipalArn
    (ArnLike or ArnNotLike, IAM's wildcards) is decided here for `principal`; any other condition is refused
    rather than guessed."""
    boundary = json.loads(boundary_policy(estate_scope(PipelineSettings("katforge/estate", "state"), bucket)))
    denials = []
    for statement in (s for s in boundary["Statement"] if s["Effect"] == "Deny"):
        statement = dict(statement)
        condition = statement.pop("Condition", {})
        for operator, keys in condition.items():
            assert operator in ("ArnLike", "ArnNotLike") and set(keys) == {"aws:PrincipalArn"}, condition
            patterns = keys["aws:PrincipalArn"]
            matches = any(fnmatch.fnmatchcase(principal, p) for p in ([patterns] if isinstance(patterns, str)
                                                                       else patterns))
            if matches != (operator == "ArnLike"):
                break  # the condition does not hold for `principal`: the denial is not its
        else:
            denials.append(statement)
    return json.dumps({"Version": "2012-10-17", "Statement": denials})


def timestamp_of(key: str) -> str:
    return key.rsplit("/", 1)[1].removesuffix(".dump")


@pytest.fixture(scope="session")
def s3():
    sandbox = S3Sandbox()
    try:
        yield sandbox
    finally:
        sandbox.stop()
