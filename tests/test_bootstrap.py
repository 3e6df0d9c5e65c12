"""The host bootstrap as the offline plan declares it: what runs where, in which order, when it runs
again, and that no secret ever sits in a command line."""
from __future__ import annotations

import shlex
import shutil

import pytest
import yaml

import infra.bootstrap as bootstrap
import tools.offline as offline
from infra.settings import K3S_TRAEFIK_CHART, SettingsError
from tests.shared import CHARTS, require
from tools.offline import effective_config, evaluate, evaluate_cached, unwrap

COMMAND = "command:remote:Command"
PUBLIC_IP, PRIVATE_IP, VPN_IP = "198.51.100.166", "172.31.14.98", "198.51.100.192"

K3S_YAML = offline.HOST_OUTPUT["bootstrap-kubeconfig"]
VPN_KEY = offline.HOST_OUTPUT["bootstrap-wireguard"]


@pytest.fixture(scope="module")
def prod_with_host_output():
    """prod evaluated afresh; the offline hosts print what real ones would (tools/offline.HOST_OUTPUT)."""
    return evaluate("prod")


def runs(plan):
    """The bootstrap's commands that run a script or read the host, without the steps that install scripts."""
    return [r for r in plan.of_type(COMMAND)
            if "katforge:bootstrap:" in (r.parent or "") and not r.name.endswith("-script")]


def command_line(resource) -> dict[str, str]:
    """The NAME=value assignments of a `sudo env ... bash script` command line."""
    words = shlex.split(resource.raw_inputs["create"])
    return dict(word.split("=", 1) for word in words if "=" in word)


def depends_on(plan, later: str, earlier: str) -> bool:
    """Whether `later` waits for `earlier`, directly or through other resources."""
    by_urn = {r.urn: r for r in plan.resources}
    target = plan.named(earlier, COMMAND).urn
    seen, todo = set(), list(plan.named(later, COMMAND).options["depends_on"])
    while todo:
        urn = todo.pop()
        if urn == target:
            return True
        if urn not in seen and urn in by_urn:
            seen.add(urn)
            todo += by_urn[urn].options["depends_on"]
    return False


# --- k3s -----------------------------------------------------------------------------------------

def test_k3s_config_names_the_api_and_the_node(prod):
    config = yaml.safe_load(prod.named("bootstrap-k3s", COMMAND).raw_inputs["stdin"])
    assert config == {
        "tls-san": ["k3s.katforge.com", PUBLIC_IP],
        "node-ip": PRIVATE_IP,
        "node-external-ip": PUBLIC_IP,
        "write-kubeconfig-mode": "0600",
        "secrets-encryption": True,
        "kubelet-arg": bootstrap.kubelet_args(),  # their figures: tests/test_capacity.py
    }


def test_k3s_release_is_pinned_and_bundles_traefik_chart_39_or_newer(prod):
    pinned = offline.project_config_schema()["k3sVersion"]["default"]
    assert command_line(prod.named("bootstrap-k3s", COMMAND))["K3S_VERSION"] == pinned
    assert pinned.startswith("v1.34.")
    chart = K3S_TRAEFIK_CHART[pinned]
    assert int(chart.split(".")[0]) >= 39


def test_the_pinned_releases_traefik_chart_is_vendored():
    pinned = offline.project_config_schema()["k3sVersion"]["default"]
    charts = require(CHARTS, "to check the Traefik values against the chart the pinned k3s bundles")
    assert (charts / f"values.schema.v{K3S_TRAEFIK_CHART[pinned]}.json").exists()


def test_an_unrecorded_k3s_release_stops_the_program():
    with pytest.raises(SettingsError, match="K3S_TRAEFIK_CHART"):
        evaluate("prod", {"katforge:k3sVersion": "v1.34.99+k3s1"})


def test_kubeconfig_is_read_back_as_a_secret_pointed_at_the_public_api(prod_with_host_output):
    plan = prod_with_host_output
    read = plan.named("bootstrap-kubeconfig", COMMAND)
    assert read.inputs["logging"] == "none"
    assert {"stdout", "stderr"} <= set(read.options["additional_secret_outputs"])
    assert "kubeconfig" in plan.secret_outputs
    kubeconfig = yaml.safe_load(plan.raw_outputs["kubeconfig"])
    original = yaml.safe_load(K3S_YAML)
    assert [c["cluster"]["server"] for c in kubeconfig["clusters"]] == ["https://k3s.katforge.com:6443"]
    # Only the server moved: the CA and the credentials are k3s's own.
    original["clusters"][0]["cluster"]["server"] = "https://k3s.katforge.com:6443"
    assert kubeconfig == original


def test_qa_reads_the_cluster_from_prod_and_never_from_the_host(prod, qa):
    assert "kubeconfig" in prod.secret_outputs
    assert [r.name for r in runs(qa)] == ["database-role"]


def test_vpn_public_key_is_what_the_host_prints(prod_with_host_output):
    assert prod_with_host_output.raw_outputs["vpnPublicKey"] == VPN_KEY


