"""Evaluate the Pulumi program offline, under the SDK's mocks, and record what it declares.

This stands in for the Pulumi engine and AWS: config comes from Pulumi.yaml defaults and the stack's
Pulumi.<stack>.yaml exactly as the CLI would apply them (plus placeholders for keys that only an
operator can set); lookups are answered from `CLOUD`, the account as the spec describes it. The
program runs in update mode, so checks inside `apply` run too. Used by `make plan` and the tests.
"""
from __future__ import annotations

import base64
import json
import runpy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pulumi
import yaml
from pulumi.runtime import mocks, rpc, settings as runtime_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "katforge"
SECRET = "[secret]"
ACCOUNT_ID = "123456789012"

# What the AWS account answers to lookups, as the spec describes it.
CLOUD = {
    "vpc": {"id": "vpc-0a1b2c3d4e5f60718", "cidrBlock": "172.31.0.0/16"},
    "zones": {"katforge.com": "Z0292557263L1FJT7JXXS", "stumper.gg": "Z04STUMPERGG0ZONE0ID"},
    "elastic_ips": {"k3s": "3.19.192.157", "vpn": "3.15.140.218"},
    "ami": "ami-0ubuntu2404noble0",
}

# Values only an operator can set, which the committed stack files leave unset. Secrets get a
# labelled placeholder (the plan shows them as [secret] anyway).
OPERATOR_PLACEHOLDERS = {
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOfflinePlanPlaceholderKey0000000000000000 offline-plan",
}


def project_config_schema() -> dict[str, dict]:
    """The typed `config:` block of Pulumi.yaml, keyed by the bare key name."""
    return yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]


def stack_config(stack: str) -> dict[str, Any]:
    path = ROOT / f"Pulumi.{stack}.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("config") or {} if path.exists() else {}


