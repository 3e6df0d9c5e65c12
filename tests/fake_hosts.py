"""The k3s host and the VPN host as `make discover` reads them over SSH, set up as the live hosts are:

- k3s host: a file tree with the unit the k3s installer writes plus hand-added flags (a --token on the
  command line), its env file with K3S_TOKEN, a config.yaml with a token, the Traefik manifest file in
  the manifests directory, and a stand-in `k3s` program (version, secrets encryption off). PostgreSQL is
  the real server of the session (`pg`), with roles as the live one has them: md5 and SCRAM hashes, a
  role without a password, a database owned by a role that is not the stage's.
- VPN host: a wg0.conf written by hand (inline PrivateKey, named and unnamed peers, a preshared key),
  served by a real WireGuard interface (wireguard-go) in a network namespace this module creates, with
  one more peer added at run time only. Without root or the WireGuard tools the file alone is read.

The scripts find all of it through the variables their headers document (`env`). Every secret
planted is in `planted`: no discovery output may contain one. The session fixture `fake_hosts` comes
with `pytest_plugins = ["tests.fake_hosts"]` in a test module.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tests.pgcluster import PgCluster, ensure_os_user

K3S_VERSION = "v1.34.6+k3s1"
WG_ADDRESS = "10.99.0.1/24"

K3S_STAND_IN = f"""#!/usr/bin/env bash
# k3s, as far as discovery asks it: its version and the secrets encryption status of a server that
# was installed without it. It reads its stdin, as any program may: the rest of a script sent on stdin
# must not be there to read.
case "$1" in
  --version) cat >/dev/null; echo "k3s version {K3S_VERSION} (aabbccdd)"; echo "go version go1.24.11" ;;
  secrets-encrypt) [[ $2 == status ]] || exit 1
    printf 'Encryption Status: Disabled\\nCurrent Rotation Stage: start\\nServer Encryption Hashes: All hashes match\\n' ;;
  *) exit 1 ;;
esac
"""


@dataclass
class FakeHosts:
    root: Path
    planted: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # host_env of both scripts
    roles: dict[str, str] = field(default_factory=dict)  # kind -> role name made in `pg`
    database: str = ""
    wg: dict = field(default_factory=dict)  # interface, netns (None: file only), keys and peers

    @property
    def manifest(self) -> Path:
        return self.root / "k3s-data" / "server" / "manifests" / "traefik-config.yaml"

    def plant(self, value: str) -> str:
        self.planted.append(value)
        return value


def _k3s_tree(hosts: FakeHosts) -> None:
    root = hosts.root
    (root / "bin").mkdir()
    (root / "bin" / "k3s").write_text(K3S_STAND_IN)
    (root / "bin" / "k3s").chmod(0o755)
    env_file = root / "k3s.service.env"
    # What the installer writes (k3s-io/k3s install.sh, create_systemd_service_file), plus flags added
    # by hand; the trailing backslash before an empty line is the installer's.
    (root / "k3s.service").write_text(f"""[Unit]
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
EnvironmentFile=-{env_file}
Environment="K3S_DEBUG=false" "K3S_AGENT_TOKEN={hosts.plant('PLANTED-agent-token-in-unit')}"
KillMode=process
Delegate=yes
ExecStartPre=-/sbin/modprobe br_netfilter
ExecStart=/usr/local/bin/k3s \\
    server \\
	'--disable' \\
	'servicelb' \\
	'--token' \\
	'{hosts.plant("PLANTED-token-on-command-line")}' \\
	'--write-kubeconfig-mode' \\
	'644' \\

""")
    env_file.write_text(f'K3S_TOKEN="{hosts.plant("PLANTED-env-file-token")}"\nK3S_KUBECONFIG_MODE=644\n')
    (root / "config.yaml").write_text(f"""# token: {hosts.plant('PLANTED-old-token-in-a-comment')}
tls-san:
  - k3s.katforge.com
  - 3.19.192.157
node-ip: 172.31.14.98
token: {hosts.plant('PLANTED-config-token')}
""")
    hosts.manifest.parent.mkdir(parents=True)
    hosts.manifest.write_text(f"""apiVersion: helm.cattle.io/v1
kind: HelmChartConfig
metadata:
  name: traefik
  namespace: kube-system
spec:
  valuesContent: |-
    env:
      - name: AWS_SECRET_ACCESS_KEY
        value: {hosts.plant('PLANTED-route53-secret-in-manifest')}
