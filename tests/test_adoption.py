"""tools/adoption.py: each planned resource is matched with the place where discovery records the live
object at its name, and a live security group's rules with the planned rules that allow as much."""
from __future__ import annotations

import copy

import pytest

from tools import adoption
from tools.adoption import Peer, Rule
from tools.offline import CLOUD, ROOT

SG_K3S, SG_VPN = "sg-0k3slive", "sg-0vpnlive"


def rule(protocol: str, port: int, *, cidr: str = None, group: str = None, egress: bool = False) -> dict:
    return {"protocol": protocol, "fromPort": port, "toPort": port, "import": {"id": f"sgr-{protocol}{port}"},
            **({"cidrIpv4": cidr} if cidr else {"securityGroupId": group})}


def instance(role: str, group: str, ingress: list[dict]) -> dict:
    return {"exists": True, "import": {"type": "aws:ec2/instance:Instance", "id": f"i-0{role}"}, "vpcId": "vpc-0live",
            "privateIp": "172.31.14.98" if role == "k3s" else "172.31.20.4",
            "subnet": {"id": f"subnet-0{role}", "cidr": "172.31.0.0/20" if role == "k3s" else "172.31.16.0/20",
                       "availabilityZone": "us-east-2a"},
            "securityGroups": {group: {"name": role, "ingress": ingress, "egress": [
                {"protocol": "-1", "fromPort": -1, "toPort": -1, "cidrIpv4": "0.0.0.0/0"}]}},
            "elasticIp": {"exists": True, "import": {"id": f"eipalloc-0{role}"}, "publicIp": CLOUD["elastic_ips"][role],
                          "association": {"exists": True, "import": {"id": f"eipassoc-0{role}"}}}}


def estate() -> dict:
    """A discovered file, cut down to what these tests read."""
    return {
        "stack": "prod", "sources": {s: {"status": "read"} for s in adoption.SOURCES},
        "aws": {
            "instances": {
                "k3s": instance("k3s", SG_K3S, [rule("tcp", 443, cidr="0.0.0.0/0"), rule("tcp", 22, group=SG_VPN),
                                                rule("tcp", 22, cidr="203.0.113.7/32")]),
                "vpn": instance("vpn", SG_VPN, [rule("udp", 51820, cidr="0.0.0.0/0")]),
            },
            "iam": {"users": {"ses-sender": {"exists": True, "import": {"id": "ses-sender"}, "inlinePolicies": {}}},
                    "roles": {"katforge-github-preview": {"exists": True, "import": {"id": "katforge-github-preview"},
                                                          "inlinePolicies": {}, "attachedPolicies": {}}},
                    "instanceProfiles": {}, "policies": {}, "oidcProviders": {}},
            "keyPairs": {"katforge-operators": {"exists": False}},
            "buckets": {"katforge-db-backups": {"exists": True, "ours": False, "error": "another account holds it"}},
            "ses": {"identities": {"katforge.com": {"exists": True, "import": {"id": "katforge.com"},
                                                    "dkim": {"enabled": True, "import": {"id": "katforge.com"}},
                                                    "mailFrom": {"exists": False}}},
                    "configurationSets": {}},
            "route53": {"zones": {"katforge.com": {"exists": True, "id": "Z0LIVEKATFORGE"},
                                  "stumper.gg": {"exists": False}},
                        "records": [{"name": "katforge.com", "type": "A", "ttl": 3600, "values": ["3.19.192.157"],
                                     "import": {"id": "Z0LIVEKATFORGE_katforge.com_A"}}]},
        },
        "cluster": {"objects": {
            "HelmChartConfig kube-system/traefik": {
                "exists": True, "import": {"id": "kube-system/traefik"},
                "deployController": {"owned": True, "owner": adoption.TRAEFIK_ADDON}},
            "Namespace ci": {"exists": False},
        }},
        "hosts": None,
    }


@pytest.fixture(scope="module")
def found(prod):
    return {m.key: m for m in adoption.matches(prod, estate())}


