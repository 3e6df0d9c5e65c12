"""`hearth status` against the local estate: the running cluster (tests/kube_api.py), a TLS server with
certificates of a test CA (tests/tls_server.py), a DNS server (tests/dns_server.py) and the backup bucket
in moto's S3. Every probe goes to 127.0.0.1: --connect-to and --dns-server point them there.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from hearth.cli import main
from tests import kube_api, scaled
from tests.kube_api import AppState, Reply, app_objects, iso, status
from tools.offline import ROOT, effective_config

pytest_plugins = ["tests.kube_api", "tests.tls_server", "tests.dns_server", "tests.live_account"]

BUCKET = "hearth-test-backups"
SCHEMA = ROOT / "hearth" / "status.schema.json"


@dataclass
class Result:
    code: int
    out: str
    err: str


def dump_key(stage: str, database: str, at: datetime.datetime) -> str:
    return f"{stage}/{database}/{at.strftime('%Y%m%dT%H%M%SZ')}.dump"


@pytest.fixture(scope="session")
def backups(moto_server, running_cluster):
    """The bucket as the backup timer fills it: prod's newest dump 5 h old, qa's 50 h (a missed run)."""
    account = moto_server.account("333333333333")
    s3 = account.client("s3")
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    now = running_cluster.now
    for key, size in ((dump_key("prod", "katforge", now - datetime.timedelta(hours=29)), 1400),
                      (dump_key("prod", "katforge", now - datetime.timedelta(hours=5)), 1536),
                      ("prod/katforge/README", 10),  # not a dump
                      (dump_key("qa", "katforge_qa", now - datetime.timedelta(hours=50)), 900)):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" * size)
        s3.put_object(Bucket=BUCKET, Key=key.replace(".dump", ".manifest.json"), Body=b"{}")
    for stage, database, days in (("prod", "katforge", 10), ("qa", "katforge_qa", 3)):
        put_drill(s3, BUCKET, stage, ok=True, started=now - datetime.timedelta(days=days),
                  dump=dump_key(stage, database, now - datetime.timedelta(days=days, hours=2)))
    return account


def put_drill(s3, bucket: str, stage: str, *, ok: bool, started: datetime.datetime, dump: str = "",
              error: str = "") -> None:
    """The drill's result as katforge-drill publishes it (the backups' notes: <stage>/drill/latest.json)."""
    result = {"stage": stage, "ok": ok, "error": error or None, "started": iso(started), "mismatches": []}
    if ok:
        result.update({"database": dump.split("/")[1], "dump": dump, "database_bytes": 650_000_000,
                       "seconds": {"download_and_verify": 7.3, "restore": 31.2, "total": 38.5},
                       "restore_mib_per_s": 19.9, "tables": 41, "sequences": 37})
    s3.put_object(Bucket=bucket, Key=f"{stage}/drill/latest.json", Body=json.dumps(result).encode())


@pytest.fixture
def hearth(running_cluster, tls_server, dns_server, backups, tmp_path, monkeypatch):
    """Run hearth in-process against the local estate: (argv...) -> Result."""
    for name, value in backups.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BACKUP_BUCKET", BUCKET)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.authority.ca_file))
    monkeypatch.setenv("KUBECONFIG", str(running_cluster.kubeconfig(tmp_path / "katforge-config")))

    def run(*argv: str, probes: bool = True) -> Result:
        out, err = io.StringIO(), io.StringIO()
        # A timeout that a busy machine never reaches: only what hangs waits for it (tests of hanging set less).
        local = ["--dns-server", dns_server.address, "--connect-to", f"::127.0.0.1:{tls_server.port}",
                 "--timeout", "5"] if probes else []
        code = main([argv[0], *local, *argv[1:]], environ=os.environ, stdout=out, stderr=err, now=running_cluster.now)
        return Result(code, out.getvalue().replace(running_cluster.url, "http://127.0.0.1:PORT"), err.getvalue())
    return run


def swap_app(api, stage: str, app: str, state: AppState) -> None:
    """Replace the app's Deployment, ReplicaSets and pods with those of another state (inside `api.kept()`)."""
    namespace = "default" if stage == "prod" else stage
    for (kind, ns, name), obj in list(api.objects.items()):
        if ns == namespace and kind.kind in ("Deployment", "ReplicaSet", "Pod") and \
                (obj["metadata"].get("labels") or {}).get("app") == app:
            api.remove(kind.api_version, kind.kind, name, ns)
    objects, _ = app_objects(stage, app, api.now, state=state)
    api.add(*objects)


