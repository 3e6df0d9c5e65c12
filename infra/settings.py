"""A stage's settings, read once from Pulumi config and validated before any resource is declared.

Every key is declared (type, description, default, secret) in Pulumi.yaml; this module is the only
reader of `pulumi.Config`. A bad value stops the program with one `SettingsError`, one line:

    Pulumi.<stack>.yaml: katforge:<key> = <value>: expected <what>[; set it with: <command>]
"""
from __future__ import annotations

import base64
import binascii
import contextvars
import difflib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import pulumi
import yaml
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.config import CONFIG

PROJECT = "katforge"
REGION = "us-east-2"  # SES, the hosts and the zones' records all live here (spec: SES us-east-2)
PROJECT_FILE = Path(__file__).resolve().parent.parent / "Pulumi.yaml"
NOT_SET = "(not set)"


# libyaml's loader where PyYAML was built with it: the project file parses in a tenth of the time.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SettingsError(pulumi.RunError):
    """Bad or missing configuration; Pulumi prints the message without a traceback
    (pulumi-language-python-exec logs a RunError's message alone), and so does `make plan`."""


def _shown(value: Any) -> str:
    """A value as an error line shows it: as written, unless it would not read back as it is (empty,
    spaces around it, not one line of text)."""
    plain = isinstance(value, str) and value.strip() == value != "" and value.isprintable()
    return value if plain else json.dumps(value)


def invalid(key: str, value: Any, expected: str, fix: str = "") -> SettingsError:
    """The one-line error for a bad setting of the current stack. `key` is bare (the project's
    namespace) or `namespace:name`; `value` None means not set; `fix` is the command that sets it."""
    full = key if ":" in key else f"{PROJECT}:{key}"
    shown = NOT_SET if value is None else _shown(value)
    return SettingsError(f"Pulumi.{pulumi.get_stack()}.yaml: {full} = {shown}: expected {expected}"
                         + (f"; set it with: {fix}" if fix else ""))


@dataclass(frozen=True)
class Stage:
    name: str
    namespace: str
    database: str
    db_role: str


# The Traefik Helm chart each pinned k3s release bundles (k3s ships it as traefik-<chart>01+up<chart>;
# v1.34.6+k3s1 carries traefik-39.0.501+up39.0.5). The cluster's Traefik values are checked against
# that chart's schema, so a release can be pinned only once its row is here.
K3S_TRAEFIK_CHART = {"v1.34.6+k3s1": "39.0.5"}

# One row per stage: where its apps run and which database they own.
STAGES = {
    "prod": Stage(name="prod", namespace="default", database="katforge", db_role="katforge"),
    "qa": Stage(name="qa", namespace="qa", database="katforge_qa", db_role="katforge_qa"),
}


@dataclass(frozen=True)
class NetworkSettings:
    vpc_cidr: str
    k3s_private_ip: str
    admin_cidrs: tuple[str, ...]
    k3s_api_cidrs: tuple[str, ...]
    vpn_client_cidr: str
    wireguard_port: int


@dataclass(frozen=True)
class RootVolume:
    size_gb: int
    type: str
    encrypted: bool


@dataclass(frozen=True)
class HostSpec:
    instance_type: str
    expected_public_ip: str  # what an adopted Elastic IP must hold
    root_volume: RootVolume
    keep_security_groups: tuple[str, ...]  # live groups that stay attached beside the program's own


@dataclass(frozen=True)
class AgentSpec:
    """A k3s agent node: its name (also its Kubernetes node name), EC2 type and pinned private address."""
    name: str
    instance_type: str
    private_ip: str


@dataclass(frozen=True)
class HostSettings:
    k3s: HostSpec
    vpn: HostSpec
    vpn_subnet_id: str  # "" = the k3s host's subnet
    ssh_public_key: str
    k3s_agents: tuple[AgentSpec, ...] = ()


@dataclass(frozen=True)
class EmailSettings:
    domain: str
    mail_from_subdomain: str
    dmarc_policy: str
    from_addresses: tuple[str, ...]
    mail_from_mx_failure: str  # UseDefaultValue or RejectMessage


@dataclass(frozen=True)
class WireguardPeer:
    name: str
    public_key: str
    address: str


@dataclass(frozen=True)
class BootstrapSettings:
    k3s_version: str
    wireguard_peers: tuple[WireguardPeer, ...]
    ssh_private_key: pulumi.Output
    # What a host script may do to a live host only when an operator says so (infra/host/*.sh).
    k3s_secrets_encryption: bool
    k3s_encrypt_existing_secrets: bool  # the one-time encryption of a running cluster's Secrets
    k3s_replace_live_flags: bool  # config.yaml may override a live unit flag that differs
    postgres_allow_restart: bool  # a changed setting that needs it may restart PostgreSQL
    postgres_drop_live_hba_rules: bool  # live pg_hba rules the new file would not keep may go
    postgres_extra_client_cidrs: tuple[str, ...]  # networks admitted with a password beyond pods and the VPC