def test_each_resource_maps_to_where_discovery_records_its_name(found):
    assert {key: found[key].at for key in ("Instance:k3s", "Eip:vpn", "EipAssociation:k3s", "User:ses-sender",
                                           "KeyPair:operators", "DomainDkim:katforge.com", "Record:katforge.com-a",
                                           "Namespace:cluster-ci-namespace")} == {
        "Instance:k3s": "aws.instances.k3s", "Eip:vpn": "aws.instances.vpn.elasticIp",
        "EipAssociation:k3s": "aws.instances.k3s.elasticIp.association", "User:ses-sender": "aws.iam.users.ses-sender",
        "KeyPair:operators": "aws.keyPairs.katforge-operators",
        "DomainDkim:katforge.com": "aws.ses.identities.katforge.com.dkim",
        "Record:katforge.com-a": "aws.route53.records[0]",
        "Namespace:cluster-ci-namespace": "cluster.objects.Namespace ci"}
    assert found["Instance:k3s"].import_id == "i-0k3s" and found["Record:katforge.com-a"].import_id == \
        "Z0LIVEKATFORGE_katforge.com_A"
    assert found["DomainDkim:katforge.com"].exists  # DKIM is a setting of the identity: on means it exists


def test_what_the_program_makes_itself_has_nothing_live(found):
    for key in ("SecurityGroup:k3s", "AccessKey:ses-sender", "Command:bootstrap-k3s", "Record:dkim-0"):
        assert found[key].at is None and not found[key].known, key


def test_absent_unknown_and_not_looked_for_are_told_apart(found):
    assert found["KeyPair:operators"].known and not found["KeyPair:operators"].exists
    # An existing role lists all its policies: one it does not list is absent.
    attachment = found["RolePolicyAttachment:katforge-github-preview-ReadOnlyAccess"]
    assert attachment.known and not attachment.exists
    assert found["Record:stumper.gg-a"].live == {"exists": False}  # its zone does not exist either
    assert found["Role:katforge-github-deploy"].live is None  # discovery did not look for this name
    assert found["Namespace:cluster-ci-namespace"].known and not found["Namespace:cluster-ci-namespace"].exists
    # A bucket name held by another account exists, though its facts are an error.
    assert found["Bucket:backups"].known and found["Bucket:backups"].live["ours"] is False


def test_a_source_not_read_says_nothing(prod):
    document = estate()
    document["cluster"] = None
    found = {m.key: m for m in adoption.matches(prod, document)}
    assert found["Namespace:cluster-ci-namespace"].live is None and not found["Namespace:cluster-ci-namespace"].known


def test_the_traefik_config_the_handover_deletes_is_created_not_imported(prod):
    document = estate()
    config = {m.key: m for m in adoption.matches(prod, document)}["HelmChartConfig:cluster-traefik-config"]
    assert config.handed_over and config.live_id == "kube-system/traefik" and config.import_id is None
    # Owned by another file's Addon, the handover leaves it: it is imported (and preflight says why it is unsafe).
    document["cluster"]["objects"]["HelmChartConfig kube-system/traefik"]["deployController"]["owner"] = \
        "kube-system/traefik"
    config = {m.key: m for m in adoption.matches(prod, document)}["HelmChartConfig:cluster-traefik-config"]
    assert not config.handed_over and config.import_id == "kube-system/traefik"


def tcp22(peer: Peer) -> Rule:
    return Rule(False, "tcp", 22, 22, peer)


VPN = Peer(hosts=frozenset({"vpn"}))


@pytest.mark.parametrize("allowed, live, holds", [
    (tcp22(Peer(cidr="203.0.113.0/24")), tcp22(Peer(cidr="203.0.113.7/32")), True),
    (tcp22(Peer(cidr="203.0.113.7/32")), tcp22(Peer(cidr="203.0.113.0/24")), False),
    (tcp22(Peer(cidr="0.0.0.0/0")), Rule(False, "udp", 22, 22, Peer(cidr="0.0.0.0/0")), False),
    (Rule(False, "tcp", 20, 30, Peer(cidr="0.0.0.0/0")), tcp22(Peer(cidr="10.0.0.0/8")), True),
    (tcp22(Peer(cidr="0.0.0.0/0")), Rule(False, "tcp", 21, 23, Peer(cidr="0.0.0.0/0")), False),
    (Rule(False, "-1", -1, -1, Peer(cidr="0.0.0.0/0")), tcp22(Peer(cidr="0.0.0.0/0")), True),
    (Rule(True, "-1", -1, -1, Peer(cidr="0.0.0.0/0")), tcp22(Peer(cidr="0.0.0.0/0")), False),
    (tcp22(VPN), tcp22(VPN), True),
    (tcp22(VPN), tcp22(Peer(hosts=frozenset({"vpn", "k3s"}))), False),
    (tcp22(Peer(cidr=None)), tcp22(Peer(cidr="203.0.113.7/32")), False),  # an address known only after deploy
])
def test_a_rule_holds_another_when_it_allows_at_least_as_much(allowed, live, holds):
    assert allowed.holds(live) is holds


