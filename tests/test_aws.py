"""The AWS estate as the plan declares it, checked against the spec and the issue's rules."""
import ipaddress
import json
import re

import pytest

from infra.policies import normalized_record_name
from infra.settings import SettingsError
from tests.shared import SPEC, require
from tools import offline
from tools.offline import evaluate, evaluate_cached


def instance(plan, name):
    return next(r for r in plan.of_type("aws:ec2/instance:Instance") if r.name == name)


def eip(plan, name):
    return next(r for r in plan.of_type("aws:ec2/eip:Eip") if r.name == name)


def association(plan, name):
    return next(r for r in plan.of_type("aws:ec2/eipAssociation:EipAssociation") if r.name == name)


# The live estate's facts as `make discover` would set them: unencrypted root volumes, the VPN host in
# another subnet with a 20 GB gp2 volume, live security groups kept.
LIVE_FACTS = {
    "katforge:k3sRootVolumeEncrypted": "false",
    "katforge:vpnRootVolumeGb": "20", "katforge:vpnRootVolumeType": "gp2", "katforge:vpnRootVolumeEncrypted": "false",
    "katforge:vpnSubnetId": "subnet-0a1b2c3d4e5f60002",
    "katforge:k3sKeepSecurityGroups": ["sg-0123456789abcdef1"],
    "katforge:vpnKeepSecurityGroups": ["sg-0123456789abcdef2", "sg-0123456789abcdef3"],
}


def records(plan):
    return plan.of_type("aws:route53/record:Record")


# --- hosts -------------------------------------------------------------------------------------

def test_k3s_host_matches_the_spec(prod):
    host = instance(prod, "k3s")
    i = host.inputs
    assert i["instanceType"] == "t3.medium"
    assert i["privateIp"] == "172.31.14.98"
    # It holds the database: its volume outlives the instance, whatever ends it.
    assert i["rootBlockDevice"] == {"volumeSize": 30, "volumeType": "gp3", "encrypted": True,
                                    "deleteOnTermination": False}
    [subnet] = prod.lookups_of("aws:ec2/getSubnet:getSubnet")
    assert ipaddress.IPv4Address(i["privateIp"]) in ipaddress.IPv4Network(subnet["cidrBlock"])


def test_the_default_vpc_is_looked_up_not_created(prod):
    assert prod.lookups_of("aws:ec2/getVpc:getVpc") == [{"default": True}]
    assert prod.of_type("aws:ec2/vpc:Vpc") == [] and prod.of_type("aws:ec2/subnet:Subnet") == []


def test_a_vpc_with_another_cidr_stops_the_program():
    with pytest.raises(SettingsError, match="katforge:vpcCidr = 10.0.0.0/16: expected the default VPC's CIDR"):
        evaluate("prod", {"katforge:vpcCidr": "10.0.0.0/16", "katforge:k3sPrivateIp": "10.0.14.98"})


def test_hosts_run_ubuntu_2404_from_canonical(prod):
    [ami] = prod.lookups_of("aws:ec2/getAmi:getAmi")
    assert ami["owners"] == ["099720109477"]
    assert ami["filters"] == [{"name": "name", "values": ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]}]
    assert ami["mostRecent"] is True


@pytest.mark.parametrize("name", ["k3s", "vpn"])
def test_hosts_require_imdsv2_with_one_hop_and_encrypted_root(prod, name):
    i = instance(prod, name).inputs
    assert i["metadataOptions"]["httpTokens"] == "required"
    assert i["metadataOptions"]["httpPutResponseHopLimit"] == 1
    assert i["rootBlockDevice"]["encrypted"] is True


def test_k3s_host_cannot_be_replaced_or_terminated_by_accident(prod):
    host = instance(prod, "k3s")
    assert host.inputs["disableApiTermination"] is True
    assert host.options["protect"] is True
    assert {"ami", "userData", "keyName"} <= set(host.options["ignore_changes"])