def normalized(text: str) -> str:
    """The table with the one thing that depends on the moment: the newest dump's name."""
    return re.sub(r"\d{8}T\d{6}Z\.dump", "<timestamp>.dump", text)


HEALTHY = """\
prod (namespace default) at http://127.0.0.1:PORT

APP      VERSION  READY  RESTARTS  ROLLED OUT  STATE  ROUTES
api      v1.4.2   1/1    0         2d ago      ok     api.katforge.com
web      v1.4.2   1/1    0         2d ago      ok     katforge.com, www.katforge.com -> katforge.com
lextris  v1.4.2   1/1    0         2d ago      ok     katforge.com/play/lextris/
stumper  v1.4.2   1/1    0         2d ago      ok     stumper.gg

CHECK        SUBJECT                                          STATE  DETAIL
backup       s3://hearth-test-backups/prod/katforge/          ok     <timestamp>.dump: 1.5 KiB, 5 h old
drill        s3://hearth-test-backups/prod/drill/latest.json  ok     <timestamp>.dump restored in 31 s, 10 days ago
certificate  api.katforge.com                                 ok     expires in 60 days
certificate  katforge.com                                     ok     expires in 60 days
certificate  stumper.gg                                       ok     expires in 60 days
certificate  www.katforge.com                                 ok     expires in 60 days
dns          katforge.com                                     ok     resolves to 3.19.192.157
dns          www.katforge.com                                 ok     resolves to 3.19.192.157
dns          api.katforge.com                                 ok     resolves to 3.19.192.157
dns          stumper.gg                                       ok     resolves to 3.19.192.157
dns          k3s.katforge.com                                 ok     resolves to 3.19.192.157
dns          vpn.katforge.com                                 ok     resolves to 3.15.140.218
memory       ip-172-31-14-98                                  ok     no memory pressure; allocatable 2075 MiB, the pods' limits 2062 MiB (budget: 2075 MiB allocatable)

healthy
"""


def test_a_healthy_estate(hearth):
    result = hearth("status")
    assert (result.code, result.err) == (0, "")
    assert normalized(result.out) == HEALTHY


CRASH_LOOPING_ROWS = """\
APP      VERSION  READY  RESTARTS  ROLLED OUT  STATE          ROUTES
api      v1.4.2   1/1    0         2d ago      ok             api.katforge.com
web      v1.4.2   0/1    7         2d ago      crash-looping  katforge.com, www.katforge.com -> katforge.com
    web is crash-looping: restarted 7 times, last exit code 255 (Error)
lextris  v1.4.2   1/1    0         2d ago      ok             katforge.com/play/lextris/
stumper  v1.4.2   1/1    0         2d ago      ok             stumper.gg
"""


def test_a_crash_looping_app(hearth, running_cluster):
    with running_cluster.kept():
        swap_app(running_cluster, "prod", "web", AppState("crash-loop"))
        result = hearth("status")
    assert result.code == 1
    assert CRASH_LOOPING_ROWS in result.out
    assert result.out.endswith("\nunhealthy: web (crash-looping)\n")


FAILED_MIGRATION_ROWS = """\
APP      VERSION  READY  RESTARTS  ROLLED OUT  STATE   ROUTES
api      v1.5.0   1/1    3         28m ago     failed  api.katforge.com
    migrate failed 4 times, exit code 1 (Error): In AbstractPostgreSQLDriver.php line 79: An exception occurred \
in the driver: SQLSTATE[08006] [7] connection to server at "172.31.14.98", port 5432 failed: FATAL: password \
authentication failed for user "katforge"
web      v1.4.2   1/1    0         2d ago      ok      katforge.com, www.katforge.com -> katforge.com
"""


def test_a_failed_migration(hearth, running_cluster):
    """A rollout to v1.5.0 whose migrate init container fails: v1.4.2's pod still serves (1/1), the
    rollout is failed with the container's reason."""
    with running_cluster.kept():
        swap_app(running_cluster, "prod", "api", AppState("migrate-failed"))
        result = hearth("status")
        report = json.loads(hearth("status", "--json").out)
    assert result.code == 1
    assert FAILED_MIGRATION_ROWS in result.out
    assert result.out.endswith("\nunhealthy: api (failed)\n")
    [api] = [a for a in report["apps"] if a["name"] == "api"]
    assert api["rollout"]["state"] == "failed"
    assert api["rollout"]["message"].startswith("migrate failed 4 times, exit code 1 (Error): In AbstractPostgreSQLDriver")
    assert report["problems"] == [f"api: {api['rollout']['message']}"]


