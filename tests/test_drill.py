"""The restore drill (infra/host/drill-database.sh), run as the host's timer runs it: with the host's own
credentials (the writer policy, which reads its dumps back), on the small drill-like database of
tests/test_restore.py, against PostgreSQL 16 and moto's S3."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.s3_sandbox import DRILL, RUN_AS, STAGE, Backups
from tests.test_restore import Drill, databases_like

pytest_plugins = ["tests.s3_sandbox"]


@pytest.fixture(scope="module")
def drill(s3, pg, tmp_path_factory) -> Drill:
    made = Drill(s3, pg, tmp_path_factory.mktemp("drill"))
    yield made
    made.remove()


def run_drill(backups: Backups, database: str, **env: str) -> subprocess.CompletedProcess:
    alerts = backups.work / "alerts.txt"
    # What the alert would say, kept in a file: the mail itself is tests/test_alerts.py's.
    alert = backups.work / "alert"
    alert.write_text(f'#!/bin/sh\n{{ echo "$*"; cat; }} >> "{alerts}"\n')
    alert.chmod(0o755)
    return subprocess.run(["bash", str(DRILL), "--stage", STAGE, "--database", database],
                          env=backups.env(backups.writer, RESTORE_RUN_AS=RUN_AS, ALERT_COMMAND=str(alert),
                                          DRILL_LOCK=str(backups.work / "drill.lock"), **env),
                          capture_output=True, text=True, timeout=60)


def test_the_drill_restores_the_latest_dump_checks_it_against_its_manifest_and_drops_the_copy(drill, pg):
    backups = drill.backups
    result = run_drill(backups, drill.database)
    assert result.returncode == 0, result.stderr
    outcome = json.loads((backups.work / "state" / "drill" / f"{STAGE}.json").read_text())
    assert outcome["ok"] is True and outcome["error"] is None and outcome["mismatches"] == []
    assert outcome["dump"] == drill.key and outcome["database"] == drill.database
    # Every table and sequence of the drill database was compared.
    assert outcome["tables"] == 5 and outcome["sequences"] == 5
    assert outcome["database_bytes"] == backups.manifest(drill.key)["database"]["size"]
    assert 0 < outcome["seconds"]["restore"] <= outcome["seconds"]["total"]
    assert f"ok: {drill.key} restored in" in result.stderr and "5 tables and 5 sequences match" in result.stderr
    # Where `hearth status` reads it; the scratch database is gone.
    assert json.loads(backups.get(f"{STAGE}/drill/latest.json")) == outcome
    assert databases_like(pg, "katforge_drill_") == []
    assert not (backups.work / "alerts.txt").exists()

    # Each backup publishes the last result again, so it outlives the dumps' expiry between drills.
    versions = len(backups.keys(f"{STAGE}/drill/"))
    assert backups.backup(f"{STAGE}:{drill.database}").returncode == 0
    assert len(backups.keys(f"{STAGE}/drill/")) == versions + 1


def test_a_drill_that_finds_a_difference_fails_names_it_and_mails(drill, pg):
    """A manifest that disagrees with what the dump restores to (here: one checksum changed, as a dump that
    missed rows would) fails the drill."""
    backups = drill.backups
    manifest = backups.manifest(drill.key)
    for relation in manifest["relations"]:
        if relation.get("table") == "game.scores":
            relation["checksum"] = "12345"
    key = f"{STAGE}/{drill.database}/29990101T000000Z.dump"  # the newest: the one the drill takes
    backups.put(key, backups.get(drill.key))
    backups.put(key.removesuffix(".dump") + ".manifest.json", json.dumps({**manifest, "dump": key}).encode())
    try:
        result = run_drill(backups, drill.database)
    finally:
        backups.admin.delete_object(Bucket=backups.bucket, Key=key)
        backups.admin.delete_object(Bucket=backups.bucket, Key=key.removesuffix(".dump") + ".manifest.json")
    assert result.returncode == 1
    assert "FAILED: 1 tables or sequences differ from the manifest" in result.stderr
    assert "game.scores: 1001 rows, checksum" in result.stderr and "checksum 12345" in result.stderr
    outcome = json.loads(backups.get(f"{STAGE}/drill/latest.json"))
    assert outcome["ok"] is False and outcome["dump"] == key
    alert = (backups.work / "alerts.txt").read_text()
    assert alert.startswith(f"restore drill FAILED ({STAGE})\n") and "game.scores" in alert
    assert databases_like(pg, "katforge_drill_") == []


def test_a_drill_with_no_dump_that_passes_fails(drill, s3, pg, tmp_path):
    backups = Backups(s3, pg, tmp_path)
    backups.put(f"{STAGE}/{drill.database}/20250101T000000Z.dump", b"PGDMP truncated")
    result = run_drill(backups, drill.database)
    assert result.returncode == 1
    assert "FAILED: the restore failed" in result.stderr
    assert json.loads(backups.get(f"{STAGE}/drill/latest.json"))["ok"] is False
    assert "restore drill FAILED" in (tmp_path / "alerts.txt").read_text()


def test_make_drill_runs_the_hosts_own_drill_unit_over_ssh():
    root = Path(__file__).resolve().parent.parent
    shown = subprocess.run(["make", "-s", "-n", "drill", "STAGE=qa", "SSH=ops@k3s.example"], cwd=root,
                           capture_output=True, text=True, check=True).stdout
    [line] = [line for line in shown.replace("\\\n", "").splitlines() if line.startswith("ssh ")]
    assert line.startswith("ssh ops@k3s.example 'since=")
    remote = shlex.split(line)[2]
    assert "sudo systemctl start katforge-drill@qa.service;" in remote
    assert "sudo journalctl --unit=katforge-drill@qa.service --since=@$since" in remote and remote.endswith("exit $status")
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
    refused = subprocess.run(["make", "-s", "drill", "STAGE=qa;reboot"], cwd=root, capture_output=True, text=True)
    assert refused.returncode == 2 and "usage: make drill STAGE=" in refused.stderr


@pytest.mark.parametrize("argument", ["TARGET=katforge;reboot", "TARGET=a b", "DATABASE=x'y", "AT=now", "STAGE=qa&&id",
                                      "DATABASE=katforge"])
def test_make_restore_sends_only_words_the_hosts_restore_accepts(argument, tmp_path):
    """ssh joins its arguments into one remote command line, so make's quotes would not reach the host."""
    root = Path(__file__).resolve().parent.parent
    ssh = tmp_path / "ssh"  # never the network: a stand-in that says it was reached
    ssh.write_text("#!/bin/sh\necho ssh reached >&2\nexit 99\n")
    ssh.chmod(0o755)
    args = dict(a.split("=", 1) for a in ("STAGE=qa", "AT=latest", "TARGET=katforge_qa", argument))
    refused = subprocess.run(["make", "-s", "restore", *(f"{k}={v}" for k, v in args.items())], cwd=root,
                             capture_output=True, text=True, env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    if argument == "DATABASE=katforge":  # the control: good words reach ssh
        assert "ssh reached" in refused.stderr
        return
    assert refused.returncode == 2 and refused.stderr.startswith("make restore: "), refused.stderr
    assert "ssh reached" not in refused.stderr
