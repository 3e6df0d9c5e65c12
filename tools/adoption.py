"""Which live object each planned resource would take over: the one mapping between an offline plan and
build/discovered-<stack>.json (tools/discover.py), shared by `make discover` (which writes the
`katforge:imports` lines from it) and `make preflight` (which compares each pair).

A resource maps to the place in the discovered file where discovery records the object at the
resource's name: an instance by its host role, an IAM user by its `name` input, a record by its name
and type, a Kubernetes object by `Kind namespace/name`, ... A resource with no such place (a security
group the program makes, an access key, a host command, a bucket's settings) has nothing live to take
over. The live facts are then `{"exists": false}` (looked for, not there), the object's facts, or None
where the discovered file cannot say (its source was not read, or discovery did not look for it).

Security group rules map too: a live group attached to a host that the program would detach (it is not
in the host's keep list) takes its rules with it, and each of those rules either has a planned rule
that allows at least as much (same protocol, a port range and source that hold it) or is dropped.
"""
from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tools import stackfile
from tools.discover_targets import kube_object
from tools.offline import (CLOUD, KNOWN_AFTER_DEPLOY, ROOT, Plan, PlannedResource, configured_cloud,
                           effective_config, evaluate, project_config_schema, stack_config)

SOURCES = ("aws", "cluster", "hosts")
INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
HELM_CHART_CONFIG = "kubernetes:helm.cattle.io/v1:HelmChartConfig"
# The Addon k3s makes for the operators' manifest file traefik-config.yaml (named after the file, up to its
# first dot): infra/host/traefik-handover.sh deletes what it owns.
TRAEFIK_ADDON = "kube-system/traefik-config"


@dataclass(frozen=True)
class Match:
    resource: PlannedResource
    inputs: dict  # the resource's inputs as the plan shows them: stand-ins read "(known after deploy)"
    at: Optional[str] = None  # where the live object sits in the discovered file, e.g. "aws.instances.k3s"
    live: Optional[dict] = None  # its facts; {"exists": False} when absent; None when the file cannot say

    @property
    def kind(self) -> str:
        """`<Type>` of an import line: the last part of the type token."""
        return self.resource.type.rsplit(":", 1)[1]

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.resource.name}"

    @property
    def source(self) -> Optional[str]:
        return self.at.split(".", 1)[0] if self.at else None

    @property
    def known(self) -> bool:
        """Whether the discovered file says if the object exists (a bucket name held by another account
        exists, though its facts are an error)."""
        return self.live is not None and ("error" not in self.live or self.live.get("exists") is True)

    @property
    def exists(self) -> bool:
        return bool(self.known and self.live.get("exists"))

    @property
    def live_id(self) -> Optional[str]:
        """The ID `pulumi import` takes for the live object."""
        found = (self.live or {}).get("import") if self.exists else None
        return found.get("id") if isinstance(found, dict) else None

    @property
    def handed_over(self) -> bool:
        """A HelmChartConfig that k3s's deploy controller applies from the operators' manifest file: the
        Traefik handover (infra/host/traefik-handover.sh) moves the file away and deletes this object before
        the cluster is deployed, so the program creates it anew rather than importing it."""
        owner = (self.live or {}).get("deployController") or {}
        return (self.resource.type == HELM_CHART_CONFIG and self.exists and bool(owner.get("owned"))
                and owner.get("owner") == TRAEFIK_ADDON)

    @property
    def import_id(self) -> Optional[str]:
        """The ID this resource should import, or None when it has nothing live to take over."""
        return None if self.handed_over else self.live_id


# --- where discovery records the object at a resource's name ------------------------------------

def _known(value: Any) -> bool:
    return isinstance(value, str) and KNOWN_AFTER_DEPLOY not in value


def _dkim_facts(facts: dict) -> dict:
    # DKIM is a setting of the identity: it "exists" when it is on.
    return {**facts, "exists": bool(facts.get("enabled"))} if "exists" not in facts else facts


Locator = Callable[[PlannedResource, dict], Optional[tuple]]


