"""The backup script, run for real: PostgreSQL 16 (the shared `pg` fixture) and moto's S3 on 127.0.0.1
with IAM enforced, the host writing with exactly the writer policy of infra/backups.py
(tests/s3_sandbox.py). Restores have their own module, tests/test_restore.py."""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import subprocess
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Callable

import pytest
from botocore.exceptions import ClientError

from infra.settings import STAGES
from tests.s3_sandbox import BACKUP, RUN_AS, STAGE, Backups, timestamp_of

pytest_plugins = ["tests.s3_sandbox"]


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


def only_dump(backups: Backups, database: str) -> str:
    dumps = backups.dumps(database)
    assert len(dumps) == 1, dumps
    return dumps[0]


def test_a_backup_is_a_dump_and_a_manifest_that_vouches_for_it(backups, databases, pg):
    source = databases()
    pg.psql(f"ALTER DATABASE {source} SET work_mem = '64MB'; COMMENT ON DATABASE {source} IS 'the game''s'")
    result = backups.backup(f"{STAGE}:{source}")
    assert result.returncode == 0, result.stderr

    key = only_dump(backups, source)
    # The key's timestamp is UTC, compact ISO 8601; the manifest sits beside the dump.
    assert len(timestamp_of(key)) == 16 and timestamp_of(key)[8] == "T" and key.endswith("Z.dump")
    assert backups.keys(f"{STAGE}/{source}/") == [key, key.removesuffix(".dump") + ".manifest.json"]
    body = backups.get(key)
    assert body.startswith(b"PGDMP")  # pg_dump's custom format
    manifest = backups.manifest(key)
    assert manifest["dump"] == key
    assert manifest["sha256"] == hashlib.sha256(body).hexdigest() and manifest["bytes"] == len(body)
    assert f"ok {key} ({len(body)} bytes, sha256 {manifest['sha256']})" in result.stderr
    database = manifest["database"]
    assert database["name"] == source and database["owner"] == "postgres" and database["encoding"] == "UTF8"
    assert database["comment"] == "the game's"
    assert {"role": None, "setting": "work_mem=64MB"} in database["settings"]
    assert {"grantee": "PUBLIC", "privilege": "CONNECT", "grantable": False} in database["acl"]
    # Row counts and checksums, as the drill compares them, read in the dump's snapshot.
    [players] = [r for r in manifest["relations"] if r.get("table") == "public.players"]
    assert players["rows"] == 500 and players["checksum"].lstrip("-").isdigit()
    assert {"sequence": "public.players_id_seq", "value": 500} in manifest["relations"]
    assert (backups.work / "state" / "backup" / f"{STAGE}.{source}.last-success").read_text() == key + "\n"
    assert "mailed" not in result.stderr  # a run that succeeds alerts nobody (ALERT_COMMAND is never run)


def test_the_manifest_is_read_in_the_snapshot_the_dump_is(backups, databases, pg):
    """Rows written while the dump runs are in neither: both read one exported snapshot."""
    source = databases()
    writer = subprocess.Popen(
        ["bash", "-c", f"for i in $(seq 1 400); do echo 'INSERT INTO players (name) VALUES (''w'');'; done | "
                       f"psql -X -q -d {source}"], env=pg.env())
    try:
        result = backups.backup(f"{STAGE}:{source}")
    finally:
        writer.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    key = only_dump(backups, source)
    [players] = [r for r in backups.manifest(key)["relations"] if r.get("table") == "public.players"]
    dumped = subprocess.run(["pg_restore", "--data-only", "--table=players", "-f", "-"], input=backups.get(key),
                            capture_output=True, env=pg.env(), check=True).stdout
    copied = dumped.split(b"FROM stdin;\n", 1)[1].split(b"\n\\.\n", 1)[0].count(b"\n") + 1
    assert players["rows"] == copied


