"""`python -m tools.discover` end to end: AWS (the simulated live account in moto's server), the cluster
(tests/kube_api.py) and both hosts over real SSH, into one JSON file; the same estate twice gives the
same bytes, and no secret planted anywhere reaches the file or the terminal; then it sets what it found in a
copy of the stack file, and a second run over the same estate changes no byte of it."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("lightkube", reason="lightkube is not installed: make test must install requirements-tools.txt")

from tests.discovered import stack_copy
from tests.kube_api import PLANTED
from tools import discover
from tools.offline import ROOT, project_config_schema
from tools.stackfile import read as read_stack_file

# The runbook's discovery runs (tests/discovered.py), shared with the preflight tests; they bring the
# session's servers (moto, the Kubernetes API, sshd and the fake hosts).
pytest_plugins = ["tests.discovered"]


def test_every_source_is_read_into_one_file(adoption, live_account):
    run = adoption.runs[0]
    assert run.status == 0, run.stdout
    document = run.document
    assert document["schema"] == 2 and document["stack"] == "prod"
    assert {s: state["status"] for s, state in document["sources"].items()} == {
        "aws": "read", "cluster": "read", "hosts": "read"}
    made = live_account.made
    imported = {(i["type"], i["id"]) for i in document["imports"]}
    assert {("aws:ec2/instance:Instance", made["k3s"]["instance"]), ("aws:ec2/eip:Eip", made["vpn"]["allocation"]),
            ("aws:iam/user:User", "ses-sender"), ("kubernetes:apps/v1:Deployment", "default/api"),
            ("kubernetes:helm.cattle.io/v1:HelmChartConfig", "kube-system/traefik")} <= imported
    at = {i["at"]: i["id"] for i in document["imports"]}
    assert at["aws.instances.k3s"] == made["k3s"]["instance"]
    assert at["cluster.objects.Namespace ci"] == "ci"
    assert document["hosts"]["k3s"]["k3s"]["traefikManifest"]["present"] is True


def test_live_secrets_are_commands_to_run_never_values(adoption, sshd, fake_hosts, kube_api):
    run = adoption.runs[0]
    commands = {s["configKey"]: s["command"] for s in run.document["secrets"] if s["command"]}
    assert commands == {"ghcrToken": "pulumi config set --secret katforge:ghcrToken --stack prod",
                        "sshPrivateKey": f"pulumi config set --secret katforge:sshPrivateKey --stack prod < {sshd.key}"}
    for command in commands.values():
        assert command in run.stdout
    planted = [*fake_hosts.planted, *PLANTED.values(), kube_api.token]
    shown = [text for r in adoption.runs for text in (r.stdout, r.json.decode())] + [adoption.written.decode()]
    assert not [value for value in planted if any(value in text for text in shown)]


def test_a_second_run_writes_the_same_bytes(adoption):
    assert adoption.runs[0].json == adoption.runs[1].json


def test_discovery_sets_every_import_and_live_fact_in_the_stack_file(adoption, live_account, fake_hosts):
    config = read_stack_file(adoption.stack_file, project_config_schema())
    made = live_account.made
    imports = dict(line.split("=", 1) for line in config["katforge:imports"])
    assert {key: imports.get(key) for key in ("Instance:k3s", "Instance:vpn", "Eip:k3s", "EipAssociation:vpn",
                                              "User:ses-sender", "KeyPair:operators", "Namespace:cluster-ci-namespace",
                                              "Deployment:apps-api")} == {
        "Instance:k3s": made["k3s"]["instance"], "Instance:vpn": made["vpn"]["instance"],
        "Eip:k3s": made["k3s"]["allocation"], "EipAssociation:vpn": made["vpn"]["association"],
        "User:ses-sender": "ses-sender", "KeyPair:operators": "katforge-operators",
        "Namespace:cluster-ci-namespace": "ci", "Deployment:apps-api": "default/api"}
    # The HelmChartConfig the manifest file applies is handed over (deleted, then created), not imported.
    assert "HelmChartConfig:cluster-traefik-config" not in imports
    assert {key: config.get(f"katforge:{key}") for key in (
        "k3sRootVolumeEncrypted", "vpnRootVolumeEncrypted", "vpnRootVolumeGb", "vpnRootVolumeType", "vpnSubnetId",
        "k3sKeepSecurityGroups", "vpnKeepSecurityGroups", "k3sSecretsEncryption")} == {
        "k3sRootVolumeEncrypted": "false", "vpnRootVolumeEncrypted": "false", "vpnRootVolumeGb": "20",
        "vpnRootVolumeType": "gp2", "vpnSubnetId": made["vpn"]["subnet"],
        "k3sKeepSecurityGroups": [made["k3s"]["group"]], "vpnKeepSecurityGroups": [made["vpn"]["group"]],
        "k3sSecretsEncryption": "false"}
    assert sorted(config["katforge:zoneIds"]) == sorted(f"{z}={i}" for z, i in made["zones"].items())
    peers = {line.split(",")[1]: line for line in config["katforge:wireguardPeers"]}
    live = fake_hosts.wg["peers"]
    assert peers[live["alice-laptop"]] == f"alice-laptop,{live['alice-laptop']},10.99.0.2/32"  # named by its comment
    assert peers[live["bob-phone"]].endswith(",10.99.0.3/32") and peers[live["bob-phone"]].startswith("live-")
    if fake_hosts.wg.get("netns"):  # only the running interface has it
        assert peers[live["runtime-only"]].endswith(",10.99.0.9/32")
    assert sorted(config["katforge:imageTags"]) == ["api=v1.4.2", "lextris=v1.4.2", "stumper=v1.4.2", "web=v1.4.2"]
    # What only repeats a default stays out of the file: the k3s host's 30 GB gp3, WireGuard's port and network.
    assert not {"katforge:k3sRootVolumeGb", "katforge:k3sRootVolumeType", "katforge:wireguardPort",
                "katforge:vpnClientCidr"} & set(config)
    assert "katforge:imports: " in adoption.runs[1].stdout


def test_a_second_run_over_the_same_estate_changes_no_byte_of_the_stack_file(adoption):
    assert adoption.after_last == adoption.before_last
    assert "nothing changed" in adoption.runs[2].stdout


def test_the_committed_stack_files_are_never_written(adoption):
    assert (ROOT / "Pulumi.prod.yaml").read_bytes() == adoption.committed


def test_without_write_config_the_stack_file_stays(adoption):
    assert "Pulumi.prod.yaml" not in adoption.runs[0].stdout


def test_an_empty_account_has_nothing_to_import(greenfield):
    assert greenfield.status == 0, greenfield.stdout
    document = greenfield.document
    assert document["imports"] == [] and document["secrets"] == []

    assert document["sources"]["cluster"] == {"status": "skipped", "why": "--no-cluster"}
    assert document["cluster"] is None and document["hosts"] is None


def test_a_source_that_cannot_be_read_fails_the_run_and_says_why(tmp_path):
    out = tmp_path / "failed.json"
    missing = tmp_path / "no-such-kubeconfig"
    assert discover.main(["--stack", "qa", "--no-aws", "--no-hosts", "--kubeconfig", str(missing),
                          "--out", str(out), "--no-write-config"], io.StringIO()) == 1
    cluster = json.loads(out.read_text())["sources"]["cluster"]
    assert cluster["status"] == "error" and cluster["kubeconfig"] == str(missing)


def test_help_reads_like_a_readme_paragraph():
    result = subprocess.run([sys.executable, "-m", "tools.discover", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert "read-only" in result.stdout.lower() and "pulumi config set --secret" in result.stdout
    assert "build/discovered-<stack>.json" in result.stdout


def test_host_settings_must_be_name_value(capsys):
    with pytest.raises(SystemExit) as refused:
        discover.main(["--stack", "prod", "--host-env", "K3S_DATA_DIR"])
    assert refused.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


# --- the live facts as config, piece by piece ------------------------------------------------------

def volume_estate(size: int, type_: str) -> dict:
    return {"aws": {"instances": {"k3s": {"exists": True, "rootVolume": {"sizeGb": size, "type": type_,
                                                                         "encrypted": False}}}}}


def test_a_larger_volume_or_another_type_the_stack_file_names_is_kept():
    # Another type and a larger size change in place: the operator's choice stands.
    own = {"katforge:k3sRootVolumeGb": "40", "katforge:k3sRootVolumeType": "gp3"}
    assert discover.host_facts(volume_estate(30, "gp2"), own) == {
        "k3sRootVolumeEncrypted": False, "k3sRootVolumeGb": 40, "k3sRootVolumeType": "gp3"}
    # A volume never shrinks, and encryption never changes: the live values win.
    assert discover.host_facts(volume_estate(50, "gp2"), {**own, "katforge:k3sRootVolumeEncrypted": "true"}) == {
        "k3sRootVolumeEncrypted": False, "k3sRootVolumeGb": 50, "k3sRootVolumeType": "gp3"}
    assert discover.host_facts(volume_estate(30, "gp2"), {}) == {
        "k3sRootVolumeEncrypted": False, "k3sRootVolumeGb": 30, "k3sRootVolumeType": "gp2"}


KEYS = [f"{c * 43}=" for c in "ABCDE"]


def wireguard_estate(*peers: dict) -> dict:
    return {"hosts": {"vpn": {"wireguard": {"config": {"address": "10.8.0.1/24", "listenPort": 51821},
                                            "running": None, "peers": list(peers)}}}}


def test_live_peers_join_the_config_named_by_their_comment_or_live_n():
    current = {"katforge:wireguardPeers": [f"alice,{KEYS[0]},10.8.0.9/32", f"live-1,{KEYS[4]},10.8.0.20/32"]}
    values, notes = discover.wireguard_facts(wireguard_estate(
        {"publicKey": KEYS[0], "allowedIps": "10.8.0.2/32", "name": "alice"},  # in config, at another address
        {"publicKey": KEYS[1], "allowedIps": "10.8.0.3/32", "name": "Bob's Phone"},
        {"publicKey": KEYS[2], "allowedIps": "10.8.0.4/32", "name": None},
        {"publicKey": KEYS[3], "allowedIps": "10.8.0.5/32, 10.8.0.6/32", "name": "two"}), current)
    assert values == {"wireguardPort": 51821, "vpnClientCidr": "10.8.0.0/24", "wireguardPeers": [
        f"alice,{KEYS[0]},10.8.0.2/32", f"live-1,{KEYS[4]},10.8.0.20/32", f"bob-s-phone,{KEYS[1]},10.8.0.3/32",
        f"live-2,{KEYS[2]},10.8.0.4/32"]}
    assert len(notes) == 1 and KEYS[3] in notes[0]  # two addresses: one line cannot say it; preflight names it


def test_secrets_encryption_follows_the_live_cluster_unless_the_operator_opted_in():
    estate = {"hosts": {"k3s": {"k3s": {"secretsEncryption": {"status": "Disabled"}}}}}
    assert discover.k3s_facts(estate, {}) == {"k3sSecretsEncryption": False}
    assert discover.k3s_facts(estate, {"katforge:k3sEncryptExistingSecrets": "true"}) == {}


def test_a_config_the_program_refuses_is_written_and_fails_the_run(adoption, tmp_path, monkeypatch):
    document = adoption.runs[1].document
    document["aws"]["instances"]["k3s"]["elasticIp"]["publicIp"] = "3.19.192.158"  # not katforge:k3sPublicIp
    monkeypatch.setattr(discover, "discover", lambda args: document)
    stdout = io.StringIO()
    status = discover.main(["--stack", "prod", "--stack-file", str(stack_copy(tmp_path)),
                            "--out", str(tmp_path / "discovered.json")], stdout)
    assert status == 1
    assert "katforge:imports: " in stdout.getvalue()  # written all the same, for the operator to correct
    assert stdout.getvalue().rstrip().endswith("is this the right allocation?")