def scale_to_zero(api, namespace: str, app: str) -> None:
    """What `kubectl scale --replicas=0` leaves (katforge-restore --stop-apps does it): the spec at 0, its
    ReplicaSet at 0, no pod; the rollout complete, as far as the Deployment's status tells."""
    deployment = api.get("apps/v1", "Deployment", app, namespace)
    deployment["spec"]["replicas"] = 0
    deployment["metadata"]["generation"] += 1
    deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"],
                            "conditions": deployment["status"]["conditions"]}
    api.add(deployment)
    for (kind, ns, name), obj in list(api.objects.items()):
        if ns == namespace and (obj["metadata"].get("labels") or {}).get("app") == app:
            if kind.kind == "Pod":
                api.remove("v1", "Pod", name, ns)
            elif kind.kind == "ReplicaSet" and obj["spec"]["replicas"]:
                obj = api.get("apps/v1", "ReplicaSet", name, ns)
                obj["spec"]["replicas"], obj["status"] = 0, {"replicas": 0, "observedGeneration": 1}
                api.add(obj)


def test_an_app_scaled_to_zero_is_down(hearth, running_cluster):
    """Left at 0 by a restore that stopped the apps and never started them, or by hand: the rollout is
    complete and nothing serves."""
    with running_cluster.kept():
        scale_to_zero(running_cluster, "default", "stumper")
        result = hearth("status")
        report = json.loads(hearth("status", "--json").out)
    assert result.code == 1
    assert ("stumper  v1.4.2   0/0    0         2d ago      scaled-down  stumper.gg\n"
            "    scaled to 0, the program declares 1: `kubectl -n default scale deployment/stumper --replicas=1`\n"
            ) in result.out
    assert result.out.endswith("\nunhealthy: stumper (scaled-down)\n")
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(report)
    [stumper] = [a for a in report["apps"] if a["name"] == "stumper"]
    assert stumper["replicas"] == {"desired": 0, "declared": 1, "ready": 0, "updated": 0, "available": 0}
    assert report["problems"] == ["stumper: scaled to 0, the program declares 1: "
                                  "`kubectl -n default scale deployment/stumper --replicas=1`"]


def test_qa_is_its_namespace_its_names_and_its_dumps(hearth):
    result = hearth("status", "--qa")
    assert result.code == 1  # qa's newest dump is 50 h old
    lines = result.out.splitlines()
    assert lines[0] == "qa (namespace qa) at http://127.0.0.1:PORT"
    assert [line.split()[0] for line in lines[3:5]] == ["api", "web"]
    assert "qa.api.katforge.com" in lines[3] and "qa.katforge.com" in lines[4]
    checks = {tuple(line.split()[:3]) for line in lines if line.split()[:1] in (["dns"], ["certificate"])}
    assert checks == {("certificate", "qa.api.katforge.com", "ok"), ("certificate", "qa.katforge.com", "ok"),
                      ("dns", "qa.katforge.com", "ok"), ("dns", "qa.api.katforge.com", "ok")}
    assert check_row(result.out, "backup", "s3://hearth-test-backups/qa/katforge_qa/").startswith("stale")
    assert check_row(result.out, "drill", "s3://hearth-test-backups/qa/drill/latest.json").startswith("ok ")
    assert "the newest dump is 50 h old, over 26 h" in result.out
    assert result.out.endswith("unhealthy: backup s3://hearth-test-backups/qa/katforge_qa/ (stale)\n")


# --- JSON ----------------------------------------------------------------------------------------------

def test_json_is_the_documented_schema_and_stable(hearth):
    first, second = hearth("status", "--json"), hearth("status", "--json")
    assert first.code == 0 and first.out == second.out
    report = json.loads(first.out)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(report)
    assert first.out == json.dumps(report, indent=2, sort_keys=True) + "\n"  # sorted keys
    assert report["healthy"] is True and report["problems"] == []
    [api] = [a for a in report["apps"] if a["name"] == "api"]
    assert (api["version"], api["image"], api["revision"]) == ("v1.4.2", "ghcr.io/katforge/api.katforge.com:v1.4.2", 7)
    assert api["replicas"] == {"desired": 1, "declared": 1, "ready": 1, "updated": 1, "available": 1}
    assert report["backup"]["sizeBytes"] == 1536 and report["backup"]["ageSeconds"] == 5 * 3600
    assert {c["name"]: c["daysLeft"] for c in report["certificates"]} == dict.fromkeys(
        ["api.katforge.com", "katforge.com", "stumper.gg", "www.katforge.com"], 60)
    assert report["memory"]["budget"]["allocatableMiB"] == report["memory"]["nodes"][0]["allocatableMiB"]


