"""Evaluate the Pulumi program offline, under the SDK's mocks, and record what it declares.

This stands in for the Pulumi engine and AWS: config comes from Pulumi.yaml defaults and the stack's
Pulumi.<stack>.yaml exactly as the CLI would apply them (plus placeholders for keys that only an
operator can set); lookups are answered from `CLOUD`, the account as the spec describes it (or from
another account given in its form: `make preflight` passes the discovered one). The
program runs in update mode, so checks inside `apply` run too. Used by `make plan` and the tests.

What only a deployment can know (a new instance's ID, an ARN, a new Elastic IP's address, what a host
prints) the mocks answer with stand-ins, so the program can run; each is registered, and the JSON plan
shows it as `(known after deploy)` and lists where it went. Lookups of things that exist and imported
resources' IDs are known. Secrets reach the JSON only as a keyed hash, so a rotation shows as a change.
"""
from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import json
import re
import runpy
import threading
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pulumi
import yaml
from pulumi.runtime import mocks, rpc, settings as runtime_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

from infra import adopt
from infra.apps import APPS
from infra.settings import YAML_LOADER
from tools import stackfile

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "katforge"
SECRET = "[secret]"
ACCOUNT_ID = "123456789012"
KNOWN_AFTER_DEPLOY = "(known after deploy)"
# Fixed, so the same secret hashes alike in every process and both revisions of a plan diff. It is
# public: the hash tells that a secret changed, it does not hide a guessable value (the offline plan
# only ever sees ciphertext or placeholders anyway).
SECRET_DIGEST_KEY = b"katforge offline plan: secret digest v1"

# What the AWS account answers to lookups, as the spec describes it, and what it reports of the live
# objects a stack imports (by the program's name for them).
CLOUD = {
    "vpc": {"id": "vpc-0a1b2c3d4e5f60718", "cidrBlock": "172.31.0.0/16"},
    # The default VPC's subnets as AWS makes them, a /20 per availability zone: CIDR -> (ID, zone).
    "subnets": {"172.31.0.0/20": ("subnet-0a1b2c3d4e5f60001", "us-east-2a"),
                "172.31.16.0/20": ("subnet-0a1b2c3d4e5f60002", "us-east-2b"),
                "172.31.32.0/20": ("subnet-0a1b2c3d4e5f60003", "us-east-2c")},
    "zones": {"katforge.com": "Z0292557263L1FJT7JXXS", "stumper.gg": "Z04STUMPERGG0ZONE0ID"},
    "elastic_ips": {"k3s": "3.19.192.157", "vpn": "3.15.140.218"},
    # The live hosts' private addresses (the VPN host's in another subnet than the k3s host's).
    "private_ips": {"k3s": "172.31.14.98", "vpn": "172.31.24.15"},
    "ami": "ami-0ubuntu2404noble0",
}

# Values only an operator can set, which the committed stack files leave unset. Secrets get a
# labelled placeholder (the plan shows them as [secret] anyway).
OPERATOR_PLACEHOLDERS = {
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9mZmxpbmUtcGxhbi1wbGFjZWhvbGRlci1rZXktMDAw offline-plan",
    "imageTags": json.dumps([f"{app.name}=offline-plan" for app in APPS]),
}


def project_config_schema() -> dict[str, dict]:
    """The typed `config:` block of Pulumi.yaml, keyed by the bare key name."""
    return yaml.load((ROOT / "Pulumi.yaml").read_text(), Loader=YAML_LOADER)["config"]


def stack_config(stack: str, encrypted: Optional[dict[str, str]] = None) -> dict[str, Any]:
    return stackfile.read(ROOT / f"Pulumi.{stack}.yaml", project_config_schema(), encrypted)