def test_key_pair_comes_from_config(prod):
    key = prod.named("operators")
    assert key.inputs["publicKey"].startswith("ssh-ed25519 ")
    assert instance(prod, "k3s").inputs["keyName"] == key.inputs["keyName"]


def test_vpn_host_is_a_t2_nano_that_forwards_packets(prod):
    i = instance(prod, "vpn").inputs
    assert i["instanceType"] == "t2.nano"
    assert i["sourceDestCheck"] is False
    assert instance(prod, "k3s").inputs["sourceDestCheck"] is True


def test_elastic_ips_are_allocated_on_their_own_attached_protected_and_feed_dns(prod):
    for name, address in (("k3s", "198.51.100.166"), ("vpn", "198.51.100.192")):
        address_resource = eip(prod, name)
        assert "instance" not in address_resource.inputs  # allocated apart: it outlives a replaced host
        assert address_resource.options["protect"] is True
        attached = association(prod, name)
        assert attached.inputs == {"allocationId": f"eipalloc-{name}", "instanceId": f"{name}-id"}
        assert attached.options["protect"] is True  # a replacement would move the public address
        assert set(attached.options["depends_on"]) >= {address_resource.urn, instance(prod, name).urn}
        assert prod.outputs[f"{name}PublicIp"] == address


def test_nothing_reaches_a_host_at_its_address_before_the_address_is_attached(prod):
    """The bootstrap's SSH connections wait for the association, not just for the allocation."""
    attached = {association(prod, name).urn for name in ("k3s", "vpn")}
    for command in prod.of_type("command:remote:Command"):
        assert attached & set(command.options["property_dependencies"].get("connection", [])), command.name


def test_the_key_pair_is_deleted_before_its_replacement_is_created(prod):
    """Its name is fixed: EC2 refuses a second pair named katforge-operators."""
    key = prod.named("operators", "aws:ec2/keyPair:KeyPair")
    assert key.inputs["keyName"] == "katforge-operators" and key.options["delete_before_replace"] is True


@pytest.fixture(scope="module")
def live_facts():
    return evaluate("prod", LIVE_FACTS)


def test_root_volume_facts_reach_the_instances(live_facts):
    """What cannot change in place on a live instance is config: encryption, subnet; size and type too."""
    assert instance(live_facts, "k3s").inputs["rootBlockDevice"] == {
        "volumeSize": 30, "volumeType": "gp3", "encrypted": False, "deleteOnTermination": False}
    assert instance(live_facts, "vpn").inputs["rootBlockDevice"] == {
        "volumeSize": 20, "volumeType": "gp2", "encrypted": False, "deleteOnTermination": True}


def test_the_vpn_host_lives_in_its_configured_subnet(prod, live_facts):
    assert instance(live_facts, "vpn").inputs["subnetId"] == "subnet-0a1b2c3d4e5f60002"
    assert instance(live_facts, "k3s").inputs["subnetId"] == "subnet-0a1b2c3d4e5f60001"
    assert live_facts.lookups_of("aws:ec2/getSubnet:getSubnet")[1] == {"id": "subnet-0a1b2c3d4e5f60002"}
    # Unset, it shares the k3s host's subnet (a greenfield estate), found by the k3s host's address.
    assert instance(prod, "vpn").inputs["subnetId"] == instance(prod, "k3s").inputs["subnetId"]
    assert len(prod.lookups_of("aws:ec2/getSubnet:getSubnet")) == 1


def test_a_vpn_subnet_outside_the_default_vpc_stops_the_program(monkeypatch):
    answer = offline.LOOKUPS["aws:ec2/getSubnet:getSubnet"]
    monkeypatch.setitem(offline.LOOKUPS, "aws:ec2/getSubnet:getSubnet",
                        lambda args, *cloud: {**answer(args, *cloud), "vpcId": "vpc-0other"} if "id" in args
                        else answer(args, *cloud))
    with pytest.raises(SettingsError, match="katforge:vpnSubnetId = subnet-0a1b2c3d4e5f60002: expected a subnet of "
                                            "the default VPC vpc-0a1b2c3d4e5f60718, but it is in vpc-0other"):
        evaluate("prod", {"katforge:vpnSubnetId": "subnet-0a1b2c3d4e5f60002"})


