"""The host scripts that cannot run for real here (they need systemd, apt and the internet): shellcheck for
every script, and k3s-install.sh, postgres-install.sh and wireguard.sh run against stand-ins for the programs
they drive, which record what they were asked to do."""
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


# --- WireGuard ------------------------------------------------------------------------------------

PEERS = ("laptop,YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=,10.99.0.2/32\n"
         "phone,MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXY=,10.99.0.3/32\n")


@pytest.fixture
def wireguard(tmp_path):
    box = Sandbox(tmp_path)
    # syncconf logs how many peers the configuration it is handed holds; stop and start keep the file
    # on disk at that moment, to show which file wg-quick down and up would have read.
    fake(box.bin, "wg", 'case $1 in\n'
                        '  genkey) echo "PRIVATE-$RANDOM$RANDOM" ;;\n'
                        '  pubkey) echo "PUBLIC-of-$(cat)" ;;\n'
                        '  syncconf) echo "wg syncconf $2 peers=$(grep -c "^\\[Peer\\]" "$3")" >>"$FAKE/calls.log" ;;\n'
                        'esac\n')
    fake(box.bin, "wg-quick", '[[ $1 == strip ]] && cat "$2"\n')
    fake(box.bin, "sysctl", 'echo "sysctl $*" >>"$FAKE/calls.log"\n')
    fake(box.bin, "systemctl", 'echo "systemctl $*" >>"$FAKE/calls.log"\n'
                               'conf=$FAKE/wireguard/wg0.conf\n'
                               'case $1 in\n'
                               '  is-active) [[ -e $FAKE/active ]] ;;\n'
                               '  stop) cp "$conf" "$FAKE/conf-at-stop" 2>/dev/null; rm -f "$FAKE/active" ;;\n'
                               '  enable) cp "$conf" "$FAKE/conf-at-start"; touch "$FAKE/active" ;;\n'
                               'esac\n')
    fake(box.bin, "apt-get", 'echo "apt-get $*" >>"$FAKE/calls.log"; exit 1\n')
    box.env_vars = {"WG_ADDRESS": "10.99.0.1/24", "WG_NAT_CIDRS": "172.31.0.0/16 3.19.192.157/32",
                    "WG_DIR": str(tmp_path / "wireguard"), "WG_SYSCTL_CONF": str(tmp_path / "sysctl.conf")}
    return box


def serve(box: Sandbox, peers: str = PEERS) -> subprocess.CompletedProcess:
    return box.run("wireguard.sh", peers, **box.env_vars)


def test_wireguard_prints_only_the_public_key_and_keeps_the_private_one(wireguard):
    result = serve(wireguard)
    assert result.returncode == 0, result.stderr
    key_file = Path(wireguard.env_vars["WG_DIR"]) / "server.key"
    private = key_file.read_text().strip()
    assert result.stdout == f"PUBLIC-of-{private}"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    conf = (Path(wireguard.env_vars["WG_DIR"]) / "wg0.conf").read_text()
    assert private not in result.stderr and private not in conf
    again = serve(wireguard)
    assert again.stdout == result.stdout and key_file.read_text().strip() == private  # generated once


def test_wireguard_config_has_the_peers_and_nats_clients_into_each_destination(wireguard):
    assert serve(wireguard).returncode == 0
    conf = (Path(wireguard.env_vars["WG_DIR"]) / "wg0.conf").read_text()
    assert "Address = 10.99.0.1/24\nListenPort = 51820\n" in conf
    for destination in ("172.31.0.0/16", "3.19.192.157/32"):
        assert f"PostUp = iptables -t nat -A POSTROUTING -s 10.99.0.1/24 -d {destination} -j MASQUERADE" in conf
        assert f"PreDown = iptables -t nat -D POSTROUTING -s 10.99.0.1/24 -d {destination} -j MASQUERADE || true" in conf
    # Forwarded only to those destinations: the accepts come before the drop.
    accepts = [line for line in conf.splitlines() if line.startswith("PostUp = iptables -A FORWARD -i %i -d")]
    assert len(accepts) == 2
    assert conf.index(accepts[-1]) < conf.index("PostUp = iptables -A FORWARD -i %i -j DROP")
    assert conf.count("[Peer]") == 2
    assert ("# phone\n[Peer]\nPublicKey = MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXY=\n"
            "AllowedIPs = 10.99.0.3/32\n") in conf
    assert "net.ipv4.ip_forward = 1" in Path(wireguard.env_vars["WG_SYSCTL_CONF"]).read_text()


def test_wireguard_predown_rules_that_are_already_gone_do_not_stop_wg_quick_down(wireguard):
    # wg-quick runs each hook as `(eval "$hook")` under `set -e`; here every iptables call fails.
    assert serve(wireguard).returncode == 0
    conf = (Path(wireguard.env_vars["WG_DIR"]) / "wg0.conf").read_text()
    hooks = [line.split(" = ", 1)[1].replace("%i", "wg0") for line in conf.splitlines() if line.startswith("PreDown")]
    assert len(hooks) == 6
    fake(wireguard.bin, "iptables", 'echo "iptables: Bad rule (does a matching rule exist in that chain?)." >&2\nexit 1\n')
    for hook in hooks:
        down = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", '(eval "$HOOK")'],
                              env=wireguard.env(HOOK=hook), capture_output=True, text=True)
        assert down.returncode == 0, hook


def new_calls(box: Sandbox, before: int) -> list[str]:
    return [call for call in box.calls()[before:] if "is-active" not in call]


def test_wireguard_starts_once_and_leaves_an_unchanged_config_alone(wireguard):
    assert serve(wireguard).returncode == 0
    assert "systemctl enable --now --quiet wg-quick@wg0" in wireguard.calls()
    before = len(wireguard.calls())
    assert serve(wireguard).returncode == 0
    assert new_calls(wireguard, before) == []


def test_wireguard_applies_a_change_of_peers_to_the_running_interface_without_a_restart(wireguard):
    assert serve(wireguard).returncode == 0
    before = len(wireguard.calls())
    result = serve(wireguard, PEERS.splitlines(keepends=True)[0])
    assert result.returncode == 0, result.stderr
    # The new file is in place when syncconf reads it; no client's tunnel goes down.
    assert new_calls(wireguard, before) == ["wg syncconf wg0 peers=1"]


@pytest.mark.parametrize("change", [{"WG_ADDRESS": "10.98.0.1/24"}, {"WG_NAT_CIDRS": "172.31.0.0/16"}],
                         ids=["address", "nat-destinations"])
def test_wireguard_stops_with_the_old_config_before_starting_with_a_new_interface(wireguard, change):
    assert serve(wireguard).returncode == 0
    conf = Path(wireguard.env_vars["WG_DIR"]) / "wg0.conf"
    old = conf.read_text()
    before = len(wireguard.calls())
    wireguard.env_vars.update(change)
    result = serve(wireguard)
    assert result.returncode == 0, result.stderr
    assert new_calls(wireguard, before) == ["systemctl stop wg-quick@wg0", "systemctl enable --now --quiet wg-quick@wg0"]
    # wg-quick down undid the rules the old file had added; up read the new one.
    assert (wireguard.root / "conf-at-stop").read_text() == old
    assert (wireguard.root / "conf-at-start").read_text() == conf.read_text() != old


def test_wireguard_refuses_a_malformed_peer(wireguard):
    result = serve(wireguard, "laptop,only-a-key\n")
    assert result.returncode == 2
    assert "bad peer line 'laptop'" in result.stderr