def test_an_unhealthy_report_keeps_to_the_schema(hearth, running_cluster, tls_server, dns_server):
    schema = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    with running_cluster.kept():
        swap_app(running_cluster, "prod", "web", AppState("crash-loop"))
        running_cluster.remove("apps/v1", "Deployment", "stumper", "default")
        dns_server.silent.add("vpn.katforge.com")
        try:
            result = hearth("status", "--json", "--timeout", "0.3")
        finally:
            dns_server.silent.discard("vpn.katforge.com")
    report = json.loads(result.out)
    schema.validate(report)
    assert result.code == 1 and not report["healthy"]
    assert {a["name"]: a["state"] for a in report["apps"]} == {"api": "ok", "web": "crash-looping", "lextris": "ok",
                                                              "stumper": "missing"}
    assert "stumper: no Deployment stumper in namespace default" in report["problems"]
    assert [d["state"] for d in report["dns"] if d["name"] == "vpn.katforge.com"] == ["unreachable"]


# --- the checks beyond the cluster ------------------------------------------------------------------------

def check_row(out: str, check: str, subject: str) -> str:
    [row] = [line for line in out.splitlines() if line.split()[:2] == [check, subject]]
    return " ".join(row.split()[2:])


def test_certificates_expiring_expired_untrusted_or_unreachable(hearth, tls_server, running_cluster):
    now = datetime.datetime.now(datetime.timezone.utc)
    authority = tls_server.authority
    tls_server.by_name.update({
        "katforge.com": authority.issue("soon", ["katforge.com"], now + datetime.timedelta(days=5, hours=1)),
        "www.katforge.com": authority.issue("gone", ["www.katforge.com"], now - datetime.timedelta(days=2, hours=1)),
        "stumper.gg": authority.issue("self", ["stumper.gg"], now + datetime.timedelta(days=80), self_signed=True),
    })
    try:
        out = main(["status", "--connect-to", f"api.katforge.com:443:127.0.0.1:{tls_server.silent_port}",
                    "--connect-to", f"::127.0.0.1:{tls_server.port}", "--dns-server", hearth_dns(hearth),
                    "--timeout", "1"], environ=os.environ, stdout=(buffer := io.StringIO()), stderr=io.StringIO(),
                   now=running_cluster.now)
    finally:
        tls_server.by_name.clear()
    text = buffer.getvalue()
    assert out == 1
    assert check_row(text, "certificate", "katforge.com").startswith(
        "expiring expires in 5 days: Traefik renews at 30 days left, so renewal is failing")
    assert check_row(text, "certificate", "www.katforge.com") == "expired expired 3 days ago"
    assert check_row(text, "certificate", "stumper.gg").startswith("untrusted not trusted: self-signed certificate")
    assert check_row(text, "certificate", "api.katforge.com") == "unreachable no answer within 1 s"
    assert {"katforge.com", "www.katforge.com", "stumper.gg"} <= set(tls_server.seen)  # each asked by its name


def hearth_dns(hearth) -> str:
    return hearth.__closure__ and next(c.cell_contents.address for c in hearth.__closure__
                                       if hasattr(c.cell_contents, "silent"))


def test_dns_names_that_resolve_elsewhere_not_at_all_or_never_answer(hearth, dns_server):
    saved = dict(dns_server.records)
    dns_server.records["stumper.gg"] = ("A", "203.0.113.9")
    dns_server.records["katforge.com"] = ("A", "3.19.192.157,203.0.113.10")  # a stray second record
    del dns_server.records["k3s.katforge.com"]
    dns_server.silent.add("vpn.katforge.com")
    try:
        result = hearth("status", "--timeout", "0.3")
    finally:
        dns_server.records.clear()
        dns_server.records.update(saved)
        dns_server.silent.discard("vpn.katforge.com")
    assert result.code == 1
    assert check_row(result.out, "dns", "stumper.gg") == "wrong resolves to 203.0.113.9, declared 3.19.192.157"
    assert check_row(result.out, "dns", "k3s.katforge.com") == "unresolved does not resolve (NXDOMAIN)"
    # Whichever fires first: the resolver's own timeout or the checks' common deadline, both 0.3 s.
    assert re.fullmatch(r"unreachable no answer (within 0\.3 s|from 127\.0\.0\.1: timed out)",
                        check_row(result.out, "dns", "vpn.katforge.com"))
    assert check_row(result.out, "dns", "katforge.com") == "wrong resolves to 203.0.113.10, 3.19.192.157, declared 3.19.192.157"
    assert check_row(result.out, "dns", "www.katforge.com") == (  # through its CNAME
        "wrong resolves to 203.0.113.10, 3.19.192.157, declared 3.19.192.157")
    assert check_row(result.out, "dns", "api.katforge.com").startswith("wrong")


