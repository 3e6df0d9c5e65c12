"""shellcheck for every host script, and postgres-install.sh (apt and systemd only) against stand-ins for
the programs it drives, which record what they were asked to do. The other scripts have modules of their
own, with real parts: test_host_wireguard, test_host_postgres, test_host_k3s, test_host_sshd."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.bootstrap import HOST_FILES

SCRIPTS = sorted(HOST_FILES.glob("*.sh"))


def test_every_host_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    # -x and the scripts' own directory: a sourced library (k3s-release.sh) is checked where it is used.
    result = subprocess.run([str(shellcheck), "--severity=style", "--external-sources", *map(str, SCRIPTS)],
                            cwd=SCRIPTS[0].parent, capture_output=True, text=True)
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