def _as_config_string(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class SecretValue(str):
    """An override set as `pulumi config set --secret` would: the program gets it as a secret even where
    Pulumi.yaml does not declare the key secret (one that may stay unset, such as rdsMasterPassword)."""


def effective_config(stack: str, overrides: Optional[dict[str, Any]] = None) -> tuple[dict[str, str], list[str]]:
    """Config as the CLI hands it to the program, and the keys that are secret."""
    schema = project_config_schema()
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    encrypted: dict[str, str] = {}
    committed = stack_config(stack, encrypted)
    for key, declaration in schema.items():
        full = f"{PROJECT}:{key}"
        if key in OPERATOR_PLACEHOLDERS:
            config[full] = OPERATOR_PLACEHOLDERS[key]
        elif "default" in declaration:
            config[full] = _as_config_string(declaration["default"])
        elif declaration.get("secret"):
            # Only the CLI decrypts; the ciphertext's hash stands in, so a rotated secret still differs.
            digest = hashlib.sha256(encrypted[full].encode()).hexdigest()[:12] if full in encrypted else "unset"
            config[full] = f"offline-placeholder-{key}-{digest}"
        if declaration.get("secret"):
            secret_keys.append(full)
    # Set with --secret though not declared secret: the CLI hands the program a secret all the same.
    for full, ciphertext in encrypted.items():
        if full not in secret_keys:
            digest = hashlib.sha256(ciphertext.encode()).hexdigest()[:12]
            config[full] = f"offline-placeholder-{full.partition(':')[2]}-{digest}"
            secret_keys.append(full)
    for key, value in {**committed, **(overrides or {})}.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = _as_config_string(value)
            if isinstance(value, SecretValue) and key not in secret_keys:
                secret_keys.append(key)
    return config, secret_keys


@dataclass
class PlannedResource:
    urn: str
    type: str
    name: str
    parent: Optional[str]
    custom: bool
    raw_inputs: dict
    options: dict

    @property
    def inputs(self) -> dict:
        return redact(self.raw_inputs)


@dataclass
class Plan:
    stack: str
    resources: list[PlannedResource]
    raw_outputs: dict = field(default_factory=dict)
    secret_outputs: frozenset = frozenset()
    lookups: list = field(default_factory=list)  # (token, args) of every data-source call
    placeholders: dict = field(default_factory=dict)  # stand-in value -> ((URN, property), ...) it stands for
    adoptable: tuple = ()  # every "<Type>:<name>" a `katforge:imports` line may name (infra/adopt.py)

    @property
    def outputs(self) -> dict:
        return {k: SECRET if k in self.secret_outputs else redact(v) for k, v in self.raw_outputs.items()}

    def of_type(self, token: str) -> list[PlannedResource]:
        return [r for r in self.resources if r.type == token]

    def named(self, name: str, token: Optional[str] = None) -> PlannedResource:
        found = [r for r in self.resources if r.name == name and token in (None, r.type)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} resources named {name!r}")
        return found[0]

    def children(self, parent: PlannedResource) -> list[PlannedResource]:
        return [r for r in self.resources if r.parent == parent.urn]

    def lookups_of(self, token: str) -> list[dict]:
        return [args for tok, args in self.lookups if tok == token]

    def to_json(self) -> str:
        return json.dumps(self.document(), indent=2, sort_keys=True) + "\n"

    def document(self) -> dict:
        """The plan for machines: stand-ins read `(known after deploy)` and are listed under
        knownAfterDeploy with where each went; secrets are `[secret <hash>]`."""
        shown = Shown(self.placeholders)
        resources = [{"urn": r.urn, "type": r.type, "name": r.name, "parent": r.parent, "custom": r.custom,
                      "inputs": shown.value(r.raw_inputs, r.urn, "inputs"), "options": r.options}
                     for r in self.resources]
        outputs = {name: shown.value(rpc.wrap_rpc_secret(value) if name in self.secret_outputs else value,
                                     "outputs", name)
                   for name, value in self.raw_outputs.items()}
        return {"stack": self.stack, "resources": resources, "outputs": outputs, "knownAfterDeploy": shown.listing()}


def secret_digest(plain: Any) -> str:
    """`[secret <hash>]`: a keyed hash of the value, truncated; equal values hash alike."""
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return f"[secret {hmac.new(SECRET_DIGEST_KEY, text.encode(), hashlib.sha256).hexdigest()[:8]}]"


class Shown:
    """Renders property values for the JSON plan and remembers which stand-ins went where."""

    def __init__(self, placeholders: dict[str, tuple[tuple[str, str], ...]]):
        self.placeholders = placeholders
        # Longest first, and whole tokens only: `k3s-id` must not match inside `k3s-identity`.
        alternatives = "|".join(re.escape(p) for p in sorted(placeholders, key=lambda p: (-len(p), p)))
        self.pattern = re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w-])") if placeholders else None
        self.uses: dict[tuple[tuple[str, str], ...], set[tuple[str, str]]] = {}

    def value(self, value: Any, where: str, path: str) -> Any:
        if rpc.is_rpc_secret(value):
            # Hashed with stand-ins already replaced, so only what is known can make it differ.
            plain = self.value(unwrap(value), where, path)
            return KNOWN_AFTER_DEPLOY if plain == KNOWN_AFTER_DEPLOY else secret_digest(plain)
        if isinstance(value, dict):
            return {k: self.value(v, where, f"{path}.{k}" if re.fullmatch(r"[A-Za-z_]\w*", k)
                                  else f"{path}[{json.dumps(k)}]") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and self.pattern is not None:
            return self.pattern.sub(lambda m: self._use(m.group(0), where, path), value)
        return value

    def _use(self, stand_in: str, where: str, path: str) -> str:
        self.uses.setdefault(self.placeholders[stand_in], set()).add((where, path))
        return KNOWN_AFTER_DEPLOY

    def listing(self) -> list[dict]:
        """Each value known only after deploy that the plan uses: the property it stands for (several
        when the mocks gave two resources the same stand-in, e.g. `k3s-id`), and where it went."""
        return [{"standsFor": [{"urn": urn, "property": prop} for urn, prop in origins],
                 "usedIn": [{"urn": w, "path": p} for w, p in sorted(uses)]}
                for origins, uses in sorted(self.uses.items())]


def _each(value: Any, fn) -> Any:
    """fn applied to each member of a dict or list; anything else as it is."""
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fn(v) for v in value]
    return value