def test_checks_that_hang_are_cut_at_their_timeout(hearth, dns_server, tls_server, running_cluster):
    """Every DNS server silent and every handshake hanging: the answer still comes, after the timeout."""
    import time
    dns_server.silent.update(dns_server.records)
    try:
        started = time.monotonic()
        code = main(["status", "--dns-server", dns_server.address, "--connect-to", f"::127.0.0.1:{tls_server.silent_port}",
                     "--timeout", "0.3"], environ=os.environ, stdout=(out := io.StringIO()), stderr=io.StringIO(),
                    now=running_cluster.now)
        took = time.monotonic() - started
    finally:
        dns_server.silent.clear()
    assert code == 1 and took < 3  # not one 0.3 s wait per name, and nothing left hanging
    rows = [line.split()[2] for line in out.getvalue().splitlines() if line.split()[:1] in (["dns"], ["certificate"])]
    assert rows == ["unreachable"] * 10


def test_the_system_resolver_is_the_default():
    from hearth import probes
    assert probes.resolves("localhost", "127.0.0.1", None).state == "ok"


def test_a_newer_dump_without_its_manifest_did_not_complete(hearth, monkeypatch, backups, running_cluster):
    s3, now = backups.client("s3"), running_cluster.now
    s3.create_bucket(Bucket="hearth-unfinished", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    complete = dump_key("prod", "katforge", now - datetime.timedelta(hours=3))
    s3.put_object(Bucket="hearth-unfinished", Key=complete, Body=b"x" * 2048)
    s3.put_object(Bucket="hearth-unfinished", Key=complete.replace(".dump", ".manifest.json"), Body=b"{}")
    s3.put_object(Bucket="hearth-unfinished", Key=dump_key("prod", "katforge", now - datetime.timedelta(hours=1)),
                  Body=b"x" * 99)
    put_drill(s3, "hearth-unfinished", "prod", ok=True, started=now, dump=complete)
    monkeypatch.setenv("BACKUP_BUCKET", "hearth-unfinished")
    result = hearth("status", "--json")
    backup = json.loads(result.out)["backup"]
    assert result.code == 1
    assert (backup["state"], backup["key"], backup["sizeBytes"]) == ("incomplete", complete, 2048)
    assert backup["message"].endswith("has no manifest: it did not complete (or is uploading now); the newest "
                                      "complete one is 3 h old")


def test_a_failed_an_old_or_no_drill(hearth, monkeypatch, backups, running_cluster):
    s3, now = backups.client("s3"), running_cluster.now
    s3.create_bucket(Bucket="hearth-drills", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    monkeypatch.setenv("BACKUP_BUCKET", "hearth-drills")
    subject = "s3://hearth-drills/prod/drill/latest.json"
    absent = check_row(hearth("status").out, "drill", subject)
    put_drill(s3, "hearth-drills", "prod", ok=False, started=now - datetime.timedelta(days=2),
              error="pg_restore: error: could not read from input file: end of file")
    failed_run = hearth("status")
    failed = check_row(failed_run.out, "drill", subject)
    assert failed_run.out.endswith(f"drill {subject} (failed)\n")  # one of the unhealthy things
    assert f"drill: {failed.removeprefix('failed ')}" in json.loads(hearth("status", "--json").out)["problems"]
    put_drill(s3, "hearth-drills", "prod", ok=True, started=now - datetime.timedelta(days=40),
              dump=dump_key("prod", "katforge", now - datetime.timedelta(days=41)))
    old = check_row(hearth("status").out, "drill", subject)
    assert absent == "missing no drill has run: s3://hearth-drills/prod/drill/latest.json is absent (make drill STAGE=prod)"
    assert failed == ("failed the drill of " + f"{now - datetime.timedelta(days=2):%Y-%m-%d}"
                      + " failed: pg_restore: error: could not read from input file: end of file")
    assert old.startswith("stale the last drill is 40 days old, over 35")


def test_backups_missing_or_unreadable(hearth, monkeypatch, backups, running_cluster):
    s3 = backups.client("s3")
    s3.create_bucket(Bucket="hearth-empty-backups", CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    incomplete = dump_key("prod", "katforge", running_cluster.now - datetime.timedelta(hours=2))
    s3.put_object(Bucket="hearth-empty-backups", Key=incomplete, Body=b"x")
    s3.put_object(Bucket="hearth-empty-backups", Key=dump_key("prod", "katforge", running_cluster.now).replace(
        ".dump", ".manifest.json"), Body=b"{}")  # a manifest without its dump: not a dump either
    monkeypatch.setenv("BACKUP_BUCKET", "hearth-empty-backups")
    missing = hearth("status")
    monkeypatch.setenv("BACKUP_BUCKET", "hearth-no-such-bucket")
    unreadable = hearth("status")
    assert missing.code == unreadable.code == 1
    assert check_row(missing.out, "backup", "s3://hearth-empty-backups/prod/katforge/") == (
        "missing no complete dump under s3://hearth-empty-backups/prod/katforge/")
    assert check_row(unreadable.out, "backup", "s3://hearth-no-such-bucket/prod/katforge/").startswith(
        "error s3://hearth-no-such-bucket: NoSuchBucket:")


def test_without_aws_credentials_both_bucket_checks_say_what_to_set(monkeypatch, tmp_path):
    """The backup and the drill read the bucket alike (one client, one set of failures)."""
    from hearth import probes
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing is sent unsigned, but if it were: here
    now = datetime.datetime.now(datetime.timezone.utc)
    checks = [probes.newest_backup(BUCKET, "prod/katforge/", "us-east-2", now, 1),
              probes.last_drill(BUCKET, "prod", "us-east-2", now, 1)]
    assert {(c.state, c.message) for c in checks} == {(
        "error", "no AWS credentials: set AWS_PROFILE (or the AWS_* variables) to an identity with the "
                 "katforge-backup-restore policy")}


def test_memory_pressure_and_an_overcommitted_node(hearth, running_cluster):
    with running_cluster.kept():
        node = running_cluster.get("v1", "Node", "ip-172-31-14-98")
        node["status"]["conditions"][0].update(status="True", reason="KubeletHasInsufficientMemory")
        running_cluster.add(node)
        pressed = hearth("status")
        node["status"]["conditions"][0].update(status="False", reason="KubeletHasSufficientMemory")
        node["status"]["allocatable"]["memory"] = "2000Mi"
        running_cluster.add(node)
        tight = hearth("status")
    assert pressed.code == 1 and check_row(pressed.out, "memory", "ip-172-31-14-98").startswith(
        "pressure MemoryPressure on ip-172-31-14-98; allocatable 2075 MiB")
    assert tight.code == 1 and check_row(tight.out, "memory", "ip-172-31-14-98") == (
        "overcommitted allocatable 2000 MiB, the pods' limits 2062 MiB (budget: 2075 MiB allocatable): "
        "the pods can use more than the kubelet allocates")


def stack_with_agents(monkeypatch, *lines: str) -> None:
    """hearth reading a prod stack file whose katforge:k3sAgents lists these lines."""
    from hearth import estate
    config = effective_config("prod", {"katforge:k3sAgents": list(lines)})[0]
    monkeypatch.setattr(estate, "_hosts_config", lambda: config)


def agent_node(api, name: str, address: str, allocatable_mib: int) -> dict:
    """An agent as k3s registers it (infra/bootstrap.py: node-name, node-ip), no control-plane role."""
    node = api.get("v1", "Node", kube_api.NODE)
    node["metadata"] = {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}
    node["spec"] = {"podCIDR": "10.42.1.0/24", "podCIDRs": ["10.42.1.0/24"], "providerID": f"k3s://{name}"}
    node["status"]["addresses"] = [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]
    node["status"]["allocatable"]["memory"] = f"{allocatable_mib}Mi"
    return node


def test_with_an_agent_each_node_is_held_to_its_own_budget(hearth, running_cluster, monkeypatch):
    from infra import capacity
    from infra.settings import AgentSpec

    stack_with_agents(monkeypatch, *scaled.ONE_AGENT)
    host, agent = capacity.estate_report((AgentSpec(*scaled.ONE_AGENT[0].split(",")),)).nodes
    assert host.total_mib < capacity.estate_report().total_mib  # the agent takes app pods off the host
    with running_cluster.kept():
        running_cluster.add(agent_node(running_cluster, "agent-1", "172.31.14.120", agent.allocatable_mib))
        fits = hearth("status", "--json")
        # Short of the agent's own budget, though the two nodes together allocate more than all the pods need.
        short = agent.total_mib - 1
        assert host.allocatable_mib + short > host.total_mib + agent.total_mib
        running_cluster.add(agent_node(running_cluster, "agent-1", "172.31.14.120", short))
        tight = hearth("status")
        running_cluster.remove("v1", "Node", "agent-1")
        gone = hearth("status")
    report = json.loads(fits.out)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(report)
    assert fits.code == 0 and report["memory"]["state"] == "ok"
    assert sorted((n["name"], n["allocatableMiB"], n["budget"]) for n in report["memory"]["nodes"]) == [
        ("agent-1", agent.allocatable_mib, {"node": "agent-1", "allocatableMiB": agent.allocatable_mib,
                                            "podLimitsMiB": agent.total_mib}),
        (kube_api.NODE, host.allocatable_mib, {"node": "k3s", "allocatableMiB": host.allocatable_mib,
                                               "podLimitsMiB": host.total_mib})]
    figures = (f"{kube_api.NODE}: allocatable {host.allocatable_mib} MiB, the pods' limits {host.total_mib} MiB "
               f"(budget: {host.allocatable_mib} MiB allocatable); agent-1: allocatable {{}} MiB, the pods' limits "
               f"{agent.total_mib} MiB (budget: {agent.allocatable_mib} MiB allocatable)")
    assert report["memory"]["message"] == "no memory pressure; " + figures.format(agent.allocatable_mib)
    assert tight.code == 1 and memory_row(tight.out) == (
        f"memory agent-1, {kube_api.NODE} overcommitted {figures.format(short)}: the pods can use more than the "
        "kubelet allocates on agent-1")
    assert gone.code == 1 and memory_row(gone.out) == (
        f"memory {kube_api.NODE} missing {figures.split('; ')[0]}; agent agent-1 is not in the cluster (no node "
        "agent-1)")


def test_an_agent_line_the_program_refuses_is_refused_in_the_programs_words(hearth, monkeypatch):
    stack_with_agents(monkeypatch, "agent-1,t3.medium")
    result = hearth("status", probes=False)
    assert result.code == 2 and one_line(result) == (
        'hearth: Pulumi.prod.yaml: katforge:k3sAgents = agent-1,t3.medium: expected "name,instanceType,privateIp", '
        'e.g. "agent-1,t3.medium,172.31.14.120", but the line has 2 comma-separated parts, not 3\n')


def memory_row(out: str) -> str:
    [row] = [line for line in out.splitlines() if line.startswith("memory ")]
    return " ".join(row.split())


# --- the cluster cannot be asked -------------------------------------------------------------------------

def one_line(result: Result) -> str:
    assert result.out == "" and result.err.count("\n") == 1 and result.err.startswith("hearth: "), result
    return result.err


def test_no_kubeconfig(hearth, tmp_path):
    result = hearth("status", "--kubeconfig", str(tmp_path / "absent"), probes=False)
    assert result.code == 2
    assert one_line(result) == (f"hearth: no kubeconfig at {tmp_path / 'absent'}: write it with `(umask 077; mkdir -p "
                                "~/.kube && pulumi stack output kubeconfig --show-secrets --stack prod > "
                                "~/.kube/katforge-config)`, or pass --kubeconfig or set KUBECONFIG\n")


def test_the_written_kubeconfig_is_its_owners_alone_whatever_the_umask(hearth, tmp_path):
    """The hint's command, run by bash with the usual umask 022, `pulumi` a stand-in printing a kubeconfig."""
    [command] = re.findall(r"`([^`]+)`", one_line(hearth("status", "--kubeconfig", str(tmp_path / "absent"),
                                                         probes=False)))
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "pulumi").write_text('#!/bin/sh\n[ "$*" = "stack output kubeconfig --show-secrets --stack prod" ] && '
                                    'echo "apiVersion: v1"\n')
    (bin_dir / "pulumi").chmod(0o755)
    subprocess.run(["bash", "-c", f"umask 022; {command}"], check=True, timeout=30,
                   env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)})
    written = home / ".kube" / "katforge-config"
    assert written.read_text() == "apiVersion: v1\n"
    assert (stat.S_IMODE(written.stat().st_mode), stat.S_IMODE(written.parent.stat().st_mode)) == (0o600, 0o700)