def _by(*path: str) -> Locator:
    """A path of literal keys and input names: `"=name"` is the resource's name, `"@x"` its input x."""
    def locate(resource: PlannedResource, inputs: dict) -> Optional[tuple]:
        keys = []
        for part in path:
            value = resource.name if part == "=name" else inputs.get(part[1:]) if part.startswith("@") else part
            if part.startswith("@") and part[1:] == "url" and isinstance(value, str):
                value = value.removeprefix("https://")  # IAM reports OIDC providers without the scheme
            if not _known(value):
                return None
            keys.append(value)
        return tuple(keys)
    return locate


LOCATORS: dict[str, Locator] = {
    INSTANCE: _by("aws", "instances", "=name"),
    "aws:ec2/eip:Eip": _by("aws", "instances", "=name", "elasticIp"),
    "aws:ec2/eipAssociation:EipAssociation": _by("aws", "instances", "=name", "elasticIp", "association"),
    "aws:ec2/keyPair:KeyPair": _by("aws", "keyPairs", "@keyName"),
    "aws:iam/user:User": _by("aws", "iam", "users", "@name"),
    "aws:iam/userPolicy:UserPolicy": _by("aws", "iam", "users", "@user", "inlinePolicies", "@name"),
    "aws:iam/userPolicyAttachment:UserPolicyAttachment": _by("aws", "iam", "users", "@user", "attachedPolicies",
                                                             "@policyArn"),
    "aws:iam/role:Role": _by("aws", "iam", "roles", "@name"),
    "aws:iam/rolePolicy:RolePolicy": _by("aws", "iam", "roles", "@role", "inlinePolicies", "@name"),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": _by("aws", "iam", "roles", "@role", "attachedPolicies",
                                                             "@policyArn"),
    "aws:iam/instanceProfile:InstanceProfile": _by("aws", "iam", "instanceProfiles", "@name"),
    "aws:iam/policy:Policy": _by("aws", "iam", "policies", "@name"),
    "aws:iam/openIdConnectProvider:OpenIdConnectProvider": _by("aws", "iam", "oidcProviders", "@url"),
    "aws:s3/bucket:Bucket": _by("aws", "buckets", "@bucket"),
    "aws:ses/domainIdentity:DomainIdentity": _by("aws", "ses", "identities", "@domain"),
    "aws:ses/domainDkim:DomainDkim": _by("aws", "ses", "identities", "@domain", "dkim"),
    "aws:ses/mailFrom:MailFrom": _by("aws", "ses", "identities", "@domain", "mailFrom"),
    "aws:ses/configurationSet:ConfigurationSet": _by("aws", "ses", "configurationSets", "@name"),
}
FACTS = {"aws:ses/domainDkim:DomainDkim": _dkim_facts}


def _walk(document: dict, path: tuple) -> Optional[dict]:
    """The facts at `path`. Inside an object that exists, a name it does not list is absent (discovery
    lists all of an object's policies); one level up, a name discovery did not look for is unknown."""
    node: Any = document
    inside = False
    for key in path:
        if isinstance(node, dict) and ("error" in node or node.get("exists") is False):
            return node if "error" in node else {"exists": False}
        inside = inside or (isinstance(node, dict) and node.get("exists") is True)
        if isinstance(node, list) and isinstance(key, int):
            node = node[key]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return {"exists": False} if inside else None
    return node if isinstance(node, dict) else None


def _record(resource: PlannedResource, inputs: dict, document: dict) -> Optional[tuple[str, Optional[dict]]]:
    name, type_ = inputs.get("name"), inputs.get("type")
    aws = document.get("aws")
    if not _known(name) or not aws:
        return None
    records = aws.get("route53", {}).get("records", [])
    found = [i for i, r in enumerate(records) if r["name"] == name.rstrip(".").lower() and r["type"] == type_]
    if found:
        return f"aws.route53.records[{found[0]}]", {"exists": True, **records[found[0]]}
    zone = next((z for n, z in aws.get("route53", {}).get("zones", {}).items()
                 if name == n or name.endswith("." + n)), None)
    # Every record of a zone discovery read is listed, and a zone that does not exist holds none: a record
    # not listed is absent. A zone discovery could not tell (two of that name) says nothing.
    return "aws.route53.records", ({"exists": False} if zone and "error" not in zone else None)