def test_live_groups_whose_rules_the_program_does_not_cover_are_kept(prod):
    # k3s: 443 and SSH from the VPN's group are the program's too; SSH from an admin /32 is not.
    # vpn: WireGuard from anywhere is the program's: the group may go.
    assert adoption.groups_to_keep(prod, estate()) == {"k3s": [SG_K3S], "vpn": []}
    [lost] = adoption.dropped(prod, estate())
    assert (lost.host, lost.group, [str(r) for r in lost.rules]) == ("k3s", SG_K3S, ["tcp 22 from 203.0.113.7/32"])


def test_the_discovered_account_answers_the_programs_lookups():
    cloud = adoption.cloud_of(estate())
    assert cloud["vpc"]["id"] == "vpc-0live" and cloud["subnets"]["172.31.16.0/20"] == ("subnet-0vpn", "us-east-2a")
    assert cloud["zones"] == {"katforge.com": "Z0LIVEKATFORGE", "stumper.gg": CLOUD["zones"]["stumper.gg"]}
    assert cloud["private_ips"] == {"k3s": "172.31.14.98", "vpn": "172.31.20.4"}
    # A greenfield account answers as the offline cloud does.
    empty = copy.deepcopy(estate())
    empty["aws"]["instances"] = {"k3s": {"exists": False}, "vpn": {"exists": False}}
    assert adoption.cloud_of(empty)["subnets"] == CLOUD["subnets"]


def test_a_stack_file_elsewhere_replaces_the_committed_one(tmp_path):
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text("config:\n  katforge:wireguardPort: 51821\n")
    overrides = adoption.stack_file_config("prod", path)
    assert overrides["katforge:wireguardPort"] == "51821"
    committed = adoption.stack_file_config("prod", ROOT / "Pulumi.prod.yaml")
    assert {key for key, value in overrides.items() if value is None} == set(committed) - {"katforge:wireguardPort"}


def test_qa_plans_against_its_account_with_prod_as_prods_stack_file_names_it(tmp_path):
    # qa's discovery reads qa's names only: prod's live subnet and zone IDs, which prod's stack file names,
    # are not in it. qa's plan still evaluates prod (its StackReference) with them.
    (tmp_path / "Pulumi.prod.yaml").write_text("\n".join([
        "config:", "  aws:region: us-east-2", "  katforge:vpnSubnetId: subnet-0a1b2c3d4e5f6a7b8",
        "  katforge:zoneIds:", "    - katforge.com=Z0LIVEKATFORGE", "  katforge:imports:",
        "    - Instance:vpn=i-0a1b2c3d4e5f6a7b8", "    - Eip:vpn=eipalloc-0a1b2c3d4e5f6a7b8",
        "    - EipAssociation:vpn=eipassoc-0a1b2c3d4e5f6a7b8", ""]))
    (tmp_path / "Pulumi.qa.yaml").write_text("config:\n  aws:region: us-east-2\n  katforge:zoneIds:\n"
                                             "    - katforge.com=Z0LIVEKATFORGE\n")
    qa = {"stack": "qa", "sources": {s: {"status": "read"} for s in adoption.SOURCES}, "cluster": {"objects": {}},
          "aws": {"instances": {}, "route53": {"zones": {"katforge.com": {"exists": True, "id": "Z0LIVEKATFORGE"},
                                                         "stumper.gg": {"exists": True, "id": "Z0LIVESTUMPER"}}}}}
    plan = adoption.plan_against("qa", tmp_path / "Pulumi.qa.yaml", qa)
    assert {r.raw_inputs["zoneId"] for r in plan.of_type("aws:route53/record:Record")} == {"Z0LIVEKATFORGE"}
