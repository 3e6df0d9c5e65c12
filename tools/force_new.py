"""Which property changes replace a resource, and which stop a host: one table, one row per resource
type the program declares, each row citing the provider source it was read from.

`make plan-diff` uses it to tell an update from a replacement, and `make preflight` to compare the
plan with what is live. Property paths are Pulumi's camelCase names as the plan JSON shows them:
`rootBlockDevice.encrypted` is a nested field, `ebsBlockDevices[*].volumeSize` a field of every item.

Sources are the provider code at the commit read (terraform-provider-aws's `ForceNew: true` schema
fields and `RequiresReplace` plan modifiers; pulumi-kubernetes's forceNew table; pulumi-command's
`replaceOnChanges` inputs). pulumi-aws 7 bridges terraform-provider-aws 6; a field that became
updatable later would show here as a replacement, which errs on the safe side. Offline, a change is
a change of the program's inputs; the engine compares with the live state, so a field set to what
is already live is no change at all there.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

ABSENT = object()  # a property that one side does not have
SECRET_MARK = re.compile(r"\[secret(?: [0-9a-f]+)?\]")


# --- property paths --------------------------------------------------------------------------------

_TOKEN = re.compile(r'\.?([A-Za-z_$][\w$-]*)|\[(\d+|\*)\]|\["((?:[^"\\]|\\.)*)"\]')


def parse(path: str) -> tuple:
    """`a.b[0]["c.d"][*]` -> ("a", "b", 0, "c.d", "*")."""
    tokens, position = [], 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if match is None or match.end() == position:
            raise ValueError(f"not a property path: {path!r}")
        name, index, quoted = match.groups()
        if name is not None:
            tokens.append(name)
        elif index is not None:
            tokens.append("*" if index == "*" else int(index))
        else:
            tokens.append(json.loads(f'"{quoted}"'))
        position = match.end()
    return tuple(tokens)


def covers(pattern: tuple, path: tuple) -> bool:
    """Whether `path` is the pattern's property or inside it ("*" matches any one key or index)."""
    return len(pattern) <= len(path) and all(p == "*" or p == q for p, q in zip(pattern, path))


def value_at(tree: Any, path: tuple) -> Any:
    """The value at a path; "*" gives the list of each item's value. ABSENT where there is none."""
    if not path:
        return tree
    head, rest = path[0], path[1:]
    if head == "*":
        items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else None
        return ABSENT if items is None else [value_at(item, rest) for item in items]
    if isinstance(tree, dict) and isinstance(head, str) and head in tree:
        return value_at(tree[head], rest)
    if isinstance(tree, list) and isinstance(head, int) and head < len(tree):
        return value_at(tree[head], rest)
    return ABSENT


def same(old: Any, new: Any) -> bool:
    """Equal as plan values. A secret shows as `[secret <hash>]`; a bare `[secret]` (a plan written
    before hashes) cannot be compared, so it counts as unchanged."""
    if isinstance(old, str) and isinstance(new, str) and SECRET_MARK.fullmatch(old) and SECRET_MARK.fullmatch(new):
        return old == new or "[secret]" in (old, new)
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(same(a, b) for a, b in zip(old, new))
    return old == new if old is not ABSENT and new is not ABSENT else old is new


def _concrete(tree: Any, pattern: tuple, prefix: tuple = ()) -> Iterable[tuple]:
    """The existing paths in `tree` that `pattern` names."""
    if not pattern:
        yield prefix
        return
    head, rest = pattern[0], pattern[1:]
    keys = (list(tree) if isinstance(tree, dict) else list(range(len(tree))) if isinstance(tree, list) else [])
    for key in keys if head == "*" else [head] if head in keys else []:
        yield from _concrete(tree[key], rest, prefix + (key,))


