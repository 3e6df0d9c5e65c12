"""make preflight STACK=prod|qa: what the first `pulumi up` would do to each live object, and whether that
is safe, from the offline plan and build/discovered-<stack>.json (make discover), before anyone runs it.

The plan is evaluated with the stack file's config, its lookups answered from the discovered account
(tools/adoption.py). Each resource is matched with its live object (tools/adoption.py) and gets one row:
`import unchanged`, `import then update` (the fields), `replace` (the field that forces it: the force-new
table of tools/force_new.py, as `make plan-diff` uses it), `create`, `collision` (a create where a live
object holds the name) or `risk` (what the first `up` does on purpose that an operator should know, or
what could not be checked). Then every hazard, one line each, with how to resolve it; the exit status
is 1 while there is one, 0 when the first `up` is safe as far as discovery can tell, 2 when the
discovered file is missing or belongs to another stack.

Only what discovery reads is compared: a field discovery does not know is not compared, so `pulumi
preview` still has the last word on drift.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO


from infra.bootstrap import HOST_FILES
from infra.settings import STAGES, SettingsError
from tools import adoption
from tools.adoption import Match, PlannedNetwork, Rule
from tools.discover import SCHEMA
from tools.discover_hosts import WG_HOOKS
from tools.force_new import ABSENT, replacement_reasons, same, with_ignored
from tools.offline import PROJECT, ROOT, NotFound, Plan, project_config_schema
from tools.stackfile import StackFileError

OPS = ("replace", "collision", "risk", "import then update", "import unchanged", "create")

DESCRIPTION = """\
Before the first `pulumi up` of a stack that adopts the running estate: what it would do to each live
object, and whether that is safe. It reads build/discovered-<stack>.json (make discover), evaluates the
offline plan with the stack file's config against the discovered account, and prints one row per
resource: `import unchanged`, `import then update` (the fields), `replace` (the field that forces it, from
the same force-new table as make plan-diff), `create`, `collision` (a create where a live object holds the
name) or `risk` (what the first run does on purpose, or could not check). Then one line per hazard, each
saying how to resolve it: a protected or live resource that would be replaced, a create that collides
with an existing name, a live security group rule that would go, a live WireGuard peer missing from
config, a host the bootstrap could not reach over SSH, MAIL FROM that would reject mail, a Kubernetes
object that exists but is not imported, the Traefik manifest file that the handover cannot take, what the
host scripts would refuse midway (md5 roles, a PostgreSQL restart not allowed, Secrets encryption, the
WireGuard address or port), and every source discovery did not read ("not checked"). Exits 0 when the
first `up` is safe as far as discovery can tell, 1 with the hazards, 2 when the discovered file is missing
or belongs to another stack.
"""


class PreflightError(Exception):
    """The discovered file cannot be used; the message is one line."""


@dataclass(frozen=True)
class Row:
    op: str
    resource: str  # <Type>:<name>, as katforge:imports names it
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.op:<19} {self.resource}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Report:
    stack: str
    rows: list[Row] = field(default_factory=list)
    hazards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, resource: str) -> Row:
        return next(r for r in self.rows if r.resource == resource)

    def of(self, op: str) -> list[Row]:
        return [r for r in self.rows if r.op == op]


# --- live facts as planned inputs -----------------------------------------------------------------

def _instance(live: dict, planned: dict) -> dict:
    volume = live.get("rootVolume") or {}
    profile = live.get("instanceProfile") or {}
    facts = {
        "instanceType": live.get("instanceType"), "subnetId": (live.get("subnet") or {}).get("id"),
        "privateIp": live.get("privateIp"), "ami": live.get("imageId"), "keyName": live.get("keyName"),
        "rootBlockDevice": {"volumeSize": volume.get("sizeGb"), "volumeType": volume.get("type"),
                            "encrypted": volume.get("encrypted"),
                            "deleteOnTermination": volume.get("deleteOnTermination")},
        "metadataOptions": live.get("metadataOptions") or {},
        "sourceDestCheck": live.get("sourceDestCheck"),
        "vpcSecurityGroupIds": sorted(live.get("securityGroups") or {}),
        "tags": {key: (live.get("tags") or {}).get(key, ABSENT) for key in planned.get("tags") or {}},
        "iamInstanceProfile": profile.get("name"),
    }
    if isinstance(live.get("disableApiTermination"), bool):
        facts["disableApiTermination"] = live["disableApiTermination"]
    return facts


def _record(live: dict, planned: dict) -> dict:
    values = live.get("values") or []
    if live.get("type") in ("TXT", "SPF"):  # the provider shows TXT values without their quotes
        values = [v[1:-1] if len(v) > 1 and v[0] == v[-1] == '"' else v for v in values]
    return {"name": live.get("name"), "type": live.get("type"), "ttl": live.get("ttl"), "records": sorted(values)}


def _kubernetes(live: dict, planned: dict) -> dict:
    metadata = planned.get("metadata") or {}
    labels = live.get("labels") or {}
    facts: dict[str, Any] = {"metadata": {
        # Server-side apply sets the labels the program names and leaves the others.
        "labels": {key: labels.get(key, ABSENT) for key in metadata.get("labels") or {}}}}
    spec = planned.get("spec") or {}
    if "images" in live:  # a Deployment
        pod = ((spec.get("template") or {}).get("spec") or {})
        facts["spec"] = {"selector": {"matchLabels": live.get("selector")}, "replicas": live.get("replicas"),
                         "template": {"spec": {
                             kind: [{"image": (live.get(images) or {}).get(c.get("name"))} for c in pod.get(kind) or []]
                             for kind, images in (("containers", "images"), ("initContainers", "initImages"))}}}
    elif "clusterIP" in live:  # a Service
        facts["spec"] = {"type": live.get("type"), "selector": live.get("selector")}
    elif "keys" in live:  # a Secret
        facts["type"] = live.get("type")
    return facts


def _secret_data(m: Match) -> list[tuple[str, Any, Any]]:
    """A Secret's data is never discovered: an imported one is written from config, which may differ."""
    if m.resource.type != "kubernetes:core/v1:Secret":
        return []
    return [(key, "[secret]", "[secret, from config]") for key in ("data", "stringData") if key in m.inputs]