def redact(value: Any) -> Any:
    """Replace every secret inside a deserialized property value with [secret]."""
    return SECRET if rpc.is_rpc_secret(value) else _each(value, redact)


def whole_numbers(value: Any) -> Any:
    """Protobuf carries every number as a float; show 30 rather than 30.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _each(value, whole_numbers)


def unwrap(value: Any) -> Any:
    """The plain value with secret markers removed (placeholders only exist offline)."""
    if rpc.is_rpc_secret(value):
        return unwrap(rpc.unwrap_rpc_secret(value))
    return _each(value, unwrap)


class EstateMocks(mocks.Mocks):
    """Answers resource registrations and lookups as AWS and the Kubernetes API would.

    Every value it has to invent is registered in `placeholders` (stand-in -> the URN and property it
    stands for), so the plan can say which values only a deployment will know."""

    def __init__(self, prod: Optional["Plan"] = None, cloud: Optional[dict] = None):
        self.cloud = cloud or CLOUD  # what lookups and imported resources find
        self.prod_outputs = prod.raw_outputs if prod else {}
        self.prod_secret_outputs = prod.secret_outputs if prod else frozenset()
        # prod's stand-ins reach this stack through the StackReference.
        self.placeholders: dict[str, tuple[tuple[str, str], ...]] = dict(prod.placeholders) if prod else {}
        # The URN being registered, per thread: the SDK registers resources from a thread pool.
        self.registering = threading.local()

    def stand_in(self, value: Any, prop: str) -> Any:
        """Register each non-empty string in `value` as a stand-in for the resource's `prop`."""
        if isinstance(value, str) and value:
            origin = (self.registering.urn, prop)
            self.placeholders[value] = tuple(sorted({*self.placeholders.get(value, ()), origin}))
        elif isinstance(value, (list, dict)):
            for item in value.values() if isinstance(value, dict) else value:
                self.stand_in(item, prop)
        return value

    def new_resource(self, args: mocks.MockResourceArgs):
        inputs = unwrap(args.inputs)
        if args.typ == "pulumi:pulumi:StackReference":
            return args.name, {"name": args.name, "outputs": self.prod_outputs,
                               "secretOutputNames": sorted(self.prod_secret_outputs)}
        if not args.custom:  # a component: no provider, nothing computed
            return f"{args.name}-id", dict(inputs)
        # An import keeps the live ID; a new resource's ID exists only once it is created.
        resource_id = args.resource_id or self.stand_in(f"{args.name}-id", "id")
        state = dict(inputs)
        # An imported resource reports what AWS holds; the rest of what a create computes is a stand-in.
        live = (ADOPTED[args.typ](args.name, args.resource_id, self.cloud)
                if args.resource_id and args.typ in ADOPTED else {})
        computed = COMPUTED.get(args.typ, lambda name, inputs: {})(args.name, inputs)
        state.update({prop: self.stand_in(value, prop) for prop, value in computed.items() if prop not in live})
        state.update(live)
        if "arn" not in state:
            service = args.typ.split(":")[1].split("/")[0]
            arn = f"arn:aws:{service}:us-east-2:{ACCOUNT_ID}:{args.name}"
            # An imported resource's ARN is known: the import ID itself where that is the ARN (a policy).
            state["arn"] = ((args.resource_id if args.resource_id.startswith("arn:") else arn) if args.resource_id
                            else self.stand_in(arn, "arn"))
        return resource_id, state

    def call(self, args: mocks.MockCallArgs):
        answer = LOOKUPS.get(args.token)
        if answer is None:
            raise NotImplementedError(f"the offline cloud cannot answer {args.token}; add it to tools/offline.py")
        return answer(args.args, self.cloud)