def test_live_security_groups_stay_attached_beside_the_programs_own(prod, live_facts):
    groups = {r.name: r.urn for r in prod.of_type("aws:ec2/securityGroup:SecurityGroup")}
    for name, kept in (("k3s", LIVE_FACTS["katforge:k3sKeepSecurityGroups"]),
                       ("vpn", LIVE_FACTS["katforge:vpnKeepSecurityGroups"])):
        assert instance(live_facts, name).inputs["vpcSecurityGroupIds"] == [f"{name}-id", *kept]
        assert instance(prod, name).inputs["vpcSecurityGroupIds"] == [f"{name}-id"]
        assert groups[name] in instance(prod, name).options["property_dependencies"]["vpcSecurityGroupIds"]



def test_adopting_an_elastic_ip_with_another_address_stops_the_deployment():
    with pytest.raises(SettingsError, match="katforge:imports = Eip:k3s=eipalloc-0123456789abcdef0: expected the "
                                            "allocation of katforge:k3sPublicIp 3.19.192.1, but it holds 3.19.192.157"):
        evaluate("prod", {"katforge:imports": ["Instance:k3s=i-0abc12345def67890",
                                               "Eip:k3s=eipalloc-0123456789abcdef0",
                                               "EipAssociation:k3s=eipassoc-0123456789abcdef0"],
                          "katforge:k3sPublicIp": "3.19.192.1"})


# --- security groups ---------------------------------------------------------------------------

def ingress(plan, group):
    groups = {r.urn: r.name for r in plan.of_type("aws:ec2/securityGroup:SecurityGroup")}
    vpn_id = "vpn-id"
    rules = set()
    for rule in plan.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        if groups[rule.parent] != group:
            continue
        i = rule.inputs
        assert i["fromPort"] == i["toPort"]
        assert i["description"], "every rule says why it exists"
        source = "vpn-sg" if i.get("referencedSecurityGroupId") == vpn_id else i["cidrIpv4"]
        rules.add((i["ipProtocol"], i["fromPort"], source))
    return rules


def test_k3s_host_opens_exactly_the_listed_ports(prod):
    # The VPN's Elastic IP is a new one in the committed config: its address is AWS's choice.
    vpn = ("vpn-sg", f"{prod.raw_outputs['vpnPublicIp']}/32")
    assert ingress(prod, "k3s") == {
        ("tcp", 80, "0.0.0.0/0"), ("tcp", 443, "0.0.0.0/0"),
        *{("tcp", 6443, s) for s in vpn}, *{("tcp", 22, s) for s in vpn},
        ("tcp", 5432, "172.31.0.0/16"),
    }


def test_vpn_host_opens_only_wireguard(prod):
    assert ingress(prod, "vpn") == {("udp", 51820, "0.0.0.0/0")}


def test_admin_and_api_cidrs_widen_only_their_ports():
    plan = evaluate("prod", {"katforge:adminCidrs": ["203.0.113.7/32"], "katforge:k3sApiCidrs": ["198.51.100.0/24"]})
    k3s = ingress(plan, "k3s")
    assert ("tcp", 22, "203.0.113.7/32") in k3s and ("tcp", 6443, "203.0.113.7/32") in k3s
    assert ("tcp", 6443, "198.51.100.0/24") in k3s and ("tcp", 22, "198.51.100.0/24") not in k3s
    assert ingress(plan, "vpn") == {("udp", 51820, "0.0.0.0/0"), ("tcp", 22, "203.0.113.7/32")}


# --- DNS ---------------------------------------------------------------------------------------

def spec_routing_table():
    text = require(SPEC, "to compare the DNS records with the spec's routing table").read_text()
    rows = re.findall(r"^\|?\s*([a-z0-9.]+\.(?:com|gg))\s*\|\s*(A|CNAME)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|",
                      text, flags=re.M)
    return {(name, type_): (target, "qa" if stage.startswith("qa") else "prod") for name, type_, target, stage in rows}