LIVE_INPUTS = {
    "aws:ec2/instance:Instance": _instance,
    "aws:ec2/eip:Eip": lambda live, planned: {"domain": live.get("domain")},
    # The text an import reads (EC2's, with its own comment): another text than sshPublicKey is a replacement
    # unless the program ignores publicKey, as it does for an adopted pair (infra/hosts.py).
    "aws:ec2/keyPair:KeyPair": lambda live, planned: {"keyName": (live.get("import") or {}).get("id"),
                                                      **({"publicKey": live["publicKey"]} if live.get("publicKey")
                                                         else {})},
    "aws:iam/user:User": lambda live, planned: {"name": (live.get("import") or {}).get("id"),
                                                "path": live.get("path")},
    "aws:iam/role:Role": lambda live, planned: {"name": (live.get("import") or {}).get("id")},
    "aws:iam/instanceProfile:InstanceProfile": lambda live, planned: {
        "name": (live.get("import") or {}).get("id"),
        **({"role": live["roles"][0]} if len(live.get("roles") or []) == 1 else {})},
    "aws:iam/policy:Policy": lambda live, planned: {
        "name": (live.get("import") or {}).get("id", "").rsplit("/", 1)[-1]},
    "aws:iam/openIdConnectProvider:OpenIdConnectProvider": lambda live, planned: {
        "clientIdLists": sorted(live.get("clientIds") or []), "thumbprintLists": sorted(live.get("thumbprints") or [])},
    "aws:s3/bucket:Bucket": lambda live, planned: {"bucket": (live.get("import") or {}).get("id")},
    "aws:ses/domainIdentity:DomainIdentity": lambda live, planned: {"domain": (live.get("import") or {}).get("id")},
    "aws:ses/domainDkim:DomainDkim": lambda live, planned: {"domain": (live.get("import") or {}).get("id")},
    "aws:ses/mailFrom:MailFrom": lambda live, planned: {"mailFromDomain": live.get("domain"),
                                                        "behaviorOnMxFailure": live.get("behaviorOnMxFailure")},
    # SES's defaults when a configuration set has no such options.
    "aws:ses/configurationSet:ConfigurationSet": lambda live, planned: {
        "deliveryOptions": {"tlsPolicy": live.get("tlsPolicy") or "Optional"},
        "reputationMetricsEnabled": bool(live.get("reputationMetricsEnabled"))},
    "aws:route53/record:Record": _record,
}
# Lists whose order means nothing.
UNORDERED = ("vpcSecurityGroupIds", "records", "clientIdLists", "thumbprintLists")


def live_inputs(m: Match) -> dict:
    convert = LIVE_INPUTS.get(m.resource.type) or (_kubernetes if m.resource.type.startswith("kubernetes:") else None)
    return convert(m.live, m.inputs) if convert else {}


def _restricted(tree: Any, mask: Any) -> Any:
    """`tree` cut down to the paths `mask` has too (what both sides know)."""
    if isinstance(tree, dict) and isinstance(mask, dict):
        return {k: _restricted(v, mask[k]) for k, v in tree.items() if k in mask and mask[k] is not None}
    if isinstance(tree, list) and isinstance(mask, list) and all(isinstance(v, dict) for v in tree + mask):
        return [_restricted(v, w) for v, w in zip(tree, mask)]
    return tree