def _set(tree: Any, path: tuple, value: Any) -> None:
    *parents, last = path
    for key in parents:
        tree = tree.setdefault(key, {}) if isinstance(tree, dict) else tree[key]
    if value is ABSENT:
        if isinstance(tree, dict):
            tree.pop(last, None)
    elif isinstance(tree, dict) or (isinstance(tree, list) and isinstance(last, int) and last < len(tree)):
        tree[last] = value


def with_ignored(old: dict, new: dict, ignore_changes: Iterable[str]) -> dict:
    """The inputs Pulumi acts on: for each `ignoreChanges` path the old value stands, so a field
    listed there is no change at all."""
    effective = copy.deepcopy(new)
    for text in ignore_changes:
        pattern = parse(text)
        for path in {*_concrete(old, pattern), *_concrete(new, pattern)}:
            _set(effective, path, copy.deepcopy(value_at(old, path)))
    return effective


# --- the table ------------------------------------------------------------------------------------

# Replacements that depend on another input or on the provider's configuration, by name.
CONDITIONS: dict[str, Callable[[dict, dict], bool]] = {
    "userDataReplaceOnChange": lambda inputs, provider: inputs.get("userDataReplaceOnChange") in (True, "true"),
    # pulumi-kubernetes replaces a Secret whose data changes unless the provider has enableSecretMutable
    # (and the Secret is not immutable).
    "secret data immutable": lambda inputs, provider: (provider.get("enableSecretMutable") not in (True, "true")
                                                       or inputs.get("immutable") in (True, "true")),
    "no clusterIdentifier": lambda inputs, provider: not inputs.get("clusterIdentifier"),
}


@dataclass(frozen=True)
class Rule:
    type: str
    force_new: tuple[str, ...]
    source: str
    force_new_when: tuple[tuple[str, str], ...] = ()  # (path, name in CONDITIONS)
    # Exactly one of these is set; setting another one instead replaces (a security group rule's source).
    one_of: tuple[str, ...] = ()
    stops_host: tuple[str, ...] = ()  # applied by stopping and starting the instance


def _tf(path: str, commit: str, what: str = "") -> str:
    return (f"hashicorp/terraform-provider-aws internal/service/{path} @{commit}: "
            f"{what or 'ForceNew: true in the schema'}")


_INSTANCE = "ec2/ec2_instance.go", "0015dfcd06d5"
_EBS = ("deleteOnTermination", "deviceName", "encrypted", "iops", "kmsKeyId", "snapshotId", "throughput",
        "volumeSize", "volumeType")
_K8S_DIFF = "pulumi/pulumi-kubernetes provider/pkg/provider/diff.go @cafe8c4ac4de: forceNewProperties"
_METADATA = ("metadata.name", "metadata.namespace")  # metadataForceNewProperties, for every kind


def _kubernetes(type_: str, *fields: str, source: str = _K8S_DIFF, **more) -> Rule:
    return Rule(type_, _METADATA + fields, source, **more)


def _custom_resource(type_: str) -> Rule:
    # The type token is kubernetes:<apiVersion>:<kind>: another apiVersion or kind is another URN,
    # which Pulumi plans as a delete and a create.
    return _kubernetes(type_, "apiVersion", "kind",
                       source=f"{_K8S_DIFF} (metadata); apiVersion and kind make the type token")