def _as_config_string(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def effective_config(stack: str, overrides: Optional[dict[str, Any]] = None) -> tuple[dict[str, str], list[str]]:
    """Config as the CLI hands it to the program, and the keys that are secret."""
    schema = project_config_schema()
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, declaration in schema.items():
        full = f"{PROJECT}:{key}"
        if key in OPERATOR_PLACEHOLDERS:
            config[full] = OPERATOR_PLACEHOLDERS[key]
        elif "default" in declaration:
            config[full] = _as_config_string(declaration["default"])
        elif declaration.get("secret"):
            config[full] = f"offline-placeholder-{key}"
        if declaration.get("secret"):
            secret_keys.append(full)
    for key, value in {**stack_config(stack), **(overrides or {})}.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = _as_config_string(value)
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

    def to_json(self) -> dict:
        return {"urn": self.urn, "type": self.type, "name": self.name, "parent": self.parent,
                "custom": self.custom, "inputs": self.inputs, "options": self.options}


@dataclass
class Plan:
    stack: str
    resources: list[PlannedResource]
    raw_outputs: dict = field(default_factory=dict)
    secret_outputs: frozenset = frozenset()
    lookups: list = field(default_factory=list)  # (token, args) of every data-source call

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
        document = {"stack": self.stack, "resources": [r.to_json() for r in self.resources],
                    "outputs": self.outputs}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"


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
    """Answers resource registrations and lookups as AWS and the Kubernetes API would."""

    def __init__(self, prod_outputs: Optional[dict] = None, prod_secret_outputs: frozenset = frozenset()):
        self.prod_outputs = prod_outputs or {}
        self.prod_secret_outputs = prod_secret_outputs

    def new_resource(self, args: mocks.MockResourceArgs):
        inputs = unwrap(args.inputs)
        if args.typ == "pulumi:pulumi:StackReference":
            return args.name, {"name": args.name, "outputs": self.prod_outputs,
                               "secretOutputNames": sorted(self.prod_secret_outputs)}
        resource_id = args.resource_id or f"{args.name}-id"
        state = dict(inputs)
        computed = COMPUTED.get(args.typ)
        if computed is not None:
            state.update(computed(args.name, inputs))
        service = args.typ.split(":")[1].split("/")[0]
        state.setdefault("arn", f"arn:aws:{service}:us-east-2:{ACCOUNT_ID}:{args.name}")
        return resource_id, state

    def call(self, args: mocks.MockCallArgs):
        answer = LOOKUPS.get(args.token)
        if answer is None:
            raise NotImplementedError(f"the offline cloud cannot answer {args.token}; add it to tools/offline.py")
        return answer(args.args)


def _zone(args: dict) -> dict:
    name = args.get("name")
    if name is None:
        name = next(n for n, z in CLOUD["zones"].items() if z == args.get("zoneId"))
    zone_id = CLOUD["zones"][name]
    return {"id": zone_id, "zoneId": zone_id, "name": name,
            "arn": f"arn:aws:route53:::hostedzone/{zone_id}", "privateZone": False}


def _subnet(args: dict) -> dict:
    cidr = args["cidrBlock"]
    return {"id": "subnet-" + cidr.replace(".", "").replace("/", "x"), "cidrBlock": cidr,
            "vpcId": CLOUD["vpc"]["id"], "availabilityZone": "us-east-2a"}


LOOKUPS = {
    "aws:ec2/getVpc:getVpc": lambda args: {**CLOUD["vpc"], "default": True},
    "aws:ec2/getSubnet:getSubnet": _subnet,
    "aws:ec2/getAmi:getAmi": lambda args: {"id": CLOUD["ami"], "imageId": CLOUD["ami"],
                                           "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261101"},
    "aws:route53/getZone:getZone": _zone,
    "aws:index/getCallerIdentity:getCallerIdentity": lambda args: {"accountId": ACCOUNT_ID, "id": ACCOUNT_ID,
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
HOST_OUTPUT = {"bootstrap-kubeconfig": _K3S_YAML, "bootstrap-wireguard": _WIREGUARD_PUBLIC_KEY}

# Properties that the cloud computes when a resource is created, by type token.
COMPUTED = {
    "command:remote:Command": lambda name, inputs: {"stdout": HOST_OUTPUT.get(name, ""), "stderr": ""},
    # The token controller fills a ServiceAccount token Secret; the provider waits for it.
    "kubernetes:core/v1:Secret": lambda name, inputs: {"data": {
        "token": base64.b64encode(b"offline-token").decode(), "ca.crt": base64.b64encode(b"offline-ca").decode(),
        "namespace": base64.b64encode(inputs["metadata"]["namespace"].encode()).decode(),
    }} if inputs.get("type") == "kubernetes.io/service-account-token" else {},
    "aws:ec2/eip:Eip": lambda name, inputs: {"publicIp": CLOUD["elastic_ips"].get(name, "198.51.100.7"),
                                             "allocationId": f"eipalloc-{name}"},
    "aws:ec2/instance:Instance": lambda name, inputs: {"publicIp": "198.51.100.8",
                                                       "primaryNetworkInterfaceId": f"eni-{name}"},
    "aws:ec2/securityGroup:SecurityGroup": lambda name, inputs: {"id": f"sg-{name}"},
    "aws:iam/accessKey:AccessKey": lambda name, inputs: {"id": f"AKIA{name.upper()[:12]}",
                                                         "secret": f"offline-secret-{name}",
                                                         "sesSmtpPasswordV4": f"offline-smtp-{name}"},
    "aws:ses/domainIdentity:DomainIdentity": lambda name, inputs: {"verificationToken": "offline-verification-token"},
    "aws:ses/domainDkim:DomainDkim": lambda name, inputs: {"dkimTokens": ["dkimone", "dkimtwo", "dkimthree"]},
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
                    "import_id": request.importId,
                    "depends_on": sorted(request.dependencies),
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
    _sync_await(run_pulumi_func(lambda: runpy.run_path(str(ROOT / "__main__.py"), run_name="__pulumi__")))
    root = runtime_settings.get_root_resource()
    outputs, secrets = _sync_await(_resolve_outputs(root.outputs))
    resources = sorted(monitor.planned, key=lambda r: r.urn)
    return Plan(stack=stack, resources=resources, raw_outputs=outputs, secret_outputs=secrets,
                lookups=monitor.lookups)


def evaluate(stack: str, config: Optional[dict[str, Any]] = None, prod_config: Optional[dict[str, Any]] = None) -> Plan:
    """Evaluate one stack. qa's StackReference answers with prod's own evaluated outputs."""
    stage_config, secret_keys = effective_config(stack, config)
    prod = None
    if stack != "prod":
        prod = evaluate("prod", prod_config)
    mock = EstateMocks(prod.raw_outputs if prod else None, prod.secret_outputs if prod else frozenset())
    return _run(stack, stage_config, secret_keys, mock)


@lru_cache(maxsize=None)
def evaluate_cached(stack: str) -> Plan:
    """The plan of a stack with its committed config, evaluated once per process (for read-only tests)."""
    return evaluate(stack)