def match(resource: PlannedResource, inputs: dict, document: dict) -> Match:
    """The live object `resource` (with its shown inputs) would take over, as `document` records it."""
    if resource.type == "aws:route53/record:Record":
        found = _record(resource, inputs, document)
        return Match(resource, inputs, *found) if found else Match(resource, inputs)
    if resource.type.startswith("kubernetes:") and resource.custom and "metadata" in inputs:
        if not _known((inputs.get("metadata") or {}).get("name")):
            return Match(resource, inputs)
        path = ("cluster", "objects", kube_object(resource).key)
    else:
        locate = LOCATORS.get(resource.type)
        path = locate(resource, inputs) if locate else None
        if path is None:
            return Match(resource, inputs)
    facts = _walk(document, path) if document.get(path[0]) is not None else None
    if facts is not None and resource.type in FACTS:
        facts = FACTS[resource.type](facts)
    return Match(resource, inputs, ".".join(str(p) for p in path), facts)


def shown_inputs(plan: Plan) -> dict[str, dict]:
    """Each resource's inputs by URN, as the plan JSON shows them."""
    return {r["urn"]: r["inputs"] for r in plan.document()["resources"]}


def matches(plan: Plan, document: dict, shown: Optional[dict[str, dict]] = None) -> list[Match]:
    """One match per custom resource of the plan, in the plan's order (`shown`: its shown_inputs)."""
    shown = shown or shown_inputs(plan)
    return [match(r, shown[r.urn], document) for r in plan.resources if r.custom]


# --- live facts both commands judge alike -----------------------------------------------------------

def mail_from_verified(m: Match) -> bool:
    """Whether SES shows the MAIL FROM domain the resource plans as verified live: only then may a failed MX
    lookup reject mail (RejectMessage)."""
    live = m.live if m.exists else {}
    return live.get("status") == "Success" and live.get("domain") == m.inputs.get("mailFromDomain")


def peer_allowed_ips(peer: dict) -> tuple[str, bool]:
    """A live WireGuard peer's AllowedIPs (the running interface's, else the file's), and whether a
    katforge:wireguardPeers line can hold them: wireguard.sh keeps one /32 per peer."""
    allowed = peer.get("runningAllowedIps") or peer.get("allowedIps") or ""
    return allowed, "," not in allowed and allowed.endswith("/32")


# --- security group rules -------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """Where a rule admits traffic from (ingress) or to (egress)."""
    cidr: Optional[str] = None  # an IPv4 or IPv6 network
    prefix_list: Optional[str] = None
    hosts: frozenset = frozenset()  # a group as a source: the host roles in it
    group: Optional[str] = None  # that group's ID or the program's name for it, to show

    def holds(self, other: "Peer") -> bool:
        if self.cidr and other.cidr:
            try:
                mine, theirs = ipaddress.ip_network(self.cidr), ipaddress.ip_network(other.cidr)
            except ValueError:
                return False
            return mine.version == theirs.version and theirs.subnet_of(mine)
        if self.prefix_list or other.prefix_list:
            return self.prefix_list == other.prefix_list
        if self.cidr and other.group:
            # A group as peer stands for its members' private IPv4 addresses (docs.aws.amazon.com/vpc/latest/
            # userguide/security-group-rules.html, "Security group referencing"): every address holds them, a
            # narrower range cannot be judged without them.
            return self.cidr == "0.0.0.0/0"
        return bool(other.hosts) and other.hosts <= self.hosts

    def __str__(self) -> str:
        return self.cidr or self.prefix_list or f"group {self.group}"


@dataclass(frozen=True)
class Rule:
    egress: bool
    protocol: str  # "tcp", "udp", "icmp", "-1" (all)
    from_port: int
    to_port: int
    peer: Peer
    id: str = ""  # the live rule's ID (sgr-...), empty for a planned one

    def holds(self, other: "Rule") -> bool:
        if self.egress != other.egress or self.protocol not in ("-1", other.protocol):
            return False
        whole = self.protocol == "-1" or (self.from_port, self.to_port) == (-1, -1)
        ports = whole or (other.protocol != "-1" and other.from_port != -1
                          and self.from_port <= other.from_port and other.to_port <= self.to_port)
        return ports and self.peer.holds(other.peer)

    def __str__(self) -> str:
        if self.protocol == "-1":
            what = "all traffic"
        elif self.from_port in (-1, None):
            what = self.protocol
        else:
            what = f"{self.protocol} {self.from_port}" + (f"-{self.to_port}" if self.to_port != self.from_port else "")
        return f"{'egress ' if self.egress else ''}{what} {'to' if self.egress else 'from'} {self.peer}"


