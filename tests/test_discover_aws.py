"""Discovery of AWS against the simulated live account (tests/live_account.py: moto's server on
127.0.0.1, built as the estate really is) and an empty account with only the two hosted zones."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import boto3
import pytest
from botocore.stub import Stubber

from tests.live_account import (ADMIN_CIDR, DKIM_TTL, K3S_PRIVATE_IP, K3S_PUBLIC_IP, LIVE_TTL, VPN_PUBLIC_IP,
                                UBUNTU_AMI, VPN_SUBNET, operators_key)
from tools import discover_aws
from tools.discover_targets import targets

# Session fixtures (servers), shared by every module that names them here: imported, each module would
# start its own.
pytest_plugins = ["tests.live_account"]


@contextlib.contextmanager
def environment_of(account):
    """boto3's own configuration chain, pointed at the account only by the environment (AWS_ENDPOINT_URL
    and the credentials), as an operator's shell would be."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(account.env())
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def discover_in(account, stack: str = "prod") -> dict:
    with environment_of(account):
        return discover_aws.discover(targets(stack))


@pytest.fixture(scope="module")
def live(live_account):
    return discover_in(live_account)


@pytest.fixture(scope="module")
def empty(empty_account):
    return discover_in(empty_account)


def test_both_hosts_are_found_by_the_configured_addresses_with_their_import_ids(live, live_account):
    made = live_account.made
    for role in ("k3s", "vpn"):
        host = live["instances"][role]
        assert host["import"] == {"type": "aws:ec2/instance:Instance", "id": made[role]["instance"]}
        assert host["elasticIp"]["import"] == {"type": "aws:ec2/eip:Eip", "id": made[role]["allocation"]}
        assert host["elasticIp"]["association"]["import"] == {"type": "aws:ec2/eipAssociation:EipAssociation",
                                                              "id": made[role]["association"]}
    assert live["instances"]["k3s"]["lookup"] == {"by": "private-ip-address", "value": K3S_PRIVATE_IP}
    assert live["instances"]["vpn"]["lookup"] == {"by": "elastic-ip", "value": VPN_PUBLIC_IP}
    assert live["instances"]["k3s"]["elasticIp"]["publicIp"] == K3S_PUBLIC_IP
    assert live["instances"]["vpn"]["publicIp"] == VPN_PUBLIC_IP


