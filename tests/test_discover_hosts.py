"""Discovery of the hosts, for real: infra/host/discover-k3s.sh and discover-vpn.sh sent over SSH (the
OpenSSH client, a real sshd on 127.0.0.1) to a host laid out as the live one (tests/fake_hosts.py),
with the session's PostgreSQL 16 and a WireGuard interface in a network namespace."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess

import pytest

from infra.bootstrap import HOST_FILES
from tests.fake_hosts import K3S_VERSION, WG_ADDRESS, wg_keypair
from tools import discover_hosts
from tools.discover_targets import targets

# Session fixtures (servers), shared by every module that names them here: imported, each module would
# start its own.
pytest_plugins = ["tests.fake_hosts", "tests.sshd"]

pytestmark = pytest.mark.usefixtures("sshd", "fake_hosts")


def ssh_of(sshd, fake_hosts, **env) -> discover_hosts.Ssh:
    # The live sshd is the session's own, whose configuration tests/sshd.py writes beside its keys.
    env = {**fake_hosts.env, "SSHD_CONFIG": str(sshd.key.parent / "sshd_config"), **env}
    return discover_hosts.Ssh(user=sshd.user, key=str(sshd.key), port=sshd.port, options=sshd.options,
                              host_env=tuple(env.items()),
                              addresses={"k3s": sshd.host, "vpn": sshd.host})


def k3s_only(t):
    return dataclasses.replace(t, hosts=("k3s",))


@pytest.fixture(scope="module")
def prod_targets(fake_hosts):
    # The stage's role is one of the test's own: the shared server must not get a role named katforge.
    return dataclasses.replace(targets("prod"), db_role=fake_hosts.roles["md5"])


@pytest.fixture(scope="module")
def found(sshd, fake_hosts, prod_targets):
    return discover_hosts.discover(prod_targets, ssh_of(sshd, fake_hosts))


def test_both_hosts_are_reached_over_ssh_as_the_given_user(found, sshd):
    hosts, _ = found
    assert {role: (h["address"], h["reached"]) for role, h in hosts.items()} == {
        "k3s": (sshd.host, True), "vpn": (sshd.host, True)}


def test_k3s_version_unit_flags_env_and_config(found, fake_hosts):
    k3s = found[0]["k3s"]["k3s"]
    assert k3s["version"] == K3S_VERSION
    env_file = str(fake_hosts.root / "k3s.service.env")
    assert k3s["unitFiles"] == [{"path": str(fake_hosts.root / "k3s.service"), "settings": [
        ["EnvironmentFile", "/etc/default/k3s"], ["EnvironmentFile", "/etc/sysconfig/k3s"], ["EnvironmentFile", env_file],
        ["Environment", ["K3S_DEBUG", "false"]], ["Environment", ["K3S_AGENT_TOKEN", "[redacted]"]],
        ["ExecStart", ["/usr/local/bin/k3s", "server", "--disable", "servicelb", "--token", "[redacted]",
                       "--write-kubeconfig-mode", "644"]]]}]
    assert k3s["env"] == {env_file: {"K3S_TOKEN": "[redacted]", "K3S_KUBECONFIG_MODE": "644"}}
    assert k3s["config"]["settings"] == {"tls-san": ["k3s.katforge.com", "3.19.192.157"], "node-ip": "172.31.14.98",
                                         "token": "[redacted]"}
    assert k3s["secretsEncryption"]["status"] == "Disabled"


def test_the_traefik_manifest_file_is_found_and_its_absence_too(found, sshd, fake_hosts, prod_targets):
    k3s = found[0]["k3s"]["k3s"]
    assert k3s["manifests"] == ["ccm.yaml", "traefik-config.yaml"]
    assert k3s["traefikManifest"] == {"path": str(fake_hosts.manifest), "present": True}
    moved = fake_hosts.manifest.with_suffix(".moved")
    fake_hosts.manifest.rename(moved)
    try:
        hosts, _ = discover_hosts.discover(k3s_only(prod_targets), ssh_of(sshd, fake_hosts))
    finally:
        moved.rename(fake_hosts.manifest)
    assert hosts["k3s"]["k3s"]["traefikManifest"]["present"] is False


def test_postgres_roles_show_the_kind_of_hash_and_databases_their_owner(found, fake_hosts):
    pg = found[0]["k3s"]["postgres"]
    assert pg["version"].startswith("16.") and pg["versionNum"] // 10000 == 16
    roles = fake_hosts.roles
    assert pg["roles"][roles["md5"]]["password"] == "md5"
    assert pg["roles"][roles["scram"]]["password"] == "scram-sha-256"
    assert pg["roles"][roles["nologin"]] == {"superuser": False, "login": False, "createdb": False,
                                            "createrole": False, "password": "none", "validUntil": None,
                                            "quoted": roles["nologin"]}  # as pg-configure.sh names it
    assert pg["roles"]["postgres"]["superuser"] is True
    assert pg["databases"][fake_hosts.database]["owner"] == roles["md5"]
    assert pg["settings"]["hba_file"].endswith("pg_hba.conf")
    assert pg["hba"] and all({"line", "type", "databases", "users", "method"} <= set(rule) for rule in pg["hba"])


def test_a_setting_waiting_for_a_restart_is_reported(sshd, fake_hosts, prod_targets, pg):
    pending = pg.conf_dir / "conf.d" / "zz-discover-test.conf"
    current = int(pg.psql("SHOW max_locks_per_transaction"))
    pending.write_text(f"max_locks_per_transaction = {current + 1}\n")
    try:
        pg.psql("SELECT pg_reload_conf()")
        for _ in range(50):  # the postmaster rereads its files a moment after the signal
            if pg.psql("SELECT count(*) FROM pg_settings WHERE pending_restart") != "0":
                break
            subprocess.run(["sleep", "0.1"])
        hosts, _ = discover_hosts.discover(k3s_only(prod_targets), ssh_of(sshd, fake_hosts))
    finally:
        pending.unlink()
        pg.psql("SELECT pg_reload_conf()")
    assert hosts["k3s"]["postgres"]["pendingRestart"]["max_locks_per_transaction"] == {
        "running": str(current), "configured": str(current + 1)}


def test_wireguard_address_port_key_location_and_peers(found, fake_hosts):
    wg = found[0]["vpn"]["wireguard"]
    assert wg["config"]["address"] == WG_ADDRESS and wg["config"]["listenPort"] == 51820
    assert wg["config"]["managed"] is False
    assert wg["privateKey"] == {"where": "inline", "path": str(fake_hosts.wg["conf"])}
    assert wg["publicKey"] == fake_hosts.wg["public"]
    peers = {p["publicKey"]: p for p in wg["peers"]}
    alice, bob = (fake_hosts.wg["peers"][name] for name in ("alice-laptop", "bob-phone"))
    assert peers[alice]["name"] == "alice-laptop" and peers[alice]["allowedIps"] == "10.99.0.2/32"
    assert peers[bob]["name"] is None and peers[bob]["presharedKey"] is True


def test_the_running_interface_is_read_in_its_network_namespace(found, fake_hosts):
    if not fake_hosts.wg["netns"]:
        pytest.skip(f"no WireGuard interface ({fake_hosts.wg['why_not_running']}): only wg0.conf was read")
    wg = found[0]["vpn"]["wireguard"]
    assert wg["running"] == {"publicKey": fake_hosts.wg["public"], "listenPort": 51820, "address": WG_ADDRESS,
                             "peers": 3}
    peers = {p["publicKey"]: p for p in wg["peers"]}
    runtime = peers[fake_hosts.wg["peers"]["runtime-only"]]
    assert runtime["in"] == ["interface"] and runtime["runningAllowedIps"] == "10.99.0.9/32"
    assert peers[fake_hosts.wg["peers"]["alice-laptop"]]["in"] == ["config", "interface"]


def test_secrets_are_located_never_shown(found, fake_hosts):
    hosts, secrets = found
    text = json.dumps([hosts, secrets])
    leaked = [value for value in fake_hosts.planted if value in text]
    assert not leaked
    where = {s["where"]: s["configKey"] for s in secrets}
    env_file = fake_hosts.root / "k3s.service.env"
    assert where[f"k3s host: {env_file} K3S_TOKEN"] is None
    assert where["k3s host: k3s unit ExecStart --token"] is None
    assert where[f"k3s host: {fake_hosts.root / 'config.yaml'} token"] is None
    # The stage's role keeps its password: the operator puts it in katforge:dbPassword.
    assert where[f"k3s host: PostgreSQL role {fake_hosts.roles['md5']} (md5 hash)"] == "dbPassword"
    assert any(w.startswith("vpn host: WireGuard private key, inline in") for w in where)


@pytest.mark.parametrize("role", ["k3s", "vpn"])
def test_the_scripts_send_no_secret_over_the_wire(role, sshd, fake_hosts):
    lines, error = discover_hosts.run(ssh_of(sshd, fake_hosts), role, sshd.host)
    assert error is None and lines
    text = "\n".join("\t".join(line) for line in lines)
    assert not [value for value in fake_hosts.planted if value in text]


def test_secrets_spelled_otherwise_are_never_sent(sshd, fake_hosts, tmp_path):
    # wg-quick reads keys and section names in any case, and k3s reads --datastore-endpoint (with its
    # password) from K3S_DATASTORE_ENDPOINT: a file written so must not send them over the wire.
    private, public = wg_keypair()
    preshared = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    peer = wg_keypair()[1]
    wg_dir = tmp_path / "wireguard"
    wg_dir.mkdir(mode=0o700)
    (wg_dir / "wgl0.conf").write_text(f"""[interface]
