"""shellcheck for every host script, and postgres-install.sh (apt and systemd only) against stand-ins for
the programs it drives, which record what they were asked to do. The other scripts have modules of their
own, with real parts: test_host_wireguard, test_host_postgres, test_host_k3s, test_host_sshd."""
from __future__ import annotations

import configparser
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra.bootstrap import HOST_FILES

SCRIPTS = sorted(HOST_FILES.glob("*.sh"))


def test_every_host_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert {"k3s-install.sh", "pg-configure.sh", "pg-database.sh", "wireguard.sh"} <= {s.name for s in SCRIPTS}


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


class Sandbox:
    """A PATH of stand-ins in front of the real one, and a log of their calls."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        self.log.touch()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE": str(self.root), **extra}

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def run(self, script: str, stdin: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(HOST_FILES / script)], input=stdin, env=self.env(**env),
                              capture_output=True, text=True)


# --- k3s ------------------------------------------------------------------------------------------

@pytest.fixture
def k3s(tmp_path):
    box = Sandbox(tmp_path)
    # The installer the stand-in curl serves: it "installs" the version it was given and, like k3s
    # started with secrets-encryption, creates the encryption configuration.
    (tmp_path / "install.sh").write_text(
        'echo "installer INSTALL_K3S_VERSION=$INSTALL_K3S_VERSION args=$*" >>"$FAKE/calls.log"\n'
        'echo "$INSTALL_K3S_VERSION" >"$FAKE/version"\n'
        'touch "$FAKE/encryption-config.json"\n')
    fake(box.bin, "curl", 'echo "curl $*" >>"$FAKE/calls.log"; cat "$FAKE/install.sh"\n')
    fake(box.bin, "k3s", 'if [[ $1 == --version ]]; then\n'
                         '  [[ -e $FAKE/version ]] || exit 127\n'
                         '  echo "k3s version $(cat "$FAKE/version") (0123abcd)"; echo "go version go1.25"\n'
                         'else\n'
                         '  echo "k3s $*" >>"$FAKE/calls.log"\n'
                         'fi\n'
                         'exit 0\n')
    box.env_vars = {"K3S_CONFIG_FILE": str(tmp_path / "etc" / "config.yaml"),
                    "K3S_ENCRYPTION_CONFIG": str(tmp_path / "encryption-config.json")}
    return box


def install(box: Sandbox, version: str, config: str) -> subprocess.CompletedProcess:
    return box.run("k3s-install.sh", config, K3S_VERSION=version, **box.env_vars)


CONFIG = "node-ip: 172.31.14.98\nsecrets-encryption: true\n"


def test_k3s_is_installed_by_the_installer_of_the_pinned_tag(k3s):
    result = install(k3s, "v1.34.6+k3s1", CONFIG)
    assert result.returncode == 0, result.stderr
    calls = k3s.calls()
    assert "curl -sfL https://raw.githubusercontent.com/k3s-io/k3s/v1.34.6%2Bk3s1/install.sh" in calls
    assert "installer INSTALL_K3S_VERSION=v1.34.6+k3s1 args=server" in calls
    config = Path(k3s.env_vars["K3S_CONFIG_FILE"])
    assert config.read_text() == CONFIG
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_k3s_with_the_same_version_and_config_is_left_alone(k3s):
    assert install(k3s, "v1.34.6+k3s1", CONFIG).returncode == 0
    before = k3s.calls()
    again = install(k3s, "v1.34.6+k3s1", CONFIG)
    assert again.returncode == 0, again.stderr
    assert "already runs with this configuration" in again.stderr
    assert k3s.calls() == before


@pytest.mark.parametrize("version, config", [("v1.34.7+k3s1", CONFIG), ("v1.34.6+k3s1", CONFIG + "node-label: [x=y]\n")],
                         ids=["new-version", "new-config"])
def test_k3s_upgrades_in_place_when_version_or_config_changes(k3s, version, config):
    assert install(k3s, "v1.34.6+k3s1", CONFIG).returncode == 0
    before = len(k3s.calls())
    result = install(k3s, version, config)
    assert result.returncode == 0, result.stderr
    new_calls = k3s.calls()[before:]
    assert f"installer INSTALL_K3S_VERSION={version} args=server" in new_calls
    assert Path(k3s.env_vars["K3S_CONFIG_FILE"]).read_text() == config


def test_k3s_that_runs_without_secrets_encryption_is_left_alone_with_the_documented_steps(k3s):
    # Installed and running, but never started with secrets-encryption: no encryption configuration.
    (k3s.root / "version").write_text("v1.34.6+k3s1\n")
    config = Path(k3s.env_vars["K3S_CONFIG_FILE"])
    config.parent.mkdir()
    config.write_text("node-ip: 172.31.14.98\n")
    result = install(k3s, "v1.34.6+k3s1", CONFIG)
    assert result.returncode != 0
    assert k3s.calls() == []  # no installer, no restart, no Secret rewritten
    assert config.read_text() == "node-ip: 172.31.14.98\n"
    steps = ["k3s secrets-encrypt enable", "systemctl restart k3s", "k3s secrets-encrypt reencrypt"]
    positions = [result.stderr.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stderr


# --- PostgreSQL's unit ----------------------------------------------------------------------------

@pytest.fixture
def postgres_unit(tmp_path):
    box = Sandbox(tmp_path)
    fake(box.bin, "dpkg-query", "echo 'install ok installed'\n")
    fake(box.bin, "apt-get", 'echo "apt-get $*" >>"$FAKE/calls.log"; exit 1\n')
    fake(box.bin, "systemctl", 'echo "systemctl $*" >>"$FAKE/calls.log"\n'
                               'case $1 in\n'
                               '  is-enabled|is-active) [[ -e $FAKE/active ]] ;;\n'
                               '  enable) touch "$FAKE/active" ;;\n'
                               'esac\n')
    box.env_vars = {"PG_SYSTEMD_DIR": str(tmp_path / "systemd")}
    return box


def test_postgres_starts_at_boot_only_once_the_network_is_online(postgres_unit):
    result = postgres_unit.run("postgres-install.sh", "", **postgres_unit.env_vars)
    assert result.returncode == 0, result.stderr
    drop_in = postgres_unit.root / "systemd" / "postgresql@16-main.service.d" / "katforge-network-online.conf"
    unit = configparser.ConfigParser()
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(drop_in.read_text())
    assert dict(unit["Unit"]) == {"Wants": "network-online.target", "After": "network-online.target"}
    calls = postgres_unit.calls()
    # systemd reads the drop-in before the unit is enabled and started.
    assert calls.index("systemctl daemon-reload") < calls.index("systemctl enable --now postgresql@16-main")

    mtime, before = drop_in.stat().st_mtime_ns, len(calls)
    again = postgres_unit.run("postgres-install.sh", "", **postgres_unit.env_vars)
    assert again.returncode == 0, again.stderr
    assert [call for call in postgres_unit.calls()[before:] if not call.startswith("systemctl is-")] == []
    assert drop_in.stat().st_mtime_ns == mtime