def test_every_spec_record_is_declared_once_in_its_stage(prod, qa):
    spec = spec_routing_table()
    assert len(spec) == 8
    declared = {}
    for plan in (prod, qa):
        for record in records(plan):
            key = (record.inputs["name"], record.inputs["type"])
            assert key not in declared, f"{key} is declared twice"
            declared[key] = (record.inputs["records"], plan.stack)
    for key, (target, stage) in spec.items():
        # The committed stacks import no Elastic IP: a record aimed at one holds the new address's stand-in.
        live = {address: name for name, address in offline.CLOUD["elastic_ips"].items()}
        expected = prod.raw_outputs[f"{live[target]}PublicIp"] if target in live else target
        assert declared[key] == ([expected], stage), key


def test_zones_are_looked_up_never_created_by_id_where_configured(prod, qa):
    """The committed stacks name katforge.com's ID (the operators' page has it); stumper.gg goes by name."""
    for plan in (prod, qa):
        assert plan.of_type("aws:route53/zone:Zone") == []
        assert sorted(plan.lookups_of("aws:route53/getZone:getZone"), key=str) == [
            {"name": "stumper.gg", "privateZone": False}, {"zoneId": "Z0292557263L1FJT7JXXS"}]
    zone_of = {r.inputs["name"]: r.inputs["zoneId"] for r in records(prod)}
    assert zone_of["katforge.com"] == "Z0292557263L1FJT7JXXS"
    assert zone_of["stumper.gg"] == "Z04STUMPERGG0ZONE0ID"


def test_an_account_with_only_its_zones_plans_by_zone_name(monkeypatch):
    """A greenfield account: zones made by hand get IDs of their own, and nothing names them."""
    monkeypatch.setitem(offline.CLOUD, "zones", {"katforge.com": "Z111NEWACCOUNT1", "stumper.gg": "Z222NEWACCOUNT2"})
    plan = evaluate("prod", {"katforge:zoneIds": []})
    assert sorted(z["name"] for z in plan.lookups_of("aws:route53/getZone:getZone")) == ["katforge.com", "stumper.gg"]
    assert {r.inputs["zoneId"] for r in records(plan)} == {"Z111NEWACCOUNT1", "Z222NEWACCOUNT2"}
    assert [r.name for r in plan.resources if r.options["import_id"]] == []


def test_a_zone_id_of_another_zone_stops_the_program_before_any_record():
    with pytest.raises(SettingsError) as caught:
        evaluate("prod", {"katforge:zoneIds": ["katforge.com=Z04STUMPERGG0ZONE0ID"]})
    assert str(caught.value) == (
        "Pulumi.prod.yaml: katforge:zoneIds = katforge.com=Z04STUMPERGG0ZONE0ID: expected the ID of the public hosted "
        "zone katforge.com, but Z04STUMPERGG0ZONE0ID is zone stumper.gg: check the ID in the Route53 console")


def test_qa_declares_only_its_own_records_and_reads_prod(qa):
    assert {r.inputs["name"] for r in records(qa)} == {"qa.katforge.com", "qa.api.katforge.com"}
    assert [r for r in qa.resources if r.type.startswith("aws:") and r.type != "aws:route53/record:Record"] == []


# --- SES ---------------------------------------------------------------------------------------

def record_values(plan, name, type_):
    return [r.inputs["records"] for r in records(plan) if r.inputs["name"] == name and r.inputs["type"] == type_]


def test_ses_identity_with_three_dkim_cnames(prod):
    identity = prod.of_type("aws:ses/domainIdentity:DomainIdentity")[0]
    assert identity.inputs["domain"] == "katforge.com"
    assert identity.options["protect"] is True
    dkim = [r for r in records(prod) if r.inputs["name"].endswith("._domainkey.katforge.com")]
    assert len(dkim) == 3
    for record in dkim:
        token = record.inputs["name"].split(".")[0]
        assert record.inputs["type"] == "CNAME"
        assert record.inputs["records"] == [f"{token}.dkim.amazonses.com"]


