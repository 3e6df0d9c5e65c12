"""The backup and restore scripts, run for real: PostgreSQL 16 (the shared `pg` fixture) and the S3 API of
moto in server mode on 127.0.0.1, with IAM enforced. The host writes with exactly the writer policy that
infra/backups.py attaches to the instance role, and restores read with exactly the operators' policy."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from infra.backups import restore_policy, writer_policy
from infra.settings import STAGES
from tests.pgcluster import SERVER_USER, free_port

HOST = Path(__file__).resolve().parent.parent / "infra" / "host"
BACKUP = HOST / "backup-databases.sh"
RESTORE = HOST / "restore-database.sh"
REGION = "us-east-2"
STAGE = "prod"
ADMIN_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


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

    def user(self, policy: str) -> dict[str, str]:
        return self._user(f"u{uuid.uuid4().hex[:12]}", policy)

    def client(self, service: str, credentials: dict[str, str] | None = None):
        credentials = credentials or self.admin
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])

    def environment(self, credentials: dict[str, str]) -> dict[str, str]:
        """What the AWS CLI in the scripts needs to reach this sandbox, and nothing from the caller's setup."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true", **credentials}

    def stop(self) -> None:
        # moto's settings are process-wide: leave it as other tests expect it.
        self._moto_api("reset-auth", b"inf")
        self._moto_api("reset", b"")
        self.server.stop()


class Backups:
    """One bucket with the host's writer and an operator, and the scripts wired to them and to `pg`."""

    def __init__(self, s3: S3Sandbox, pg, tmp_path: Path):
        self.s3, self.pg, self.tmp_path = s3, pg, tmp_path
        self.bucket = f"backups-{uuid.uuid4().hex[:12]}"
        self.admin = s3.client("s3")
        self.admin.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        self.admin.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        arn = f"arn:aws:s3:::{self.bucket}"
        self.writer = s3.user(writer_policy(arn, STAGES))
        self.operator = s3.user(restore_policy(arn))

    def _env(self, credentials: dict[str, str], **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.pg.env().items() if not k.startswith("AWS_")}
        # The AWS CLI pinned in requirements-test.txt, installed beside this Python.
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        return {**env, **self.s3.environment(credentials), "BACKUP_BUCKET": self.bucket, **extra}

    def backup(self, *targets: str, **env: str) -> subprocess.CompletedProcess:
        # As on the host: pg_dump runs as the server's OS user over the socket (there: postgres).
        env = {"BACKUP_RUN_AS": SERVER_USER if os.geteuid() == 0 else "",
               "BACKUP_LOCK": str(self.tmp_path / "backup.lock"), **env}
        return subprocess.run(["bash", str(BACKUP), *targets], env=self._env(self.writer, **env),
                              capture_output=True, text=True, timeout=60)

    def restore(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(RESTORE), *args], env=self._env(self.operator, **env),
                              capture_output=True, text=True, timeout=60)

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.admin.list_object_versions(Bucket=self.bucket, Prefix=prefix)
        return sorted(v["Key"] for v in listing.get("Versions", []))


@pytest.fixture(scope="module")
def s3():
    sandbox = S3Sandbox()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def backups(s3, pg, tmp_path) -> Backups:
    return Backups(s3, pg, tmp_path)


@pytest.fixture
def databases(pg):
    """Make fresh, uniquely named databases; drop them all after the test."""
    made: list[str] = []

    def make(seed: bool = True) -> str:
        name = f"bk_{uuid.uuid4().hex[:10]}"
        made.append(name)
        pg.psql(f"CREATE DATABASE {name}")
        if seed:
            pg.psql(SEED, database=name)
        return name

    yield make
    for name in made:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# Awkward values on purpose: NULLs, quotes, newlines, non-ASCII, binary, exact numerics, time zones.
SEED = """
CREATE TABLE players (
  id bigserial PRIMARY KEY, name text NOT NULL, score numeric(12, 3), joined timestamptz,
  profile jsonb, avatar bytea, tags text[]
);
INSERT INTO players (name, score, joined, profile, avatar, tags)
SELECT 'player ' || i || CASE WHEN i % 7 = 0 THEN E' \\'quoted\\'\\nline' ELSE ' Łódź ☃' END,
       CASE WHEN i % 5 = 0 THEN NULL ELSE i * 1.125 END,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '37 minutes',
       jsonb_build_object('level', i % 40, 'badges', jsonb_build_array(i, 'x')),
       decode(md5(i::text), 'hex'),
       ARRAY['t' || (i % 3), NULL]
FROM generate_series(1, 500) AS i;
CREATE VIEW leaders AS SELECT name, score FROM players WHERE score > 500;
"""


