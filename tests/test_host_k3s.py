"""k3s-install.sh on a host root laid out like the live k3s host: the binary an earlier install.sh put
in /usr/local/bin, install.sh's unit with flags on its command line, the env file with K3S_TOKEN, and k3s
running. Only what cannot run here is stood in for, and each stand-in acts rather than decides:
- curl serves the files of a fake release directory (binary and sha256sum-amd64.txt), by URL;
- the "release binary" is a script that answers as k3s does (--version, kubectl get --raw=/readyz,
  secrets-encrypt status/rotate-keys, in k3s's output format) and, started as `k3s server`, records
  the command line, the config file and the environment it got, and creates the encryption key the
  way k3s does on a start with secrets-encryption;
- systemctl records its calls, shows the unit and its drop-ins (`cat`), and starts the unit systemd has
  LOADED (so a unit written without a daemon-reload starts the old command line) with its Environment= and
  EnvironmentFile and none of the caller's environment, as systemd does."""
from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.bootstrap import HOST_FILES, render_k3s_config

SCRIPT = HOST_FILES / "k3s-install.sh"
LIVE = "v1.34.6+k3s1"
CONFIG = render_k3s_config(public_ip="3.19.192.157", private_ip="172.31.14.98")
TOKEN = "K10c0ffee::server:5ecret"

# The unit the upstream install.sh wrote for `sh -s - server --write-kubeconfig-mode 644 ...`,
# quoted and indented as its quote_indent does.
LIVE_UNIT = """[Unit]
Description=Lightweight Kubernetes
Documentation=https://k3s.io
Wants=network-online.target
After=network-online.target

[Install]
WantedBy=multi-user.target

[Service]
Type=notify
EnvironmentFile=-/etc/default/%N
EnvironmentFile=-/etc/sysconfig/%N
EnvironmentFile=-{systemd}/k3s.service.env
KillMode=process
Delegate=yes
User=root
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
TimeoutStartSec=0
Restart=always
RestartSec=5s
ExecStartPre=/bin/sh -xc '! /usr/bin/systemctl is-enabled --quiet nm-cloud-setup.service 2>/dev/null'
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStartPre=-/sbin/modprobe overlay
{environment}ExecStart={bin}/k3s \\
    server \\
{flags}
"""
LIVE_FLAGS = "\t'--write-kubeconfig-mode' \\\n\t'644' \\\n\t'--tls-san' \\\n\t'k3s.katforge.com' \\\n\t'--node-name' \\\n\t'k3s-prod' \\\n"

FAKE_K3S = r"""#!/usr/bin/env bash
# k3s @VERSION@, as far as k3s-install.sh asks it anything.
state=$FAKE/state
encryption=$state/encryption   # k3s's encryption-config.json, as its providers in order
stage() { cat "$state/stage" 2>/dev/null || echo start; }
config=${K3S_CONFIG_FILE:-$FAKE/etc/rancher/k3s/config.yaml}  # k3s's default, under the host's root
case $1 in
  --version) echo "k3s version @VERSION@ (0123abcd)"; echo "go version go1.24.11" ;;
  server)
    shift
    { echo "version=@VERSION@"; echo "args=$*"; echo "K3S_TOKEN=${K3S_TOKEN:-}"; echo "K3S_VERSION=${K3S_VERSION:-}"; } >"$state/started"
    if [[ -f $config ]]; then cp "$config" "$state/started-config.yaml"; else rm -f "$state/started-config.yaml"; fi
    # pkg/daemons/control/deps: with secrets-encryption and no configuration yet, a new AES-CBC key first.
    if grep -qsx 'secrets-encryption: true' "$config" || [[ " $* " == *" --secrets-encryption "* ]]; then
      [[ -s $encryption ]] || echo "aescbc:aescbckey identity" >"$encryption"
    fi
    [[ -e $state/never-ready ]] || touch "$state/ready" ;;
  kubectl) [[ $* == "kubectl get --raw=/readyz" && -e $state/ready ]] && echo ok ;;
  secrets-encrypt)
    case $2 in
      status)  # pkg/cli/secretsencrypt Status()
        if [[ ! -s $encryption ]]; then echo "Encryption Status: Disabled, no configuration file found"; exit 0; fi
        read -ra providers <"$encryption"
        [[ ${providers[0]} == aescbc:* ]] && echo "Encryption Status: Enabled" || echo "Encryption Status: Disabled"
        echo "Current Rotation Stage: $(stage)"
        echo "Server Encryption Hashes: All hashes match"
        printf '\nActive  Key Type  Name\n------  --------  ----\n'
        for p in "${providers[@]}"; do
          [[ $p == aescbc:* ]] || continue
          if [[ $p == "${providers[0]}" ]]; then mark=' *'; else mark=''; fi
          printf '%-8s%-10s%s\n' "$mark" AES-CBC "AES-CBC ${p#aescbc:}"
        done ;;
      rotate-keys)
        echo "secrets-encrypt rotate-keys" >>"$FAKE/calls.log"
        [[ -s $encryption ]] || { echo "open encryption-config.json: no such file or directory" >&2; exit 1; }
        # pkg/server/handlers/secrets-encrypt.go encryptionRotateKeys: only from these stages.
        [[ $(stage) == start || $(stage) == reencrypt_finished ]] || { echo "error: stage is $(stage)" >&2; exit 1; }
        [[ ! -e $state/rotate-fails ]] || { echo "Error: context deadline exceeded" >&2; exit 1; }
        read -ra providers <"$encryption"
        echo "aescbc:aescbckey-2026 ${providers[*]}" >"$encryption"
        # A rotation that is still re-encrypting when the caller stops waiting.
        if [[ -e $state/reencrypt-stalls ]]; then echo reencrypt_active; else echo reencrypt_finished; fi >"$state/stage"
        echo "keys rotated, reencryption started" ;;
    esac ;;
esac
"""