@dataclass(frozen=True)
class ClusterSettings:
    acme_email: str
    image_tags: Mapping[str, str]  # app name -> the tag its Deployment is created with
    ghcr_username: str
    ghcr_token: pulumi.Output


@dataclass(frozen=True)
class BackupSettings:
    bucket: str
    retention_days: int
    time_utc: str
    alert_from: str  # the address the k3s host mails backup alerts from (an address of the SES domain)
    alert_to: str  # the operators' address, the only one the alerts may go to


# Where a stage's database lives (katforge:database). "migrating": the RDS instance and the stage's
# role and database on it exist, the apps still use the host's PostgreSQL until `make migrate-database`
# moves the data and switches them; then "rds".
DATABASE_PLACES = ("host", "migrating", "rds")


@dataclass(frozen=True)
class DatabaseSettings:
    place: str  # one of DATABASE_PLACES
    # The RDS instance, declared by prod while its own database is not on the host (None in qa).
    rds: Optional["RdsSettings"] = None
    host_postgres: str = "keep"  # prod: "remove" stops and disables the host's PostgreSQL, data kept

    @property
    def on_rds(self) -> bool:
        """The stage's apps use RDS."""
        return self.place == "rds"

    @property
    def has_rds_role(self) -> bool:
        """The stage's role and database exist on RDS."""
        return self.place != "host"


@dataclass(frozen=True)
class RdsSettings:
    instance_class: str
    allocated_storage_gb: int
    master_password: pulumi.Output


@dataclass(frozen=True)
class PipelineSettings:
    github_repository: str
    state_bucket: str  # the S3 bucket of the Pulumi backend, which the CI roles may use


@dataclass(frozen=True)
class Settings:
    stage: str
    stage_facts: Stage
    prod_stack: str
    imports: Mapping[str, str]  # "<Type>:<name>" -> the live object's import ID (infra/adopt.py)
    zone_ids: Mapping[str, str]  # hosted zone name -> its ID, for the zones configured by ID
    network: NetworkSettings
    db_password: pulumi.Output
    database: DatabaseSettings
    bootstrap: BootstrapSettings
    cluster: ClusterSettings
    # Owned by the prod stack only; None in qa.
    hosts: Optional[HostSettings]
    email: Optional[EmailSettings]
    backups: Optional[BackupSettings]
    pipeline: Optional[PipelineSettings]

    @property
    def is_prod(self) -> bool:
        return self.stage == "prod"


class _Reader:
    """Reads keys of one stack and turns every failure into a SettingsError naming the key."""

    def __init__(self, stack: str):
        self.stack = stack
        self.config = pulumi.Config(PROJECT)

    def _missing(self, key: str, expected: str, secret: bool = False) -> SettingsError:
        # A secret is typed at the prompt (or piped in), never put on the command line.
        how = f"--secret {PROJECT}:{key}" if secret else f"{PROJECT}:{key} <value>"
        return invalid(key, None, expected, fix=f"pulumi config set {how} --stack {self.stack}")

    def required(self, key: str, expected: str) -> str:
        """A key that has no useful default: empty means not set."""
        value = self.config.get(key)
        if not value:
            raise self._missing(key, expected)
        return value

    def string(self, key: str, check: Optional[Callable[[str], bool]] = None, expected: str = "a value") -> str:
        value = self.config.get(key)
        if value is None:
            raise self._missing(key, expected)
        if check is not None and not check(value):
            raise invalid(key, value, expected)
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        expected = f"a whole number from {low} to {high}"
        raw = self.string(key, expected=expected)
        try:
            value = int(raw)
        except ValueError:
            raise invalid(key, raw, expected) from None
        if not low <= value <= high:
            raise invalid(key, raw, expected)
        return value

    def boolean(self, key: str) -> bool:
        raw = self.string(key, expected="true or false")
        if raw not in ("true", "false"):
            raise invalid(key, raw, "true or false")
        return raw == "true"

    def strings(self, key: str, check: Callable[[str], bool] = lambda v: True,
                expected: str = "a list of text") -> tuple[str, ...]:
        raw = self.string(key, expected="a list")
        try:
            values = json.loads(raw)
        except json.JSONDecodeError:
            raise invalid(key, raw, f"a list, e.g. set with: pulumi config set --path '{PROJECT}:{key}[0]' "
                                      f"<value> --stack {self.stack}") from None
        if not isinstance(values, list):
            raise invalid(key, raw, "a list")
        for value in values:
            if not isinstance(value, str) or not check(value):
                raise invalid(key, value, expected)
        return tuple(values)

    def secret(self, key: str) -> pulumi.Output:
        value = self.config.get_secret(key)
        if value is None:
            raise self._missing(key, "a secret", secret=True)
        return value


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@(.+)$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.(nano|micro|small|medium|large|metal|[0-9]*xlarge)$")
_WIREGUARD_KEY = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_GITHUB_REPO = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_FORM = "an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)"
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # the OCI distribution spec's tag grammar
# Tags that move: they name whatever was pushed last, so a rebuilt cluster would not run what ran before.
MOVING_TAGS = frozenset({"latest", "main", "master", "edge", "nightly", "stable"})
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SECURITY_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
_RDS_CLASS = re.compile(r"^db\.[a-z0-9]+\.[0-9]*(micro|small|medium|large|xlarge)$")
_ZONE_ID = re.compile(r"^[A-Z0-9]{1,32}$")  # Route53's hosted zone IDs (Z0292557263L1FJT7JXXS), no /hostedzone/
# EBS volume types an instance can boot from: "st1 and sc1 volumes can't be used as boot volumes"
# (Amazon EBS User Guide, "Amazon EBS volume types").
ROOT_VOLUME_TYPES = ("gp2", "gp3", "io1", "io2", "standard")

