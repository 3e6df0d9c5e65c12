"""`python -m tools.discover` end to end: AWS (the simulated live account in moto's server), the cluster
(tests/kube_api.py) and both hosts over real SSH, into one JSON file; the same estate twice gives the
same bytes, and no secret planted anywhere reaches the file or the terminal."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightkube", reason="lightkube is not installed: make test must install requirements-tools.txt")

from tests.kube_api import PLANTED
from tools import discover
from tools.offline import ROOT

# Session fixtures (servers), shared by every module that names them here: imported, each module would
# start its own.
pytest_plugins = ["tests.fake_hosts", "tests.kube_api", "tests.live_account", "tests.sshd"]


def use_account(monkeypatch, account) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in account.env().items():
        monkeypatch.setenv(key, value)


def host_args(sshd, fake_hosts) -> list[str]:
    args = ["--ssh-key", str(sshd.key), "--ssh-user", sshd.user, "--ssh-port", str(sshd.port),
            "--k3s-host", sshd.host, "--vpn-host", sshd.host]
    args += [f"--ssh-option={option}" for option in sshd.options]
    return args + [f"--host-env={name}={value}" for name, value in fake_hosts.env.items()]


@pytest.fixture(scope="module")
def everything(live_account, kube_api, sshd, fake_hosts, tmp_path_factory):
    """Two runs of the whole discovery of prod: (exit status, stdout, file bytes) each."""
    monkeypatch = pytest.MonkeyPatch()
    use_account(monkeypatch, live_account)
    work = tmp_path_factory.mktemp("discover")
    kubeconfig = kube_api.kubeconfig(work / "katforge-config")
    runs = []
    try:
        for n in (1, 2):
            out = work / f"run{n}.json"
            argv = ["--stack", "prod", "--kubeconfig", str(kubeconfig), "--out", str(out), *host_args(sshd, fake_hosts)]
            stdout = io.StringIO()
            status = discover.main(argv, stdout)
            runs.append((status, stdout.getvalue(), out.read_bytes()))
    finally:
        monkeypatch.undo()
    return runs


def test_every_source_is_read_into_one_file(everything, live_account):
    status, stdout, written = everything[0]
    assert status == 0, stdout
    document = json.loads(written)
    assert document["schema"] == 1 and document["stack"] == "prod"
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


def test_live_secrets_are_commands_to_run_never_values(everything, sshd, fake_hosts, kube_api):
    status, stdout, written = everything[0]
    commands = {s["configKey"]: s["command"] for s in json.loads(written)["secrets"] if s["command"]}
    assert commands == {"ghcrToken": "pulumi config set --secret katforge:ghcrToken --stack prod",
                        "sshPrivateKey": f"pulumi config set --secret katforge:sshPrivateKey --stack prod < {sshd.key}"}
    for command in commands.values():
        assert command in stdout
    planted = [*fake_hosts.planted, *PLANTED.values(), kube_api.token]
    assert not [value for value in planted if value in stdout or value in written.decode()]


def test_a_second_run_writes_the_same_bytes(everything):
    assert everything[0][2] == everything[1][2]


def test_an_empty_account_has_nothing_to_import(empty_account, monkeypatch, tmp_path):
    use_account(monkeypatch, empty_account)
    out = tmp_path / "empty.json"
    assert discover.main(["--stack", "prod", "--no-cluster", "--no-hosts", "--out", str(out)], io.StringIO()) == 0
    document = json.loads(out.read_text())
    assert document["imports"] == [] and document["secrets"] == []
    assert document["sources"]["cluster"] == {"status": "skipped", "why": "--no-cluster"}
    assert document["cluster"] is None and document["hosts"] is None


def test_a_source_that_cannot_be_read_fails_the_run_and_says_why(tmp_path):
    out = tmp_path / "failed.json"
    missing = tmp_path / "no-such-kubeconfig"
    assert discover.main(["--stack", "qa", "--no-aws", "--no-hosts", "--kubeconfig", str(missing),
                          "--out", str(out)], io.StringIO()) == 1
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