CURL = r"""#!/usr/bin/env bash
# Serves $FAKE/releases/<tag>/<file> for https://github.com/k3s-io/k3s/releases/download/<tag>/<file>.
echo "curl $*" >>"$FAKE/calls.log"
out=""
while [[ $# -gt 0 ]]; do
  case $1 in -o) out=$2; shift 2 ;; --retry) shift 2 ;; -*) shift ;; *) url=$1; shift ;; esac
done
path=${url#https://github.com/k3s-io/k3s/releases/download/}
path=${path//%2B/+}
[[ $path != "$url" && -f $FAKE/releases/$path ]] || exit 22
cp "$FAKE/releases/$path" "$out"
"""

SYSTEMCTL = r"""#!/usr/bin/env bash
# systemd for k3s.service: shows the unit with its drop-ins as `systemctl cat` does; starts the unit it
# last loaded, with its Environment= and EnvironmentFile and nothing of the caller's environment.
echo "systemctl $*" >>"$FAKE/calls.log"
state=$FAKE/state
unit=$K3S_SYSTEMD_DIR/k3s.service
args=()
for arg; do [[ $arg == --* ]] || args+=("$arg"); done
case ${args[0]} in
  cat)
    [[ -f $unit ]] || { echo "No files found for k3s.service." >&2; exit 1; }
    echo "# $unit"; cat "$unit"
    for drop_in in "$unit.d"/*.conf; do
      [[ ! -f $drop_in ]] || { printf '\n# %s\n' "$drop_in"; cat "$drop_in"; }
    done ;;
  daemon-reload) cp "$unit" "$state/loaded.service" ;;
  is-active) [[ -e $state/ready || -e $state/started ]] ;;
  is-enabled) [[ -e $state/enabled ]] ;;
  enable) touch "$state/enabled" ;;
  restart)
    rm -f "$state/ready" "$state/started"
    exec_start=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$state/loaded.service" | sed -n 's/^ExecStart=//p')
    env_file=$(sed -n 's/^EnvironmentFile=-\(.*k3s.service.env\)$/\1/p' "$state/loaded.service")
    environment=()
    while read -r words; do eval "environment+=($words)"; done < <(sed -n 's/^Environment=//p' "$state/loaded.service")
    env -i PATH="$PATH" FAKE="$FAKE" "${environment[@]}" \
      bash -c 'set -a; [[ ! -f $1 ]] || . "$1"; set +a; eval "$2"' - "$env_file" "$exec_start" ;;
  *) echo "systemctl stand-in: $* is not supported" >&2; exit 1 ;;
esac
"""