def _live_instances(document: dict) -> dict[str, dict]:
    return {role: i for role, i in ((document.get("aws") or {}).get("instances") or {}).items() if i.get("exists")}


def live_members(document: dict) -> dict[str, frozenset]:
    """Each live security group attached to a host discovery read, and the host roles it is on."""
    members: dict[str, set] = {}
    for role, instance in _live_instances(document).items():
        for group in instance.get("securityGroups") or {}:
            members.setdefault(group, set()).add(role)
    return {group: frozenset(roles) for group, roles in members.items()}


def live_rules(group: dict, members: dict[str, frozenset]) -> list[Rule]:
    rules = []
    for egress, key in ((False, "ingress"), (True, "egress")):
        for r in group.get(key) or []:
            peer = Peer(cidr=r.get("cidrIpv4") or r.get("cidrIpv6"), prefix_list=r.get("prefixListId"),
                        hosts=members.get(r.get("securityGroupId"), frozenset()), group=r.get("securityGroupId"))
            ports = (-1, -1) if r.get("fromPort") is None else (r["fromPort"], r["toPort"])
            rules.append(Rule(egress, str(r["protocol"]), *ports, peer, id=(r.get("import") or {}).get("id", "")))
    return rules


class PlannedNetwork:
    """The security groups and rules a plan gives each host."""

    def __init__(self, plan: Plan, shown: Optional[dict[str, dict]] = None):
        self.instances = {r.name: r for r in plan.of_type(INSTANCE)}
        shown = shown or shown_inputs(plan)
        # The program's groups of each host, by URN (their IDs are stand-ins until created).
        self.groups = {name: set(r.options["property_dependencies"].get("vpcSecurityGroupIds", ()))
                       for name, r in self.instances.items()}
        members: dict[str, set] = {}
        for name, urns in self.groups.items():
            for urn in urns:
                members.setdefault(urn, set()).add(name)
        groups = {r.urn: r.name for r in plan.of_type("aws:ec2/securityGroup:SecurityGroup")}
        self.rules: dict[str, list[Rule]] = {}  # group URN -> its planned rules
        for resource in plan.of_type(INGRESS) + plan.of_type(EGRESS):
            inputs, deps = shown[resource.urn], resource.options["property_dependencies"]
            referenced = deps.get("referencedSecurityGroupId", ())
            cidr = inputs.get("cidrIpv4") or inputs.get("cidrIpv6")
            peer = Peer(cidr=cidr if _known(cidr) else None, prefix_list=inputs.get("prefixListId"),
                        hosts=frozenset(h for urn in referenced for h in members.get(urn, ())),
                        group=", ".join(groups.get(urn, urn) for urn in referenced) or None)
            ports = (-1, -1) if inputs.get("fromPort") is None else (inputs["fromPort"], inputs["toPort"])
            rule = Rule(resource.type == EGRESS, str(inputs["ipProtocol"]), *ports, peer)
            for urn in deps.get("securityGroupId", ()):
                self.rules.setdefault(urn, []).append(rule)

    def kept(self, host: str) -> list[str]:
        """The live group IDs the plan keeps attached to the host beside its own."""
        instance = self.instances.get(host)
        ids = (instance.raw_inputs.get("vpcSecurityGroupIds") or []) if instance else []
        return [i for i in ids if isinstance(i, str) and i.startswith("sg-")]

    def own_rules(self, host: str) -> list[Rule]:
        return [rule for urn in sorted(self.groups.get(host, ())) for rule in self.rules.get(urn, [])]


@dataclass(frozen=True)
class Dropped:
    """A live group the plan detaches from a host, and its rules that nothing planned allows."""
    host: str
    group: str
    name: str
    rules: tuple[Rule, ...]