def rows(pg, database: str) -> list[str]:
    """Every row of the seeded table as PostgreSQL prints it, in id order."""
    return json.loads(pg.psql("SELECT json_agg(p::text ORDER BY id) FROM players p", database=database))


def only_key(backups: Backups, database: str) -> str:
    keys = backups.keys(f"{STAGE}/{database}/")
    assert len(keys) == 1, keys
    return keys[0]


def timestamp_of(key: str) -> str:
    return key.rsplit("/", 1)[1].removesuffix(".dump")


def test_backup_then_restore_into_a_fresh_database_brings_back_every_row(backups, databases, pg):
    source = databases()
    result = backups.backup(f"{STAGE}:{source}")
    assert result.returncode == 0, result.stderr

    key = only_key(backups, source)
    assert key.startswith(f"{STAGE}/{source}/") and key.endswith(".dump")
    # The key's timestamp is UTC, compact ISO 8601.
    assert len(timestamp_of(key)) == 16 and timestamp_of(key)[8] == "T" and key.endswith("Z.dump")
    body = backups.admin.get_object(Bucket=backups.bucket, Key=key)["Body"].read()
    assert body.startswith(b"PGDMP")  # pg_dump's custom format

    target = f"{source}_restored"
    result = backups.restore("--stage", STAGE, "--database", source, "--at", timestamp_of(key), "--target", target)
    assert result.returncode == 0, result.stderr
    try:
        assert rows(pg, target) == rows(pg, source)
        assert len(rows(pg, target)) == 500
        assert pg.psql("SELECT count(*) FROM leaders", database=target) == \
            pg.psql("SELECT count(*) FROM leaders", database=source)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {target} WITH (FORCE)")


def test_a_failed_dump_exits_non_zero_and_uploads_nothing(backups, databases):
    source = databases()
    # On the host peer authentication cannot fail this way; over TCP a wrong password makes pg_dump
    # itself fail, through the same code path as any other dump error.
    result = backups.backup(f"{STAGE}:{source}", PGHOST="127.0.0.1", PGPASSWORD="wrong")
    assert result.returncode != 0
    assert "password authentication failed" in result.stderr
    assert f"FAILED {STAGE}/{source}/" in result.stderr
    assert backups.keys() == []


def test_one_failed_database_does_not_stop_the_others(backups, databases):
    good, missing = databases(), f"bk_missing_{uuid.uuid4().hex[:6]}"
    result = backups.backup(f"{STAGE}:{missing}", f"{STAGE}:{good}")
    assert result.returncode != 0
    assert f"FAILED {STAGE}/{missing}/" in result.stderr
    assert backups.keys(f"{STAGE}/{missing}/") == []
    only_key(backups, good)


def test_latest_restores_the_newest_dump(backups, databases, pg):
    source = databases()
    old_rows = rows(pg, source)
    assert backups.backup(f"{STAGE}:{source}").returncode == 0
    old_key = only_key(backups, source)
    old_dump = backups.admin.get_object(Bucket=backups.bucket, Key=old_key)["Body"].read()
    backups.admin.delete_object(Bucket=backups.bucket, Key=old_key)  # back below, under an older name
    pg.psql("UPDATE players SET name = 'renamed' WHERE id <= 10; DELETE FROM players WHERE id > 400", database=source)
    new_rows = rows(pg, source)
    assert backups.backup(f"{STAGE}:{source}").returncode == 0
    # The older dump is uploaded last: neither upload order nor modification time may decide.
    older = f"{STAGE}/{source}/20000101T000000Z.dump"
    backups.admin.put_object(Bucket=backups.bucket, Key=older, Body=old_dump)

    target = databases(seed=False)
    result = backups.restore("--stage", STAGE, "--at", "latest", "--target", target)
    assert result.returncode == 0, result.stderr
    assert older not in result.stderr
    assert rows(pg, target) == new_rows != old_rows


def test_restore_refuses_a_non_empty_database_without_force(backups, databases, pg):
    source = databases()
    assert backups.backup(f"{STAGE}:{source}").returncode == 0
    at = timestamp_of(only_key(backups, source))
    target = databases(seed=False)
    # A table of the same name as one in the dump, holding something else.
    pg.psql("CREATE TABLE players (id int, note text); INSERT INTO players VALUES (1, 'precious')", database=target)
    before = rows(pg, target)

    result = backups.restore("--stage", STAGE, "--database", source, "--at", at, "--target", target)
    assert result.returncode != 0
    assert "REFUSED" in result.stderr
    assert rows(pg, target) == before == ['(1,precious)']

    # --force replaces what the dump holds.
    result = backups.restore("--stage", STAGE, "--database", source, "--at", at, "--target", target, "--force")
    assert result.returncode == 0, result.stderr
    assert rows(pg, target) == rows(pg, source)


