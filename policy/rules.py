"""The estate's invariants as pure checks over what a resource declares: its type, its inputs and its
options. policy/pack.py runs each under Pulumi's CrossGuard (`--policy-pack policy`);
tests/test_policy_pack.py runs each over the offline plans (tools/offline.py `Plan.document()`), whose
resources have the same three parts. Each check returns the violations it finds, one line each.

Secret values reach a check as SECRET-prefixed text, never in plain: the offline plan shows them as
`[secret <hash>]`, and the pack marks them so before any check sees them (policy/pack.py). So a check
that finds a secret config value in plain text has found one that is stored in plain in the state.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Iterator, Mapping

SECRET = "[secret"  # how a secret value reads: "[secret]" in the pack, "[secret <hash>]" offline
ANYWHERE = ("0.0.0.0/0", "::/0")
PUBLIC_PORTS = (("tcp", 80), ("tcp", 443))  # the sites; WireGuard's UDP port comes from config

# What holds state that a replacement or deletion would lose: hosts (the database, the VPN's key),
# addresses (every DNS name and VPN client points at them), the dumps, the verified SES identity,
# Traefik's HelmChartConfig (its certificates' configuration), and their kin should the estate grow.
STATEFUL = frozenset({
    "aws:ec2/instance:Instance", "aws:ec2/eip:Eip", "aws:ec2/eipAssociation:EipAssociation",
    "aws:ebs/volume:Volume", "aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2",
    "aws:ses/domainIdentity:DomainIdentity", "aws:route53/zone:Zone", "aws:rds/instance:Instance",
    "aws:dynamodb/table:Table", "kubernetes:core/v1:PersistentVolume", "kubernetes:core/v1:PersistentVolumeClaim",
    "kubernetes:helm.cattle.io/v1:HelmChartConfig",
})
# A k3s agent holds no state: its instance (tagged so, its root volume deleted with it) may go unprotected,
# so that removing it from the config drains it and deletes it (infra/hosts.py).
STATELESS_TAG = ("Role", "k3s-agent")
RDS_INSTANCE = "aws:rds/instance:Instance"
BUCKETS = ("aws:s3/bucket:Bucket", "aws:s3/bucketV2:BucketV2")
BUCKET_ENCRYPTION = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
ATTACHMENTS = {
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": "policyArn",
    "aws:iam/userPolicyAttachment:UserPolicyAttachment": "policyArn",
    "aws:iam/groupPolicyAttachment:GroupPolicyAttachment": "policyArn",
    "aws:iam/policyAttachment:PolicyAttachment": "policyArn",
    "aws:iam/role:Role": "managedPolicyArns",
    "aws:iam/rolePolicyAttachmentsExclusive:RolePolicyAttachmentsExclusive": "policyArns",
    "aws:iam/userPolicyAttachmentsExclusive:UserPolicyAttachmentsExclusive": "policyArns",
}
POLICY_DOCUMENTS = {"aws:iam/policy:Policy", "aws:iam/rolePolicy:RolePolicy", "aws:iam/userPolicy:UserPolicy",
                    "aws:iam/groupPolicy:GroupPolicy"}
# AWS's broad managed policies: every *FullAccess, AdministratorAccess and the job-function admins.
BROAD_POLICY = re.compile(r"^arn:aws:iam::aws:policy/(?:.*/)?(?:[A-Za-z0-9]*FullAccess\w*|\w*Administrator\w*)$")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def open_to_the_world(resource_type: str, inputs: Mapping[str, Any], wireguard_port: int) -> list[str]:
    """Nothing but HTTP, HTTPS and WireGuard is open to every address."""
    allowed = {*PUBLIC_PORTS, ("udp", wireguard_port)}
    rules: list[tuple[str, Any, Any, list[str]]] = []  # (protocol, from, to, sources)
    if resource_type == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule":
        rules.append((inputs.get("ipProtocol"), inputs.get("fromPort"), inputs.get("toPort"),
                      [inputs.get("cidrIpv4"), inputs.get("cidrIpv6")]))
    elif resource_type == "aws:ec2/securityGroupRule:SecurityGroupRule" and inputs.get("type") == "ingress":
        rules.append((inputs.get("protocol"), inputs.get("fromPort"), inputs.get("toPort"),
                      _as_list(inputs.get("cidrBlocks")) + _as_list(inputs.get("ipv6CidrBlocks"))))
    elif resource_type == "aws:ec2/securityGroup:SecurityGroup":
        for rule in _as_list(inputs.get("ingress")):
            rules.append((rule.get("protocol"), rule.get("fromPort"), rule.get("toPort"),
                          _as_list(rule.get("cidrBlocks")) + _as_list(rule.get("ipv6CidrBlocks"))))
    found = []
    for protocol, first, last, sources in rules:
        if not any(source in ANYWHERE for source in sources):
            continue
        if first != last or (str(protocol).lower(), first) not in allowed:
            found.append(f"{protocol} {first}-{last} is open to the world: only tcp 80, tcp 443 and udp "
                         f"{wireguard_port} may be")
    if resource_type == RDS_INSTANCE and inputs.get("publiclyAccessible"):
        found.append("the RDS instance is publicly accessible: it answers the nodes only, inside the VPC")
    return found


def stateful_protected(resource_type: str, options: Mapping[str, Any],
                       inputs: Mapping[str, Any] | None = None) -> list[str]:
    """What holds state is protected: a plan that would replace or delete it fails instead; an RDS instance
    is deletion-protected in AWS too. A k3s agent's instance holds none (STATELESS_TAG, its disk deleted with it)."""
    inputs = inputs or {}
    found = []
    stateless = (resource_type == "aws:ec2/instance:Instance"
                 and (inputs.get("tags") or {}).get(STATELESS_TAG[0]) == STATELESS_TAG[1]
                 and (inputs.get("rootBlockDevice") or {}).get("deleteOnTermination") is True)
    if resource_type in STATEFUL and not options.get("protect") and not stateless:
        found.append(f"{resource_type} holds state and is not protected")
    if resource_type == RDS_INSTANCE and not inputs.get("deletionProtection"):
        found.append("the RDS instance has no deletion protection")
    return found