def test_a_failed_dump_exits_non_zero_and_uploads_nothing(backups, databases):
    source = databases()
    # On the host peer authentication cannot fail this way; over TCP a wrong password makes pg_dump
    # itself fail, through the same code path as any other dump error.
    result = backups.backup(f"{STAGE}:{source}", PGHOST="127.0.0.1", PGPASSWORD="wrong")
    assert result.returncode != 0
    assert "password authentication failed" in result.stderr
    assert f"FAILED {STAGE}/{source}/" in result.stderr
    assert backups.keys() == []


def test_without_its_checksum_query_the_run_dumps_nothing_and_mails_why(backups, databases, tmp_path):
    """No manifest could vouch for a dump: the run stops before any, through the alert path."""
    source = databases()
    alert = tmp_path / "alert"
    alert.write_text(f"#!/bin/sh\ncat > {tmp_path / 'mail'}\n")
    alert.chmod(0o755)
    result = backups.backup(f"{STAGE}:{source}", KATFORGE_LIB_DIR=str(tmp_path / "empty"), ALERT_COMMAND=str(alert))
    assert result.returncode == 1 and "table-checksums.sql cannot be read: no database was dumped" in result.stderr
    assert "table-checksums.sql cannot be read" in (tmp_path / "mail").read_text()
    assert backups.keys() == []


def test_one_failed_database_does_not_stop_the_others(backups, databases):
    good, missing = databases(), f"bk_missing_{uuid.uuid4().hex[:6]}"
    result = backups.backup(f"{STAGE}:{missing}", f"{STAGE}:{good}")
    assert result.returncode != 0
    assert f"FAILED {STAGE}/{missing}/" in result.stderr
    assert backups.keys(f"{STAGE}/{missing}/") == []
    only_dump(backups, good)


def test_a_second_run_does_not_start_while_one_holds_the_lock(backups, databases, tmp_path):
    source = databases()
    lock = tmp_path / "backup.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = backups.backup(f"{STAGE}:{source}")
    assert result.returncode != 0
    assert "another backup run holds the lock" in result.stderr
    assert backups.keys() == []


def test_the_dump_streams_to_s3_without_a_temporary_file(backups, databases):
    """Finding 9: the dump's temporary file shared the database's disk. No file is written at all now:
    with nowhere to write one, the backup still succeeds."""
    source = databases()
    result = backups.backup(f"{STAGE}:{source}", TMPDIR="/nonexistent/katforge-tmp")
    assert result.returncode == 0, result.stderr
    only_dump(backups, source)


def session(pg, database: str, *statements: str) -> subprocess.Popen:
    """A psql session that runs the statements and then stays connected, in its transaction, until closed."""
    process = subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database], env=pg.env(),
                               stdin=subprocess.PIPE, text=True)
    process.stdin.write("".join(f"{s};\n" for s in statements) + "SELECT pg_sleep(0);\n")
    process.stdin.flush()
    return process


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_dump_waiting_for_a_lock_gives_up_before_a_migration_queued_behind_it_would(backups, databases, pg):
    """Finding 9: pg_dump locks its tables one by one and holds each; stuck behind a transaction on one
    of them, it held a migration waiting for another indefinitely. It waits BACKUP_LOCK_WAIT at most."""
    source = databases()
    pg.psql("CREATE TABLE later (id int)", database=source)  # pg_dump locks players first (lower OID)
    holder = session(pg, source, "BEGIN", "LOCK TABLE later IN ACCESS EXCLUSIVE MODE")
    backup = subprocess.Popen(["bash", str(BACKUP), f"{STAGE}:{source}"], stderr=subprocess.PIPE, text=True,
                              env=backups.env(backups.writer, BACKUP_RUN_AS=RUN_AS, BACKUP_LOCK=str(backups.work / "lock"),
                                              BACKUP_LOCK_WAIT="1s", BACKUP_TRIES="1"))
    try:
        wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 f"AND datname = '{source}' AND application_name = 'pg_dump'") == "1",
                 "pg_dump to wait for the lock")
        # The migration: it waits for pg_dump's lock on players, and gives up after 4 s of waiting.
        started = time.monotonic()
        pg.psql("SET lock_timeout = '4s'; ALTER TABLE players ADD COLUMN migrated int", database=source)
        assert time.monotonic() - started < 3
        _, errors = backup.communicate(timeout=30)
    finally:
        holder.communicate("ROLLBACK;\n", timeout=10)
        backup.kill()
    assert backup.returncode != 0
    assert f"FAILED {STAGE}/{source}/" in errors and "stayed locked for 1s" in errors, errors
    assert backups.keys() == []


