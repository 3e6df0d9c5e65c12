"""The offline harness's JSON plan: values only a deployment knows read "(known after deploy)", what
lookups and imports answer stays known, and secrets are keyed hashes that change when the secret does."""
import ipaddress
import json

import pytest

from tools.offline import KNOWN_AFTER_DEPLOY, evaluate, evaluate_cached, secret_digest
from tools.plan_diff import diff_plans, render

IMPORTS = {"katforge:imports": ["Instance:k3s=i-0abc12345def67890", "Eip:k3s=eipalloc-0123456789abcdef0",
                                 "EipAssociation:k3s=eipassoc-0123456789abcdef0"]}


@pytest.fixture(scope="module")
def document():
    return json.loads(evaluate_cached("prod").to_json())


def named(document, name, type_):
    (found,) = [r for r in document["resources"] if r["name"] == name and r["type"] == type_]
    return found


@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_no_stand_in_reaches_the_json(stack):
    text = evaluate_cached(stack).to_json()
    for stand_in in ("k3s-id", "vpn-id", "backups-id", ":123456789012:", "198.51.100.", "192.0.2.", "eipalloc-",
                     "eni-", "offline-verification-token", "dkimone", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="):
        assert stand_in not in text, stand_in
    assert KNOWN_AFTER_DEPLOY in text


def test_what_lookups_answer_is_known(document):
    text = json.dumps(document)
    for known in ("ami-0ubuntu2404noble0", "Z0292557263L1FJT7JXXS", "subnet-0a1b2c3d4e5f60001"):
        assert known in text
    assert named(document, "k3s", "aws:ec2/instance:Instance")["inputs"]["ami"] == "ami-0ubuntu2404noble0"


def test_values_only_a_deployment_knows_read_known_after_deploy_and_are_listed(document):
    record = named(document, "katforge.com-a", "aws:route53/record:Record")
    assert record["inputs"]["records"] == [KNOWN_AFTER_DEPLOY]
    association = named(document, "k3s", "aws:ec2/eipAssociation:EipAssociation")["inputs"]
    assert association == {"allocationId": KNOWN_AFTER_DEPLOY, "instanceId": KNOWN_AFTER_DEPLOY}
    assert document["outputs"]["k3sInstanceId"] == KNOWN_AFTER_DEPLOY
    # A stand-in inside a longer value is replaced in place: the rest of it stays readable.
    wireguard = named(document, "bootstrap-wireguard", "command:remote:Command")
    assert f"172.31.0.0/16 {KNOWN_AFTER_DEPLOY}/32" in wireguard["inputs"]["create"]
    eip_address = next(e for e in document["knownAfterDeploy"]
                       if e["standsFor"] == [{"urn": named(document, "k3s", "aws:ec2/eip:Eip")["urn"],
                                              "property": "publicIp"}])
    assert {"urn": record["urn"], "path": "inputs.records[0]"} in eip_address["usedIn"]


def test_the_mocks_still_answer_with_usable_stand_ins():
    plan = evaluate_cached("prod")
    address = ipaddress.ip_address(plan.raw_outputs["k3sPublicIp"])
    assert address in ipaddress.ip_network("198.51.100.0/24")  # a documentation range, never a live address
    assert plan.placeholders[str(address)] == ((plan.named("k3s", "aws:ec2/eip:Eip").urn, "publicIp"),)


def test_an_import_keeps_its_id_and_its_live_address():
    plan = evaluate("prod", IMPORTS)
    document = plan.document()
    assert document["outputs"]["k3sInstanceId"] == "i-0abc12345def67890"
    assert document["outputs"]["k3sPublicIp"] == "3.19.192.157"  # what AWS reports for that allocation
    assert named(document, "katforge.com-a", "aws:route53/record:Record")["inputs"]["records"] == ["3.19.192.157"]
    eip = plan.named("k3s", "aws:ec2/eip:Eip").urn
    assert not any({"urn": eip, "property": "publicIp"} in e["standsFor"] for e in document["knownAfterDeploy"])
    # What AWS reports for the imported association, and for the instance: its live private address.
    assert named(document, "k3s", "aws:ec2/eipAssociation:EipAssociation")["inputs"] == {
        "allocationId": "eipalloc-0123456789abcdef0", "instanceId": "i-0abc12345def67890"}
    imported = {r.urn for r in plan.resources if r.options["import_id"]}
    assert len(imported) == 3
    assert not any(origin["urn"] in imported for e in document["knownAfterDeploy"] for origin in e["standsFor"]
                   if origin["property"] in ("id", "arn", "publicIp", "privateIp", "allocationId"))
    # The VPN host is new: its address is still a stand-in.
    assert document["outputs"]["vpnPublicIp"] == KNOWN_AFTER_DEPLOY


def test_a_secret_is_a_keyed_hash_that_changes_with_the_secret_and_never_shows_it(document):
    rotated_password = "rotated-Xq7-password"
    rotated = json.loads(evaluate("prod", {"katforge:dbPassword": rotated_password}).to_json())
    old, new = (named(d, "apps-database", "kubernetes:core/v1:Secret")["inputs"]["stringData"]
                for d in (document, rotated))
    assert old.startswith("[secret ") and new.startswith("[secret ") and old != new
    assert rotated_password not in json.dumps(rotated)
    # Other secrets did not change, so they hash alike.
    assert named(rotated, "cluster-traefik-route53", "kubernetes:core/v1:Secret")["inputs"]["stringData"] == \
        named(document, "cluster-traefik-route53", "kubernetes:core/v1:Secret")["inputs"]["stringData"]
    text = render([diff_plans(document, rotated)], "main")
    assert "`stringData`: secret changed" in text and rotated_password not in text


def test_the_secret_hash_key_is_fixed():
    # A random key would make every plan differ from the last; the byte-identical test in
    # test_plan.py checks two processes, this pins the key itself.
    assert secret_digest({"a": "b"}) == "[secret 0f9b9da8]"


def test_a_plan_finds_the_zone_and_subnet_ids_discovery_wrote():
    """After `make discover`, the committed config names real IDs; `make plan` must still run."""
    plan = evaluate("prod", config={"katforge:zoneIds": ["katforge.com=ZREALKATFORGE", "stumper.gg=ZREALSTUMPER"],
                                            "katforge:vpnSubnetId": "subnet-0123456789abcdef0"})
    assert {r.inputs["zoneId"] for r in plan.of_type("aws:route53/record:Record")} == {"ZREALKATFORGE", "ZREALSTUMPER"}
    assert plan.named("vpn", "aws:ec2/instance:Instance").inputs["subnetId"] == "subnet-0123456789abcdef0"