def test_the_awkward_realities_of_the_hosts(live, live_account):
    k3s, vpn = live["instances"]["k3s"], live["instances"]["vpn"]
    assert k3s["rootVolume"]["encrypted"] is False and vpn["rootVolume"]["encrypted"] is False
    assert k3s["rootVolume"]["deleteOnTermination"] is True
    assert (vpn["rootVolume"]["sizeGb"], vpn["rootVolume"]["type"]) == (20, "gp2")
    assert vpn["subnet"]["cidr"] == VPN_SUBNET and vpn["subnet"]["id"] != k3s["subnet"]["id"]
    assert vpn["subnet"]["availabilityZone"] != k3s["subnet"]["availabilityZone"]
    assert k3s["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "optional", "httpPutResponseHopLimit": 2}
    assert k3s["disableApiTermination"] is False and vpn["sourceDestCheck"] is True
    assert k3s["instanceProfile"] is None and k3s["keyName"] == "katforge-operators"


def test_every_live_security_group_rule_is_read(live, live_account):
    group = live["instances"]["k3s"]["securityGroups"][live_account.made["k3s"]["group"]]
    assert group["import"] == {"type": "aws:ec2/securityGroup:SecurityGroup", "id": live_account.made["k3s"]["group"]}
    rules = {(r["protocol"], r["fromPort"], r.get("cidrIpv4") or r.get("securityGroupId")) for r in group["ingress"]}
    vpn_group = live_account.made["vpn"]["group"]
    assert rules == {("tcp", 80, "0.0.0.0/0"), ("tcp", 443, "0.0.0.0/0"), ("tcp", 6443, vpn_group),
                     ("tcp", 22, vpn_group), ("tcp", 22, ADMIN_CIDR), ("tcp", 5432, "172.31.0.0/16")}
    assert all(r["import"]["type"] == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
               and r["import"]["id"].startswith("sgr-") for r in group["ingress"])


def test_account_unique_names_that_exist_live(live, live_account):
    users = live["iam"]["users"]
    assert users["traefik-dns-challenge"]["import"] == {"type": "aws:iam/user:User", "id": "traefik-dns-challenge"}
    assert users["traefik-dns-challenge"]["accessKeys"] == 1
    assert list(users["traefik-dns-challenge"]["attachedPolicies"]) == ["arn:aws:iam::aws:policy/AmazonRoute53FullAccess"]
    assert users["ses-sender"]["inlinePolicies"] == {"ses-send": {"import": {
        "type": "aws:iam/userPolicy:UserPolicy", "id": "ses-sender:ses-send"}}}
    assert live["keyPairs"]["katforge-operators"]["import"]["id"] == "katforge-operators"
    assert live["keyPairs"]["katforge-operators"]["fingerprint"]
    # Its public key, as an import reads it (preflight compares it with sshPublicKey).
    assert live["keyPairs"]["katforge-operators"]["publicKey"] == operators_key()
    assert live["iam"]["oidcProviders"]["token.actions.githubusercontent.com"]["import"] == {
        "type": "aws:iam/openIdConnectProvider:OpenIdConnectProvider", "id": live_account.made["oidc"]}
    assert live["ses"]["configurationSets"]["katforge"]["import"]["id"] == "katforge"


def test_names_the_program_declares_that_do_not_exist(live):
    assert live["buckets"] == {"katforge-db-backups": {"exists": False}}
    assert live["iam"]["roles"] == {name: {"exists": False} for name in (
        "katforge-backup-writer", "katforge-github-deploy", "katforge-github-preview")}
    assert live["iam"]["instanceProfiles"] == {"katforge-k3s-host": {"exists": False}}
    assert live["iam"]["policies"] == {"katforge-backup-restore": {"exists": False},
                                       "katforge-permissions-boundary": {"exists": False}}


def test_ses_identity_with_dkim_and_no_mail_from(live, live_account):
    identity = live["ses"]["identities"]["katforge.com"]
    assert identity["import"] == {"type": "aws:ses/domainIdentity:DomainIdentity", "id": "katforge.com"}
    assert identity["verification"] == "Success"
    assert identity["dkim"]["tokens"] == live_account.made["dkim"] and identity["dkim"]["enabled"] is True
    assert identity["mailFrom"] == {"exists": False}


def test_records_at_managed_names_with_their_live_ttls(live, live_account):
    zones = live_account.made["zones"]
    assert live["route53"]["zones"] == {name: {"exists": True, "id": zone} for name, zone in zones.items()}
    records = {(r["name"], r["type"]): r for r in live["route53"]["records"]}
    apex = records[("katforge.com", "A")]
    assert apex == {"name": "katforge.com", "zone": "katforge.com", "type": "A", "ttl": LIVE_TTL,
                    "values": [K3S_PUBLIC_IP],
                    "import": {"type": "aws:route53/record:Record", "id": f"{zones['katforge.com']}_katforge.com_A"}}
    assert records[("stumper.gg", "A")]["import"]["id"] == f"{zones['stumper.gg']}_stumper.gg_A"
    for token in live_account.made["dkim"]:
        dkim = records[(f"{token}._domainkey.katforge.com", "CNAME")]
        assert dkim["ttl"] == DKIM_TTL and dkim["currentDkimToken"] is True
    # prod manages neither qa's names nor the zones' own NS and SOA; mail.katforge.com does not exist.
    assert not {name for name, _ in records} & {"qa.katforge.com", "qa.api.katforge.com", "mail.katforge.com"}
    assert not [key for key in records if key[1] in ("NS", "SOA")]


def test_qa_reads_only_its_own_records(live_account):
    found = discover_in(live_account, "qa")
    assert sorted((r["name"], r["ttl"]) for r in found["route53"]["records"]) == [
        ("qa.api.katforge.com", LIVE_TTL), ("qa.katforge.com", LIVE_TTL)]
    assert found["instances"] == {} and found["iam"]["users"] == {}


def test_an_empty_account_has_nothing_to_import(empty, empty_account):
    assert empty["instances"] == {"k3s": {"exists": False, "lookup": {"by": "private-ip-address",
                                                                       "value": K3S_PRIVATE_IP}},
                                  "vpn": {"exists": False, "lookup": {"by": "public-ip-address",
                                                                       "value": VPN_PUBLIC_IP}}}
    assert all(found == {"exists": False} for group in empty["iam"].values() for found in group.values())
    assert empty["keyPairs"] == {"katforge-operators": {"exists": False}}
    assert empty["ses"]["identities"] == {"katforge.com": {"exists": False}}
    assert empty["ses"]["configurationSets"] == {"katforge": {"exists": False}}
    assert empty["route53"] == {"zones": {name: {"exists": True, "id": zone}
                                          for name, zone in empty_account.made["zones"].items()}, "records": []}
    assert "import" not in str(empty)


def test_a_refused_call_costs_one_fact_not_the_run():
    iam = boto3.client("iam", region_name="us-east-2", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(iam) as stub:
        stub.add_client_error("get_user", "AccessDenied", "not allowed to iam:GetUser", 403)
        stub.add_client_error("get_user", "NoSuchEntity", "no such user", 404)
        assert discover_aws.read(lambda: iam.get_user(UserName="ses-sender")) == {
            "error": "AccessDenied: not allowed to iam:GetUser"}
        assert discover_aws.read(lambda: iam.get_user(UserName="ses-sender")) == {"exists": False}


def test_a_vpn_host_without_an_elastic_ip_is_found_by_its_public_address(moto_server):
    account = moto_server.account("222222222222")
    ec2 = account.client("ec2")
    [ami] = ec2.describe_images(ImageIds=[UBUNTU_AMI["ami_id"]])["Images"]
    instance = ec2.run_instances(ImageId=ami["ImageId"], MinCount=1, MaxCount=1, InstanceType="t2.nano")["Instances"][0]
    address = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]["PublicIpAddress"]
    wanted = dataclasses.replace(targets("prod"), vpn_public_ip=address)
    with environment_of(account):
        vpn = discover_aws.Aws(wanted).instance("vpn")
    assert vpn["import"]["id"] == instance["InstanceId"]
    assert vpn["lookup"] == {"by": "public-ip-address", "value": address}
    assert vpn["elasticIp"] == {"exists": False}
