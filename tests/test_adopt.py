"""Adopting the live estate: `katforge:imports` lines become `import` options on exactly the resources
they name, every account-unique AWS name can be adopted, and a line that names nothing, or a host adopted
in part, stops the program in one line."""
import pytest

from infra.settings import SettingsError
from tools import offline
from tools.offline import KNOWN_AFTER_DEPLOY, evaluate

# What `make discover` writes for the live AWS estate: every AWS resource prod can adopt, by the
# program's name for it, with the ID `pulumi import` takes for its type.
AWS_IMPORTS = {
    "Instance:k3s": "i-0abc12345def67890",
    "Eip:k3s": "eipalloc-0123456789abcdef0",
    "EipAssociation:k3s": "eipassoc-0123456789abcdef0",
    "Instance:vpn": "i-0fedcba9876543210",
    "Eip:vpn": "eipalloc-0fedcba9876543210",
    "EipAssociation:vpn": "eipassoc-0fedcba9876543210",
    "KeyPair:operators": "katforge-operators",
    "User:dns-challenge": "traefik-dns-challenge",
    "User:ses-sender": "ses-sender",
    "DomainIdentity:katforge.com": "katforge.com",
    "ConfigurationSet:katforge": "katforge",
    "OpenIdConnectProvider:github-actions":
        "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com",
    "Bucket:backups": "katforge-db-backups",
    "Role:backups-writer": "katforge-backup-writer",
    "Role:katforge-github-preview": "katforge-github-preview",
    "Role:katforge-github-deploy": "katforge-github-deploy",
    "InstanceProfile:backups-writer": "katforge-k3s-host",
    "Policy:backups-restore": "arn:aws:iam::123456789012:policy/katforge-backup-restore",
}
HOST_LINES = ("Instance", "Eip", "EipAssociation")


def lines(imports: dict) -> list[str]:
    return [f"{key}={value}" for key, value in imports.items()]


def key_of(resource) -> str:
    return f"{resource.type.rsplit(':', 1)[1]}:{resource.name}"


def error_of(stack: str = "prod", **config) -> str:
    with pytest.raises(SettingsError) as caught:
        evaluate(stack, {f"katforge:{k}": v for k, v in config.items()})
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.fixture(scope="module")
def adopted():
    return evaluate("prod", {"katforge:imports": lines(AWS_IMPORTS)})


def test_every_account_unique_aws_name_can_be_adopted(prod):
    """The list discovery works from: each AWS resource whose create would collide with a live object of
    that name (or that holds state: hosts, addresses, bucket, SES identity) asks for an import ID."""
    aws_types = {key_of(r): r.type for r in prod.resources if r.type.startswith("aws:")}
    assert {key for key in prod.adoptable if key in aws_types} == set(AWS_IMPORTS)


def test_each_line_imports_exactly_the_resource_it_names(adopted):
    imported = {key_of(r): r.options["import_id"] for r in adopted.resources if r.options["import_id"]}
    assert imported == AWS_IMPORTS


def test_imported_resources_report_their_live_ids_addresses_and_arns(adopted):
    """What AWS holds for an imported object is known before deploy: nothing of it is a stand-in."""
    outputs = adopted.document()["outputs"]
    assert outputs["k3sInstanceId"] == AWS_IMPORTS["Instance:k3s"]
    assert outputs["k3sPublicIp"] == offline.CLOUD["elastic_ips"]["k3s"]
    assert outputs["vpnPublicIp"] == offline.CLOUD["elastic_ips"]["vpn"]
    assert outputs["vpnPrivateIp"] == offline.CLOUD["private_ips"]["vpn"]
    assert outputs["backupRestorePolicyArn"] == AWS_IMPORTS["Policy:backups-restore"]
    assert KNOWN_AFTER_DEPLOY not in (outputs["previewRoleArn"], outputs["deployRoleArn"])
    imported = {r.urn for r in adopted.resources if r.options["import_id"]}
    assert not [origin for entry in adopted.document()["knownAfterDeploy"] for origin in entry["standsFor"]
                if origin["urn"] in imported and origin["property"] in ("id", "arn", "publicIp", "privateIp")]