def test_the_default_kubeconfig_is_the_operators(hearth, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = hearth("status", probes=False)
    assert result.code == 2 and f"no kubeconfig at {tmp_path}/.kube/katforge-config" in one_line(result)


def test_an_unreachable_cluster(hearth, tmp_path):
    import socket
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        config = tmp_path / "kubeconfig"
        config.write_text(Path(os.environ["KUBECONFIG"]).read_text().replace(
            _server(), f"http://127.0.0.1:{port}"))
        result = hearth("status", "--kubeconfig", str(config))  # the probes start first: at 127.0.0.1 too
    assert result.code == 2
    assert one_line(result).startswith(f"hearth: cannot reach the cluster at http://127.0.0.1:{port} (ConnectError: ")
    assert result.err.endswith("): the k3s API answers only through the VPN\n")


def _server() -> str:
    import yaml
    return yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())["clusters"][0]["cluster"]["server"]


def test_refused_credentials_and_a_broken_kubeconfig(hearth, tmp_path):
    import yaml
    config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    config["users"][0]["user"]["token"] = "not-the-token"
    (tmp_path / "wrong").write_text(yaml.safe_dump(config))
    (tmp_path / "broken").write_text("clusters: [")
    refused = hearth("status", "--kubeconfig", str(tmp_path / "wrong"))
    broken = hearth("status", "--kubeconfig", str(tmp_path / "broken"), probes=False)
    assert refused.code == broken.code == 2
    assert one_line(refused).startswith("hearth: the cluster at http://127.0.0.1:") and \
        refused.err.endswith(f"refused the credentials of {tmp_path / 'wrong'}: 401 Unauthorized\n")
    assert one_line(broken).startswith(f"hearth: {tmp_path / 'broken'} is not a usable kubeconfig: ")


