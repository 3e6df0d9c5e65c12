"""make preflight decides what the host scripts refuse by running the scripts themselves (their check-only
mode) on a tree rebuilt from what `make discover` read. Here the same live-like host is read by the real
discovery script, checked the way preflight checks it, and then given to the real script: the verdict and
its message must be the same."""
from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from tests.test_host_k3s import CONFIG, LIVE_FLAGS, K3sHost
from tests.test_host_postgres import LIVE_HBA, SETTINGS, UBUNTU_HBA, UBUNTU_SETTINGS, LiveHost, cluster
from tools import discover_hosts, preflight
from tools.discover_targets import targets


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root (PostgreSQL's as the postgres user)")


# --- k3s-install.sh ------------------------------------------------------------------------------------

def discovered_k3s(host: K3sHost) -> dict:
    """What discover-k3s.sh reads on the host (as over SSH, here run in place)."""
    env = {**host.env, "K3S_BIN": str(host.bin / "k3s"), "K3S_DATA_DIR": str(host.root / "data"),
           "PG_BIN_DIR": str(host.root / "no-postgres")}
    result = discover_hosts.subprocess.run(["bash", str(discover_hosts.SCRIPTS["k3s"])], env=env, capture_output=True,
                                           text=True, check=True)
    lines = [line.split("\t") for line in result.stdout.splitlines() if line]
    return discover_hosts.k3s_facts(lines, targets("prod"), [])["k3s"]


def checked(host: K3sHost, version: str, config: str, **env: str) -> list[str]:
    facts = discovered_k3s(host)
    with tempfile.TemporaryDirectory() as tree:
        return preflight.host_check("k3s-install.sh", {"K3S_VERSION": version, **env,
                                                       **preflight.k3s_check_tree(Path(tree), facts)},
                                    config, Path(tree))


@pytest.fixture
def host(tmp_path):
    return K3sHost(tmp_path)


def drop_in(host: K3sHost) -> None:
    path = host.systemd / "k3s.service.d" / "override.conf"
    path.parent.mkdir()
    path.write_text(f"[Service]\nExecStart=\nExecStart={host.bin}/k3s server --write-kubeconfig-mode 644\n")


SCENARIOS = {
    # name: (how the live host differs, version, config.yaml, environment of the run)
    "live-flags": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG, {}),
    "live-flags-replaced": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "env-file-setting": (lambda h: h.live(flags=LIVE_FLAGS.replace("\t'--write-kubeconfig-mode' \\\n\t'644' \\\n", ""),
                                          env="K3S_KUBECONFIG_MODE='644'\n"), "v1.34.6+k3s1", CONFIG, {}),
    "token-in-config": (lambda h: h.live(), "v1.34.6+k3s1", CONFIG + "token: K10other::server:y\n", {}),
    "drop-in": (lambda h: (h.live(), drop_in(h)), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "downgrade": (lambda h: h.live(), "v1.34.5+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "unencrypted": (lambda h: h.live(encrypted=False), "v1.34.6+k3s1", CONFIG, {"K3S_REPLACE_LIVE_FLAGS": "1"}),
    "new-host": (lambda h: None, "v1.34.6+k3s1", CONFIG, {}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_preflight_and_k3s_install_reach_the_same_verdict(host, scenario):
    prepare, version, config, env = SCENARIOS[scenario]
    prepare(host)
    verdict = checked(host, version, config, **env)
    result = host.run(version, config, **env)
    assert verdict == (preflight.refusals("k3s-install.sh", result.stderr) if result.returncode else [])
    assert (verdict == []) == (scenario in ("live-flags-replaced", "new-host"))
    assert "K10" not in str(verdict)  # a token's value is never shown, live or planned


# --- pg-configure.sh ---------------------------------------------------------------------------------

def discovered_postgres(host) -> dict:
    """What discover-k3s.sh reads of the host's PostgreSQL (as over SSH, here run in place)."""
    env = {**host.env, "K3S_BIN": "/bin/false", "K3S_UNIT_FILE": "/nonexistent", "K3S_CONFIG_FILE": "/nonexistent"}
    result = discover_hosts.subprocess.run(["bash", str(discover_hosts.SCRIPTS["k3s"])], env=env, capture_output=True,
                                           text=True, check=True)
    lines = [line.split("\t") for line in result.stdout.splitlines() if line]
    return discover_hosts.k3s_facts(lines, targets("prod"), [])["postgres"]


def pg_checked(host) -> list[str]:
    facts = discovered_postgres(host)
    environment = {key: host.env[key] for key in ("PG_LISTEN_ADDRESSES", "PG_CLIENT_CIDRS", "PG_ALLOW_RESTART")}
    with tempfile.TemporaryDirectory() as tree:
        return preflight.host_check("pg-configure.sh", {**environment, **preflight.pg_check_tree(Path(tree), facts)},
                                    SETTINGS.read_text(), Path(tree))


@pytest.fixture(scope="module")
def live_pg():
    """A PostgreSQL 16 set up like the live one (tests/test_host_postgres.py): Ubuntu's pg_hba with the
    operators' md5 lines and two more, an md5 role, Ubuntu's settings before the include of conf.d."""
    legacy = f"pw-{secrets.token_urlsafe(12)}"
    with cluster("katforge-preflight-pg-") as server:
        server.psql(f"SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD '{legacy}'")
        conf = server.conf_dir / "postgresql.conf"
        conf.write_text(conf.read_text().replace("include_dir = 'conf.d'", UBUNTU_SETTINGS + "include_dir = 'conf.d'"))
        (server.conf_dir / "pg_hba.conf").write_text(LIVE_HBA)
        server.pg_ctl("restart", "-w", "-m", "fast", "-l", str(server.root / "server.log"))
        host = LiveHost(server, {"legacy": legacy})
        yield host


# In file order, as the runbook goes on the live host.
def test_pg_configure_and_preflight_refuse_alike_md5_roles_and_live_rules(live_pg):
    verdict = pg_checked(live_pg)
    assert verdict == preflight.refusals("pg-configure.sh", live_pg.configure().stderr)
    assert [line.split(";", 1)[0] for line in verdict] == ["refusing to replace pg_hba.conf"] * 2
    assert "lock out: legacy " in verdict[0] and ": host all all 192.168.0.0/16 md5 " in verdict[1]


def test_pg_configure_and_preflight_pass_alike_once_the_runbook_is_done(live_pg):
    live_pg.sql(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE legacy PASSWORD '{live_pg.passwords['legacy']}'")
    (live_pg.pg.conf_dir / "pg_hba.conf").write_text(UBUNTU_HBA)  # the extra lines gone
    assert pg_checked(live_pg) == []
    result = live_pg.configure()  # fails later, for the restart it may not do, having changed the files
    assert "refusing" not in result.stderr and "wait for a restart" in result.stderr
    # pg_hba.conf is the program's now: unchanged, it is not compared again, and the md5 check does not run.
    live_pg.sql("SET password_encryption = 'md5'; ALTER ROLE legacy PASSWORD 'md5-again'")
    assert pg_checked(live_pg) == [] and "refusing" not in live_pg.configure().stderr


def test_preflight_names_the_override_pg_configure_finds_after_its_reload(live_pg):
    assert live_pg.configure(PG_ALLOW_RESTART="1").returncode == 0
    live_pg.sql("ALTER SYSTEM SET work_mem = '8MB'")
    live_pg.sql("SELECT pg_reload_conf()")
    names = re.findall(r"^\s*(\w+)\s*=", SETTINGS.read_text(), re.M) + ["listen_addresses"]
    predicted = preflight.overridden(discovered_postgres(live_pg), names)
    result = live_pg.configure()
    assert result.returncode == 1
    assert predicted == re.findall(r"are overridden: (.*)\.\n", result.stderr)[0].split(", ")
    assert predicted == [f"work_mem from {live_pg.pg.data_dir}/postgresql.auto.conf line 3"]
    live_pg.sql("ALTER SYSTEM RESET work_mem")
    live_pg.sql("SELECT pg_reload_conf()")
    assert preflight.overridden(discovered_postgres(live_pg), names) == []