class K3sHost:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "usr/local/bin"
        self.systemd = root / "etc/systemd/system"
        self.config = root / "etc/rancher/k3s/config.yaml"
        self.unit = self.systemd / "k3s.service"
        self.env_file = self.systemd / "k3s.service.env"
        self.state = root / "state"
        self.log = root / "calls.log"
        tools = root / "tools"
        for d in (self.bin, self.systemd, self.state, tools):
            d.mkdir(parents=True)
        self.log.touch()
        for name, text in (("curl", CURL), ("systemctl", SYSTEMCTL)):
            (tools / name).write_text(text)
            (tools / name).chmod(0o755)
        for version in (LIVE, "v1.34.5+k3s1", "v1.34.10+k3s1", "v1.34.6+k3s2", "v1.35.3+k3s1", "v1.36.0+k3s1"):
            self.release(version)
        self.env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "FAKE": str(root),
                    "K3S_BIN_DIR": str(self.bin), "K3S_SYSTEMD_DIR": str(self.systemd),
                    "K3S_CONFIG_FILE": str(self.config), "K3S_READY_TIMEOUT": "3",
                    "KATFORGE_RESTART_LOCK": str(root / "restart.lock"), "KATFORGE_STATE_DIR": str(root / "katforge")}

    def release(self, version: str, binary: str | None = None) -> None:
        directory = self.root / "releases" / version
        directory.mkdir(parents=True, exist_ok=True)
        text = binary or FAKE_K3S.replace("@VERSION@", version)
        (directory / "k3s").write_text(text)
        digest = hashlib.sha256(FAKE_K3S.replace("@VERSION@", version).encode()).hexdigest()
        (directory / "sha256sum-amd64.txt").write_text(f"{'0' * 64}  k3s-arm64\n{digest}  k3s\n")

    def live(self, *, encrypted: bool = True, flags: str = LIVE_FLAGS, env: str = "", environment: str = "") -> None:
        """k3s LIVE as install.sh left it, running; with --secrets-encryption on its command line or without,
        more lines in the env file (env), and Environment= lines in the unit (environment)."""
        (self.bin / "k3s").write_text(FAKE_K3S.replace("@VERSION@", LIVE))
        (self.bin / "k3s").chmod(0o755)
        flags += "\t'--secrets-encryption' \\\n" if encrypted else ""
        self.unit.write_text(LIVE_UNIT.format(systemd=self.systemd, bin=self.bin, flags=flags, environment=environment))
        self.env_file.write_text(f"K3S_TOKEN='{TOKEN}'\n{env}")
        self.env_file.chmod(0o600)
        (self.state / "enabled").touch()
        subprocess.run(["systemctl", "daemon-reload"], env=self.env, check=True)
        subprocess.run(["systemctl", "restart", "k3s"], env=self.env, check=True)
        self.log.write_text("")

    def run(self, version: str = LIVE, config: str = CONFIG, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT)], input=config, env={**self.env, "K3S_VERSION": version, **env},
                              capture_output=True, text=True)

    def calls(self) -> list[str]:
        return [call for call in self.log.read_text().splitlines() if " is-" not in call and " cat " not in call]

    def started(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (self.state / "started").read_text().splitlines())

    def files(self) -> dict[str, tuple[bytes, int]]:
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(self.root.joinpath("etc").rglob("*"))
                if p.is_file()} | {"k3s": ((self.bin / "k3s").read_bytes(), (self.bin / "k3s").stat().st_mtime_ns)}


@pytest.fixture
def host(tmp_path):
    return K3sHost(tmp_path)


@pytest.fixture
def live(host):
    host.live()
    return host


def test_live_flags_that_config_yaml_sets_otherwise_are_refused_with_the_difference(live):
    before = live.files()
    result = live.run()
    assert result.returncode == 1
    assert "write-kubeconfig-mode: 644 on the live host, 0600 in config.yaml" in result.stderr
    assert "katforge:k3sReplaceLiveFlags true" in result.stderr
    assert live.files() == before and live.calls() == []