class NotFound(Exception):
    """What AWS answers to a lookup that matches nothing; a real `pulumi up` fails the same way."""


def _zone(args: dict, cloud: dict) -> dict:
    names = [n for n, z in cloud["zones"].items()
             if args.get("name") in (None, n) and args.get("zoneId") in (None, z)]
    if len(names) != 1:
        raise NotFound(f"no matching Route 53 Hosted Zone found: {args}")
    zone_id = cloud["zones"][names[0]]
    return {"id": zone_id, "zoneId": zone_id, "name": names[0],
            "arn": f"arn:aws:route53:::hostedzone/{zone_id}", "privateZone": False}


def _subnet(args: dict, cloud: dict) -> dict:
    found = [(cidr, subnet_id, zone) for cidr, (subnet_id, zone) in cloud["subnets"].items()
             if args.get("cidrBlock") in (None, cidr) and args.get("id") in (None, subnet_id)
             and args.get("vpcId") in (None, cloud["vpc"]["id"])]
    if len(found) != 1:
        raise NotFound(f"no matching EC2 Subnet found: {args}")
    cidr, subnet_id, zone = found[0]
    return {"id": subnet_id, "cidrBlock": cidr, "vpcId": cloud["vpc"]["id"], "availabilityZone": zone}


def _subnets(args: dict, cloud: dict) -> dict:
    """The default VPC's subnets: one per availability zone, each its zone's default (the filters RDS's
    subnet group asks with)."""
    wanted = {f["name"]: f["values"] for f in args.get("filters", [])}
    if wanted.get("vpc-id", [cloud["vpc"]["id"]]) != [cloud["vpc"]["id"]]:
        raise NotFound(f"no subnets match {args}")
    return {"id": REGION_ID, "ids": sorted(subnet_id for subnet_id, _ in cloud["subnets"].values()),
            "filters": args.get("filters", [])}


REGION_ID = "us-east-2"
LOOKUPS = {
    "aws:ec2/getVpc:getVpc": lambda args, cloud: {**cloud["vpc"], "default": True},
    "aws:ec2/getSubnet:getSubnet": _subnet,
    "aws:ec2/getSubnets:getSubnets": _subnets,
    "aws:ec2/getAmi:getAmi": lambda args, cloud: {"id": cloud["ami"], "imageId": cloud["ami"],
                                           "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261101"},
    "aws:route53/getZone:getZone": _zone,
    "aws:index/getCallerIdentity:getCallerIdentity": lambda args, cloud: {"accountId": ACCOUNT_ID, "id": ACCOUNT_ID,
                                                                   "arn": f"arn:aws:iam::{ACCOUNT_ID}:user/offline",
                                                                   "userId": "AIDAOFFLINE"},
}

# What the hosts print to the commands whose output the program reads, by command name: k3s's
# /etc/rancher/k3s/k3s.yaml (credentials shortened) and the VPN's WireGuard public key.
_K3S_YAML = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJkekNDQVIyZ0F3SUJBZ0lCQURBS0JnZ3Foa2pPUFFRREFqQWpNU0V3SHdZRFZRUUREQmhyTTNNdGMyVnkKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
    client-key-data: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCg==