def test_custom_mail_from_falls_back_to_ses_until_verified(prod):
    """RejectMessage before SES has seen the MX record would refuse every send."""
    mail_from = prod.of_type("aws:ses/mailFrom:MailFrom")[0].inputs
    assert mail_from["mailFromDomain"] == "mail.katforge.com"
    assert mail_from["behaviorOnMxFailure"] == "UseDefaultValue"
    stricter = evaluate("prod", {"katforge:mailFromMxFailure": "RejectMessage"})
    assert stricter.of_type("aws:ses/mailFrom:MailFrom")[0].inputs["behaviorOnMxFailure"] == "RejectMessage"
    assert record_values(prod, "mail.katforge.com", "MX") == [["10 feedback-smtp.us-east-2.amazonses.com"]]
    [[spf]] = record_values(prod, "mail.katforge.com", "TXT")
    assert spf.startswith("v=spf1 include:amazonses.com")


def test_dmarc_starts_at_none_and_is_configurable(prod):
    assert record_values(prod, "_dmarc.katforge.com", "TXT") == [["v=DMARC1; p=none;"]]
    stricter = evaluate("prod", {"katforge:dmarcPolicy": "quarantine"})
    assert record_values(stricter, "_dmarc.katforge.com", "TXT") == [["v=DMARC1; p=quarantine;"]]


def test_configuration_set_exists(prod):
    assert len(prod.of_type("aws:ses/configurationSet:ConfigurationSet")) == 1


def policy_of(plan, user_policy_name):
    return json.loads(plan.named(user_policy_name, "aws:iam/userPolicy:UserPolicy").inputs["policy"])


def test_ses_sender_may_only_send_from_known_addresses(prod):
    [statement] = policy_of(prod, "ses-sender")["Statement"]
    assert statement["Effect"] == "Allow"
    assert sorted(statement["Action"]) == ["ses:SendEmail", "ses:SendRawEmail"]
    assert any(":katforge.com" in arn or "katforge.com" == arn.split(":")[-1] for arn in statement["Resource"])
    assert "*" not in statement["Resource"]
    assert statement["Condition"] == {"StringEquals": {"ses:FromAddress": ["noreply@katforge.com"]}}


def test_smtp_credentials_are_secret_outputs(prod):
    assert {"sesSmtpUsername", "sesSmtpPassword"} <= prod.secret_outputs
    key = next(r for r in prod.of_type("aws:iam/accessKey:AccessKey") if r.name == "ses-sender")
    assert {"secret", "sesSmtpPasswordV4"} <= set(key.options["additional_secret_outputs"])


# --- DNS challenge user ------------------------------------------------------------------------

def test_dns_challenge_user_has_least_privilege(prod):
    statements = {s["Action"]: s for s in policy_of(prod, "dns-challenge")["Statement"]}
    zone_arns = sorted(f"arn:aws:route53:::hostedzone/{z}" for z in prod.outputs["zoneIds"].values())
    change = statements.pop("route53:ChangeResourceRecordSets")
    assert change["Resource"] == zone_arns
    # Exactly the challenge record of each routed name (stumper.gg's in its own zone), nothing else.
    assert change["Condition"] == {"ForAllValues:StringEquals": {
        "route53:ChangeResourceRecordSetsRecordTypes": ["TXT"],
        "route53:ChangeResourceRecordSetsNormalizedRecordNames": [
            "_acme-challenge.api.katforge.com", "_acme-challenge.katforge.com", "_acme-challenge.qa.api.katforge.com",
            "_acme-challenge.qa.katforge.com", "_acme-challenge.stumper.gg", "_acme-challenge.www.katforge.com"]}}
    assert statements.pop("route53:ListResourceRecordSets")["Resource"] == zone_arns
    assert statements.pop("route53:GetChange")["Resource"] == "arn:aws:route53:::change/*"
    assert statements.pop("route53:ListHostedZonesByName")["Resource"] == "*"
    assert statements == {}