def uncovered(rules: Iterable[Rule], allowed: Iterable[Rule]) -> list[Rule]:
    allowed = list(allowed)
    return [rule for rule in rules if not any(a.holds(rule) for a in allowed)]


def dropped(plan: Plan, document: dict, network: Optional[PlannedNetwork] = None) -> list[Dropped]:
    """Every live group that a host loses with the plan and that allows something its groups after the
    plan (the program's own, and the live ones kept) do not."""
    network = network or PlannedNetwork(plan)
    members = live_members(document)
    found = []
    for host, instance in sorted(_live_instances(document).items()):
        groups = instance.get("securityGroups") or {}
        kept = [g for g in network.kept(host) if g in groups]
        allowed = network.own_rules(host) + [r for g in kept for r in live_rules(groups[g], members)]
        for group_id, group in sorted(groups.items()):
            if group_id in kept or host not in network.instances:
                continue
            lost = uncovered(live_rules(group, members), allowed)
            if lost:
                found.append(Dropped(host, group_id, group.get("name", ""), tuple(lost)))
    return found


def groups_to_keep(plan: Plan, document: dict) -> dict[str, list[str]]:
    """For each live host the plan declares: its live groups that allow something the program's own
    groups do not, the keep list that makes adopting the host drop nothing."""
    network = PlannedNetwork(plan)
    members = live_members(document)
    keep = {}
    for host, instance in sorted(_live_instances(document).items()):
        if host not in network.instances:
            continue
        own = network.own_rules(host)
        keep[host] = sorted(g for g, group in (instance.get("securityGroups") or {}).items()
                            if uncovered(live_rules(group, members), own))
    return keep


# --- the plan against the discovered account ------------------------------------------------------

def cloud_of(document: dict) -> dict:
    """What the program's lookups and imports find in the discovered account, in tools/offline.py's
    CLOUD form: the live VPC (by the hosts' VPC; its CIDR is not discovered, so the configured one is
    taken), the hosts' subnets, the hosted zones, the hosts' addresses. What discovery did not find
    stays as the offline cloud has it, so a greenfield account still plans."""
    cloud = copy.deepcopy(CLOUD)
    aws = document.get("aws") or {}
    for role, instance in _live_instances(document).items():
        cloud["vpc"]["id"] = instance.get("vpcId") or cloud["vpc"]["id"]
        subnet = instance.get("subnet") or {}
        if subnet.get("cidr"):
            cloud["subnets"][subnet["cidr"]] = (subnet["id"], subnet.get("availabilityZone"))
        if instance.get("privateIp"):
            cloud["private_ips"][role] = instance["privateIp"]
        if (instance.get("elasticIp") or {}).get("exists"):
            cloud["elastic_ips"][role] = instance["elasticIp"]["publicIp"]
    for zone, found in ((aws.get("route53") or {}).get("zones") or {}).items():
        if found.get("exists"):
            cloud["zones"][zone] = found["id"]
    return cloud


def stack_file_config(stack: str, path: Path) -> dict[str, Any]:
    """The config of the stack file at `path`, as overrides of the committed Pulumi.<stack>.yaml for
    tools.offline.evaluate: a key only the committed file has is taken out."""
    chosen = stackfile.read(path, project_config_schema())
    return {**{key: None for key in stack_config(stack) if key not in chosen}, **chosen}


def plan_against(stack: str, stack_file: Path, document: Optional[dict] = None,
                 extra: Optional[dict[str, Any]] = None) -> Plan:
    """The offline plan of `stack` with the config of `stack_file` (and `extra` on top), its lookups
    answered from the discovered account (without one, from the account the config names). qa's plan
    reads prod's stack file beside it, or the committed one; qa's discovery does not look at prod's hosts,
    so those are as prod's stack file names them."""
    config = {**stack_file_config(stack, stack_file), **(extra or {})}
    prod_file = stack_file.with_name("Pulumi.prod.yaml")
    prod = None if stack == "prod" else stack_file_config("prod", prod_file if prod_file.exists()
                                                          else ROOT / "Pulumi.prod.yaml")
    cloud = None if document is None else cloud_of(document)
    if cloud is not None and prod is not None:
        cloud = configured_cloud(effective_config("prod", prod)[0], cloud)
    return evaluate(stack, config, prod, cloud=cloud)
