"""A stage's settings, read once from Pulumi config and validated before any resource is declared.

Every key is declared (type, description, default, secret) in Pulumi.yaml; this module is the only
reader of `pulumi.Config`. A bad value stops the program with one `SettingsError` that names the key,
the value and the expected form.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pulumi

PROJECT = "katforge"
REGION = "us-east-2"  # SES, the hosts and the zones' records all live here (spec: SES us-east-2)


class SettingsError(pulumi.RunError):
    """Bad or missing configuration; Pulumi prints the message without a traceback."""


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


@dataclass(frozen=True)
class HostSpec:
    instance_type: str
    expected_public_ip: str
    instance_id: str  # "" = create; otherwise import the live instance
    eip_allocation_id: str  # "" = allocate; otherwise import the live Elastic IP


@dataclass(frozen=True)
class HostSettings:
    k3s: HostSpec
    vpn: HostSpec
    root_volume_gb: int
    ssh_public_key: str


@dataclass(frozen=True)
class EmailSettings:
    domain: str
    mail_from_subdomain: str
    dmarc_policy: str
    from_addresses: tuple[str, ...]
    identity_id: str  # "" = create; otherwise import the live SES identity


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


@dataclass(frozen=True)
class ClusterSettings:
    acme_email: str
    image_tag: str
    ghcr_username: str
    ghcr_token: pulumi.Output


@dataclass(frozen=True)
class BackupSettings:
    bucket: str
    retention_days: int
    time_utc: str


@dataclass(frozen=True)
class PipelineSettings:
    github_repository: str


@dataclass(frozen=True)
class Settings:
    stage: str
    stage_facts: Stage
    prod_stack: str
    network: NetworkSettings
    db_password: pulumi.Output
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

    def fail(self, key: str, value, expected: str) -> SettingsError:
        return SettingsError(f"{PROJECT}:{key} = {value!r} is invalid: expected {expected}.")

    def _missing(self, key: str, secret: bool) -> SettingsError:
        # A secret is typed at the prompt (or piped in), never put on the command line.
        how = f"--secret {PROJECT}:{key} --stack {self.stack}" if secret else f"{PROJECT}:{key} <value> --stack {self.stack}"
        return SettingsError(f"{PROJECT}:{key} is not set for stack '{self.stack}'. Set it with: pulumi config set {how}")

    def required(self, key: str, check: Callable[[str], bool], expected: str) -> str:
        """A key that has no useful default: empty means not set."""
        value = self.string(key)
        if value == "":
            raise self._missing(key, secret=False)
        if not check(value):
            raise self.fail(key, value, expected)
        return value

    def string(self, key: str, check: Optional[Callable[[str], bool]] = None, expected: str = "") -> str:
        value = self.config.get(key)
        if value is None:
            raise self._missing(key, secret=False)
        if check is not None and not check(value):
            raise self.fail(key, value, expected)
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        raw = self.string(key)
        try:
            value = int(raw)
        except ValueError:
            raise self.fail(key, raw, f"a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise self.fail(key, value, f"a whole number from {low} to {high}")
        return value

    def strings(self, key: str, check: Callable[[str], bool], expected: str) -> tuple[str, ...]:
        raw = self.string(key)
        try:
            values = json.loads(raw)
        except json.JSONDecodeError:
            raise self.fail(key, raw, "a list, e.g. set with --path 'katforge:" + key + "[0]'") from None
        if not isinstance(values, list):
            raise self.fail(key, values, "a list")
        for value in values:
            if not isinstance(value, str) or not check(value):
                raise self.fail(key, value, expected)
        return tuple(values)

    def secret(self, key: str) -> pulumi.Output:
        value = self.config.get_secret(key)
        if value is None:
            raise self._missing(key, secret=True)
        return value


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@(.+)$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.(nano|micro|small|medium|large|metal|[0-9]*xlarge)$")
_SSH_PUBLIC_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=* ?.*$")
_WIREGUARD_KEY = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_GITHUB_REPO = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
_AWS_ID = {"instance": re.compile(r"^i-[0-9a-f]{8,17}$"), "eip": re.compile(r"^eipalloc-[0-9a-f]{8,17}$")}


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


def _optional_id(kind: str) -> Callable[[str], bool]:
    return lambda value: value == "" or bool(_AWS_ID[kind].match(value))


def _network(read: _Reader) -> NetworkSettings:
    cidr_form = "an IPv4 network in CIDR form with no host bits, e.g. 172.31.0.0/16"
    vpc_cidr = read.string("vpcCidr", is_cidr, cidr_form)
    private_ip = read.string("k3sPrivateIp")
    try:
        inside = ipaddress.IPv4Address(private_ip) in ipaddress.IPv4Network(vpc_cidr)
    except ValueError:
        raise read.fail("k3sPrivateIp", private_ip, "an IPv4 address such as 172.31.14.98") from None
    if not inside:
        raise read.fail("k3sPrivateIp", private_ip, f"an address inside the VPC {vpc_cidr}")
    return NetworkSettings(
        vpc_cidr=vpc_cidr,
        k3s_private_ip=private_ip,
        admin_cidrs=read.strings("adminCidrs", is_cidr, cidr_form),
        k3s_api_cidrs=read.strings("k3sApiCidrs", is_cidr, cidr_form),
        vpn_client_cidr=read.string("vpnClientCidr", is_cidr, cidr_form),
    )


def _host(read: _Reader, prefix: str) -> HostSpec:
    """One host's settings. Its instance and Elastic IP are adopted together: importing the instance
    while allocating a new address would move the live address off it, and every DNS name with it."""
    def is_ip(value: str) -> bool:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return False
        return True

    spec = HostSpec(
        instance_type=read.string(f"{prefix}InstanceType", lambda v: bool(_INSTANCE_TYPE.match(v)),
                                  "an EC2 instance type such as t3.medium"),
        expected_public_ip=read.string(f"{prefix}PublicIp", is_ip, "an IPv4 address such as 3.19.192.157"),
        instance_id=read.string(f"{prefix}InstanceId", _optional_id("instance"),
                                "empty, or an instance ID such as i-0123456789abcdef0"),
        eip_allocation_id=read.string(f"{prefix}EipAllocationId", _optional_id("eip"),
                                      "empty, or an allocation ID such as eipalloc-0123456789abcdef0"),
    )
    if bool(spec.instance_id) != bool(spec.eip_allocation_id):
        missing = f"{prefix}EipAllocationId" if spec.instance_id else f"{prefix}InstanceId"
        raise SettingsError(f"{PROJECT}:{missing} is not set, but the {prefix} host is half adopted: set both "
                            f"{PROJECT}:{prefix}InstanceId and {PROJECT}:{prefix}EipAllocationId, or neither.")
    return spec


def _hosts(read: _Reader) -> HostSettings:
    return HostSettings(
        k3s=_host(read, "k3s"),
        vpn=_host(read, "vpn"),
        root_volume_gb=read.integer("rootVolumeGb", 8, 1024),
        ssh_public_key=read.required("sshPublicKey", lambda v: bool(_SSH_PUBLIC_KEY.match(v)),
                                   "an OpenSSH public key line such as 'ssh-ed25519 AAAA... ops@katforge.com'"),
    )


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
        identity_id=read.string("sesIdentityId", lambda v: v in ("", domain), f"empty, or {domain}"),
    )


def _wireguard_peers(read: _Reader, vpn_client_cidr: str) -> tuple[WireguardPeer, ...]:
    expected = f"'name,publickey,address/32' with a WireGuard public key and an address inside {vpn_client_cidr}"

    def parse(value: str) -> Optional[WireguardPeer]:
        parts = value.split(",")
        if len(parts) != 3 or not _LABEL.match(parts[0]) or not _WIREGUARD_KEY.match(parts[1]):
            return None
        try:
            address = ipaddress.IPv4Network(parts[2], strict=True)
        except ValueError:
            return None
        if address.prefixlen != 32 or not address.subnet_of(ipaddress.IPv4Network(vpn_client_cidr)):
            return None
        return WireguardPeer(name=parts[0], public_key=parts[1], address=parts[2])

    raw = read.strings("wireguardPeers", lambda v: parse(v) is not None, expected)
    peers = tuple(parse(v) for v in raw)
    for attribute in ("name", "address"):
        seen = [getattr(p, attribute) for p in peers]
        duplicate = next((v for v in seen if seen.count(v) > 1), None)
        if duplicate is not None:
            raise read.fail("wireguardPeers", duplicate, f"each peer {attribute} to appear once")
    return peers


def load() -> Settings:
    """Read and validate the current stack's configuration."""
    stack = pulumi.get_stack()
    if stack not in STAGES:
        raise SettingsError(f"unknown stage '{stack}': the stack name must be one of {', '.join(STAGES)}.")
    region = pulumi.Config("aws").get("region")
    if region != REGION:
        raise SettingsError(
            f"aws:region = {region!r} is invalid: expected {REGION}, where the estate and SES live. "
            f"Set it with: pulumi config set aws:region {REGION} --stack {stack}"
        )
    read = _Reader(stack)
    is_prod = stack == "prod"
    network = _network(read)
    return Settings(
        stage=stack,
        stage_facts=STAGES[stack],
        prod_stack=read.string("prodStack", lambda v: v.count("/") == 2, "organization/project/stack"),
        network=network,
        db_password=read.secret("dbPassword"),
        bootstrap=BootstrapSettings(
            k3s_version=read.string("k3sVersion", lambda v: v in K3S_TRAEFIK_CHART,
                                    "a k3s release whose bundled Traefik chart is recorded in K3S_TRAEFIK_CHART "
                                    f"(infra/settings.py): {', '.join(K3S_TRAEFIK_CHART)}"),
            wireguard_peers=_wireguard_peers(read, network.vpn_client_cidr),
            ssh_private_key=read.secret("sshPrivateKey"),
        ),
        cluster=ClusterSettings(
            acme_email=read.string("acmeEmail", is_email, "an email address such as ops@katforge.com"),
            image_tag=read.string("imageTag", lambda v: bool(re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", v)),
                                  "an image tag such as v1.2.3 or latest"),
            ghcr_username=read.string("ghcrUsername", lambda v: bool(re.match(r"^[A-Za-z0-9-]{1,39}$", v)),
                                      "a GitHub user name"),
            ghcr_token=read.secret("ghcrToken"),
        ),
        hosts=_hosts(read) if is_prod else None,
        email=_email(read) if is_prod else None,
        backups=BackupSettings(
            bucket=read.string("backupBucket", lambda v: bool(re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v)),
                               "an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)"),
            retention_days=read.integer("backupRetentionDays", 1, 3650),
            time_utc=read.string("backupTime", lambda v: bool(_TIME.match(v)), "a UTC time HH:MM such as 03:30"),
        ) if is_prod else None,
        pipeline=PipelineSettings(
            github_repository=read.string("githubRepository", lambda v: bool(_GITHUB_REPO.match(v)),
                                          "a GitHub repository as owner/name"),
        ) if is_prod else None,
    )
