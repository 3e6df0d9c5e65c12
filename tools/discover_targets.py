"""What `make discover` looks for: every name the program declares for a stack, read from the stack's
effective config and its offline plan, so discovery follows the program instead of a list of its own.

The plan gives the account-unique names (IAM users, roles, key pair, buckets, SES names, DNS records)
and every Kubernetes object with its kind; the config gives the addresses the live hosts are found by.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from infra.dns import ZONES
from infra.settings import REGION, STAGES
from tools.offline import PROJECT, Plan, effective_config, evaluate_cached

# Besides what a stack declares: the namespaces the spec names, and the PVC in which k3s's Traefik keeps
# its certificates (the chart names it after the release, kube-system/traefik).
SPEC_NAMESPACES = ("default", "qa", "ci")
TRAEFIK_PVC = ("kube-system", "traefik")


@dataclass(frozen=True, order=True)
class KubeObject:
    """One Kubernetes object the program declares, by the type token of its Pulumi resource."""
    api_version: str
    kind: str
    namespace: Optional[str]
    name: str
    type: str  # e.g. kubernetes:apps/v1:Deployment; "" for objects discovery adds itself

    @property
    def import_id(self) -> Optional[str]:
        """pulumi-kubernetes imports `namespace/name` (a cluster-wide object: `name`); a *Patch resource
        takes over fields of an existing object and is never imported."""
        if self.type.endswith("Patch"):
            return None
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def key(self) -> str:
        """How the JSON names the object: `Kind namespace/name` (or `Kind name`)."""
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Targets:
    stack: str
    region: str
    db_role: str  # the stage's PostgreSQL login role, whose password is katforge:dbPassword
    k3s_private_ip: str
    k3s_public_ip: str
    vpn_public_ip: str
    instances: tuple[str, ...]  # host roles the stack declares: "k3s", "vpn"
    iam_users: tuple[str, ...]
    iam_roles: tuple[str, ...]
    instance_profiles: tuple[str, ...]
    iam_policies: tuple[str, ...]
    key_pairs: tuple[str, ...]
    oidc_urls: tuple[str, ...]  # without https://, as IAM reports them
    buckets: tuple[str, ...]
    ses_domains: tuple[str, ...]
    configuration_sets: tuple[str, ...]
    zones: tuple[str, ...]
    records: tuple[tuple[str, str], ...]  # (name, type); DKIM names come from SES at discovery
    kube_objects: tuple[KubeObject, ...]
    hosts: tuple[str, ...]  # hosts to read over SSH: "k3s" (k3s and PostgreSQL), "vpn" (WireGuard)

def _inputs(plan: Plan, token: str, key: str) -> tuple[str, ...]:
    return tuple(sorted({r.raw_inputs[key] for r in plan.of_type(token) if isinstance(r.raw_inputs.get(key), str)}))


def kube_object(resource) -> KubeObject:
    # kubernetes:<group>/<version>:<Kind>; the core group is written `core`, and a *Patch acts on its Kind.
    group_version, kind = resource.type.split(":")[1:]
    group, version = group_version.split("/")
    metadata = resource.raw_inputs.get("metadata") or {}
    return KubeObject(api_version=version if group == "core" else f"{group}/{version}",
                      kind=kind.removesuffix("Patch"), namespace=metadata.get("namespace"),
                      name=metadata["name"], type=resource.type)


def kube_objects(plan: Plan) -> tuple[KubeObject, ...]:
    declared = {kube_object(r) for r in plan.resources
                if r.type.startswith("kubernetes:") and r.custom and "name" in (r.raw_inputs.get("metadata") or {})}
    names = {(o.kind, o.namespace, o.name) for o in declared}
    extra = {KubeObject("v1", "Namespace", None, ns, "") for ns in SPEC_NAMESPACES if ("Namespace", None, ns) not in names}
    if any(o.kind == "HelmChartConfig" and (o.namespace, o.name) == TRAEFIK_PVC for o in declared):
        extra.add(KubeObject("v1", "PersistentVolumeClaim", *TRAEFIK_PVC, ""))
    return tuple(sorted(declared | extra))


def targets(stack: str, plan: Optional[Plan] = None) -> Targets:
    plan = plan or evaluate_cached(stack)
    config, _ = effective_config(stack)

    def setting(key: str) -> str:
        return config[f"{PROJECT}:{key}"]

    instances = tuple(sorted(r.name for r in plan.of_type("aws:ec2/instance:Instance")))
    records = tuple(sorted({(r.raw_inputs["name"], r.raw_inputs["type"])
                            for r in plan.of_type("aws:route53/record:Record")}))
    return Targets(
        stack=stack,
        region=REGION,
        db_role=STAGES[stack].db_role,
        k3s_private_ip=setting("k3sPrivateIp"),
        k3s_public_ip=setting("k3sPublicIp"),
        vpn_public_ip=setting("vpnPublicIp"),
        instances=instances,
        iam_users=_inputs(plan, "aws:iam/user:User", "name"),
        iam_roles=_inputs(plan, "aws:iam/role:Role", "name"),
        instance_profiles=_inputs(plan, "aws:iam/instanceProfile:InstanceProfile", "name"),
        iam_policies=_inputs(plan, "aws:iam/policy:Policy", "name"),
        key_pairs=_inputs(plan, "aws:ec2/keyPair:KeyPair", "keyName"),
        oidc_urls=tuple(u.removeprefix("https://") for u in
                        _inputs(plan, "aws:iam/openIdConnectProvider:OpenIdConnectProvider", "url")),
        buckets=_inputs(plan, "aws:s3/bucket:Bucket", "bucket"),
        ses_domains=_inputs(plan, "aws:ses/domainIdentity:DomainIdentity", "domain"),
        configuration_sets=_inputs(plan, "aws:ses/configurationSet:ConfigurationSet", "name"),
        zones=tuple(sorted(ZONES)),
        records=records,
        kube_objects=kube_objects(plan),
        # PostgreSQL on the k3s host holds every stage's database; the VPN host belongs to the stack
        # that declares it.
        hosts=("k3s", "vpn") if "vpn" in instances else ("k3s",),
    )