""")
    (hosts.manifest.parent / "ccm.yaml").write_text("# written by k3s\n")
    hosts.env.update(K3S_BIN=str(root / "bin" / "k3s"), K3S_UNIT_FILE=str(root / "k3s.service"),
                     K3S_CONFIG_FILE=str(root / "config.yaml"), K3S_DATA_DIR=str(root / "k3s-data"))


def _roles(hosts: FakeHosts, pg: PgCluster) -> None:
    ensure_os_user("postgres")  # Ubuntu's package creates it; the script runs psql as it
    prefix = f"disc_{secrets.token_hex(4)}"
    hosts.roles = {"md5": f"{prefix}_md5", "scram": f"{prefix}_scram", "nologin": f"{prefix}_nologin"}
    hosts.database = f"{prefix}_db"
    md5_password = hosts.plant(f"PLANTED-md5-{secrets.token_hex(4)}")
    scram_password = hosts.plant(f"PLANTED-scram-{secrets.token_hex(4)}")
    pg.psql(f"SET password_encryption = 'md5'; CREATE ROLE {hosts.roles['md5']} LOGIN PASSWORD '{md5_password}'")
    pg.psql(f"SET password_encryption = 'scram-sha-256'; "
            f"CREATE ROLE {hosts.roles['scram']} LOGIN PASSWORD '{scram_password}'")
    pg.psql(f"CREATE ROLE {hosts.roles['nologin']} NOLOGIN")
    pg.psql(f"CREATE DATABASE {hosts.database} OWNER {hosts.roles['md5']}")
    # The hashes are secrets too.
    for role in ("md5", "scram"):
        hosts.plant(pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{hosts.roles[role]}'"))
    hosts.env.update(PG_BIN_DIR=str(pg.bin_dir), PGHOST=str(pg.socket_dir), PGPORT=str(pg.port))


def _drop_roles(hosts: FakeHosts, pg: PgCluster) -> None:
    if hosts.database:
        pg.psql(f"DROP DATABASE IF EXISTS {hosts.database}")
    for role in hosts.roles.values():
        pg.psql(f"DROP ROLE IF EXISTS {role}")


def wg_keypair() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()
    return private, public


def _wireguard_unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in ("wg", "wg-quick", "wireguard-go", "ip") if shutil.which(t) is None]
    return f"missing {', '.join(missing)} (Debian: wireguard-tools wireguard-go iproute2)" if missing else None


def _vpn_tree(hosts: FakeHosts) -> None:
    """wg0.conf as an operator writes it by hand, and, where possible, the interface running it."""
    directory = hosts.root / "wireguard"
    directory.mkdir(mode=0o700)
    # wireguard-go's control sockets live in /var/run/wireguard, shared by every namespace: a name of
    # its own keeps concurrent runs apart.
    interface = f"wgd{secrets.token_hex(3)}"
    private, public = wg_keypair()
    hosts.plant(private)
    peers = {name: wg_keypair()[1] for name in ("alice-laptop", "bob-phone", "runtime-only")}
    preshared = hosts.plant(subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip())
    conf = directory / f"{interface}.conf"
    conf.write_text(f"""[Interface]
Address = {WG_ADDRESS}
ListenPort = 51820
PrivateKey = {private}
PostUp = iptables -t nat -A POSTROUTING -s 10.99.0.0/24 -o eth0 -j MASQUERADE
PostDown = iptables -t nat -D POSTROUTING -s 10.99.0.0/24 -o eth0 -j MASQUERADE

# alice-laptop
[Peer]
PublicKey = {peers['alice-laptop']}
AllowedIPs = 10.99.0.2/32

[Peer]
PublicKey = {peers['bob-phone']}
PresharedKey = {preshared}
AllowedIPs = 10.99.0.3/32
""")
    conf.chmod(0o600)
    hosts.wg = {"interface": interface, "netns": None, "public": public, "peers": peers, "conf": conf}
    hosts.env.update(WG_DIR=str(directory), WG_INTERFACE=interface)
    reason = _wireguard_unavailable()
    if reason:
        hosts.wg["why_not_running"] = reason
        return
    netns = f"katforge-disc-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", netns], capture_output=True, text=True)
    if made.returncode != 0:
        hosts.wg["why_not_running"] = f"cannot create a network namespace: {made.stderr.strip()}"
        return
    hosts.wg["netns"] = netns
    inside = ["ip", "netns", "exec", netns]
    env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    subprocess.run([*inside, "wireguard-go", interface], check=True, env=env, capture_output=True)
    stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=True).stdout
    runtime = directory / "runtime.conf"
    runtime.write_text(stripped)
    subprocess.run([*inside, "wg", "setconf", interface, str(runtime)], check=True)
    runtime.unlink()
    # A peer added by hand to the running interface and never written to the file.
    subprocess.run([*inside, "wg", "set", interface, "peer", peers["runtime-only"], "allowed-ips", "10.99.0.9/32"],
                   check=True)
    subprocess.run([*inside, "ip", "address", "add", WG_ADDRESS, "dev", interface], check=True)
    subprocess.run([*inside, "ip", "link", "set", interface, "up"], check=True)
    hosts.env["WG_NETNS"] = netns


def _remove_netns(netns: Optional[str]) -> None:
    if not netns:
        return
    for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    subprocess.run(["ip", "netns", "delete", netns], check=True)


@pytest.fixture(scope="session")
def fake_hosts(pg):
    if os.geteuid() != 0:
        pytest.skip("the discovery scripts run as root on the hosts (root-only files, psql as postgres)")
    hosts = FakeHosts(root=Path(tempfile.mkdtemp(prefix="katforge-hosts-")))
    try:
        _k3s_tree(hosts)
        _roles(hosts, pg)
        _vpn_tree(hosts)
        yield hosts
    finally:
        _remove_netns(hosts.wg.get("netns"))
        _drop_roles(hosts, pg)
        shutil.rmtree(hosts.root, ignore_errors=True)