# --- order ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("later, earlier", [
    ("bootstrap-kubeconfig", "bootstrap-k3s"),
    ("bootstrap-k3s", "bootstrap-k3s-baseline"),
    ("bootstrap-postgres-install", "bootstrap-k3s-baseline"),
    ("bootstrap-postgres-config", "bootstrap-postgres-install"),
    ("database-role", "bootstrap-postgres-config"),
    ("bootstrap-wireguard", "bootstrap-vpn-baseline"),
])
def test_steps_run_in_order(prod, later, earlier):
    assert depends_on(prod, later, earlier)


def test_each_script_is_installed_before_it_runs(prod):
    for run in runs(prod):
        if run.name != "bootstrap-kubeconfig":
            assert depends_on(prod, run.name, f"{run.name}-script"), run.name


# --- triggers ------------------------------------------------------------------------------------

def triggers(plan) -> dict[str, object]:
    return {r.name: unwrap(r.raw_inputs["triggers"]) for r in runs(plan)}


def test_every_run_is_triggered_by_a_hash_that_is_stable_across_evaluations(prod, prod_with_host_output):
    first = triggers(prod)
    assert set(first) == {"bootstrap-k3s-baseline", "bootstrap-vpn-baseline", "bootstrap-k3s", "bootstrap-kubeconfig",
                          "bootstrap-traefik-handover", "bootstrap-postgres-install", "bootstrap-postgres-config",
                          "bootstrap-wireguard", "database-role"}
    hashes = [value[0] for name, value in first.items() if name != "bootstrap-kubeconfig"]
    assert all(len(value) == 64 and int(value, 16) >= 0 for value in hashes)
    assert triggers(prod_with_host_output) == first  # a second evaluation: nothing would run again


def test_a_new_release_or_an_edited_script_reruns_only_its_own_steps(prod, monkeypatch, tmp_path):
    monkeypatch.setitem(K3S_TRAEFIK_CHART, "v1.34.7+k3s1", "39.0.5")
    host_files = tmp_path / "host"
    shutil.copytree(bootstrap.HOST_FILES, host_files)
    with (host_files / "pg-configure.sh").open("a") as script:
        script.write("# an edit\n")
    monkeypatch.setattr(bootstrap, "HOST_FILES", host_files)
    changed = triggers(evaluate("prod", {"katforge:k3sVersion": "v1.34.7+k3s1"}))
    before = triggers(prod)
    assert {name for name in before if changed[name] != before[name]} == {
        "bootstrap-k3s", "bootstrap-kubeconfig",  # the new release, and the kubeconfig it rewrites
        "bootstrap-postgres-config",  # the edited script
    }


def test_k3s_release_library_is_installed_beside_both_installers_and_reruns_them(prod, monkeypatch, tmp_path):
    """k3s-install.sh and k3s-agent-install.sh source k3s-release.sh: it is on the host before they run,
    and an edit of it reruns them as an edit of their own text would."""
    library = prod.named("bootstrap-k3s-k3s-release-script", COMMAND)
    assert library.urn in prod.named("bootstrap-k3s", COMMAND).options["depends_on"]
    assert library.inputs["create"].endswith(f"/prod/{bootstrap.K3S_RELEASE}")
    host_files = tmp_path / "host"
    shutil.copytree(bootstrap.HOST_FILES, host_files)
    with (host_files / bootstrap.K3S_RELEASE).open("a") as script:
        script.write("# an edit\n")
    monkeypatch.setattr(bootstrap, "HOST_FILES", host_files)
    changed, before = triggers(evaluate("prod")), triggers(prod)
    assert {name for name in before if changed[name] != before[name]} == {"bootstrap-k3s", "bootstrap-kubeconfig"}


# --- secrets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_no_secret_is_in_any_command_line(stack):
    plan = evaluate_cached(stack)
    config, secret_keys = effective_config(stack)
    secrets = [config[key] for key in secret_keys]
    commands = plan.of_type(COMMAND)
    assert commands
    for resource in commands:
        for field in ("create", "update", "delete"):
            line = resource.raw_inputs.get(field, "")
            assert isinstance(line, str), f"{resource.name}.{field} is secret"
            assert not any(secret in line for secret in secrets), f"{resource.name}.{field}"


@pytest.mark.parametrize("stack, role", [("prod", "katforge"), ("qa", "katforge_qa")])
def test_each_stack_creates_its_own_role_with_the_password_on_stdin(stack, role):
    plan = evaluate_cached(stack)
    config, _ = effective_config(stack)
    database = plan.named("database-role", COMMAND)
    assert command_line(database) == {"PG_DATABASE": role, "PG_ROLE": role}
    assert database.inputs["stdin"] == "[secret]"
    assert unwrap(database.raw_inputs["stdin"]) == config["katforge:dbPassword"]


def test_qa_reaches_the_k3s_host_through_prod_outputs(prod, qa):
    connection = unwrap(qa.named("database-role", COMMAND).raw_inputs["connection"])
    assert connection["host"] == prod.raw_outputs["k3sPublicIp"] == PUBLIC_IP
    assert connection["user"] == "ubuntu"