def test_challenge_names_are_written_as_route53_compares_them():
    """Lower case, no trailing dot, other characters as octal escapes: a name written otherwise in the
    condition never matches, and lego's writes would be refused."""
    assert normalized_record_name("_acme-challenge.Stumper.GG.") == "_acme-challenge.stumper.gg"
    assert normalized_record_name("*.katforge.com") == "\\052.katforge.com"


def test_iam_users_hold_only_their_inline_least_privilege_policy(prod):
    """The spec's user had AmazonRoute53FullAccess: adopted, it would keep it. Every managed policy is
    detached and every other inline policy deleted."""
    assert prod.of_type("aws:iam/userPolicyAttachment:UserPolicyAttachment") == []
    assert prod.of_type("aws:iam/policyAttachment:PolicyAttachment") == []
    users = {r.name: r for r in prod.of_type("aws:iam/user:User")}
    policies = {r.name: r for r in prod.of_type("aws:iam/userPolicy:UserPolicy")}
    attachments = {r.name: r for r in prod.of_type(
        "aws:iam/userPolicyAttachmentsExclusive:UserPolicyAttachmentsExclusive")}
    inline = {r.name: r for r in prod.of_type("aws:iam/userPoliciesExclusive:UserPoliciesExclusive")}
    assert set(users) == set(policies) == set(attachments) == set(inline) == {"dns-challenge", "ses-sender",
                                                                              "backup-alerts"}
    for name, user in users.items():
        assert attachments[name].inputs == {"userName": user.inputs["name"], "policyArns": []}
        assert inline[name].inputs["userName"] == user.inputs["name"]
        # The program's own policy, by the name Pulumi gives it.
        assert inline[name].options["property_dependencies"]["policyNames"] == [policies[name].urn]


def test_dns_challenge_key_is_a_secret_output(prod):
    assert {"dnsChallengeAccessKeyId", "dnsChallengeSecretAccessKey"} <= prod.secret_outputs
    key = next(r for r in prod.of_type("aws:iam/accessKey:AccessKey") if r.name == "dns-challenge")
    assert "secret" in key.options["additional_secret_outputs"]


# --- secrets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_no_secret_value_reaches_the_plan(stack):
    text = evaluate_cached(stack).to_json()
    assert "offline-placeholder" not in text and "offline-secret" not in text and "offline-smtp" not in text


@pytest.mark.parametrize("name", ["k3s", "vpn"])
def test_a_host_joins_its_security_group_only_after_the_groups_rules_exist(prod, name):
    """Adopting a live host swaps it onto the program's group: were the group still empty then, SSH, the k3s
    API or WireGuard would be closed until its rules were made."""
    host = instance(prod, name)
    groups = set(host.options["property_dependencies"]["vpcSecurityGroupIds"])
    rules = {r.urn for rule_type in ("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
                                     "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
             for r in prod.of_type(rule_type) if groups & set(r.options["property_dependencies"]["securityGroupId"])}
    assert len(rules) >= 2  # SSH and more, and the egress
    assert rules <= set(host.options["depends_on"])


def test_an_adopted_key_pair_keeps_its_public_key_and_a_new_one_takes_the_configured_one(prod):
    """publicKey is force-new and an import reads EC2's text of it (its own comment): only an adopted pair
    ignores it, so that adopting it replaces nothing; a new pair gets sshPublicKey."""
    assert not prod.named("operators", "aws:ec2/keyPair:KeyPair").options.get("ignore_changes")
    adopted = evaluate("prod", {"katforge:imports": ["KeyPair:operators=katforge-operators"]})
    key = adopted.named("operators", "aws:ec2/keyPair:KeyPair")
    assert key.options["import_id"] == "katforge-operators" and key.options["ignore_changes"] == ["publicKey"]