def test_adoption_keeps_the_live_flags_and_token_and_restarts_once(live):
    env_file = live.env_file.read_bytes()
    result = live.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert result.returncode == 0, result.stderr
    # Our unit, install.sh's shape, no flags; systemd reloaded it before the one restart.
    unit = live.unit.read_text()
    assert f"ExecStart={live.bin}/k3s server\n" in unit
    assert f"EnvironmentFile=-{live.systemd}/k3s.service.env\n" in unit
    assert live.calls() == ["systemctl daemon-reload", "systemctl restart k3s"]
    # The env file is untouched: K3S_TOKEN stays, K3S_VERSION never lands there.
    assert live.env_file.read_bytes() == env_file
    started = live.started()
    assert started["args"] == "" and started["K3S_TOKEN"] == TOKEN and started["K3S_VERSION"] == ""  # `k3s server`
    # The live flag config.yaml lacked is carried into it; the ones it sets alike are dropped.
    config = yaml.safe_load(live.config.read_text())
    assert config == {**yaml.safe_load(CONFIG), "node-name": "k3s-prod"}
    assert stat.S_IMODE(live.config.stat().st_mode) == 0o600
    assert "carried the live node-name" in result.stderr

    before = live.files()
    live.log.write_text("")
    again = live.run()
    assert again.returncode == 0, again.stderr
    assert "already runs with this unit and configuration" in again.stderr
    assert live.calls() == [] and live.files() == before


@pytest.fixture
def adopted(live):
    assert live.run(K3S_REPLACE_LIVE_FLAGS="1").returncode == 0
    live.log.write_text("")
    return live


def test_a_hand_written_config_yaml_is_compared_and_carried_like_the_flags(live):
    # The live config.yaml: a setting the program's lacks, and one the unit's flag overrides anyway.
    live.config.parent.mkdir(parents=True)
    live.config.write_text("token: K10from-config::server:x\nkube-apiserver-arg:\n- audit-log-maxage=30\nnode-name: old\n")
    result = live.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(live.config.read_text())
    assert config == {**yaml.safe_load(CONFIG), "token": "K10from-config::server:x",
                      "kube-apiserver-arg": ["audit-log-maxage=30"], "node-name": "k3s-prod"}
    # A hand-written value config.yaml sets otherwise is refused like a flag.
    live.config.write_text("node-ip: 10.0.0.5\n")
    live.unit.write_text(LIVE_UNIT.format(systemd=live.systemd, bin=live.bin, flags=LIVE_FLAGS, environment=""))
    refused = live.run()
    assert refused.returncode == 1 and "node-ip: 10.0.0.5 on the live host, 172.31.14.98 in config.yaml" in refused.stderr


def test_a_change_of_config_yaml_alone_restarts_k3s(adopted):
    config = CONFIG + "node-label:\n- katforge.com/role=all\n"
    result = adopted.run(config=config)
    assert result.returncode == 0, result.stderr
    assert adopted.calls() == ["systemctl restart k3s"]  # no download, no daemon-reload
    started = yaml.safe_load((adopted.state / "started-config.yaml").read_text())
    assert started["node-label"] == ["katforge.com/role=all"] and started["node-name"] == "k3s-prod"


@pytest.mark.parametrize("version", ["v1.34.10+k3s1", "v1.34.6+k3s2", "v1.35.3+k3s1"])
def test_a_newer_release_is_downloaded_checked_and_started(adopted, version):
    result = adopted.run(version)
    assert result.returncode == 0, result.stderr
    tag = version.replace("+", "%2B")
    release = f"https://github.com/k3s-io/k3s/releases/download/{tag}"
    calls = adopted.calls()
    assert [call.split()[-1] for call in calls if call.startswith("curl ")] == [f"{release}/sha256sum-amd64.txt",
                                                                                 f"{release}/k3s"]
    assert [call for call in calls if not call.startswith("curl ")] == ["systemctl restart k3s"]
    assert adopted.started()["version"] == version
    assert f"k3s {version} ready" in result.stderr


@pytest.mark.parametrize("version, message", [
    ("v1.34.5+k3s1", "refusing to downgrade k3s from v1.34.6+k3s1 to v1.34.5+k3s1"),
    ("v1.36.0+k3s1", "one minor version at a time"),
    ("1.34.7", "is not a k3s release"),
], ids=["downgrade", "two-minors", "malformed"])
def test_a_downgrade_or_a_jump_is_refused(adopted, version, message):
    before = adopted.files()
    result = adopted.run(version)
    assert result.returncode != 0
    assert message in result.stderr
    assert adopted.files() == before and adopted.calls() == []


def test_a_binary_that_does_not_match_the_release_checksum_is_not_installed(adopted):
    adopted.release("v1.34.10+k3s1", binary="#!/bin/sh\necho tampered\n")
    before = adopted.files()
    result = adopted.run("v1.34.10+k3s1")
    assert result.returncode == 1
    assert "sha256sum-amd64.txt says" in result.stderr
    assert adopted.files() == before and not any("restart" in c for c in adopted.calls())
    # Nor is a restart left for the next run to do: with the release as installed, it restarts nothing.
    assert not list((adopted.root / "katforge").glob("*"))
    adopted.log.write_text("")
    assert adopted.run().returncode == 0 and adopted.calls() == []