"""
_WIREGUARD_PUBLIC_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
# The server's join token in k3s's secure form, K10<CA hash>::server:<password> (docs.k3s.io, CLI, token).
K3S_JOIN_TOKEN = "K10" + "0f" * 32 + "::server:offline-plan-join-token-0123456789abcdef"
HOST_OUTPUT = {"bootstrap-kubeconfig": _K3S_YAML, "bootstrap-wireguard": _WIREGUARD_PUBLIC_KEY,
               "agents-join-token": K3S_JOIN_TOKEN + "\n"}


def documentation_address(prefix: str, name: str) -> str:
    """A stand-in address from a documentation range (RFC 5737), stable per name."""
    return f"{prefix}.{zlib.crc32(name.encode()) % 254 + 1}"


# Properties that the cloud computes when a resource is created, by type token: stand-ins, every one.
COMPUTED = {
    "command:remote:Command": lambda name, inputs: {"stdout": HOST_OUTPUT.get(name, ""), "stderr": ""},
    # The token controller fills a ServiceAccount token Secret; the provider waits for it.
    "kubernetes:core/v1:Secret": lambda name, inputs: {"data": {
        "token": base64.b64encode(b"offline-token").decode(), "ca.crt": base64.b64encode(b"offline-ca").decode(),
        "namespace": base64.b64encode(inputs["metadata"]["namespace"].encode()).decode(),
    }} if inputs.get("type") == "kubernetes.io/service-account-token" else {},
    # A new Elastic IP's address is AWS's choice.
    "aws:ec2/eip:Eip": lambda name, inputs: {"publicIp": documentation_address("198.51.100", name),
                                             "allocationId": f"eipalloc-{name}"},
    # A pinned private address is the program's; an unpinned one is AWS's choice within the subnet.
    "aws:ec2/instance:Instance": lambda name, inputs: {"publicIp": documentation_address("192.0.2", name),
                                                       "primaryNetworkInterfaceId": f"eni-{name}",
                                                       **({} if inputs.get("privateIp") else
                                                          {"privateIp": documentation_address("172.31.255", name)})},
    "aws:iam/accessKey:AccessKey": lambda name, inputs: {"secret": f"offline-secret-{name}",
                                                         "sesSmtpPasswordV4": f"offline-smtp-{name}"},
    "aws:ses/domainIdentity:DomainIdentity": lambda name, inputs: {"verificationToken": "offline-verification-token"},
    "aws:ses/domainDkim:DomainDkim": lambda name, inputs: {"dkimTokens": ["dkimone", "dkimtwo", "dkimthree"]},
    # RDS names the endpoint after the identifier and a suffix of the account's.
    "aws:rds/instance:Instance": lambda name, inputs: {
        "address": f"{inputs['identifier']}.c0ffline0plan.us-east-2.rds.amazonaws.com", "port": 5432,
        "endpoint": f"{inputs['identifier']}.c0ffline0plan.us-east-2.rds.amazonaws.com:5432"},
}

# What AWS reports for an imported resource, by type token (name, import ID, cloud): known before deploy.
ADOPTED = {
    "aws:ec2/eip:Eip": lambda name, allocation_id, cloud: {"publicIp": cloud["elastic_ips"][name],
                                                    "allocationId": allocation_id},
    "aws:ec2/instance:Instance": lambda name, instance_id, cloud: {"privateIp": cloud["private_ips"][name],
                                                                   "publicIp": cloud["elastic_ips"][name]}
}


class RecordingMonitor(mocks.MockMonitor):
    """The SDK's mock monitor, also recording each registration's options in order."""

    def __init__(self, mock: mocks.Mocks):
        super().__init__(mock)
        self.planned: list[PlannedResource] = []
        self.lookups: list[tuple[str, dict]] = []

    def Invoke(self, request):
        self.lookups.append((request.tok, whole_numbers(rpc.deserialize_properties(request.args))))
        return super().Invoke(request)

    def RegisterResource(self, request):
        self.mocks.registering.urn = self.make_urn(request.parent, request.type, request.name)
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.planned.append(PlannedResource(
                urn=response.urn,
                type=request.type,
                name=request.name,
                # Top-level components hang off the root stack, which the plan leaves implicit.
                parent=None if "::pulumi:pulumi:Stack::" in request.parent else request.parent or None,
                custom=bool(request.custom),
                raw_inputs=whole_numbers(rpc.deserialize_properties(request.object)),
                options={
                    "protect": bool(request.protect),
                    "ignore_changes": sorted(request.ignoreChanges),
                    "replace_on_changes": sorted(request.replaceOnChanges),
                    "import_id": request.importId,
                    "depends_on": sorted(request.dependencies),
                    # Which input came from which resources: what a replacement makes unknown.
                    "property_dependencies": {prop: sorted(deps.urns) for prop, deps
                                              in sorted(request.propertyDependencies.items()) if deps.urns},
                    "additional_secret_outputs": sorted(request.additionalSecretOutputs),
                    "delete_before_replace": bool(request.deleteBeforeReplace),
                    "provider": request.provider.split("::")[-2] if request.provider else "",
                },
            ))
        return response


async def _resolve_outputs(outputs: dict) -> tuple[dict, frozenset]:
    values, secrets = {}, set()
    for name, value in outputs.items():
        output = pulumi.Output.from_input(value)
        values[name] = whole_numbers(unwrap(await output.future()))
        if await output.is_secret():
            secrets.add(name)
    return values, frozenset(secrets)


def _quiet_abandoned_failures(loop, context) -> None:
    # One failed check fails every Output built on it; the first failure is raised, the rest are noise.
    if "never retrieved" not in context.get("message", ""):
        loop.default_exception_handler(context)


def _run(stack: str, config: dict[str, str], secret_keys: list[str], mock: EstateMocks) -> Plan:
    runtime_settings.ROOT.set(None)
    _ensure_event_loop().set_exception_handler(_quiet_abandoned_failures)
    monitor = RecordingMonitor(mock)
    mocks.set_mocks(mock, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(config, secret_keys)
    runtime_settings.SETTINGS.rpc_manager.clear()
    runtime_settings.SETTINGS.outputs.clear()
    # A pure speed measure: with the SDKs loaded, half of a run went to garbage collections walking their
    # long-lived objects and finding nothing; the run's few cycles are collected once it is over.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _sync_await(run_pulumi_func(lambda: runpy.run_path(str(ROOT / "__main__.py"), run_name="__pulumi__")))
        root = runtime_settings.get_root_resource()
        outputs, secrets = _sync_await(_resolve_outputs(root.outputs))
    finally:
        if collecting:
            gc.enable()
    resources = sorted(monitor.planned, key=lambda r: r.urn)
    return Plan(stack=stack, resources=resources, raw_outputs=outputs, secret_outputs=secrets,
                lookups=monitor.lookups, placeholders=dict(mock.placeholders), adoptable=adopt.claimed())


def configured_cloud(config: dict[str, str], cloud: dict = CLOUD) -> dict:
    """The account as the stack's config names it: a hosted zone at its configured ID, the VPN's subnet.
    Discovery writes real IDs there, and the offline plan must still find what they name."""
    known = {**cloud, "zones": dict(cloud["zones"]), "subnets": dict(cloud["subnets"])}
    for line in json.loads(config.get(f"{PROJECT}:zoneIds", "[]")):
        zone, _, zone_id = line.partition("=")
        if zone_id not in known["zones"].values():  # an ID of another zone stays that zone's
            known["zones"][zone] = zone_id
    subnet_id = config.get(f"{PROJECT}:vpnSubnetId", "")
    if subnet_id and subnet_id not in {s for s, _ in known["subnets"].values()}:
        known["subnets"][f"(the CIDR of {subnet_id})"] = (subnet_id, "us-east-2b")
    return known


def evaluate(stack: str, config: Optional[dict[str, Any]] = None, prod_config: Optional[dict[str, Any]] = None,
             cloud: Optional[dict] = None) -> Plan:
    """Evaluate one stack. qa's StackReference answers with prod's own evaluated outputs. `cloud`, in
    CLOUD's form, stands for another account (make preflight passes the discovered one); by default the
    spec's account, knowing the IDs the stack's config names."""
    stage_config, secret_keys = effective_config(stack, config)
    prod = evaluate("prod", prod_config, cloud=cloud) if stack != "prod" else None
    return _run(stack, stage_config, secret_keys, EstateMocks(prod, cloud or configured_cloud(stage_config)))


@lru_cache(maxsize=None)
def evaluate_cached(stack: str) -> Plan:
    """The plan of a stack with its committed config, evaluated once per process (for read-only tests)."""
    return evaluate(stack)