# --- hosts ---------------------------------------------------------------------------------------

def test_both_hosts_get_the_baseline_over_ssh_as_ubuntu(prod):
    config, _ = effective_config("prod")
    for name, address in (("bootstrap-k3s-baseline", PUBLIC_IP), ("bootstrap-vpn-baseline", VPN_IP)):
        run = prod.named(name, COMMAND)
        assert "host-baseline.sh" in run.raw_inputs["create"]
        connection = unwrap(run.raw_inputs["connection"])
        assert (connection["host"], connection["user"], connection["privateKey"]) == \
            (address, "ubuntu", config["katforge:sshPrivateKey"])


def test_postgres_listens_on_the_node_and_admits_exactly_the_three_networks(prod):
    configure = prod.named("bootstrap-postgres-config", COMMAND)
    assert command_line(configure) == {"PG_LISTEN_ADDRESSES": f"localhost,{PRIVATE_IP}",
                                       "PG_CLIENT_CIDRS": "10.0.0.0/8 172.16.0.0/12 172.31.0.0/16",
                                       "PG_ALLOW_RESTART": "0", "PG_DROP_LIVE_HBA_RULES": "0"}
    assert configure.raw_inputs["stdin"] == (bootstrap.HOST_FILES / "postgresql-katforge.conf").read_text()


def test_wireguard_gets_its_peers_and_nats_into_the_vpc_and_the_k3s_address():
    peer = "laptop,YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=,10.99.0.2/32"
    plan = evaluate("prod", {"katforge:wireguardPeers": [peer]})
    wireguard = plan.named("bootstrap-wireguard", COMMAND)
    assert command_line(wireguard) == {"WG_ADDRESS": "10.99.0.1/24", "WG_PORT": "51820",
                                       "WG_NAT_CIDRS": f"172.31.0.0/16 {PUBLIC_IP}/32"}
    assert wireguard.raw_inputs["stdin"] == peer + "\n"
    assert unwrap(wireguard.raw_inputs["connection"])["host"] == VPN_IP


def test_what_a_script_may_do_to_a_live_host_only_an_operator_allows(prod):
    """Restarting PostgreSQL, overriding a live k3s flag and encrypting a running cluster's Secrets are
    each off until config says otherwise; the port and encryption follow what discovery found live."""
    assert command_line(prod.named("bootstrap-k3s", COMMAND))["K3S_REPLACE_LIVE_FLAGS"] == "0"
    assert command_line(prod.named("bootstrap-k3s", COMMAND))["K3S_ENCRYPT_EXISTING_SECRETS"] == "0"
    plan = evaluate("prod", {"katforge:postgresAllowRestart": "true", "katforge:k3sReplaceLiveFlags": "true",
                             "katforge:postgresDropLiveHbaRules": "true",
                             "katforge:postgresExtraClientCidrs": ["192.168.0.0/16"],
                             "katforge:k3sEncryptExistingSecrets": "true", "katforge:k3sSecretsEncryption": "false",
                             "katforge:wireguardPort": "41820"})
    k3s = plan.named("bootstrap-k3s", COMMAND)
    assert command_line(k3s)["K3S_REPLACE_LIVE_FLAGS"] == command_line(k3s)["K3S_ENCRYPT_EXISTING_SECRETS"] == "1"
    assert "secrets-encryption" not in yaml.safe_load(k3s.raw_inputs["stdin"])
    postgres = command_line(plan.named("bootstrap-postgres-config", COMMAND))
    assert postgres["PG_ALLOW_RESTART"] == postgres["PG_DROP_LIVE_HBA_RULES"] == "1"
    assert postgres["PG_CLIENT_CIDRS"] == "10.0.0.0/8 172.16.0.0/12 172.31.0.0/16 192.168.0.0/16"
    assert command_line(plan.named("bootstrap-wireguard", COMMAND))["WG_PORT"] == "41820"
    [rule] = [r for r in plan.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
              if r.inputs["ipProtocol"] == "udp"]
    assert rule.inputs["fromPort"] == rule.inputs["toPort"] == 41820


def test_postgres_and_k3s_never_restart_together(prod):
    """Both restarts take one host lock (infra/host/*.sh); Pulumi also runs the two one after the other."""
    assert depends_on(prod, "bootstrap-postgres-config", "bootstrap-k3s")


def test_a_replaced_hosts_old_file_installs_go_before_the_new_ones_land(prod):
    """Old and new host answer at the same Elastic IP: an old install's `rm` run after the new install
    would delete the file again. Every file install on a host (bootstrap and backups) deletes first."""
    installs = [r for r in prod.of_type(COMMAND) if r.inputs["create"].startswith("sudo install -D")]
    assert len(installs) >= 10
    assert all(r.options["delete_before_replace"] for r in installs), [
        r.name for r in installs if not r.options["delete_before_replace"]]