@pytest.fixture
def stage_database(pg):
    """A database owned by a login role that is no superuser and may not create databases, as the stage's
    role is on the host (infra/host/pg-database.sh); dropped after the test."""
    name, password = f"bk_{uuid.uuid4().hex[:10]}", f"pw-{secrets.token_urlsafe(12)}"
    pg.psql(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
    # The password goes through the environment, not a command line.
    subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1"], env=pg.env(KATFORGE_PASSWORD=password), check=True,
                   input=f"\\getenv password KATFORGE_PASSWORD\nALTER ROLE {name} PASSWORD :'password';\n",
                   capture_output=True, text=True)
    pg.psql(f"CREATE DATABASE {name} OWNER {name}")
    pg.psql(f"REVOKE CONNECT ON DATABASE {name} FROM PUBLIC")
    yield name, password
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.psql(f"DROP ROLE IF EXISTS {name}")


def test_the_stage_role_restores_over_its_own_database_with_force_over_tcp(backups, stage_database, pg):
    role, password = stage_database
    # As the README has operators connect: the stage's role, by password over TCP.
    tcp = {"PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": role, "PGPASSWORD": password}
    assert pg.psql("SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
                   **tcp, PGDATABASE=role) == "f"
    # This path checks the password (pg_hba: scram-sha-256 from 127.0.0.1); if another test left pg_hba
    # otherwise, this says so rather than passing without a password check.
    refused = subprocess.run(["psql", "-X", "-c", "SELECT 1"], capture_output=True, text=True,
                             env=pg.env(**{**tcp, "PGPASSWORD": "wrong"}, PGDATABASE=role))
    assert "password authentication failed" in refused.stderr

    pg.psql(SEED, database=role, **tcp)  # the role owns what the apps create
    seeded, leaders = rows(pg, role), pg.psql("SELECT json_agg(l) FROM leaders l", database=role)
    assert backups.backup(f"{STAGE}:{role}").returncode == 0
    at = timestamp_of(only_key(backups, role))
    pg.psql("UPDATE players SET name = 'changed', score = -1 WHERE id <= 10; DELETE FROM players WHERE id > 400;"
            "INSERT INTO players (name) VALUES ('added after the dump')", database=role, **tcp)
    changed = rows(pg, role)
    assert changed != seeded and pg.psql("SELECT count(*) FROM leaders", database=role) == "0"

    restore = ("--stage", STAGE, "--database", role, "--at", at, "--target", role)
    result = backups.restore(*restore, **tcp)
    assert result.returncode != 0
    assert "REFUSED" in result.stderr
    assert rows(pg, role) == changed

    result = backups.restore(*restore, "--force", **tcp)
    assert result.returncode == 0, result.stderr
    assert rows(pg, role) == seeded
    assert len(seeded) == 500
    assert pg.psql("SELECT json_agg(l) FROM leaders l", database=role) == leaders
    assert pg.psql("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relname IN ('players', 'leaders')",
                   database=role) == role


def test_a_second_run_does_not_start_while_one_holds_the_lock(backups, databases, tmp_path):
    source = databases()
    lock = tmp_path / "backup.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = backups.backup(f"{STAGE}:{source}")
    assert result.returncode != 0
    assert "another backup run holds the lock" in result.stderr
    assert backups.keys() == []


def test_the_writer_can_only_add_dumps_under_a_stage_prefix(backups):
    key = f"{STAGE}/katforge/20240101T033000Z.dump"
    backups.admin.put_object(Bucket=backups.bucket, Key=key, Body=b"PGDMP")
    writer = backups.s3.client("s3", backups.writer)
    denied = [
        lambda: writer.get_object(Bucket=backups.bucket, Key=key),
        lambda: writer.list_objects_v2(Bucket=backups.bucket),
        lambda: writer.delete_object(Bucket=backups.bucket, Key=key),
        lambda: writer.put_object(Bucket=backups.bucket, Key="elsewhere/katforge.dump", Body=b"x"),
    ]
    for call in denied:
        with pytest.raises(ClientError, match="AccessDenied"):
            call()
    for stage in STAGES:
        writer.put_object(Bucket=backups.bucket, Key=f"{stage}/katforge/probe.dump", Body=b"x")