RULES = [
    Rule("aws:ec2/instance:Instance",
         ("ami", "associatePublicIpAddress", "availabilityZone", "cpuOptions.amdSevSnp", "cpuOptions.coreCount",
          "cpuOptions.threadsPerCore", *(f"ebsBlockDevices[*].{f}" for f in _EBS), "ebsOptimized",
          "enclaveOptions.enabled", "ephemeralBlockDevices", "hibernation", "hostId", "ipv6AddressCount",
          "ipv6Addresses", "keyName", "launchTemplate", "networkInterfaces[*].deleteOnTermination",
          "networkInterfaces[*].deviceIndex", "networkInterfaces[*].networkCardIndex",
          "networkInterfaces[*].networkInterfaceId", "placementGroup", "placementPartitionNumber",
          "privateDnsNameOptions", "privateIp", "rootBlockDevice.encrypted", "rootBlockDevice.kmsKeyId",
          "securityGroups", "subnetId", "tenancy"),
         _tf(*_INSTANCE, "ForceNew fields of ResourceInstance; CustomizeDiff ForceNewIf user_data(_base64) when "
                         "user_data_replace_on_change; resourceInstanceUpdate stops and starts the instance to "
                         "change instance_type, user_data, user_data_base64, capacity_reservation_specification"),
         force_new_when=(("userData", "userDataReplaceOnChange"), ("userDataBase64", "userDataReplaceOnChange")),
         stops_host=("instanceType", "userData", "userDataBase64", "capacityReservationSpecification")),
    Rule("aws:ec2/eip:Eip", ("address", "domain", "ipamPoolId", "networkBorderGroup", "publicIpv4Pool"),
         _tf("ec2/ec2_eip.go", "01606926a0c0")),
    # No Update at all: every field is ForceNew, so only a new instance or allocation replaces it.
    Rule("aws:ec2/eipAssociation:EipAssociation",
         ("allocationId", "allowReassociation", "instanceId", "networkInterfaceId", "privateIpAddress", "publicIp"),
         _tf("ec2/ec2_eip_association.go", "01c08000ddb1")),
    Rule("aws:ec2/keyPair:KeyPair", ("keyName", "keyNamePrefix", "publicKey"),
         _tf("ec2/ec2_key_pair.go", "05bc9541efe7")),
    Rule("aws:ec2/securityGroup:SecurityGroup", ("description", "name", "namePrefix", "vpcId"),
         _tf("ec2/vpc_security_group.go", "01606926a0c0")),
    *(Rule(f"aws:vpc/securityGroup{kind}Rule:SecurityGroup{kind}Rule", ("securityGroupId",),
           _tf(f"ec2/vpc_security_group_{kind.lower()}_rule.go", commit,
               "security_group_id RequiresReplace; ModifyPlan of the shared securityGroupRuleResource: "
               "changing the rule's source type requires replacement"),
           one_of=("cidrIpv4", "cidrIpv6", "prefixListId", "referencedSecurityGroupId"))
      for kind, commit in (("Ingress", "00a322094b4b"), ("Egress", "0810b274e37c"))),
    Rule("aws:iam/accessKey:AccessKey", ("pgpKey", "user"), _tf("iam/access_key.go", "1271cd2293d2")),
    Rule("aws:iam/instanceProfile:InstanceProfile", ("name", "namePrefix", "path"),
         _tf("iam/instance_profile.go", "013f1736b904")),
    Rule("aws:iam/openIdConnectProvider:OpenIdConnectProvider", ("url",),
         _tf("iam/openid_connect_provider.go", "01606926a0c0")),
    Rule("aws:iam/policy:Policy", ("description", "name", "namePrefix", "path"), _tf("iam/policy.go", "01ccd9a2d118")),
    Rule("aws:iam/role:Role", ("name", "namePrefix", "path"), _tf("iam/role.go", "0040ea6911af")),
    Rule("aws:iam/rolePolicy:RolePolicy", ("name", "namePrefix", "role"), _tf("iam/role_policy.go", "02f97af85f89")),
    Rule("aws:iam/rolePolicyAttachment:RolePolicyAttachment", ("policyArn", "role"),
         _tf("iam/role_policy_attachment.go", "04c79849dbe7")),
    Rule("aws:iam/user:User", (), _tf("iam/user.go", "058fd401f211", "no ForceNew field: name and path "
                                                                       "change in place (UpdateUser)")),
    Rule("aws:iam/userPolicy:UserPolicy", ("name", "namePrefix", "user"), _tf("iam/user_policy.go", "02f97af85f89")),
    Rule("aws:iam/userPolicyAttachmentsExclusive:UserPolicyAttachmentsExclusive", ("userName",),
         _tf("iam/user_policy_attachments_exclusive.go", "0ac6a8e1d84d", "user_name RequiresReplace")),
    Rule("aws:iam/userPoliciesExclusive:UserPoliciesExclusive", ("userName",),
         _tf("iam/user_policies_exclusive.go", "0eb381a26e8a", "user_name RequiresReplace")),
    Rule("aws:rds/instance:Instance",
         ("availabilityZone", "characterSetName", "customIamInstanceProfile", "dbName", "engine", "identifier",
          "identifierPrefix", "kmsKeyId", "ncharCharacterSetName", "restoreToPointInTime",
          *(f"s3Import.{f}" for f in ("bucketName", "bucketPrefix", "ingestionRole", "sourceEngine",
                                      "sourceEngineVersion")),
          "snapshotIdentifier", "storageEncrypted", "timezone", "username"),
         _tf("rds/instance.go", "00e4b2383885")),
    Rule("aws:rds/parameterGroup:ParameterGroup", ("description", "family", "name", "namePrefix"),
         _tf("rds/parameter_group.go", "01606926a0c0")),
    Rule("aws:rds/subnetGroup:SubnetGroup", ("name", "namePrefix"), _tf("rds/subnet_group.go", "01c08000ddb1")),
    Rule("aws:route53/record:Record", ("name", "zoneId"), _tf("route53/record.go", "00655c1681ea")),
    Rule("aws:s3/bucket:Bucket", ("bucket", "bucketPrefix"), _tf("s3/bucket.go", "0070bcd12c95")),
    Rule("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", ("bucket", "expectedBucketOwner"),
         _tf("s3/bucket_lifecycle_configuration.go", "01606926a0c0", "RequiresReplace plan modifiers")),
    Rule("aws:s3/bucketPolicy:BucketPolicy", ("bucket",), _tf("s3/bucket_policy.go", "0073593e7d69")),
    Rule("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", ("bucket",),
         _tf("s3/bucket_public_access_block.go", "01606926a0c0")),
    Rule("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
         ("bucket", "expectedBucketOwner"), _tf("s3/bucket_server_side_encryption_configuration.go", "01606926a0c0")),
    Rule("aws:s3/bucketVersioning:BucketVersioning", ("bucket", "expectedBucketOwner"),
         _tf("s3/bucket_versioning.go", "01c08000ddb1")),
    Rule("aws:ses/configurationSet:ConfigurationSet", ("name",), _tf("ses/configuration_set.go", "00dff0f707fa")),
    Rule("aws:ses/domainDkim:DomainDkim", ("domain",), _tf("ses/domain_dkim.go", "034cebb6d5e3")),
    Rule("aws:ses/domainIdentity:DomainIdentity", ("domain",), _tf("ses/domain_identity.go", "1480f54dc1ca")),
    Rule("aws:ses/mailFrom:MailFrom", ("domain",), _tf("ses/domain_mail_from.go", "034cebb6d5e3")),
    # Without an `update` command a changed trigger re-creates the command; `connection` was
    # replaceOnChanges in early releases (command.go @09c953e0bd2e) but is not in 1.2.1.
    Rule("command:remote:Command", ("triggers",),
         "pulumi-command 1.2.1 Python SDK pulumi_command/remote/command.py registers "
         "replace_on_changes=[\"triggers[*]\"]; pulumi/pulumi-command provider/pkg/provider/remote/command.go "
         "tags Triggers provider:\"replaceOnChanges\""),
    _kubernetes("kubernetes:apps/v1:Deployment", "spec.selector"),
    _kubernetes("kubernetes:core/v1:Namespace"),
    _kubernetes("kubernetes:core/v1:NamespacePatch"),
    _kubernetes("kubernetes:core/v1:Secret", "type",
                force_new_when=(("stringData", "secret data immutable"), ("data", "secret data immutable"))),
    _kubernetes("kubernetes:core/v1:Service", "spec.clusterIP"),
    _kubernetes("kubernetes:core/v1:ServiceAccount"),
    _kubernetes("kubernetes:networking.k8s.io/v1:NetworkPolicy"),
    _kubernetes("kubernetes:rbac.authorization.k8s.io/v1:Role"),
    _kubernetes("kubernetes:rbac.authorization.k8s.io/v1:RoleBinding", "roleRef"),
    _custom_resource("kubernetes:helm.cattle.io/v1:HelmChartConfig"),
    _custom_resource("kubernetes:traefik.io/v1alpha1:IngressRoute"),
    _custom_resource("kubernetes:traefik.io/v1alpha1:Middleware"),
    # A new provider means every object it manages is replaced. DiffConfig replaces it when the
    # kubeconfig's cluster changes or is unknown, unless clusterIdentifier is set; offline the
    # (secret) kubeconfig can only be compared whole.
    Rule("pulumi:providers:kubernetes", ("clusterIdentifier",),
         "pulumi/pulumi-kubernetes provider/pkg/provider/testdata/diffconfig: wantReplaces of change-kubeconfig "
         "@1c58db38bf0d, computed-kubeconfig and change-cluster-identifier @6eb76d881145; none of "
         "change-kubeconfig-with-identifier @769526603a5a",
         force_new_when=(("kubeconfig", "no clusterIdentifier"),)),
]
TABLE: dict[str, Rule] = {rule.type: rule for rule in RULES}