def test_the_k3s_rules_trust_the_imported_vpn_address(adopted):
    """The VPN's source in the k3s host's rules is its Elastic IP's own address, as AWS reports it for
    the imported allocation (a new one's once allocated), never a copy of katforge:vpnPublicIp."""
    live = f"{offline.CLOUD['elastic_ips']['vpn']}/32"
    vpn_eip = adopted.named("vpn", "aws:ec2/eip:Eip").urn
    k3s_group = adopted.named("k3s", "aws:ec2/securityGroup:SecurityGroup").urn
    from_address = {r.inputs["fromPort"]: r for r in adopted.of_type(
        "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule") if r.inputs.get("cidrIpv4") == live}
    assert set(from_address) == {22, 6443}
    for rule in from_address.values():
        assert rule.parent == k3s_group and rule.options["property_dependencies"]["cidrIpv4"] == [vpn_eip]


def test_an_adopted_association_is_declared_as_it_is_live(adopted):
    """Every input of an association forces a new one: imported, each must be known and be the live one."""
    for host in ("k3s", "vpn"):
        association = adopted.named(host, "aws:ec2/eipAssociation:EipAssociation")
        assert association.inputs == {"allocationId": AWS_IMPORTS[f"Eip:{host}"],
                                      "instanceId": AWS_IMPORTS[f"Instance:{host}"]}
    assert KNOWN_AFTER_DEPLOY not in str([r["inputs"] for r in adopted.document()["resources"]
                                          if r["type"] == "aws:ec2/eipAssociation:EipAssociation"])


@pytest.mark.parametrize("line, hint", [
    # The live name instead of the program's.
    ("User:traefik-dns-challenge=traefik-dns-challenge", "; did you mean User:dns-challenge?"),
    ("Policy:x=arn:aws:iam::123456789012:policy/x", "; this stack's Policy resources: Policy:backups-restore"),
    ("Subnet:k3s=subnet-0a1b2c3d4e5f60001", "; this stack adopts no Subnet (is the line in the right stack's file?)"),
])
def test_a_line_that_names_no_resource_stops_the_program_naming_it(line, hint):
    assert error_of(imports=[line]) == (f"Pulumi.prod.yaml: katforge:imports = {line}: expected a line naming a "
                                        f"resource of this stack that can be adopted (<Type>:<name>=<id>){hint}")


def test_qa_adopts_none_of_prods_resources(qa):
    """An AWS line in qa's file names nothing there, and stops qa's program like any unclaimed line."""
    assert qa.adoptable and not set(qa.adoptable) & set(AWS_IMPORTS)


@pytest.mark.parametrize("host", ["k3s", "vpn"])
@pytest.mark.parametrize("given", [("Instance",), ("Eip",), ("Instance", "Eip"), ("Instance", "EipAssociation")])
def test_a_host_is_adopted_with_its_address_and_association_or_not_at_all(host, given):
    """Importing the instance alone would attach a new address to it, the address alone would move the
    live one to a new instance: either way every DNS name moves."""
    message = error_of(imports=[f"{kind}:{host}={AWS_IMPORTS[f'{kind}:{host}']}" for kind in given])
    missing = " and ".join(f"{kind}:{host}=<id>" for kind in HOST_LINES if kind not in given)
    assert message == (f"Pulumi.prod.yaml: katforge:imports = {given[0]}:{host}={AWS_IMPORTS[f'{given[0]}:{host}']}: "
                       f"expected also {missing}: the live {host} host's Instance, Eip and EipAssociation are "
                       "adopted together or not at all (make discover finds all three)")


def test_nothing_is_imported_unless_a_line_says_so(prod, qa):
    for plan in (prod, qa):
        assert [r.name for r in plan.resources if r.options["import_id"]] == []