def rerun_restarts_then_settles(host, config: str) -> None:
    """A run after one whose restart did not complete: the files on disk are already the new ones, and
    still k3s restarts (k3s-io/k3s#11180 otherwise), once; the run after it changes nothing."""
    host.log.write_text("")
    rerun = host.run(config=config)
    assert rerun.returncode == 0, rerun.stderr
    assert host.calls() == ["systemctl restart k3s"]
    assert yaml.safe_load((host.state / "started-config.yaml").read_text())["node-label"] == ["x=y"]
    host.log.write_text("")
    settled = host.run(config=config)
    assert settled.returncode == 0 and "already runs" in settled.stderr and host.calls() == []


def test_a_restart_counts_only_once_readyz_answers(adopted):
    config = CONFIG + "node-label:\n- x=y\n"
    (adopted.state / "never-ready").touch()
    result = adopted.run(config=config, K3S_READY_TIMEOUT="0")
    assert result.returncode == 1
    assert "k3s is not ready (/readyz) 0s after its restart" in result.stderr
    (adopted.state / "never-ready").unlink()
    rerun_restarts_then_settles(adopted, config)


def test_a_restart_waits_for_the_host_restart_lock(adopted):
    config = CONFIG + "node-label:\n- x=y\n"
    with open(adopted.env["KATFORGE_RESTART_LOCK"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pg-configure.sh restarting PostgreSQL
        result = adopted.run(config=config, KATFORGE_RESTART_LOCK_WAIT="0.1")
    assert result.returncode == 1
    assert "another restart on this host holds" in result.stderr
    assert "systemctl restart k3s" not in adopted.calls()
    rerun_restarts_then_settles(adopted, config)


@pytest.fixture
def unencrypted(host):
    host.live(encrypted=False)
    return host


def test_a_cluster_without_secrets_encryption_is_left_alone_without_the_opt_in(unencrypted):
    before = unencrypted.files()
    result = unencrypted.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert result.returncode == 1
    assert "runs without secrets encryption" in result.stderr and "katforge:k3sEncryptExistingSecrets" in result.stderr
    assert unencrypted.files() == before and unencrypted.calls() == []


def test_an_identity_first_encryption_configuration_is_not_encryption(unencrypted):
    # What `k3s secrets-encrypt disable` leaves: the file exists, the key is there, identity comes first.
    (unencrypted.state / "encryption").write_text("identity aescbc:aescbckey\n")
    result = unencrypted.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert result.returncode == 1 and "runs without secrets encryption" in result.stderr


def test_secrets_encryption_is_turned_on_the_supported_way_when_asked(unencrypted):
    result = unencrypted.run(K3S_REPLACE_LIVE_FLAGS="1", K3S_ENCRYPT_EXISTING_SECRETS="1")
    assert result.returncode == 0, result.stderr
    assert unencrypted.calls() == ["systemctl daemon-reload", "systemctl restart k3s", "secrets-encrypt rotate-keys"]
    status = subprocess.run([str(unencrypted.bin / "k3s"), "secrets-encrypt", "status"], env=unencrypted.env,
                            capture_output=True, text=True).stdout
    assert "Encryption Status: Enabled" in status and "reencrypt_finished" in status


def encryption_status(host) -> str:
    return subprocess.run([str(host.bin / "k3s"), "secrets-encrypt", "status"], env=host.env,
                          capture_output=True, text=True).stdout


def test_a_rotation_that_failed_is_resumed_by_the_next_run(unencrypted):
    opted_in = {"K3S_REPLACE_LIVE_FLAGS": "1", "K3S_ENCRYPT_EXISTING_SECRETS": "1"}
    (unencrypted.state / "rotate-fails").touch()  # e.g. the CLI's request timed out
    failed = unencrypted.run(**opted_in)
    assert failed.returncode == 1
    # k3s restarted with secrets-encryption: Enabled, with a key, but the old Secrets are not re-encrypted.
    assert "Encryption Status: Enabled" in encryption_status(unencrypted)
    (unencrypted.state / "rotate-fails").unlink()
    unencrypted.log.write_text("")
    resumed = unencrypted.run(**opted_in)
    assert resumed.returncode == 0, resumed.stderr
    assert unencrypted.calls() == ["secrets-encrypt rotate-keys"]  # no second restart
    assert "Current Rotation Stage: reencrypt_finished" in encryption_status(unencrypted)
    unencrypted.log.write_text("")
    settled = unencrypted.run(**opted_in)
    assert settled.returncode == 0 and "already runs" in settled.stderr and unencrypted.calls() == []


def test_a_rotation_still_re_encrypting_is_waited_for_not_started_again(unencrypted):
    opted_in = {"K3S_REPLACE_LIVE_FLAGS": "1", "K3S_ENCRYPT_EXISTING_SECRETS": "1", "K3S_READY_TIMEOUT": "0"}
    (unencrypted.state / "reencrypt-stalls").touch()
    assert unencrypted.run(**opted_in).returncode == 1
    unencrypted.log.write_text("")
    still = unencrypted.run(**opted_in)
    assert still.returncode == 1 and "not all encrypted again" in still.stderr
    assert unencrypted.calls() == []  # rotate-keys would fail while k3s re-encrypts
    (unencrypted.state / "stage").write_text("reencrypt_finished\n")  # k3s got there
    done = unencrypted.run(**opted_in)
    assert done.returncode == 0, done.stderr
    assert unencrypted.calls() == [] and "already runs" not in done.stderr


def test_a_live_environment_setting_is_compared_like_a_flag(host):
    # As install.sh leaves a host installed with K3S_KUBECONFIG_MODE=644 in its environment: the env file
    # holds it. And a setting in the unit's own Environment=, which our unit does not keep.
    flags = LIVE_FLAGS.replace("\t'--write-kubeconfig-mode' \\\n\t'644' \\\n", "")
    host.live(flags=flags, env="K3S_KUBECONFIG_MODE='644'\n", environment='Environment="K3S_KUBECONFIG_GROUP=ops"\n')
    before = host.files()
    refused = host.run()
    assert refused.returncode == 1
    assert "write-kubeconfig-mode: 644 on the live host, 0600 in config.yaml" in refused.stderr
    assert f"K3S_KUBECONFIG_MODE in {host.env_file}" in refused.stderr
    assert host.files() == before and host.calls() == []
    # A token is compared like any setting, and its value never shown.
    clash = host.run(config=CONFIG + "token: K10other::server:y\n")
    assert clash.returncode == 1 and "token: " in clash.stderr
    assert TOKEN not in clash.stderr and "K10other" not in clash.stderr

    env_file = host.env_file.read_bytes()
    applied = host.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert applied.returncode == 0, applied.stderr
    config = yaml.safe_load(host.config.read_text())
    assert config == {**yaml.safe_load(CONFIG), "node-name": "k3s-prod", "write-kubeconfig-group": "ops"}
    assert host.env_file.read_bytes() == env_file  # kept whole: config.yaml's value wins over it in k3s
    host.log.write_text("")
    again = host.run()
    assert again.returncode == 0 and "already runs" in again.stderr, again.stderr


def test_a_drop_in_that_overrides_the_command_line_is_compared_too(adopted):
    drop_in = adopted.systemd / "k3s.service.d" / "override.conf"
    drop_in.parent.mkdir()
    drop_in.write_text(f"[Service]\nExecStart=\nExecStart={adopted.bin}/k3s server --write-kubeconfig-mode 644\n")
    before = adopted.files()
    # The drop-in stays and its flag overrides config.yaml: no opt-in can make config.yaml's value win.
    result = adopted.run(K3S_REPLACE_LIVE_FLAGS="1")
    assert result.returncode == 1
    assert "write-kubeconfig-mode: 644 on the live host, 0600 in config.yaml" in result.stderr
    assert str(drop_in) in result.stderr
    assert adopted.files() == before and adopted.calls() == []


def test_a_new_host_gets_k3s_started_with_its_configuration(host):
    result = host.run()
    assert result.returncode == 0, result.stderr
    assert host.calls()[-3:] == ["systemctl daemon-reload", "systemctl enable --quiet k3s", "systemctl restart k3s"]
    assert (host.bin / "kubectl").resolve() == (host.bin / "k3s").resolve()
    assert yaml.safe_load((host.state / "started-config.yaml").read_text()) == yaml.safe_load(CONFIG)
    assert not host.env_file.exists()