def _differs(old: dict, new: dict, path: str) -> bool:
    tokens = parse(path)
    return not same(value_at(old, tokens), value_at(new, tokens))


def _force_new_paths(type_: str, new: dict, provider: Optional[dict], replace_on_changes: Iterable[str]) -> list[str]:
    """Every path whose change replaces this resource: the table's row (conditions applied) first,
    then the resource's own replaceOnChanges option."""
    rule = TABLE.get(type_)
    paths = list(rule.force_new) if rule else []
    if rule:
        paths += [path for path, condition in rule.force_new_when if CONDITIONS[condition](new, provider or {})]
    return paths + [path for path in replace_on_changes
                    if not any(covers(parse(p), parse(path)) or covers(parse(path), parse(p)) for p in paths)]


def replacement_reasons(type_: str, old: dict, new: dict, *, provider: Optional[dict] = None,
                        replace_on_changes: Iterable[str] = ()) -> list[str]:
    """The properties whose change replaces the resource (inputs after ignoreChanges), with the
    resource's own replaceOnChanges option. Empty: an update, or no change at all."""
    reasons = [path for path in _force_new_paths(type_, new, provider, replace_on_changes) if _differs(old, new, path)]
    rule = TABLE.get(type_)
    if rule and rule.one_of:
        chosen = [" or ".join(k for k in rule.one_of if value_at(side, (k,)) not in (ABSENT, None)) or "none"
                  for side in (old, new)]
        if chosen[0] != chosen[1]:
            reasons.append(f"{chosen[0]} → {chosen[1]}")
    return reasons


def replaced_if_unknown(type_: str, properties: Iterable[str], new: dict, *, provider: Optional[dict] = None,
                        replace_on_changes: Iterable[str] = ()) -> list[str]:
    """The force-new paths among `properties` (or inside them), for values that become unknown
    because a resource they come from is replaced: the engine cannot tell they stay the same."""
    wanted = [parse(p) for p in properties]
    return [path for path in _force_new_paths(type_, new, provider, replace_on_changes)
            if any(covers(w, parse(path)) or covers(parse(path), w) for w in wanted)]


def host_stops(type_: str, old: dict, new: dict) -> list[str]:
    """The changed properties that AWS applies only to a stopped instance."""
    rule = TABLE.get(type_)
    return [path for path in rule.stops_host if _differs(old, new, path)] if rule else []