# `imports` lines: <Type>:<name>=<id> (infra/adopt.py).
_IMPORT_LINE = re.compile(r"^([A-Z][A-Za-z0-9]*):([^=\s]+)=(\S+)$")
# The import IDs that have a form of their own, so a pasted wrong ID stops here, not midway through `up`.
IMPORT_ID_FORMS = {
    "Instance": (re.compile(r"^i-[0-9a-f]{8,17}$"), "an instance ID such as i-0123456789abcdef0"),
    "Eip": (re.compile(r"^eipalloc-[0-9a-f]{8,17}$"), "an allocation ID such as eipalloc-0123456789abcdef0"),
    "EipAssociation": (re.compile(r"^eipassoc-[0-9a-f]{8,17}$"),
                       "an association ID such as eipassoc-0123456789abcdef0"),
    "Policy": (re.compile(r"^arn:aws:iam::[0-9]{12}:policy/\S+$"),
               "a policy ARN such as arn:aws:iam::123456789012:policy/katforge-backup-restore"),
    "OpenIdConnectProvider": (re.compile(r"^arn:aws:iam::[0-9]{12}:oidc-provider/\S+$"),
                              "a provider ARN such as arn:aws:iam::123456789012:oidc-provider/"
                              "token.actions.githubusercontent.com"),
}
# What makes a host reachable at its address: adopted all together, or none of them.
HOST_IMPORTS = ("Instance", "Eip", "EipAssociation")

# The key types EC2 imports as a key pair: "an RSA or ED25519 key pair" (EC2 API reference, ImportKeyPair).
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")
# k3s's default pod and service networks (k3s server flags --cluster-cidr, --service-cidr); the host's
# k3s configuration keeps them.
K3S_POD_CIDR = "10.42.0.0/16"
K3S_SERVICE_CIDR = "10.43.0.0/16"
# Operators' own addresses: a home or office is a /32 to a /24, and even an ISP's pool for a dynamic
# address is rarely wider than a /16. A wider public range (0.0.0.0/0 above all) would open SSH and the
# k3s API to a good part of the internet, so it is refused. Private ranges (RFC 1918) can only arrive
# from inside the VPC, so their width opens nothing to the internet.
WIDEST_PUBLIC_PREFIX = 16
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


def is_domain(value: str) -> bool:
    return bool(_DOMAIN.match(value))


def is_email(value: str) -> bool:
    match = _EMAIL.match(value)
    return bool(match) and is_domain(match.group(1))


def is_cidr(value: str) -> bool:
    if "/" not in value:
        return False
    try:
        ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return False
    return True