def _leaves(tree: Any, path: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {p: v for k, item in tree.items() for p, v in _leaves(item, f"{path}.{k}" if path else k).items()}
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        return {p: v for i, item in enumerate(tree) for p, v in _leaves(item, f"{path}[{i}]").items()}
    return {path: tree}


def _sorted(tree: dict) -> dict:
    tree = dict(tree)  # not a deep copy: ABSENT must stay itself
    for key in UNORDERED:
        if isinstance(tree.get(key), list):
            tree[key] = sorted(tree[key], key=json.dumps)
    return tree


def shown(value: Any, limit: int = 60) -> str:
    if value is ABSENT or value is None:
        return "(none)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class Comparison:
    changes: list[tuple[str, Any, Any]]  # (path, live, planned)
    replaced_by: list[str]


def compare(m: Match) -> Comparison:
    """The planned inputs against the live object's, on the fields both know, ignoreChanges applied."""
    live = _sorted(live_inputs(m))
    planned = _sorted(_restricted(m.inputs, live))
    live = _restricted(live, planned)
    planned = with_ignored(live, planned, m.resource.options.get("ignore_changes", ()))
    before, after = _leaves(live), _leaves(planned)
    changes = [(path, before.get(path, ABSENT), after.get(path, ABSENT))
               for path in sorted(before.keys() | after.keys())
               if not same(before.get(path, ABSENT), after.get(path, ABSENT))]
    reasons = replacement_reasons(m.resource.type, live, planned,
                                  replace_on_changes=m.resource.options.get("replace_on_changes", ()))
    return Comparison(changes, reasons)


# --- rows -----------------------------------------------------------------------------------------

# Creating these over a live object of the same name takes it over in place: a record is an UPSERT
# (allowOverwrite), DKIM and MAIL FROM are settings of the identity, a *Patch applies its fields only.
TAKES_OVER = ("aws:route53/record:Record", "aws:ses/domainDkim:DomainDkim", "aws:ses/mailFrom:MailFrom")


class Checks:
    """The rows and hazards of one plan against one discovered file."""

    def __init__(self, plan: Plan, document: dict, waived: Iterable[str] = ()):
        self.plan, self.document = plan, document
        self.report = Report(plan.stack)
        self.waived = set(waived)
        self.shown = adoption.shown_inputs(plan)
        self.matches = adoption.matches(plan, document, self.shown)
        self.by_urn = {m.resource.urn: m for m in self.matches}

    def hazard(self, line: str) -> None:
        if line not in self.report.hazards:
            self.report.hazards.append(line)

    def add(self, op: str, m: Match, detail: str = "") -> None:
        self.report.rows.append(Row(op, m.key, detail))

    # -- sources -------------------------------------------------------------------------------

    def not_read(self) -> dict[str, str]:
        """Each source discovery did not read, and why."""
        sources = self.document.get("sources") or {}
        return {source: state.get("error") or state.get("why") or state.get("status", "missing")
                for source in adoption.SOURCES
                for state in [sources.get(source, {"why": "not in the file"})] if state.get("status") != "read"}

    def moot(self) -> set[str]:
        """Sources with nothing to read: with AWS read and no host live, there is no cluster and no host (a
        greenfield account)."""
        instances = (self.document.get("aws") or {}).get("instances")
        if "aws" in self.not_read() or instances is None or any(i.get("exists") for i in instances.values()):
            return set()
        return {"cluster", "hosts"}

    def sources(self) -> None:
        for source, why in self.not_read().items():
            if source in self.moot():
                self.report.notes.append(f"{source} not read ({why}): no host runs, so there is nothing to read")
            elif source in self.waived:
                self.report.notes.append(f"{source} not checked ({why}): waived with --accept-unchecked {source}")
            else:
                self.hazard(f"{source}: not checked ({why}): run make discover with it (or waive it: "
                            f"--accept-unchecked {source})")

    # -- resources -----------------------------------------------------------------------------

    def resources(self) -> None:
        for m in self.matches:
            self.resource(m)

    def resource(self, m: Match) -> None:
        importing = m.resource.options.get("import_id")
        if m.at is None:  # nothing live to take over: the program's own group, a key, a host step
            self.add("create", m)
        elif not m.known:
            self.unknown(m, importing)
        elif not m.exists:
            self.add("risk" if importing else "create", m, f"imports {importing}, which discovery did not find"
                     if importing else "")
            if importing:
                self.hazard(f"{m.key}: {PROJECT}:imports names {importing}, but discovery found nothing at {m.at}: "
                            "run make discover (it drops the line), or correct the ID")
        elif m.handed_over:
            self.add("risk", m, "the Traefik handover deletes the object k3s applied from its manifest file and "
                                "Pulumi creates it anew: Traefik runs on the chart's defaults for the seconds between")
        elif m.live.get("ours") is False:
            self.add("collision", m, f"{m.live_id or m.at} belongs to another account")
            self.hazard(f"{m.key}: the name {m.at.rsplit('.', 1)[-1]} belongs to another account: choose another "
                        f"({PROJECT}:backupBucket)")
        elif not importing:
            self.unimported(m)
        elif m.import_id and importing != m.import_id:
            self.add("risk", m, f"imports {importing}, but the live object is {m.import_id}")
            self.hazard(f"{m.key}: {PROJECT}:imports names {importing}, but the live object is {m.import_id}: "
                        "run make discover")
        else:
            self.imported(m, importing)

    def unknown(self, m: Match, importing: Optional[str]) -> None:
        if m.live is not None:  # discovery looked and was refused
            self.add("risk", m, f"not checked: {m.live['error']}")
            self.hazard(f"{m.key}: not checked: discovery could not read {m.at} ({m.live['error']}): give make "
                        "discover the permission it lacks and run it again")
        elif m.source in self.moot() and not importing:
            self.add("create", m)
        elif m.source in self.not_read():  # the source's hazard (or its waiver) says what to do
            self.add("risk", m, f"not checked: {m.source} was not read"
                     + (" (waived)" if m.source in self.waived else ""))
        else:
            self.add("risk", m, "not checked: discovery did not look for it")
            self.hazard(f"{m.key}: not checked: discovery did not look for {m.at}: run make discover again "
                        "(the stack declares names it did not know then)")

    def unimported(self, m: Match) -> None:
        if m.resource.type in TAKES_OVER or m.resource.type.endswith("Patch"):
            changes = compare(m).changes
            self.add("create", m, "takes over the live one in place" + (
                ": " + ", ".join(f"{p} {shown(a)} → {shown(b)}" for p, a, b in changes) if changes else ""))
            return
        name = m.live_id or m.at
        self.add("collision", m, f"{name} exists live and is not imported")
        if m.key in self.plan.adoptable:
            problem = (f"Kubernetes object {name} exists but is not imported (pulumi-kubernetes fails with "
                       "AlreadyExists)" if m.resource.type.startswith("kubernetes:")
                       else f"{name} exists live, so creating it fails")
            fix = "run make discover (it writes the import line) and review it"
        else:
            problem = f"{name} exists live and this program cannot import it"
            fix = "delete or rename the live one, or let the program adopt it (infra/adopt.py)"
        self.hazard(f"{m.key}: {problem}: {fix}")

    def imported(self, m: Match, importing: str) -> None:
        comparison = compare(m)
        if comparison.replaced_by:
            reason = comparison.replaced_by[0]
            value = next(((a, b) for p, a, b in comparison.changes if p == reason or p.startswith(reason + ".")), None)
            detail = reason + (f" (live {shown(value[0])}, planned {shown(value[1])})" if value else "")
            self.add("replace", m, detail)
            what = ("protected, so pulumi up stops with an error midway" if m.resource.options.get("protect")
                    else "the live object would be deleted and created anew")
            key = FORCE_NEW_KEYS.get((m.resource.type, reason), "").format(host=m.resource.name)
            key = key if key in project_config_schema() else ""
            fix = (f"pulumi config set {PROJECT}:{key} {shown(value[0]) if value else '<live value>'} --stack "
                   f"{self.plan.stack} (make discover sets it)" if key else
                   "make the program declare what is live, or change the live object by hand first")
            self.hazard(f"{m.key}: importing it would replace it ({detail}), {what}: {fix}")
        elif comparison.changes or _secret_data(m):
            comparison.changes += _secret_data(m)
            self.add("import then update", m, ", ".join(f"{p} {shown(a)} → {shown(b)}"
                                                        for p, a, b in comparison.changes) + self.unmanaged(m))
            self.shrinking(m, comparison)
        else:
            self.add("import unchanged", m, importing + self.unmanaged(m))

    def unmanaged(self, m: Match) -> str:
        """What a live IAM user or role holds that the program does not declare. Pulumi leaves it as it is,
        unless the program declares the policies exclusive (`*PoliciesExclusive`, `*PolicyAttachmentsExclusive`):
        then the first `up` removes it, and with it what it allowed."""
        kind = {"aws:iam/user:User": "user", "aws:iam/role:Role": "role"}.get(m.resource.type)
        if kind is None:
            return ""
        name = m.inputs.get("name")
        mine = [other for other in self.matches if other.resource.type.startswith(f"aws:iam/{kind}Polic")
                and name in (other.inputs.get(kind), other.inputs.get(f"{kind}Name"))]
        declared = {value for other in mine
                    for value in [other.inputs.get("policyArn"), other.inputs.get("name"),
                                  *(other.inputs.get("policyArns") or []), *(other.inputs.get("policyNames") or [])]}
        exclusive = {other.kind for other in mine if other.kind.endswith("Exclusive")}
        removed, kept = [], []
        for listing, owner in (("inlinePolicies", f"{kind.capitalize()}PoliciesExclusive"),
                               ("attachedPolicies", f"{kind.capitalize()}PolicyAttachmentsExclusive")):
            for policy in m.live.get(listing) or {}:
                if policy not in declared:
                    (removed if owner in exclusive else kept).append(policy.rsplit("/", 1)[-1])
        return "".join(f"; {verb} live policies the program does not declare: {', '.join(policies)}"
                       for verb, policies in (("removes", removed), ("keeps", kept)) if policies)

    def shrinking(self, m: Match, comparison: Comparison) -> None:
        """EBS grows a volume in place and never shrinks one: the update fails midway."""
        for path, live, planned in comparison.changes:
            if path == "rootBlockDevice.volumeSize" and isinstance(live, int) and isinstance(planned, int) \
                    and planned < live:
                self.hazard(f"{m.key}: the root volume would shrink from {live} GB to {planned} GB, which EBS refuses "
                            f"midway: pulumi config set {PROJECT}:{m.resource.name}RootVolumeGb {live} --stack "
                            f"{self.plan.stack} (make discover sets it)")

    # -- what only the whole plan shows ----------------------------------------------------------

    def access_keys(self) -> None:
        for m in self.matches:
            if m.resource.type != "aws:iam/accessKey:AccessKey":
                continue
            user = next((u for u in self.matches if u.resource.type == "aws:iam/user:User"
                         and u.inputs.get("name") == m.inputs.get("user")), None)
            if user is not None and user.exists and (user.live.get("accessKeys") or 0) >= 2:
                self.hazard(f"{m.key}: IAM user {m.inputs.get('user')} has {user.live['accessKeys']} access keys, "
                            "the most AWS allows, so the new key fails: delete the one nothing uses (aws iam "
                            f"list-access-keys --user-name {m.inputs.get('user')}, then delete-access-key)")

    def key_pair(self) -> None:
        """An adopted key pair keeps the key it holds (its publicKey is ignored, infra/hosts.py): one other than
        sshPublicKey would seed every new instance (an agent, a rebuilt host) with a key the bootstrap's
        sshPrivateKey may not open."""
        for m in self.matches:
            if m.resource.type != "aws:ec2/keyPair:KeyPair" or not m.exists or not m.resource.options.get("import_id"):
                continue
            live, planned = m.live.get("publicKey"), m.inputs.get("publicKey")
            if not live:
                self.replace_row(m, "risk", "not checked whether it holds sshPublicKey: discovery read no public key "
                                            "of it (run make discover again)")
            elif key_material(live) != key_material(planned):
                name = m.live_id or m.at
                self.hazard(f"{m.key}: the live key pair {name} holds another key ({m.live.get('fingerprint')}) than "
                            f"{PROJECT}:sshPublicKey, and adopting it keeps that key, so a new instance would not "
                            f"trust sshPrivateKey: set sshPublicKey and sshPrivateKey to the live key's pair, or delete "
                            f"the live pair (aws ec2 delete-key-pair --key-name {name}; running hosts keep their "
                            "authorized_keys), then make discover: the first up creates it with sshPublicKey")

    def zones(self) -> None:
        zones = ((self.document.get("aws") or {}).get("route53") or {}).get("zones") or {}
        for zone, found in sorted(zones.items()):
            if found.get("exists") is False:
                self.hazard(f"hosted zone {zone}: not in the account; the program only looks zones up: create it by "
                            "hand and point the registrar at its name servers")
            elif "error" in found:
                self.hazard(f"hosted zone {zone}: {found['error']}: delete the stray zone, or set {PROJECT}:zoneIds")

    def mail_from(self) -> None:
        for m in self.matches:
            if m.resource.type != "aws:ses/mailFrom:MailFrom" or m.inputs.get("behaviorOnMxFailure") != "RejectMessage":
                continue
            if not adoption.mail_from_verified(m):
                status = (m.live if m.exists else {}).get("status")
                self.hazard(f"{m.key}: MAIL FROM {m.inputs.get('mailFromDomain')} is not verified live "
                            f"({status or 'not set up'}), so RejectMessage would refuse every send: "
                            f"pulumi config set {PROJECT}:mailFromMxFailure UseDefaultValue --stack {self.plan.stack} "
                            "until SES shows it verified")

    def security_groups(self, network: PlannedNetwork) -> None:
        for lost in adoption.dropped(self.plan, self.document, network):
            rules = "; ".join(str(r) for r in lost.rules)
            cidrs = [r.peer.cidr for r in lost.rules if r.peer.cidr and not r.egress and _public(r.peer.cidr)
                     and ipaddress.ip_network(r.peer.cidr).prefixlen >= 16]
            # Every rule an operator's address: adminCidrs covers them as well.
            also = f", or add {', '.join(cidrs)} to {PROJECT}:adminCidrs" if len(cidrs) == len(lost.rules) else ""
            self.hazard(f"{lost.host} host: adopting it detaches live security group {lost.group} ({lost.name}) and "
                        f"with it {rules}: add {lost.group} to {PROJECT}:{lost.host}KeepSecurityGroups (make discover "
                        f"does){also}")

    def ssh(self, network: PlannedNetwork) -> None:
        """The bootstrap reaches each host at its public address on tcp 22: from the operator's address (a
        public range: adminCidrs, or a kept live group), or, to a host other than the VPN's, through the
        VPN, if the VPN host runs already (a greenfield has no VPN to come through yet)."""
        if not self.commands():
            return
        members = adoption.live_members(self.document)
        instances = {r.name: r for r in self.plan.of_type(adoption.INSTANCE)}
        vpn = instances.get("vpn")
        vpn_runs = vpn is not None and self.by_urn[vpn.urn].exists
        vpn_address = self.public_address("vpn")
        for host in sorted(instances):
            groups = ((self.document.get("aws") or {}).get("instances", {}).get(host) or {}).get("securityGroups") or {}
            rules = network.own_rules(host) + [r for g in network.kept(host) if g in groups
                                               for r in adoption.live_rules(groups[g], members)]
            if not any(_admits_ssh(r, host, vpn_runs, vpn_address) for r in rules):
                self.hazard(f"{host} host: the bootstrap connects to its public address on tcp 22 and nothing would "
                            f"allow it: pulumi config set --path '{PROJECT}:adminCidrs[0]' <your address>/32 --stack "
                            f"{self.plan.stack}, and run pulumi up from there")

    def public_address(self, host: str) -> Optional[str]:
        eip = next((m for m in self.matches if m.resource.type == "aws:ec2/eip:Eip" and m.resource.name == host), None)
        return (eip.live or {}).get("publicIp") if eip and eip.exists else None

    # -- the host steps --------------------------------------------------------------------------

    def commands(self) -> list[Match]:
        return [m for m in self.matches if m.resource.type == "command:remote:Command"]

    def step_match(self, script: str) -> Optional[Match]:
        """The command that runs a host script, or None when the plan does not run it."""
        for m in self.commands():
            create = m.resource.raw_inputs.get("create")
            if isinstance(create, str) and create.endswith(f"/{script}") and " install " not in create:
                return m
        return None

    def step(self, script: str) -> Optional[tuple[dict[str, str], str]]:
        """The environment and stdin the plan runs a host script with, or None when it does not run it."""
        m = self.step_match(script)
        if m is None:
            return None
        words = shlex.split(m.resource.raw_inputs["create"])
        environment = dict(w.split("=", 1) for w in words[words.index("env") + 1:] if "=" in w) \
            if "env" in words else {}
        stdin = m.resource.raw_inputs.get("stdin")
        return environment, stdin if isinstance(stdin, str) else ""

    def replace_row(self, m: Match, op: str, detail: str) -> None:
        self.report.rows = [row for row in self.report.rows if row.resource != m.key]
        self.add(op, m, detail)

    def postgres(self) -> None:
        """What pg-configure.sh refuses before any change, decided by the script itself (its check-only mode)
        on the live facts: login roles with md5 hashes, live pg_hba rules the new file would not honour. Then
        what makes it fail after the reload: a setting that needs a restart it may not do, and a setting of
        katforge.conf that a file read after it (postgresql.auto.conf, a later conf.d file) overrides."""
        step = self.step("pg-configure.sh")
        pg = (((self.document.get("hosts") or {}).get("k3s") or {}).get("postgres"))
        if step is None or pg is None:
            return
        if "error" in pg:
            self.hazard(f"PostgreSQL: not checked ({pg['error']}): make discover must read it on the k3s host")
            return
        environment, conf = step
        with tempfile.TemporaryDirectory(prefix="katforge-preflight-") as tree:
            root = Path(tree)
            refusals = host_check("pg-configure.sh", {**environment, **pg_check_tree(root, pg)}, conf, root)
        for refusal in refusals:
            self.hazard(f"PostgreSQL: pg-configure.sh refuses, so pulumi up stops there (after the AWS changes): "
                        f"{refusal}")
        wanted = dict(re.findall(r"^\s*(\w+)\s*=\s*'?([^'#\n]*?)'?\s*(?:#.*)?$", conf, flags=re.M))
        wanted["listen_addresses"] = environment.get("PG_LISTEN_ADDRESSES", "")
        live = pg.get("settings") or {}
        pending = [f"{name} ({values['running']} now, {values['configured']} after a restart)"
                   for name, values in sorted((pg.get("pendingRestart") or {}).items())]
        pending += [f"{name} ({live[name]} → {wanted[name]})" for name in RESTART_SETTINGS
                    if name in live and name in wanted and not _same_setting(name, live[name], wanted[name])]
        if pending and environment.get("PG_ALLOW_RESTART") not in ("1", "true", "yes"):
            self.hazard(f"PostgreSQL: {', '.join(pending)} need a restart, which pg-configure.sh may not do, so "
                        f"pulumi up fails there: pulumi config set {PROJECT}:postgresAllowRestart true --stack "
                        f"{self.plan.stack} (one restart; the apps reconnect), or restart it yourself when it stops")
        overrides = overridden(pg, sorted(wanted))
        if overrides:
            managed = f"{Path(live['config_file']).parent}/{MANAGED_CONF}"
            self.hazard(f"PostgreSQL: pg-configure.sh fails after its reload (as it checks pg_settings.sourcefile): "
                        f"settings of {managed} are overridden by files read after it: {', '.join(overrides)}: remove "
                        "them there (postgresql.auto.conf: sudo -u postgres psql -c 'ALTER SYSTEM RESET <name>'), "
                        "then make discover")
        self.foreign_owned(pg)

    def foreign_owned(self, pg: dict) -> None:
        """pg-database.sh makes the stage's role the owner of what postgres owns in schema public, nothing
        else: what postgres owns elsewhere in the stage's database, the apps (as that role from the first up
        on) cannot alter, nor use unless granted."""
        m = self.step_match("pg-database.sh")
        if m is None:
            return
        environment = self.step("pg-database.sh")[0]
        database, role = environment.get("PG_DATABASE"), environment.get("PG_ROLE")
        owned = (pg.get("foreignOwned") or {}).get(database)
        error = (pg.get("foreignOwnedErrors") or {}).get(database)
        if owned:
            shown_ = ", ".join(f"{kind} {name}" for kind, name in owned[:5]) + (
                f" and {len(owned) - 5} more" if len(owned) > 5 else "")
            self.replace_row(m, "risk", f"postgres owns {shown_} in database {database}, outside schema public: the "
                                        f"apps, as role {role} from this up on, cannot alter them (nor use them unless "
                                        f"granted); if they do, make them the role's once it exists (ALTER ... OWNER "
                                        f"TO {role})")
        elif error:
            self.replace_row(m, "risk", f"not checked what postgres owns outside schema public in {database}: {error}")

    def sshd(self) -> None:
        """What host-baseline.sh changes in sshd for whoever logs in today: each of its settings that sshd has
        otherwise in effect on the live host (sshd -T, read by discovery), as a risk on the host's baseline
        step, with who loses what."""
        wanted = baseline_sshd_settings()
        for m in self.commands():
            host = re.fullmatch(r"bootstrap-(.+)-baseline", m.resource.name)
            facts = (((self.document.get("hosts") or {}).get(host.group(1)) or {}).get("sshd")) if host else None
            if facts is None:
                continue
            if "error" in facts:
                self.replace_row(m, "risk", f"not checked what host-baseline.sh changes in sshd: {facts['error']}")
                continue
            live = facts.get("settings") or {}
            changes = [f"{key} {live[key]} → {value} ({SSHD_LOSSES.get(key, 'changes')})"
                       for key, value in sorted(wanted.items()) if key in live and live[key] != value]
            if changes:
                self.replace_row(m, "risk", "host-baseline.sh changes sshd: " + "; ".join(changes) + ": make sure "
                                 "every operator logs in as a user of their own with a key (then sudo) before up")

    def k3s(self) -> None:
        """What k3s-install.sh refuses, decided by the script itself (its check-only mode) on the live facts:
        live flags, env files and config.yaml that config.yaml sets otherwise, a downgrade or a jump of more
        than one minor release, secrets encryption."""
        step = self.step("k3s-install.sh")
        k3s = (((self.document.get("hosts") or {}).get("k3s") or {}).get("k3s"))
        if step is None or k3s is None:
            return
        environment, config = step
        status = (k3s.get("secretsEncryption") or {})
        if "error" in status or not status.get("status"):
            self.hazard(f"k3s secrets encryption: not checked ({status.get('error', 'no status')}): make discover must "
                        "read it on the k3s host")
        with tempfile.TemporaryDirectory(prefix="katforge-preflight-") as tree:
            root = Path(tree)
            refusals = host_check("k3s-install.sh", {**environment, **k3s_check_tree(root, k3s)}, config, root)
        for refusal in refusals:
            self.hazard(f"k3s host: k3s-install.sh refuses, so pulumi up stops there (after the AWS changes): {refusal}")

    def wireguard(self) -> None:
        step = self.step("wireguard.sh")
        wg = (((self.document.get("hosts") or {}).get("vpn") or {}).get("wireguard"))
        if step is None or wg is None:
            return
        environment, peers_text = step
        stack = self.plan.stack
        running = wg.get("running") or {}
        address = running.get("address") or wg["config"].get("address")
        if address and environment.get("WG_ADDRESS") and address != environment["WG_ADDRESS"]:
            network = ipaddress.ip_interface(address).network
            self.hazard(f"WireGuard: the live server is {address}, the program would make it "
                        f"{environment['WG_ADDRESS']} and move every client: pulumi config set {PROJECT}:vpnClientCidr "
                        f"{network} --stack {stack} (make discover sets it)")
        port = running.get("listenPort") or wg["config"].get("listenPort")
        if port and environment.get("WG_PORT") and str(port) != environment["WG_PORT"]:
            self.hazard(f"WireGuard: the live server listens on {port}, the program would move it to "
                        f"{environment['WG_PORT']}: pulumi config set {PROJECT}:wireguardPort {port} --stack {stack} "
                        "(make discover sets it)")
        planned = {parts[1]: parts for parts in (line.split(",") for line in peers_text.splitlines())
                   if len(parts) == 3}
        index = len(planned)
        for peer in wg.get("peers") or []:
            allowed, keepable = adoption.peer_allowed_ips(peer)
            name = planned.get(peer["publicKey"], [None])[0]
            if not keepable:
                self.hazard(f"WireGuard peer {peer.get('name') or peer['publicKey']}: allows {allowed or 'nothing'}, "
                            "which wireguard.sh cannot keep (one /32 per peer): give it one address on the VPN host "
                            "first")
            elif name is None:
                line = f"{peer.get('name') or 'live'},{peer['publicKey']},{allowed}"
                self.hazard(f"WireGuard peer {peer['publicKey']} ({allowed}) runs live but is not in "
                            f"{PROJECT}:wireguardPeers, so wireguard.sh refuses: pulumi config set --path "
                            f"'{PROJECT}:wireguardPeers[{index}]' '{line}' --stack {stack} (make discover adds it), "
                            "or remove the peer from the host")
                index += 1
            elif planned[peer["publicKey"]][2] != allowed:
                configured = planned[peer["publicKey"]][2]
                self.hazard(f"WireGuard peer {name}: live AllowedIPs {allowed}, config {configured}: set its address "
                            f"in {PROJECT}:wireguardPeers to {allowed} (make discover does)")

    def wireguard_hooks(self) -> None:
        """wireguard.sh writes wg0.conf's [Interface] whole: the live file's own PostUp/PostDown rules go with
        it (e.g. a full tunnel's `-o eth0 -j MASQUERADE`), and its rules let clients reach its destinations
        only. Each live hook command the new section does not have is named, as a risk on the step."""
        m = self.step_match("wireguard.sh")
        wg = (((self.document.get("hosts") or {}).get("vpn") or {}).get("wireguard"))
        if m is None or wg is None or not (wg.get("config") or {}).get("present"):
            return
        environment = self.step("wireguard.sh")[0]
        live = wg["config"].get("hooks")
        if live is None:
            self.replace_row(m, "risk", "not checked which live PostUp/PostDown rules wireguard.sh keeps: the "
                                        "discovered file does not list them (run make discover again)")
            return
        try:
            planned = wireguard_section(environment)
        except WireguardSectionError as error:
            self.replace_row(m, "risk", f"not checked which live PostUp/PostDown rules wireguard.sh keeps: {error}")
            return
        lost = lost_hooks(live, planned, wg.get("interface") or "wg0")
        if lost:
            self.replace_row(m, "risk", "wireguard.sh rewrites the [Interface] of the live WireGuard configuration "
                                        "and does not keep its " + "; ".join(f"{hook} `{command}`" for hook, command
                                                                            in lost)
                             + f": its own rules let clients reach {environment.get('WG_NAT_CIDRS', '(unknown)')} "
                               "only, so what they route elsewhere through the VPN (a full tunnel: the internet) "
                               "stops; no setting keeps it: if clients need it, add it to WG_NAT_CIDRS "
                               "(infra/bootstrap.py) before up")

    def traefik(self) -> None:
        """k3s applies every file of its manifests directory over what Pulumi sets: the operators'
        traefik-config.yaml must leave it, and the HelmChartConfig must be either the one the handover
        deletes (owned by that file's Addon) or one no file applies (imported)."""
        config = next((m for m in self.matches if m.resource.type == adoption.HELM_CHART_CONFIG), None)
        if config is None:
            return
        owner = ((config.live or {}).get("deployController") or {}) if config.exists else {}
        if owner.get("owned") and owner.get("owner") != adoption.TRAEFIK_ADDON:
            source = (owner.get("addon") or {}).get("source") or "source unknown"
            self.hazard(f"Traefik: HelmChartConfig kube-system/traefik is applied by k3s from another manifest file "
                        f"(Addon {owner.get('owner')}, {source}), which the handover does not take: move that file "
                        "out of the manifests directory, delete the object, then make discover")
        manifest = ((((self.document.get("hosts") or {}).get("k3s") or {}).get("k3s") or {}).get("traefikManifest")
                    or {})
        if not manifest.get("present"):
            return
        path = manifest.get("path", "traefik-config.yaml")
        if self.step("traefik-handover.sh") is None:
            self.hazard(f"Traefik: the manifest file {path} still exists and this program has no handover step: k3s "
                        "would apply it over Pulumi's object; move it out of the manifests directory first")
        elif config.exists and not owner.get("owned"):
            self.hazard(f"Traefik: the manifest file {path} still exists but HelmChartConfig kube-system/traefik is "
                        "not applied from it, so the handover cannot take it: move the file out yourself (sudo mv "
                        f"{path} /var/lib/rancher/k3s/server/traefik-config.yaml.pre-katforge), then make discover")

    def run(self) -> Report:
        network = PlannedNetwork(self.plan, self.shown)
        self.sources()
        self.resources()
        for check in (self.access_keys, self.key_pair, self.zones, self.mail_from, self.postgres, self.k3s,
                      self.wireguard, self.wireguard_hooks, self.traefik, self.sshd):
            check()
        if self.document.get("aws") is not None:
            self.security_groups(network)
            self.ssh(network)
        self.report.rows.sort(key=lambda r: (OPS.index(r.op), r.resource))
        return self.report


# --- the host scripts' own checks, on trees rebuilt from the discovered facts ------------------------

def host_check(script: str, environment: dict[str, str], stdin: str, root: Path) -> list[str]:
    """Run infra/host/<script> in its check-only mode against the tree at `root` (rebuilt from the
    discovered facts): its refusals, each as one line with the paths as on the host (a new one starts at
    "refusing"), none when it refuses nothing. The script's own decision, not a copy of it: its checks
    pipe Python to python3, this one."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}", "LC_ALL": "C.UTF-8", **environment}
    result = subprocess.run(["bash", str(HOST_FILES / script)], input=stdin, env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode == 0:
        return []
    return refusals(script, result.stderr.replace(str(root), "")) or [f"{script} failed (exit status "
                                                                      f"{result.returncode})"]


def refusals(script: str, log: str) -> list[str]:
    """A host script's refusals in its log, each as one line: a new one starts at "refusing"."""
    prefix = f"{script.removesuffix('.sh')}: "
    found: list[list[str]] = []
    for line in log.splitlines():
        line = line.removeprefix(prefix).strip()
        if not line or line.startswith("check only:"):
            continue
        if not found or line.startswith("refusing "):
            found.append([])
        found[-1].append(line)
    return [" ".join(lines) for lines in found]


def k3s_check_tree(root: Path, k3s: dict) -> dict[str, str]:
    """The k3s host's unit, env files and config.yaml as discovery read them (a secret as [redacted], which
    no value of the program's config.yaml holds), under `root`, and the variables that point
    k3s-install.sh's check at them (K3S_CHECK_ONLY)."""
    def inside(path: str) -> str:
        return f"{root}/{path.lstrip('/')}"

    config_path = k3s["config"]["path"]
    moved = {path: inside(path) for path in [config_path, *(k3s.get("env") or {})]}

    def mapped(value: str) -> str:  # a flag's or a variable's value that names a file of the tree
        flag, equals, rest = value.partition("=")
        return moved.get(value) or (f"{flag}={moved[rest]}" if equals and rest in moved else value)

    lines: list[str] = []
    for unit_file in k3s.get("unitFiles") or []:
        lines += [f"# {inside(unit_file['path'])}", "[Service]"]
        for key, value in unit_file["settings"]:
            if not value:
                lines.append(f"{key}=")
            elif key == "ExecStart":
                lines.append(f"ExecStart={shlex.join(mapped(word) for word in value)}")
            elif key == "Environment":
                lines.append(f"Environment={shlex.quote(value[0] + '=' + mapped(value[1]))}")
            else:
                lines.append(f"EnvironmentFile=-{inside(value)}")
        lines.append("")
    for path, variables in (k3s.get("env") or {}).items():
        Path(moved[path]).parent.mkdir(parents=True, exist_ok=True)
        Path(moved[path]).write_text("".join(f"{name}={shlex.quote(mapped(value))}\n" for name, value in variables.items()))
    config = k3s.get("config") or {}
    if config.get("present"):
        Path(moved[config_path]).parent.mkdir(parents=True, exist_ok=True)
        Path(moved[config_path]).write_text("\n".join(config.get("lines") or []) + "\n")
    facts = root / "facts"
    facts.mkdir()
    (facts / "unit.cat").write_text("\n".join(lines))
    (facts / "version").write_text(k3s.get("version") or "")
    status = k3s.get("secretsEncryption") or {}
    if status.get("output"):
        (facts / "encryption-status").write_text("\n".join(status["output"]) + "\n")
    # The unit k3s-install.sh writes goes where the live one is, and reads k3s.service.env beside it.
    units = k3s.get("unitFiles")
    systemd = str(Path(units[0]["path"]).parent) if units else "/systemd"
    return {"K3S_CHECK_ONLY": str(facts), "K3S_CONFIG_FILE": moved[config_path], "K3S_SYSTEMD_DIR": inside(systemd),
            "KATFORGE_STATE_DIR": inside("/state")}


def pg_check_tree(root: Path, pg: dict) -> dict[str, str]:
    """pg_hba.conf as discovery read it (its rules' lines; all of a file pg-configure.sh wrote), under
    `root`, what the server would answer pg-configure.sh's questions, and the variables that point the
    script's check at them (PG_CHECK_ONLY)."""
    def inside(path: str) -> str:
        return f"{root}/{path.lstrip('/')}"

    for path, lines in (pg.get("hbaText") or {}).items():
        text = [""] * max(n for n, _ in lines)
        for n, line in lines:
            text[n - 1] = line
        Path(inside(path)).parent.mkdir(parents=True, exist_ok=True)
        Path(inside(path)).write_text("\n".join(text))
    facts = root / "pg-facts"
    facts.mkdir()
    (facts / "hba_file").write_text(inside(pg["settings"]["hba_file"]))
    # As the server lists them: SELECT ... FROM pg_authid WHERE rolcanlogin AND rolpassword LIKE 'md5%'.
    (facts / "md5-roles").write_text(" ".join(facts_["quoted"] for _, facts_ in sorted(pg["roles"].items())
                                              if facts_["login"] and facts_["password"] == "md5"))
    rules = sorted((rule for rule in pg.get("hba") or [] if not rule.get("error")), key=lambda rule: rule["rule"])
    (facts / "live-rules.json").write_text(json.dumps([
        {"file_name": inside(rule["file"]), "line_number": rule["line"], "type": rule["type"],
         "database": rule["databases"], "user_name": rule["users"], "address": rule["address"],
         "netmask": rule["netmask"], "auth_method": rule["method"]} for rule in rules] or None))
    conf_dir = root / "conf"
    (conf_dir / "conf.d").mkdir(parents=True)
    return {"PG_CHECK_ONLY": str(facts), "PG_CONF_DIR": str(conf_dir)}


# The file pg-configure.sh writes the settings to, in the directory of postgresql.conf.
MANAGED_CONF = "conf.d/katforge.conf"


def overridden(pg: dict, names: Iterable[str]) -> list[str]:
    """Each of `names` (katforge.conf's settings) that a file the server reads after katforge.conf sets
    again, as "<name> from <file> line <n>", the one that wins: what pg-configure.sh finds in
    pg_settings.sourcefile after its reload. The server reads postgresql.conf in order, the files of an
    include_dir in their names' byte order where the directive stands, and postgresql.auto.conf last; so
    katforge.conf comes after what it already follows, or where conf.d's include puts it."""
    settings = pg.get("settings") or {}
    config_file = settings.get("config_file")
    if not config_file:
        return []
    conf_dir = Path(config_file).parent
    managed = str(conf_dir / MANAGED_CONF)
    # Not only the applied rows: an entry a later one overrides is not applied.
    rows = [row for row in pg.get("fileSettings") or [] if row.get("file")]
    own = [row["seqno"] for row in rows if row["file"] == managed]
    include = next((i["line"] for i in pg.get("confIncludes") or []
                    if re.fullmatch(r"include_dir\s*=?\s*'?(conf\.d|" + re.escape(str(conf_dir / "conf.d")) + r")/?'?"
                                    r"\s*(#.*)?", i["text"])), None)

    if not own and include is None:
        return [f"all of them ({config_file} includes no conf.d, so the server never reads katforge.conf)"]

    def after(row: dict) -> bool:
        if own:
            return row["seqno"] > min(own)
        path = Path(row["file"])
        if path.name == "postgresql.auto.conf" and str(path.parent) == settings.get("data_directory"):
            return True
        if path.parent == conf_dir / "conf.d":
            return path.name.encode() > Path(MANAGED_CONF).name.encode()
        return row["file"] == config_file and include is not None and (row["line"] or 0) > include

    found = []
    for name in names:
        later = [row for row in rows if row["name"] == name and row["file"] != managed and after(row)]
        if later:
            row = max(later, key=lambda r: r["seqno"])
            found.append(f"{name} from {row['file']} line {row['line']}")
    return found


# Who loses what when host-baseline.sh turns a setting of sshd off.
SSHD_LOSSES = {"passwordauthentication": "logins with a password end",
               "kbdinteractiveauthentication": "keyboard-interactive logins (passwords, one-time codes) end",
               "permitrootlogin": "root cannot log in over SSH, with a key or otherwise"}


def baseline_sshd_settings() -> dict[str, str]:
    """The sshd settings host-baseline.sh sets, as sshd -T prints them: the script's own table."""
    text = (HOST_FILES / "host-baseline.sh").read_text()
    table = re.search(r"^declare -A ssh_settings=\((.*)\)$", text, flags=re.M)
    return dict(re.findall(r"\[(\w+)\]=(\S+?)(?=\s|$)", table.group(1))) if table else {}


class WireguardSectionError(Exception):
    """wireguard.sh did not print its [Interface] section; the message is one line."""


def wireguard_section(environment: dict[str, str]) -> list[tuple[str, str]]:
    """The [Interface] settings wireguard.sh would write with the step's environment, as (key, value): the
    script's own text (WG_PRINT_INTERFACE=1), not a copy of it."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C.UTF-8", **environment, "WG_PRINT_INTERFACE": "1"}
    result = subprocess.run(["bash", str(HOST_FILES / "wireguard.sh")], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        said = result.stderr.strip().splitlines()
        raise WireguardSectionError(f"wireguard.sh exited {result.returncode}" + (f": {said[-1]}" if said else ""))
    return [(key.strip(), value.strip()) for key, _, value in
            (line.partition("=") for line in result.stdout.splitlines() if "=" in line)]


IPTABLES = ("iptables", "ip6tables", "iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft")
_ADD, _DELETE = ("-A", "--append", "-I", "--insert"), ("-D", "--delete")


def _hook_rule(phase: str, command: str, interface: str) -> Optional[tuple]:
    """What a hook command does, so that the same rule written otherwise compares equal: an iptables rule
    as its table, chain, add or delete and the rest of the rule (the position of -I, -w, the interface's
    name for %i and a host address for its network aside, as iptables itself stores it); any other command
    as its words. None for what changes nothing (`true`, `iptables -C`)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    words = ["%i" if word == interface else word for word in words]
    if not words or words in (["true"], [":"]):
        return None
    if Path(words[0]).name not in IPTABLES:
        return (phase, *words)
    table, chain, action, rest = "filter", None, None, []
    previous = ""
    for word in words[1:]:
        if previous in ("-t", "--table"):
            table = word
        elif previous in _ADD + _DELETE:
            action, chain = ("add" if previous in _ADD else "delete"), word
        elif word in ("-C", "--check"):
            return None
        elif word in ("-t", "--table", "-w", "--wait", *_ADD, *_DELETE):
            pass
        elif word.isdigit() and (previous in ("-w", "--wait") or (previous == chain and not rest)):
            pass  # the seconds of -w, the position of -I
        else:
            try:
                rest.append(str(ipaddress.ip_interface(word).network) if "/" in word else word)
            except ValueError:
                rest.append(word)
        previous = word
    return (phase, Path(words[0]).name.split("-")[0], table, chain, action, *rest)


def lost_hooks(live: dict[str, list[str]], planned: list[tuple[str, str]], interface: str) -> list[tuple[str, str]]:
    """Each live hook command (hook, command) whose rule the planned [Interface] does not have: up hooks
    (PreUp, PostUp) against the planned up hooks, down hooks against down hooks. The private and preshared
    keys a live hook sets are not among them: wireguard.sh keeps those itself (or refuses)."""
    def phase(hook: str) -> str:
        return "up" if hook.lower().endswith("up") else "down"

    def commands(value: str) -> list[str]:
        return [c.strip() for c in re.split(r";|&&|\|\|", value) if c.strip()]

    order = [hook.lower() for hook in WG_HOOKS]  # as wg-quick runs them
    kept = {_hook_rule(phase(hook), command, interface)
            for hook, value in planned if hook.lower() in order for command in commands(value)}
    return [(hook, command) for hook, values in sorted(live.items(), key=lambda item: order.index(item[0].lower()))
            for value in values for command in commands(value)
            if not re.match(r"wg\s+set\s.*\b(private|preshared)-key\b", command)
            and (rule := _hook_rule(phase(hook), command, interface)) is not None and rule not in kept]


# Settings pg-configure.sh writes that PostgreSQL reads only at start (postmaster context, PostgreSQL 16)
# and that discovery reads.
RESTART_SETTINGS = ("listen_addresses", "max_connections", "shared_buffers")
_UNITS = {"kB": 1, "MB": 1024, "GB": 1024 ** 2, "TB": 1024 ** 3}


def _same_setting(name: str, live: str, wanted: str) -> bool:
    if name == "listen_addresses":
        return {a.strip() for a in live.split(",")} == {a.strip() for a in wanted.split(",")}
    sizes = [re.fullmatch(r"\s*(\d+)\s*(kB|MB|GB|TB)?\s*", v) for v in (live, wanted)]
    if all(sizes):
        return len({int(s.group(1)) * _UNITS.get(s.group(2) or "kB", 1) for s in sizes}) == 1
    return live.strip() == wanted.strip()


def key_material(text: Any) -> tuple[str, ...]:
    """An OpenSSH public key without its comment: its type and key (EC2 gives an imported key its own
    comment, so only these two tell keys apart)."""
    return tuple(text.split()[:2]) if isinstance(text, str) else ()


def _admits_ssh(rule: Rule, host: str, vpn_runs: bool, vpn_address: Optional[str]) -> bool:
    anyone = adoption.Peer(cidr="0.0.0.0/0")
    if rule.egress or not Rule(False, rule.protocol, rule.from_port, rule.to_port, anyone).holds(
            Rule(False, "tcp", 22, 22, anyone)):
        return False
    # A rule that names a security group admits its members' private addresses only, never traffic to a
    # public or Elastic IP (docs.aws.amazon.com/vpc/latest/userguide/security-group-rules.html, "Security
    # group referencing"): the bootstrap, at the public address, comes through the VPN from the VPN host's
    # Elastic IP, which only a rule for that address admits.
    if not rule.peer.cidr:
        return False
    if vpn_address and rule.peer.cidr == f"{vpn_address}/32":
        return host != "vpn" and vpn_runs
    return _public(rule.peer.cidr)


# Where no operator's machine comes from over the internet (RFC 1918, shared, link-local, loopback). Not
# ipaddress's is_private, which counts the documentation ranges too.
NOT_INTERNET = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                        "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"))