@pytest.mark.parametrize("reply, told", [
    (lambda: status(500, "InternalError", "etcdserver: request timed out"), "500: etcdserver: request timed out"),
    (lambda: status(404, "NotFound", "the server could not find the requested resource"),
     "404: the server could not find the requested resource"),
    (lambda: Reply(502, [b"<html><body>502 Bad Gateway</body></html>"], "text/html"), "502: Bad Gateway"),  # a proxy's
])
def test_an_error_answer_is_one_line(hearth, running_cluster, reply, told):
    with running_cluster.answering("GET", r"^/apis/apps/v1/namespaces/default/deployments$", reply):
        result = hearth("status")
    assert result.code == 2
    assert one_line(result) == (f"hearth: the cluster at {running_cluster.url} answered GET "
                                f"/apis/apps/v1/namespaces/default/deployments with {told}\n")


def test_bad_usage_is_one_line_too(hearth):
    result = hearth("status", "--connect-to", "nonsense", probes=False)
    assert result.code == 2
    assert one_line(result) == ("hearth: hearth status: argument --connect-to: --connect-to nonsense: expected "
                                "NAME:PORT:ADDRESS:PORT (NAME and PORT may be empty) (see hearth --help)\n")


def test_the_console_script_exits_2_on_a_missing_cluster(tmp_path):
    """The installed entry point (`python -m hearth` runs the same main) against no cluster at all."""
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "hearth", "status"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"hearth: no kubeconfig at {tmp_path / 'none'}") and done.stderr.count("\n") == 1


def test_the_estate_as_the_operators_left_it(kube_api, tls_server, dns_server, backups, tmp_path, monkeypatch):
    """Before the first deployment (tests/kube_api.py's live estate): Deployments without a migrate init
    container or ReplicaSets, no node listed. Read as it is, the missing node told."""
    for name, value in backups.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BACKUP_BUCKET", BUCKET)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.authority.ca_file))
    out = io.StringIO()
    code = main(["status", "--json", "--kubeconfig", str(kube_api.kubeconfig(tmp_path / "config")), "--dns-server",
                 dns_server.address, "--connect-to", f"::127.0.0.1:{tls_server.port}"], environ=os.environ,
                stdout=out, stderr=io.StringIO())
    report = json.loads(out.getvalue())
    assert code == 1 and report["problems"] == ["memory: the cluster lists no node"]
    assert {a["name"]: (a["state"], a["version"], a["revision"], a["lastRollout"]) for a in report["apps"]} == dict.fromkeys(
        ["api", "web", "lextris", "stumper"], ("ok", "v1.4.2", 7, "2025-03-02T10:15:00Z"))