address = 10.98.0.1/24
listenport = 51999
privatekey = {private}

[PEER]
publickey = {peer}
PRESHAREDKEY = {preshared}
allowedips = 10.98.0.2/32
""")
    endpoint = "postgres://k3s:PLANTED-datastore-password@db.internal:5432/k3s"
    env_file = tmp_path / "k3s.service.env"
    env_file.write_text(f"K3S_DATASTORE_ENDPOINT='{endpoint}'\n")
    ssh = ssh_of(sshd, fake_hosts, WG_DIR=str(wg_dir), WG_INTERFACE="wgl0", WG_NETNS="", K3S_ENV_FILE=str(env_file))
    sent = {}
    for role in ("vpn", "k3s"):
        lines, error = discover_hosts.run(ssh, role, sshd.host)
        assert error is None and lines
        text = "\n".join("\t".join(line) for line in lines)
        assert not [value for value in (private, preshared, "PLANTED-datastore-password") if value in text]
        sent[role] = lines
    wg = discover_hosts.vpn_facts(sent["vpn"], [])["wireguard"]
    assert (wg["config"]["address"], wg["config"]["listenPort"]) == ("10.98.0.1/24", 51999)
    assert wg["privateKey"]["where"] == "inline" and wg["publicKey"] == public
    assert [(p["publicKey"], p["allowedIps"], p["presharedKey"]) for p in wg["peers"]] == [(peer, "10.98.0.2/32", True)]
    k3s = discover_hosts.k3s_facts(sent["k3s"], targets("prod"), [])["k3s"]
    assert k3s["env"] == {str(env_file): {"K3S_DATASTORE_ENDPOINT": "[redacted]"}}


def test_an_unreachable_host_is_an_error_not_a_crash(sshd, fake_hosts, prod_targets):
    ssh = dataclasses.replace(ssh_of(sshd, fake_hosts), port=1)  # nothing listens on port 1
    hosts, secrets = discover_hosts.discover(prod_targets, ssh)
    assert {role: h["reached"] for role, h in hosts.items()} == {"k3s": False, "vpn": False}
    assert "Connection refused" in hosts["k3s"]["error"]
    assert not [s for s in secrets if s["configKey"] == "sshPrivateKey"]


def test_a_user_other_than_root_goes_through_sudo():
    command = discover_hosts.Ssh(user="ubuntu", host_env=(("K3S_DATA_DIR", "/srv/k3s"),)).command("10.0.0.1")
    assert command[-1] == "sudo -n env K3S_DATA_DIR=/srv/k3s bash -s"
    assert "BatchMode=yes" in command


def test_sshd_settings_the_baseline_sets_are_read_as_sshd_has_them_in_effect(found):
    # tests/sshd.py: key logins only, root by key (sshd -T prints prohibit-password as without-password).
    hosts, _ = found
    for role in ("k3s", "vpn"):
        assert hosts[role]["sshd"] == {"settings": {"passwordauthentication": "no", "kbdinteractiveauthentication": "no",
                                                    "permitrootlogin": "without-password"}}


def test_sshd_discovery_reads_the_settings_host_baseline_sets():
    baseline = (HOST_FILES / "host-baseline.sh").read_text()
    declared = re.search(r"^declare -A ssh_settings=\((.*)\)$", baseline, flags=re.M).group(1)
    listed = re.search(r"^SSHD_KEYS='(.*)'$", (HOST_FILES / "discover-sshd.sh").read_text(), flags=re.M).group(1)
    assert sorted(listed.split()) == sorted(re.findall(r"\[(\w+)\]=", declared))


def test_an_sshd_that_cannot_print_its_settings_is_an_error_not_a_setting(sshd, fake_hosts, prod_targets):
    vpn_only = dataclasses.replace(prod_targets, hosts=("vpn",))
    hosts, _ = discover_hosts.discover(vpn_only, ssh_of(sshd, fake_hosts, SSHD_CONFIG="/nonexistent/sshd_config"))
    assert hosts["vpn"]["reached"] and "/nonexistent/sshd_config" in hosts["vpn"]["sshd"]["error"]


def test_what_postgres_owns_outside_public_is_read_in_each_database_whatever_its_name(sshd, fake_hosts, prod_targets,
                                                                                      pg):
    """pg-database.sh hands the stage's role what postgres owns in public only: discovery lists the rest, in
    every database, one whose name libpq would read as a connection string included."""
    odd = "x=katforge odd"
    pg.psql(f'CREATE DATABASE "{odd}"')
    try:
        pg.psql("CREATE SCHEMA ops; CREATE TABLE ops.jobs (id int); CREATE TABLE public.mine (id int)",
                database=f"dbname='{odd}'")  # psql -d reads the bare name as a connection string
        hosts, _ = discover_hosts.discover(k3s_only(prod_targets), ssh_of(sshd, fake_hosts))
    finally:
        pg.psql(f'DROP DATABASE "{odd}" WITH (FORCE)')
    postgres = hosts["k3s"]["postgres"]
    assert "foreignOwnedErrors" not in postgres or odd not in postgres["foreignOwnedErrors"], postgres
    assert postgres["foreignOwned"][odd] == [["schema", "ops"], ["table", "ops.jobs"]]