def _public(cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(cidr)
    except ValueError:
        return False
    return network.version == 4 and not any(network.subnet_of(private) for private in NOT_INTERNET)


# The config key that holds a live fact an import would otherwise replace.
FORCE_NEW_KEYS = {
    ("aws:ec2/instance:Instance", "rootBlockDevice.encrypted"): "{host}RootVolumeEncrypted",
    ("aws:ec2/instance:Instance", "subnetId"): "{host}SubnetId",
    ("aws:ec2/instance:Instance", "privateIp"): "{host}PrivateIp",
}


def assess(plan: Plan, document: dict, waived: Iterable[str] = ()) -> Report:
    """The rows and hazards of `plan` (evaluated against `document`'s account) for the live estate."""
    return Checks(plan, document, waived).run()


# --- the command ------------------------------------------------------------------------------------

def load(path: Path, stack: str) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise PreflightError(f"{path}: no discovered file: run make discover STACK={stack} first") from None
    except (OSError, ValueError) as error:
        raise PreflightError(f"{path}: cannot be read ({error}): run make discover STACK={stack} again") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise PreflightError(f"{path}: not a discovered file of schema {SCHEMA}: run make discover STACK={stack} again")
    if document.get("stack") != stack:
        raise PreflightError(f"{path}: discovered for stack {document.get('stack')}, not {stack}: run make discover "
                             f"STACK={stack}, or pass --discovered build/discovered-{stack}.json")
    return document


def check(stack: str, document: dict, stack_file: Path, waived: Iterable[str] = ()) -> Report:
    """Evaluate the plan with the stack file against the discovered account, then assess it. A program
    that stops before any change is the one hazard."""
    try:
        plan = adoption.plan_against(stack, stack_file, document)
    except (SettingsError, StackFileError, NotFound) as error:
        return Report(stack, hazards=[f"the program stops before any change: {error} (make discover sets what "
                                      "runs live in the stack file)"])
    return assess(plan, document, waived)


def render(report: Report, discovered: Path) -> str:
    lines = [f"preflight {report.stack}: {len(report.rows)} resources, against {discovered}"]
    if report.rows:  # none when the program stops before any change
        lines += [*map(str, report.rows), ", ".join(f"{len(report.of(op))} {op}" for op in OPS)]
    lines += report.notes
    if report.hazards:
        lines.append(f"{len(report.hazards)} hazard{'s' if len(report.hazards) > 1 else ''}: the first pulumi up of "
                     f"{report.stack} is not safe yet")
        lines += [f"hazard: {h}" for h in report.hazards]
    else:
        lines.append(f"no hazards: the first pulumi up of {report.stack} replaces nothing live, collides with nothing, "
                     "drops no live rule and reaches every host")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None, stdout: Optional[TextIO] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.preflight", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, choices=sorted(STAGES), help="the stack to check")
    parser.add_argument("--discovered", metavar="PATH", help="default: build/discovered-<stack>.json")
    parser.add_argument("--stack-file", metavar="PATH", help="default: Pulumi.<stack>.yaml of the repository")
    parser.add_argument("--accept-unchecked", action="append", default=[], choices=adoption.SOURCES,
                        metavar="SOURCE", help="a source (aws, cluster, hosts) discovery did not read that you "
                                               "accept as not checked (repeatable)")
    args = parser.parse_args(argv)
    stdout = stdout or sys.stdout
    discovered = Path(args.discovered) if args.discovered else ROOT / "build" / f"discovered-{args.stack}.json"
    try:
        document = load(discovered, args.stack)
    except PreflightError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    stack_file = Path(args.stack_file) if args.stack_file else ROOT / f"Pulumi.{args.stack}.yaml"
    report = check(args.stack, document, stack_file, args.accept_unchecked)
    print(render(report, discovered), file=stdout)
    return 1 if report.hazards else 0


if __name__ == "__main__":
    sys.exit(main())