class FaultyS3:
    """An HTTP proxy in front of moto that passes requests on, except those `fault` picks: each of them
    reaches S3 but its answer never comes back (`lost="answer"`), or never reaches S3 (`lost="request"`);
    either way the connection closes, as a network failure would close it."""

    def __init__(self, upstream: str, fault: Callable[[str, str], bool], lost: str):
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    body = b""
                    while True:
                        line = self.rfile.readline()
                        body += line
                        size = int(line.split(b";")[0], 16)
                        body += self.rfile.read(size + 2)
                        if size == 0:
                            break
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                faulty = fault(self.command, self.path)
                if faulty and lost == "request":
                    self.close_connection = True
                    return
                upstream_connection = http.client.HTTPConnection(host, int(port), timeout=30)
                upstream_connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream_connection.getresponse()
                data = answer.read()
                upstream_connection.close()
                if faulty:
                    proxy.faults += 1
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(name, value)
                # A HEAD's length is the object's; it comes without a body.
                self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.faults = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("lost", ["answer", "request"])
def test_failed_means_no_complete_dump_in_the_bucket(backups, databases, lost):
    """Finding 8: a dump whose upload reported an error after the object had landed was logged FAILED.
    Whether it landed is asked of S3 (a HEAD of the key, the whole size)."""
    source = databases()
    proxy = FaultyS3(backups.s3.endpoint, lambda method, path: method == "PUT" and path.endswith(".dump"), lost)
    backups.endpoint = proxy.url
    try:
        result = backups.backup(f"{STAGE}:{source}", AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    finally:
        proxy.stop()
    if lost == "answer":
        assert proxy.faults >= 1
        assert result.returncode == 0, result.stderr
        assert "FAILED" not in result.stderr
        key = only_dump(backups, source)
        assert "the upload reported an error, but the whole object" in result.stderr
        assert backups.manifest(key)["sha256"] == hashlib.sha256(backups.get(key)).hexdigest()
    else:
        assert result.returncode != 0
        assert f"FAILED {STAGE}/{source}/" in result.stderr and "no complete object" in result.stderr
        assert backups.keys() == []


def test_the_writer_adds_and_reads_dumps_but_cannot_delete_or_write_elsewhere(backups):
    """The host writes the dumps and reads them back (the drill, confirming an upload); it may never
    delete one (versions included) nor write outside a stage's prefix."""
    key = f"{STAGE}/katforge/20240101T033000Z.dump"
    backups.put(key, b"PGDMP")
    writer = backups.s3.client("s3", backups.writer)
    assert writer.get_object(Bucket=backups.bucket, Key=key)["Body"].read() == b"PGDMP"
    assert [o["Key"] for o in writer.list_objects_v2(Bucket=backups.bucket)["Contents"]] == [key]
    version = backups.admin.list_object_versions(Bucket=backups.bucket)["Versions"][0]["VersionId"]
    denied = [
        lambda: writer.delete_object(Bucket=backups.bucket, Key=key),
        lambda: writer.delete_object(Bucket=backups.bucket, Key=key, VersionId=version),
        lambda: writer.put_object(Bucket=backups.bucket, Key="elsewhere/katforge.dump", Body=b"x"),
        lambda: writer.put_bucket_lifecycle_configuration(Bucket=backups.bucket, LifecycleConfiguration={"Rules": []}),
    ]
    for call in denied:
        with pytest.raises(ClientError, match="AccessDenied"):
            call()
    for stage in STAGES:
        writer.put_object(Bucket=backups.bucket, Key=f"{stage}/katforge/probe.dump", Body=b"x")
