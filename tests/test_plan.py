"""`make plan`: the summary people read and the JSON machines diff."""
import json
import os
import subprocess
import sys

import pytest

from infra import capacity
from tools import plan as plan_cli
from tools.offline import ROOT, evaluate, evaluate_cached


@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_same_inputs_give_byte_identical_json(stack):
    """`make plan`'s own command, in a process of its own with another hash seed than this one's, writes the
    same bytes as this process's plan of the stack, evaluated just after (cheaper than a second command)."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # this process's: that value, or random
    subprocess.run([sys.executable, "-m", "tools.plan", "--stack", stack, "--json-only"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    written = (ROOT / "build" / f"plan-{stack}.json").read_bytes()
    assert written == evaluate(stack).to_json().encode()
    document = json.loads(written)
    assert document["stack"] == stack and document["resources"]


def test_summary_shows_components_dns_rules_and_hosts():
    plan = evaluate_cached("prod")
    text = plan_cli.summary(plan)
    # Nothing is imported in the committed config: the Elastic IP is a new one, its address a stand-in.
    address = plan.raw_outputs["k3sPublicIp"]
    components = text.split("Resources by component")[1].split("\n\n")[0]
    assert "  Addresses addresses\n    Eip k3s  [protected]\n    Eip vpn  [protected]\n" in components
    assert ("  Hosts hosts\n    Host k3s\n      EipAssociation k3s  [protected]\n      Instance k3s  [protected]"
            in components)
    dns = text.split("DNS records")[1].split("\n\n")[0]
    assert any(line.split()[:3] == ["katforge.com", "A", address] for line in dns.splitlines())
    rules = text.split("Security group ingress")[1].split("\n\n")[0]
    assert any(line.split()[:3] == ["k3s", "tcp/5432", "172.31.0.0/16"] for line in rules.splitlines())
    budget = text.split(f"Memory budget of the k3s host ({capacity.HOST_MEMTOTAL_MIB} MiB):")[1].split("\n\n")[0]
    assert "PostgreSQL 16" in budget and "default/api" in budget and "qa/api" in budget and "headroom" in budget
    hosts = text.split("\nHosts\n")[1].split("\n\n")[0]
    assert any(line.split()[:4] == ["k3s", "t3.medium", "172.31.14.98", address] for line in hosts.splitlines())


def test_summary_says_which_values_are_stand_ins_and_never_shows_a_secret_one():
    plan = evaluate_cached("prod")
    section = plan_cli.summary(plan).split("Known only after deploy")[1].split("\n\n")[0]
    rows = {line.split("  ")[0]: line.split() for line in section.splitlines()[3:]}
    eip = plan.named("k3s", "aws:ec2/eip:Eip").urn
    uses = next(len({use["urn"] for use in e["usedIn"]}) for e in plan.document()["knownAfterDeploy"]
                if e["standsFor"] == [{"urn": eip, "property": "publicIp"}])
    assert rows["k3s publicIp (Eip)"][-2:] == [plan.raw_outputs["k3sPublicIp"], str(uses)] and uses > 10
    assert rows["k3s id (Eip, EipAssociation, 3 more)"][-2] == "k3s-id"
    assert rows["dns-challenge secret (AccessKey)"][-2] == "[secret]"
    assert "offline-secret" not in section and "offline-smtp" not in section
    # What lookups answered is known: the VPC, the zones, the AMI are no stand-ins.
    assert "vpc-" not in section and "Z0292557263L1FJT7JXXS" not in section and "ami-" not in section


def test_summary_and_json_never_show_secrets():
    plan = evaluate_cached("prod")
    assert plan.outputs["sesSmtpPassword"] == "[secret]"
    for text in (plan_cli.summary(plan), plan.to_json()):
        assert "offline-placeholder" not in text and "offline-smtp" not in text and "offline-secret" not in text


def test_cli_writes_the_plan_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan_cli, "BUILD", tmp_path)
    assert plan_cli.main(["--stack", "qa"]) == 0
    assert json.loads((tmp_path / "plan-qa.json").read_text())["stack"] == "qa"
    assert "qa.katforge.com" in capsys.readouterr().out