def encrypted_at_rest(resource_type: str, name: str, inputs: Mapping[str, Any],
                      kept_unencrypted: Iterable[str] = ()) -> list[str]:
    """Disks are encrypted. An adopted host whose root volume was made unencrypted keeps it (encryption
    cannot change on a running instance, and another value replaces it) only when the stack says so:
    `kept_unencrypted` names the hosts whose stack config sets `<host>RootVolumeEncrypted` to false, as
    make discover writes it for a live unencrypted volume."""
    found = []
    if resource_type == "aws:ec2/instance:Instance":
        if name not in kept_unencrypted and not (inputs.get("rootBlockDevice") or {}).get("encrypted"):
            found.append(f"the root volume of instance {name} is not encrypted")
        for device in _as_list(inputs.get("ebsBlockDevices")):
            if not device.get("encrypted"):
                found.append(f"the EBS volume {device.get('deviceName')} of instance {name} is not encrypted")
    elif resource_type == "aws:ebs/volume:Volume" and not inputs.get("encrypted"):
        found.append(f"the EBS volume {name} is not encrypted")
    elif resource_type == RDS_INSTANCE and not inputs.get("storageEncrypted"):
        found.append(f"the storage of RDS instance {name} is not encrypted")
    return found


def buckets_encrypted(resources: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every bucket has a server-side encryption configuration of its own (a stack-wide check: the
    configuration is a resource that names its bucket)."""
    resources = list(resources)
    encrypted = {urn for r in resources if r["type"] == BUCKET_ENCRYPTION
                 for urn in (r["options"].get("property_dependencies") or {}).get("bucket", [])}
    return [f"bucket {r['name']} has no server-side encryption configuration" for r in resources
            if r["type"] in BUCKETS and r["urn"] not in encrypted
            and not r["inputs"].get("serverSideEncryptionConfiguration")]


def imdsv2(resource_type: str, name: str, inputs: Mapping[str, Any]) -> list[str]:
    """Instances answer metadata requests only with a session token (IMDSv2)."""
    if resource_type in ("aws:ec2/instance:Instance", "aws:ec2/launchTemplate:LaunchTemplate"):
        if (inputs.get("metadataOptions") or {}).get("httpTokens") != "required":
            return [f"{name} allows IMDSv1: set metadataOptions.httpTokens to required"]
    return []


def _admin_statements(document: Any) -> Iterator[str]:
    """An Allow of every action, or of every action of a service on every resource."""
    if not isinstance(document, str) or document.startswith(SECRET):
        return
    try:
        statements = _as_list(json.loads(document).get("Statement"))
    except (ValueError, AttributeError):
        return
    for statement in statements:
        if statement.get("Effect") != "Allow":
            continue
        if "NotAction" in statement:
            yield "an Allow with NotAction (everything but a few actions)"
            continue
        resources = _as_list(statement.get("Resource"))
        for action in _as_list(statement.get("Action")):
            if action in ("*", "*:*") or (action.endswith(":*") and "*" in resources):
                yield f"an Allow of {action} on {', '.join(resources)}"


def no_broad_policies(resource_type: str, inputs: Mapping[str, Any]) -> list[str]:
    """No *FullAccess or Administrator managed policy, and no inline document that amounts to one."""
    found = []
    if resource_type in ATTACHMENTS:
        found += [f"{arn} is attached: grant what the estate needs instead"
                  for arn in _as_list(inputs.get(ATTACHMENTS[resource_type]))
                  if isinstance(arn, str) and BROAD_POLICY.match(arn)]
    if resource_type in POLICY_DOCUMENTS:
        found += [f"the policy holds {what}" for what in _admin_statements(inputs.get("policy"))]
    return found


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


SHORTEST_SECRET = 12  # a shorter value (a weak password such as "katforge") would match everywhere


def no_plain_secrets(inputs: Mapping[str, Any], secret_values: Mapping[str, str]) -> list[str]:
    """No secret config value (key -> its plaintext) in an input that is not secret: it would be stored
    in plain in the state and shown by every preview. Values shorter than SHORTEST_SECRET are not looked
    for: they cannot be told from ordinary text."""
    found = []
    for path, text in _strings(inputs):
        if text.startswith(SECRET):
            continue
        found += [f"{path} holds the secret {key} in plain text: pass it as a secret (pulumi.Output.secret)"
                  for key, secret in secret_values.items() if len(secret) >= SHORTEST_SECRET and secret in text]
    return found