def is_ip(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def ssh_key_problem(line: str) -> Optional[str]:
    """What is wrong with an OpenSSH public key line `<type> <base64 key> [comment]`, or None. The key
    is in SSH wire format: strings, each a 4-byte big-endian length and its bytes, the first being the
    type; then for ssh-rsa the exponent and the modulus (RFC 4253 section 6.6), for ssh-ed25519 the
    32-byte key (RFC 8709). A line whose label and key disagree, or whose base64 was cut or wrapped,
    is refused here rather than by AWS or by a failed login."""
    parts = line.split(None, 2)
    if not line.isprintable() or len(parts) < 2:
        return "it is not one line of <type> <base64 key> [comment]"
    if parts[0] not in SSH_KEY_TYPES:
        return f"EC2 imports only {' and '.join(SSH_KEY_TYPES)} keys, not {parts[0]!r}"
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        blob = b""
    fields = []
    while len(blob) >= 4 and len(blob) >= 4 + (length := int.from_bytes(blob[:4], "big")):
        fields.append(blob[4:4 + length])
        blob = blob[4 + length:]
    if not fields or blob:
        return f"the base64 key after {parts[0]} is not whole (cut short, or wrapped?)"
    if fields[0] != parts[0].encode():
        return f"the key data is a {fields[0].decode('ascii', 'replace')!r} key, not {parts[0]}"
    if len(fields) != (2 if parts[0] == "ssh-ed25519" else 3) or parts[0] == "ssh-ed25519" and len(fields[1]) != 32:
        return f"the key data does not have the fields of a {parts[0]} key"
    return None


def _cidr_list(read: _Reader, key: str, form: str) -> tuple[str, ...]:
    values = read.strings(key, is_cidr, form)
    for value in values:
        network = ipaddress.IPv4Network(value)
        if network.prefixlen < WIDEST_PUBLIC_PREFIX and not any(network.subnet_of(p) for p in _RFC1918):
            raise invalid(key, value, f"an operator's public range of /{WIDEST_PUBLIC_PREFIX} or narrower "
                                      f"({value} would admit {network.num_addresses} addresses to SSH and the k3s API)")
    return values


def instance_address_problem(ip: str, vpc_cidr: str) -> Optional[str]:
    """What keeps an instance from having the private address `ip` in the default VPC, as the expected form
    of an error line, or None."""
    from infra.network import subnet_cidr_of  # here, not at the top: infra.network imports this module

    address = ipaddress.IPv4Address(ip)
    if address not in ipaddress.IPv4Network(vpc_cidr):
        return f"an address inside the VPC {vpc_cidr}"
    # AWS keeps five addresses of every subnet from instances: "the first four IP addresses and the last IP
    # address in each subnet CIDR block" (Amazon VPC User Guide, "Subnet CIDR blocks").
    subnet = ipaddress.IPv4Network(subnet_cidr_of(ip))
    reserved = {subnet[0]: "its network address", subnet[1]: "the VPC router", subnet[2]: "DNS",
                subnet[3]: "future use", subnet[-1]: "its broadcast address"}
    if address in reserved:
        return (f"an address AWS lets an instance have in subnet {subnet}, but it reserves {address} for "
                f"{reserved[address]} (AWS keeps the first four and the last address of every subnet)")
    return None


def _network(read: _Reader) -> NetworkSettings:
    cidr_form = "an IPv4 network in CIDR form with no host bits, e.g. 172.31.0.0/16"
    vpc_cidr = read.string("vpcCidr", is_cidr, cidr_form)
    private_ip = read.string("k3sPrivateIp", is_ip, "an IPv4 address such as 172.31.14.98")
    problem = instance_address_problem(private_ip, vpc_cidr)
    if problem:
        raise invalid("k3sPrivateIp", private_ip, problem)
    vpn_client_cidr = read.string("vpnClientCidr", is_cidr, cidr_form)
    clients = ipaddress.IPv4Network(vpn_client_cidr)
    if clients.prefixlen > 30:
        raise invalid("vpnClientCidr", vpn_client_cidr, "a /30 or wider range: room for the VPN server and its peers")
    # The VPN host routes between its clients and the VPC, and the allow lists and pg_hba.conf tell
    # clients, pods and VPC hosts apart by address: the ranges must not share one.
    for name, other in (("the VPC", vpc_cidr), ("k3s's pod network", K3S_POD_CIDR),
                        ("k3s's service network", K3S_SERVICE_CIDR)):
        if clients.overlaps(ipaddress.IPv4Network(other)):
            raise invalid("vpnClientCidr", vpn_client_cidr, f"a range apart from {name} {other}, e.g. 10.99.0.0/24")
    return NetworkSettings(
        vpc_cidr=vpc_cidr,
        k3s_private_ip=private_ip,
        admin_cidrs=_cidr_list(read, "adminCidrs", cidr_form),
        k3s_api_cidrs=_cidr_list(read, "k3sApiCidrs", cidr_form),
        vpn_client_cidr=vpn_client_cidr,
        wireguard_port=read.integer("wireguardPort", 1, 65535),
    )


def _ids(read: _Reader, key: str, form: re.Pattern, example: str) -> tuple[str, ...]:
    values = read.strings(key, lambda v: bool(form.match(v)), example)
    for i, value in enumerate(values):
        if value in values[:i]:
            raise invalid(key, value, f"{example}, each once, but it is listed twice")
    return values


def _root_volume(read: _Reader, prefix: str) -> RootVolume:
    """What the host's root volume is. A live host's volume keeps its encryption (changing it replaces
    the instance) and can grow but never shrink, so adopting a host needs its live facts here."""
    key = f"{prefix}RootVolumeType"
    volume_type = read.string(key, lambda v: v in ROOT_VOLUME_TYPES,
                              f"an EBS type an instance boots from: {', '.join(ROOT_VOLUME_TYPES)}")
    return RootVolume(size_gb=read.integer(f"{prefix}RootVolumeGb", 8, 16384), type=volume_type,
                      encrypted=read.boolean(f"{prefix}RootVolumeEncrypted"))


def _host(read: _Reader, prefix: str) -> HostSpec:
    return HostSpec(
        instance_type=read.string(f"{prefix}InstanceType", lambda v: bool(_INSTANCE_TYPE.match(v)),
                                  "an EC2 instance type such as t3.medium"),
        expected_public_ip=read.string(f"{prefix}PublicIp", is_ip, "an IPv4 address such as 3.19.192.157"),
        root_volume=_root_volume(read, prefix),
        keep_security_groups=_ids(read, f"{prefix}KeepSecurityGroups", _SECURITY_GROUP_ID,
                                  "a security group ID such as sg-0123456789abcdef0"),
    )


def _adopted_together(imports: Mapping[str, str], host: str) -> None:
    """A host's instance, Elastic IP and association are imported together or not at all: importing
    the instance while allocating a new address, or the address while creating a new instance, would
    move the live address and every DNS name with it."""
    listed = [kind for kind in HOST_IMPORTS if f"{kind}:{host}" in imports]
    if listed and len(listed) < len(HOST_IMPORTS):
        missing = [f"{kind}:{host}=<id>" for kind in HOST_IMPORTS if kind not in listed]
        given = f"{listed[0]}:{host}"
        raise invalid("imports", f"{given}={imports[given]}",
                      f"also {' and '.join(missing)}: the live {host} host's Instance, Eip and EipAssociation are "
                      "adopted together or not at all (make discover finds all three)")


def _hosts(read: _Reader, imports: Mapping[str, str], network: NetworkSettings) -> HostSettings:
    for host in ("k3s", "vpn"):
        _adopted_together(imports, host)
    return HostSettings(
        k3s=_host(read, "k3s"),
        vpn=_host(read, "vpn"),
        vpn_subnet_id=read.string("vpnSubnetId", lambda v: v == "" or bool(_SUBNET_ID.match(v)),
                                  "empty (the k3s host's subnet), or a subnet ID such as subnet-0123456789abcdef0"),
        ssh_public_key=_ssh_public_key(read),
        k3s_agents=_k3s_agents(read, network),
    )


def _named_lines(read: _Reader, key: str, form: str) -> Iterator[tuple[Callable[[str], SettingsError], str, str, str]]:
    """Each "name,a,b" line of the list `key` (Pulumi's typed config has no list of objects,
    pulumi/pulumi#11321): the refusal for that line, naming the part that is wrong, then its checked name
    and its other two parts."""
    for line in read.strings(key):
        def wrong(problem: str, line: str = line) -> SettingsError:
            return invalid(key, line, f"{form}, but {problem}")

        parts = line.split(",")
        if len(parts) != 3:
            raise wrong(f"the line has {len(parts)} comma-separated parts, not 3")
        name, first, second = parts
        if not _LABEL.match(name):
            raise wrong(f"the name {name!r} is not a lowercase label (a-z, 0-9 and inner hyphens)")
        yield wrong, name, first, second


def _k3s_agents(read: _Reader, network: NetworkSettings) -> tuple[AgentSpec, ...]:
    """Agents as "name,instanceType,privateIp" lines. A refusal names the part of the line that is wrong."""
    from infra.capacity import MEMTOTAL_MIB  # here, not at the top: infra.capacity imports this module

    form = '"name,instanceType,privateIp", e.g. "agent-1,t3.medium,172.31.14.120"'
    owners: dict[tuple[str, str], str] = {("address", network.k3s_private_ip): "k3s (the server)",
                                          ("name", "k3s"): "k3s (the server)", ("name", "vpn"): "vpn (the VPN host)"}
    agents = []
    for wrong, name, instance_type, private_ip in _named_lines(read, "k3sAgents", form):
        if instance_type not in MEMTOTAL_MIB:
            raise wrong(f"the instance type {instance_type!r} has no memory figure in MEMTOTAL_MIB "
                        f"(infra/capacity.py): {', '.join(MEMTOTAL_MIB)}")
        if not is_ip(private_ip):
            raise wrong(f"the private address {private_ip!r} is not an IPv4 address")
        problem = instance_address_problem(private_ip, network.vpc_cidr)
        if problem:
            raise wrong(f"the private address is not {problem}")
        for part, value in (("name", name), ("address", private_ip)):
            if (part, value) in owners:
                raise wrong(f"{owners[part, value]} already has this {part}")
            owners[part, value] = name
        agents.append(AgentSpec(name=name, instance_type=instance_type, private_ip=private_ip))
    return tuple(agents)


def _database(read: _Reader, stack: str) -> DatabaseSettings:
    """Where the stage's database lives. prod declares the RDS instance (both stages' databases live on
    it) once its own database is no longer only on the host, and owns the host's PostgreSQL."""
    place = read.string("database", lambda v: v in DATABASE_PLACES,
                        "host (the k3s host's PostgreSQL), migrating (RDS ready, the apps still on the host) or "
                        "rds (the apps on RDS, after make migrate-database)")
    if stack != "prod":
        return DatabaseSettings(place=place)
    host_postgres = read.string("hostPostgres", lambda v: v in ("keep", "remove"),
                                "keep, or remove (stops and disables the host's PostgreSQL, its data kept)")
    if host_postgres == "remove" and place != "rds":
        raise invalid("hostPostgres", host_postgres, f"keep while katforge:database is {place}: the apps use "
                                                     "the host's PostgreSQL until it is rds")
    instance_class = read.string("rdsInstanceClass", lambda v: bool(_RDS_CLASS.match(v)),
                                 "an RDS instance class such as db.t4g.small")
    storage_gb = read.integer("rdsAllocatedStorageGb", 20, 65536)
    password = read.config.get("rdsMasterPassword")  # read in plain only to check it
    if place == "host":
        return DatabaseSettings(place=place, host_postgres=host_postgres)
    # RDS refuses a master password outside 8-128 printable ASCII characters, or with /, ", @ or a space
    # (RDS User Guide, "Settings for DB instances", Master password).
    form = "the RDS master user's password, set as a secret: 8 to 128 printable ASCII characters but / \" @ and space"
    if not password:
        raise read._missing("rdsMasterPassword", form, secret=True)
    if not pulumi.runtime.is_config_secret(f"{PROJECT}:rdsMasterPassword"):
        raise invalid("rdsMasterPassword", "[plain text, not shown]", form,
                      fix=f"pulumi config set --secret {PROJECT}:rdsMasterPassword --stack {stack}")
    if not (8 <= len(password) <= 128 and password.isascii() and password.isprintable()) \
            or any(c in password for c in '/"@ '):
        raise invalid("rdsMasterPassword", "[secret]", form)
    rds = RdsSettings(instance_class=instance_class, allocated_storage_gb=storage_gb,
                      master_password=pulumi.Output.secret(password))
    return DatabaseSettings(place=place, rds=rds, host_postgres=host_postgres)


def _imports(read: _Reader) -> Mapping[str, str]:
    """`imports` as "<Type>:<name>" -> ID. Each resource and each live object appears once: two lines for
    one resource, or two resources taking over one object, are a mistake either way."""
    form = '"<Type>:<name>=<id>" lines such as "Instance:k3s=i-0123456789abcdef0" (make discover writes them)'
    found: dict[str, str] = {}
    for line in read.strings("imports"):
        match = _IMPORT_LINE.match(line)
        if match is None:
            raise invalid("imports", line, form)
        kind, name, live_id = match.groups()
        shape = IMPORT_ID_FORMS.get(kind)
        if shape is not None and not shape[0].match(live_id):
            raise invalid("imports", line, f"{form}, but {live_id!r} is not {shape[1]}")
        key = f"{kind}:{name}"
        if key in found:
            raise invalid("imports", line, f"{form}, each resource once, but {key} is listed already "
                                           f"({key}={found[key]})")
        twin = next((k for k, v in found.items() if v == live_id and k.startswith(f"{kind}:")), None)
        if twin is not None:
            raise invalid("imports", line, f"{form}, each live object once, but {twin} imports {live_id} already")
        found[key] = live_id
    return found


def _zone_ids(read: _Reader) -> Mapping[str, str]:
    from infra.dns import ZONES  # here, not at the top: infra.dns imports this module

    form = f'"zone=id" lines for the zones {", ".join(ZONES)}, e.g. "katforge.com=Z0292557263L1FJT7JXXS"'
    ids: dict[str, str] = {}
    for line in read.strings("zoneIds"):
        zone, _, zone_id = line.partition("=")
        if zone not in ZONES:
            raise invalid("zoneIds", line, f"{form}, but {zone!r} is not a zone of infra/dns.py")
        if not _ZONE_ID.match(zone_id):
            raise invalid("zoneIds", line, f"{form}, but {zone_id!r} is not a hosted zone ID (capitals and digits, "
                                           "without /hostedzone/)")
        if zone in ids:
            raise invalid("zoneIds", line, f"{form}, but {zone} has an ID already ({ids[zone]})")
        ids[zone] = zone_id
    return ids


def _ssh_public_key(read: _Reader) -> str:
    form = "an OpenSSH public key line such as 'ssh-ed25519 AAAA... ops@katforge.com'"
    value = read.required("sshPublicKey", form)
    problem = ssh_key_problem(value)
    if problem:
        raise invalid("sshPublicKey", value, f"{form}, but {problem}")
    return value


def _email(read: _Reader) -> EmailSettings:
    domain = "katforge.com"
    return EmailSettings(
        domain=domain,
        mail_from_subdomain=read.string("mailFromSubdomain", lambda v: bool(_LABEL.match(v)),
                                        "a single DNS label such as 'mail'"),
        dmarc_policy=read.string("dmarcPolicy", lambda v: v in ("none", "quarantine", "reject"),
                                 "one of none, quarantine, reject"),
        from_addresses=read.strings("sesFromAddresses", lambda v: is_email(v) and v.endswith("@" + domain),
                                    f"an email address at {domain}"),
        mail_from_mx_failure=read.string("mailFromMxFailure", lambda v: v in ("UseDefaultValue", "RejectMessage"),
                                         "UseDefaultValue (SES's own MAIL FROM domain until yours verifies) or "
                                         "RejectMessage (once SES shows it verified)"),
    )


def _wireguard_peers(read: _Reader, vpn_client_cidr: str) -> tuple[WireguardPeer, ...]:
    """Peers as "name,publickey,address/32". A refusal names the part of the line that is wrong."""
    from infra.bootstrap import wireguard_address  # here, not at the top: infra.bootstrap imports this module

    clients = ipaddress.IPv4Network(vpn_client_cidr)
    server = ipaddress.IPv4Interface(wireguard_address(vpn_client_cidr)).ip
    form = f'"name,publickey,address/32", e.g. "alice-laptop,<wg pubkey output>,{clients[2]}/32"'
    owners: dict[tuple[str, str], str] = {}  # (part, value) -> the peer that has it
    peers = []
    for wrong, name, key, address in _named_lines(read, "wireguardPeers", form):
        if not _WIREGUARD_KEY.match(key):
            raise wrong(f"the public key {key!r} is not a WireGuard key (44 base64 characters ending in '=')")
        network = ipaddress.IPv4Network(address) if is_cidr(address) else None
        if network is None or network.prefixlen != 32 or not network.subnet_of(clients):
            raise wrong(f"the address {address!r} is not a /32 inside {vpn_client_cidr}")
        host = network.network_address
        if host == server:
            raise wrong(f"the address {address} is the VPN server's own (the first of {vpn_client_cidr})")
        if host in (clients.network_address, clients.broadcast_address):
            raise wrong(f"the address {address} is the network or broadcast address of {vpn_client_cidr}")
        for part, value in (("name", name), ("public key", key), ("address", address)):
            if (part, value) in owners:
                raise wrong(f"peer {owners[part, value]!r} already has this {part}")
            owners[part, value] = name
        peers.append(WireguardPeer(name=name, public_key=key, address=address))
    return tuple(peers)


def _image_tags(read: _Reader, stage: str) -> Mapping[str, str]:
    """The release each app's Deployment starts at, as "app=tag" lines: each app has its own repository
    and its own releases. Every app the stage runs needs one; an app it does not run may have one."""
    from infra.apps import APPS, apps_in  # here, not at the top: infra.apps imports this module

    names = [app.name for app in APPS]
    running = [app.name for app in apps_in(stage)]
    form = f'"app=tag" lines, one per app {stage} runs ({", ".join(running)}), e.g. "{running[0]}=v1.4.2"'
    if read.config.get("imageTags") is None:
        raise invalid("imageTags", None, form, fix=f"pulumi config set --path '{PROJECT}:imageTags[0]' "
                                                   f"{running[0]}=<tag> --stack {stage} (and [1], ... for the others)")
    tags: dict[str, str] = {}
    lines = read.strings("imageTags")
    for line in lines:
        app, _, tag = line.partition("=")
        if app not in names:
            close = difflib.get_close_matches(app, names, n=1)
            raise invalid("imageTags", line, f"{form}, but {app!r} is not an app of infra/apps.py"
                                             + (f"; did you mean {close[0]}?" if close else ""))
        if not _IMAGE_TAG.match(tag):
            raise invalid("imageTags", line, f"{form}, but {tag!r} is not an image tag")
        if tag in MOVING_TAGS:
            raise invalid("imageTags", line, f"{form}, but {tag} is a moving tag: name a release of {app}")
        if app in tags:
            raise invalid("imageTags", line, f"{form}, but {app} has a tag already ({tags[app]})")
        tags[app] = tag
    missing = [app for app in running if app not in tags]
    if missing:
        raise invalid("imageTags", list(lines), f"{form}, but {', '.join(missing)} has no tag",
                      fix=f"pulumi config set --path '{PROJECT}:imageTags[{len(lines)}]' {missing[0]}=<tag> "
                          f"--stack {stage}")
    return tags


def _refuse_unknown_keys() -> None:
    """A key of the project's namespace that Pulumi.yaml does not declare is a typo: the program would
    silently use the default of the key it meant. The CLI hands the program every key of the stack
    (pulumi-language-python-exec puts them in the runtime's config), defaults included."""
    declared = yaml.load(PROJECT_FILE.read_text(), Loader=YAML_LOADER)["config"]
    by_lower = {key.lower(): key for key in declared}
    for full in sorted(CONFIG.get()):
        namespace, _, key = full.partition(":")
        if namespace != PROJECT or key in declared:
            continue
        close = difflib.get_close_matches(key.lower(), by_lower, n=1, cutoff=0.6)
        hint = f"; did you mean {PROJECT}:{by_lower[close[0]]}?" if close else " (see its config: section)"
        value = "[secret]" if pulumi.runtime.is_config_secret(full) else CONFIG.get()[full]
        raise invalid(full, value, f"a key that Pulumi.yaml declares{hint}")


def load() -> Settings:
    """Read and validate the current stack's configuration."""
    stack = pulumi.get_stack()
    if stack not in STAGES:
        raise SettingsError(f"Pulumi.{stack}.yaml: unknown stage '{stack}': expected a stack named after a stage: "
                            f"{', '.join(STAGES)}")
    region = pulumi.Config("aws").get("region")
    if region != REGION:
        raise invalid("aws:region", region, f"{REGION}, where the estate and SES live",
                      fix=f"pulumi config set aws:region {REGION} --stack {stack}")
    _refuse_unknown_keys()
    read = _Reader(stack)
    is_prod = stack == "prod"
    network = _network(read)
    imports = _imports(read)
    return Settings(
        stage=stack,
        stage_facts=STAGES[stack],
        prod_stack=read.string("prodStack", lambda v: v.count("/") == 2, "organization/project/stack"),
        imports=imports,
        zone_ids=_zone_ids(read),
        network=network,
        db_password=read.secret("dbPassword"),
        database=_database(read, stack),
        bootstrap=BootstrapSettings(
            k3s_version=read.string("k3sVersion", lambda v: v in K3S_TRAEFIK_CHART,
                                    "a k3s release whose bundled Traefik chart is recorded in K3S_TRAEFIK_CHART "
                                    f"(infra/settings.py): {', '.join(K3S_TRAEFIK_CHART)}"),
            wireguard_peers=_wireguard_peers(read, network.vpn_client_cidr),
            ssh_private_key=read.secret("sshPrivateKey"),
            k3s_secrets_encryption=read.boolean("k3sSecretsEncryption"),
            k3s_encrypt_existing_secrets=read.boolean("k3sEncryptExistingSecrets"),
            k3s_replace_live_flags=read.boolean("k3sReplaceLiveFlags"),
            postgres_allow_restart=read.boolean("postgresAllowRestart"),
            postgres_drop_live_hba_rules=read.boolean("postgresDropLiveHbaRules"),
            postgres_extra_client_cidrs=_cidr_list(read, "postgresExtraClientCidrs",
                                                   "an IPv4 network in CIDR form with no host bits, e.g. 192.168.0.0/16"),
        ),
        cluster=ClusterSettings(
            acme_email=read.string("acmeEmail", is_email, "an email address such as ops@katforge.com"),
            image_tags=_image_tags(read, stack),
            ghcr_username=read.string("ghcrUsername", lambda v: bool(re.match(r"^[A-Za-z0-9-]{1,39}$", v)),
                                      "a GitHub user name"),
            ghcr_token=read.secret("ghcrToken"),
        ),
        hosts=_hosts(read, imports, network) if is_prod else None,
        email=_email(read) if is_prod else None,
        backups=BackupSettings(
            bucket=read.string("backupBucket", lambda v: bool(_BUCKET.match(v)), _BUCKET_FORM),
            retention_days=read.integer("backupRetentionDays", 1, 3650),
            time_utc=read.string("backupTime", lambda v: bool(_TIME.match(v)),
                                 'a UTC time HH:MM with two-digit hours, quoted, e.g. "03:30"'),
            alert_from=read.string("backupAlertFrom", lambda v: is_email(v) and v.endswith("@katforge.com"),
                                   "an email address at katforge.com (SES sends only from its verified domain)"),
            alert_to=read.string("opsEmail", is_email, "an email address such as ops@katforge.com"),
        ) if is_prod else None,
        pipeline=PipelineSettings(
            github_repository=read.string("githubRepository", lambda v: bool(_GITHUB_REPO.match(v)),
                                          "a GitHub repository as owner/name"),
            state_bucket=read.string("stateBucket", lambda v: bool(_BUCKET.match(v)), _BUCKET_FORM),
        ) if is_prod else None,
    )


_T = TypeVar("_T")


def hosts() -> tuple[NetworkSettings, tuple[AgentSpec, ...]]:
    """The network and the k3s agents alone, as `load` reads and checks them (hearth's memory check)."""
    read = _Reader(pulumi.get_stack())
    network = _network(read)
    return network, _k3s_agents(read, network)


def from_config(stack: str, config: Mapping[str, str], secret_keys: Sequence[str] = (),
                read: Callable[[], _T] = load) -> _T:
    """`read` (all of `load` by default) on a stack's config given as the CLI hands it to the program, for
    the tools that check a stack file outside a Pulumi run. In a context of its own: Pulumi's config and
    stack name are context variables, so nothing stays set for the rest of the process."""
    def run() -> _T:
        runtime_settings._set_stack(stack)  # the stack file a refusal names
        pulumi.runtime.set_all_config(dict(config), list(secret_keys))
        return read()
    return contextvars.copy_context().run(run)

