"""The apps: one table, and what each stage's namespace holds to run them.

`APPS` is plain data; adding an app is one more row. The pure functions below turn a row into
Kubernetes manifests (dicts, camelCase as the API has them), so they can be checked without Pulumi;
`StageWorkloads` declares them in one namespace, and both stacks use it: prod for `default`, qa
for `qa`.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote

import pulumi
import pulumi_kubernetes as k8s

from infra import cluster, traefik_values
from infra.bootstrap import KubernetesProviders
from infra.email import SMTP_ENDPOINT as SMTP_HOST
from infra.settings import ClusterSettings, NetworkSettings, Stage

MIGRATE = ("php", "bin/console", "doctrine:migrations:migrate", "--no-interaction", "--allow-no-migration")
REGISTRY = "ghcr.io"
POSTGRES_PORT = 5432
SMTP_PORT = 587
HTTP_PORT = 8080  # unprivileged: the containers drop every capability


@dataclass(frozen=True)
class Route:
    """Where an app answers: a host, a path prefix, and what Traefik does on the way."""
    host: str
    path: str = "/"
    strip_prefix: bool = False  # the app expects to be served at `/`
    redirect_to: Optional[str] = None  # answer 301 to this host instead of serving
    add_slash: bool = False  # answer 301 to `path` + "/" (derived by `routes_in`, not written in the table)


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request_mib: int
    memory_limit_mib: int


@dataclass(frozen=True)
class App:
    name: str
    image: str  # repository, without tag: the ship pipeline owns the tag
    routes: Mapping[str, tuple[Route, ...]]  # stage -> routes; a stage without routes does not run the app
    resources: Resources
    port: int = HTTP_PORT
    migrate: tuple[str, ...] = MIGRATE
    env: Mapping[str, str] = field(default_factory=lambda: {"APP_ENV": "prod"})
    readiness_path: Optional[str] = "/"  # None: a TCP check, for an app with no page at a fixed path
    smtp: bool = False  # gets the SES SMTP credentials, and egress to the SMTP port
    https_egress: bool = False  # may call HTTPS services on the internet


# Memory limits are what the host's budget (infra/capacity.py) adds up, and the largest counts twice
# (its rollout surge). None is measured yet: `kubectl top pod` shows what a pod uses; raise a limit its
# pod outgrows (an OOMKilled restart) and give the memory back elsewhere, or the preview stops.
APPS: tuple[App, ...] = (
    # 256 MiB, not 320: 1.6 times its request, as web and stumper have 1.5; the host has no room for
    # 320 twice (infra/capacity.py).
    App("api", "ghcr.io/katforge/api.katforge.com", readiness_path=None, smtp=True,
        routes={"prod": (Route("api.katforge.com"),), "qa": (Route("qa.api.katforge.com"),)},
        resources=Resources(cpu_request="100m", cpu_limit="1", memory_request_mib=160, memory_limit_mib=256)),
    App("web", "ghcr.io/katforge/katforge.com",
        routes={"prod": (Route("katforge.com"), Route("www.katforge.com", redirect_to="katforge.com")),
                "qa": (Route("qa.katforge.com"),)},
        resources=Resources(cpu_request="50m", cpu_limit="500m", memory_request_mib=128, memory_limit_mib=192)),
    App("lextris", "ghcr.io/katforge/lextris.com",
        routes={"prod": (Route("katforge.com", path="/play/lextris/", strip_prefix=True),)},
        resources=Resources(cpu_request="25m", cpu_limit="250m", memory_request_mib=64, memory_limit_mib=128)),
    App("stumper", "ghcr.io/katforge/stumper.gg",
        routes={"prod": (Route("stumper.gg"),)},
        resources=Resources(cpu_request="50m", cpu_limit="500m", memory_request_mib=128, memory_limit_mib=192)),
)

# Stages whose routes admit only the VPN: a second lock behind their private-IP DNS names.
VPN_ONLY_STAGES = frozenset({"qa"})

# Stages whose pods get their request as their limit. qa serves the team over the VPN, a request or
# two at a time, so its PHP workers never reach the concurrency prod's limits allow for; prod's request
# (its usual working set) is room enough, and a release whose memory grew is OOM-killed in qa, before
# prod. The host's memory budget (infra/capacity.py) has no room for qa at prod's limits.
REQUEST_SIZED_STAGES = frozenset({"qa"})

# The Secrets every app namespace holds; the names are referenced from the pods.
PULL_SECRET = "ghcr"
DATABASE_SECRET = "database"
SMTP_SECRET = "smtp"

MANUAL_SNAPSHOT_POD = "pgdump"  # the pod name in the spec's manual backup command

# Image fields the ship pipeline sets with `kubectl set image`; `pulumi up` must leave them alone: ignored,
# they keep the value the refreshed state holds, the live one (infra/bootstrap.py kubernetes_providers).
IMAGE_FIELDS = ("spec.template.spec.containers[0].image", "spec.template.spec.initContainers[0].image")


# Outside the cluster, the VPC and link-local (instance metadata): what "the internet" means to egress rules.
PRIVATE_RANGES = ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")


# Findings of checkov (tests/test_checkov.py) that these objects answer by design. Each is skipped in
# the object itself, with its reason, where checkov reads it: annotation checkov.io/skip<N>: <check>=<why>.
IN_DEFAULT_NAMESPACE = ("CKV_K8S_21", "the spec runs prod in namespace default, as the live estate does")
APP_POD_SKIPS = (
    ("CKV_K8S_43", "the ship pipeline sets the image (kubectl set image, a release tag); Pulumi ignores it"),
    ("CKV_K8S_15", "release tags do not move: pulling if not present lets a pod restart while ghcr.io is down"),
    ("CKV_K8S_23", "the images choose their user: baseline Pod Security is enforced, restricted only warned"),
    ("CKV_K8S_40", "the images choose their user, and so its UID"),
    ("CKV_K8S_35", "the Symfony apps read DATABASE_URL and MAILER_DSN from the environment, not from files"),
    ("CKV_K8S_22", "a read-only root needs a volume at each path the images write to, which only they know"),
)


def object_metadata(name: str, namespace: str, *skips: tuple[str, str], labels: Optional[dict] = None) -> dict:
    """An app namespace object's metadata, with the checkov findings it answers by design."""
    skips = (*skips, IN_DEFAULT_NAMESPACE) if namespace == "default" else skips
    metadata = {"name": name, "namespace": namespace, **({"labels": labels} if labels else {})}
    if skips:
        metadata["annotations"] = {f"checkov.io/skip{n}": f"{check}={why}" for n, (check, why) in enumerate(skips, 1)}
    return metadata


def apps_in(stage: str, apps: Sequence[App] = APPS) -> list[App]:
    return [app for app in apps if app.routes.get(stage)]


def resources_in(app: App, stage: str) -> Resources:
    r = app.resources
    if stage in REQUEST_SIZED_STAGES:
        return Resources(r.cpu_request, r.cpu_limit, r.memory_request_mib, memory_limit_mib=r.memory_request_mib)
    return r


def routes_in(app: App, stage: str) -> list[Route]:
    """The app's routes in a stage, and for each path route ("/play/lextris/") the route of its
    slashless form, which redirects there instead of falling through to the host's `/` route."""
    routes = []
    for route in app.routes.get(stage, ()):
        routes.append(route)
        if route.path != "/" and route.path.endswith("/") and not route.redirect_to:
            routes.append(Route(route.host, path=route.path.rstrip("/"), add_slash=True))
    return routes


def routed_hosts(apps: Sequence[App] = APPS) -> list[str]:
    """Every name any stage routes: the names Traefik gets certificates for."""
    return sorted({route.host for app in apps for routes in app.routes.values() for route in routes})


# The live Deployments select their pods by `app: <name>` (the label `kubectl create deployment` gives),
# and a Deployment's selector cannot change (adopting one with another would replace it): the program
# selects by the same label, so its Services and network policies also match the pods that run before the
# first rollout. `make discover` shows each live selector; `make preflight` flags one that differs.
def selector(app: App) -> dict:
    return {"app": app.name}


def labels(app: App) -> dict:
    return {**selector(app), "app.kubernetes.io/name": app.name, "app.kubernetes.io/part-of": "katforge"}


def database_url(*, role: str, password: str, host: str, database: str, options: str = "") -> str:
    """`options`: a query string of libpq parameters, e.g. "?sslmode=require"."""
    return f"postgres://{quote(role, safe='')}:{quote(password, safe='')}@{host}:{POSTGRES_PORT}/{database}{options}"


@dataclass(frozen=True)
class PostgresEndpoint:
    """Where a stage's apps reach PostgreSQL: `host` goes into DATABASE_URL, `cidr` into their egress policy.
    The k3s host is one address; RDS is a name whose address moves (a failover, maintenance) within the
    VPC, so the policy admits the VPC's port 5432, where RDS's security group admits the nodes only.
    `switching`: the stage is `migrating`, and `make migrate-database` owns DATABASE_URL (it points the apps
    at RDS once the data has moved), so Pulumi leaves the Secret's value as it finds it."""
    host: pulumi.Input[str]
    cidr: str
    options: str = ""
    switching: bool = False

    @staticmethod
    def on_host(private_ip: str) -> "PostgresEndpoint":
        return PostgresEndpoint(host=private_ip, cidr=f"{private_ip}/32")

    @staticmethod
    def migrating(private_ip: str, vpc_cidr: str) -> "PostgresEndpoint":
        """The host's PostgreSQL until the tool switches the apps; their policy admits RDS already (the
        VPC's port 5432, the host's address among it), so the switch needs no `pulumi up` to work. Every
        run refreshes first, so a deploy between the switch and the commit of `database: rds` keeps the
        tool's DATABASE_URL rather than sending the apps back to the host's copy."""
        return PostgresEndpoint(host=private_ip, cidr=vpc_cidr, switching=True)


def mailer_dsn(*, username: str, password: str) -> str:
    return f"smtp://{quote(username, safe='')}:{quote(password, safe='')}@{SMTP_HOST}:{SMTP_PORT}"


def dockerconfigjson(*, username: str, token: str) -> str:
    auth = base64.b64encode(f"{username}:{token}".encode()).decode()
    return json.dumps({"auths": {REGISTRY: {"username": username, "password": token, "auth": auth}}}, sort_keys=True)


def _secret_env(secret: str, key: str) -> dict:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def container_env(app: App) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in sorted(app.env.items())]
    env.append(_secret_env(DATABASE_SECRET, "DATABASE_URL"))
    if app.smtp:
        env += [{"name": "SMTP_HOST", "value": SMTP_HOST}, {"name": "SMTP_PORT", "value": str(SMTP_PORT)}]
        env += [_secret_env(SMTP_SECRET, key) for key in ("SMTP_USERNAME", "SMTP_PASSWORD", "MAILER_DSN")]
    return env


def _container(app: App, r: Resources, name: str, image: str) -> dict:
    return {
        "name": name,
        "image": image,
        "env": container_env(app),
        "resources": {
            "requests": {"cpu": r.cpu_request, "memory": f"{r.memory_request_mib}Mi"},
            "limits": {"cpu": r.cpu_limit, "memory": f"{r.memory_limit_mib}Mi"},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


# On the pod template: a digest of the Secrets the app reads into its environment. A rotated password
# changes it, so the Deployment rolls and the new pods read the new value (env is read only at start).
SECRETS_DIGEST = "katforge.com/secrets-sha256"


def secrets_digest(values: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(values), sort_keys=True).encode()).hexdigest()


def deployment(app: App, *, stage: str, namespace: str, image_tag: str, secrets_sha256: str = "") -> dict:
    """The app's Deployment: its migrations run first, from the same image, in an init container."""
    image = f"{app.image}:{image_tag}"
    resources = resources_in(app, stage)
    readiness = ({"httpGet": {"path": app.readiness_path, "port": "http"}} if app.readiness_path
                 else {"tcpSocket": {"port": "http"}})
    main = _container(app, resources, app.name, image)
    main["ports"] = [{"name": "http", "containerPort": app.port, "protocol": "TCP"}]
    main["readinessProbe"] = {**readiness, "periodSeconds": 10, "failureThreshold": 3}
    main["livenessProbe"] = {"tcpSocket": {"port": "http"}, "initialDelaySeconds": 10, "periodSeconds": 20,
                             "failureThreshold": 3}
    migrate = _container(app, resources, "migrate", image)
    migrate["command"] = list(app.migrate)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(app.name, namespace, *APP_POD_SKIPS, labels=labels(app)),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(app)},
            "template": {
                "metadata": {"labels": labels(app), "annotations": {SECRETS_DIGEST: secrets_sha256}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "imagePullSecrets": [{"name": PULL_SECRET}],
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [migrate],
                    "containers": [main],
                },
            },
        },
    }


def service(app: App, *, namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(app.name, namespace, labels=labels(app)),
        "spec": {"selector": selector(app), "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                                      "protocol": "TCP"}]},
    }


def _network_policy(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _in_kube_system(pod_labels: Mapping[str, str]) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": dict(pod_labels)}}


def _to_internet(port: int) -> dict:
    return {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_RANGES)}}],
            "ports": [{"protocol": "TCP", "port": port}]}


DEFAULT_DENY = "default-deny"


def network_policies(apps: Sequence[App], *, namespace: str, postgres_host: str = "",
                     postgres_cidr: str = "") -> list[dict]:
    """Default deny, DNS for everyone, then per app exactly the flows it needs. PostgreSQL is
    `postgres_cidr`, or the address `postgres_host`."""
    policies = [
        _network_policy(DEFAULT_DENY, namespace, {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        _network_policy("allow-dns", namespace, {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [_in_kube_system(cluster.KUBE_DNS_LABELS)],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}],
        }),
    ]
    to_postgres = {"to": [{"ipBlock": {"cidr": postgres_cidr or f"{postgres_host}/32"}}],
                   "ports": [{"protocol": "TCP", "port": POSTGRES_PORT}]}
    # The spec's ad-hoc snapshot (`kubectl run ... pgdump -- pg_dump -h <host>`) labels its pod run=pgdump.
    policies.append(_network_policy("manual-snapshot", namespace, {
        "podSelector": {"matchLabels": {"run": MANUAL_SNAPSHOT_POD}}, "policyTypes": ["Egress"],
        "egress": [to_postgres]}))
    for app in apps:
        egress = [to_postgres]
        if app.smtp:
            egress.append(_to_internet(SMTP_PORT))
        if app.https_egress:
            egress.append(_to_internet(443))
        policies.append(_network_policy(app.name, namespace, {
            "podSelector": {"matchLabels": selector(app)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [_in_kube_system(traefik_values.POD_LABELS)],
                         "ports": [{"protocol": "TCP", "port": app.port}]}],
            "egress": egress,
        }))
    return policies


def ci_role(*, namespace: str) -> dict:
    """What `kubectl set image`, `kubectl rollout status` and `kubectl rollout undo` need, nothing more."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_metadata(cluster.CI_SERVICE_ACCOUNT, namespace),
        "rules": [
            # set image: get + patch; rollout status: get/list/watch; rollout undo: get + patch.
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "patch"]},
            # rollout undo lists the Deployment's ReplicaSets to find the previous revision.
            {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
        ],
    }


def ci_role_binding(*, namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_metadata(cluster.CI_SERVICE_ACCOUNT, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": cluster.CI_SERVICE_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": cluster.CI_SERVICE_ACCOUNT,
                      "namespace": cluster.CI_NAMESPACE}],
    }


# --- Traefik routing (CRDs, traefik.io/v1alpha1) -----------------------------------------------

TRAEFIK_API = "traefik.io/v1alpha1"
VPN_ONLY_MIDDLEWARE = "vpn-only"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def route_name(app: App, route: Route) -> str:
    return _slug(f"{app.name} {route.host} {route.path}") + ("-add-slash" if route.add_slash else "")


def _middleware(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": TRAEFIK_API, "kind": "Middleware", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def route_middlewares(app: App, route: Route, *, namespace: str) -> list[dict]:
    """The middlewares a route needs of its own (redirects, prefix strip)."""
    name = route_name(app, route)
    if route.add_slash:  # Traefik matches the regex against the whole URL, query included
        return [_middleware(name, namespace, {"redirectRegex": {
            "regex": f"^(https?://[^/?]+{re.escape(route.path)})(\\?.*)?$",
            "replacement": "${1}/${2}",
            "permanent": True,
        }})]
    if route.redirect_to:
        return [_middleware(name, namespace, {"redirectRegex": {
            "regex": f"^https?://{re.escape(route.host)}/(.*)",
            "replacement": f"https://{route.redirect_to}/${{1}}",
            "permanent": True,
        }})]
    if route.strip_prefix:
        return [_middleware(name, namespace, {"stripPrefix": {"prefixes": [route.path.rstrip("/")]}})]
    return []


# A source address no packet carries (RFC 1122, 3.2.1.3: a host never sends from the limited broadcast
# address): the allow list when the VPN host's address is not known, which admits nobody.
ADMIT_NOBODY = "255.255.255.255/32"


def vpn_only_middleware(vpn_private_ip: Optional[str], *, namespace: str) -> dict:
    """Only the VPN host: it masquerades its clients (infra/host/wireguard.sh), so what reaches Traefik
    from them has the VPN host's private address as its source, never a client's tunnel address."""
    source = f"{ipaddress.IPv4Address(vpn_private_ip)}/32" if vpn_private_ip else ADMIT_NOBODY
    return _middleware(VPN_ONLY_MIDDLEWARE, namespace, {"ipAllowList": {"sourceRange": [source]}})


def _warn_if_unknown(vpn_private_ip: Optional[str]) -> Optional[str]:
    if not vpn_private_ip:
        pulumi.log.warn("the prod stack exports no vpnPrivateIp yet: the VPN-only routes admit nobody until "
                        "`pulumi up` of prod has run and this stack runs again")
    return vpn_private_ip


def ingress_route(app: App, route: Route, *, namespace: str, vpn_only: bool) -> dict:
    match = f"Host(`{route.host}`)"
    if route.add_slash:
        match += f" && Path(`{route.path}`)"
    elif route.path != "/":
        match += f" && PathPrefix(`{route.path}`)"
    middlewares = [VPN_ONLY_MIDDLEWARE] if vpn_only else []
    middlewares += [m["metadata"]["name"] for m in route_middlewares(app, route, namespace=namespace)]
    rule = {"kind": "Rule", "match": match, "services": [{"name": app.name, "port": 80}]}
    if middlewares:
        rule["middlewares"] = [{"name": m} for m in middlewares]
    return {
        "apiVersion": TRAEFIK_API,
        "kind": "IngressRoute",
        "metadata": {"name": route_name(app, route), "namespace": namespace},
        "spec": {"entryPoints": ["websecure"], "routes": [rule],
                 "tls": {"certResolver": traefik_values.DNS_RESOLVER}},
    }


# --- the component -----------------------------------------------------------------------------


class StageWorkloads(pulumi.ComponentResource):
    """Everything one stage owns inside its namespace: apps, their Secrets, policies, routes, CI's Role."""

    def __init__(self, name: str, *, stage: Stage, network: NetworkSettings, settings: ClusterSettings,
                 db_password: pulumi.Input[str], smtp_username: pulumi.Input[str], smtp_password: pulumi.Input[str],
                 providers: KubernetesProviders, vpn_private_ip: pulumi.Input[Optional[str]], apps: Sequence[App] = APPS,
                 postgres: Optional[PostgresEndpoint] = None, opts: Optional[pulumi.ResourceOptions] = None):
        """`vpn_private_ip`: the VPN host's address in the VPC, the only source a VPN-only stage admits;
        `postgres`: where the stage's database is, the k3s host's PostgreSQL by default."""
        super().__init__("katforge:cluster:StageWorkloads", name, None, opts)
        postgres = postgres or PostgresEndpoint.on_host(network.k3s_private_ip)
        ns = stage.namespace
        apps = apps_in(stage.name, apps)

        def declare(resource_type: type, resource_name: str, *after: pulumi.Resource, **args):
            # Deployments through the client-side-apply provider: it never touches the images (bootstrap.py).
            provider = providers.deployments if resource_type is k8s.apps.v1.Deployment else providers.objects
            return cluster.kube_object(resource_type, resource_name, parent=self, provider=provider, after=after,
                                       **args)

        # `default` exists in every cluster: patch its labels rather than own it (never imported, never deleted).
        ns_metadata = cluster.namespace_metadata(ns, cluster.APP_POD_SECURITY)
        if ns == "default":
            namespace = k8s.core.v1.NamespacePatch(f"{name}-namespace", metadata=ns_metadata,
                                                   opts=pulumi.ResourceOptions(parent=self, provider=providers.objects))
        else:
            namespace = declare(k8s.core.v1.Namespace, f"{name}-namespace", metadata=ns_metadata)

        def custom(resource_name: str, manifest: dict, *after: pulumi.Resource) -> k8s.apiextensions.CustomResource:
            return declare(k8s.apiextensions.CustomResource, resource_name, *after, api_version=manifest["apiVersion"],
                           kind=manifest["kind"], metadata=manifest["metadata"], spec=manifest["spec"])

        env_values: dict[str, pulumi.Input[str]] = {}  # what the apps read from Secrets, by Secret/key

        def secret(key: str, type_: str, string_data: Mapping[str, pulumi.Input[str]],
                   options: Optional[Mapping[str, Any]] = None) -> k8s.core.v1.Secret:
            if key != PULL_SECRET:
                env_values.update({f"{key}/{k}": v for k, v in string_data.items()})
            return declare(k8s.core.v1.Secret, f"{name}-{key}", namespace, type=type_,
                           metadata=object_metadata(key, ns), options=options,
                           string_data={k: pulumi.Output.secret(v) for k, v in string_data.items()})

        secrets = [
            secret(PULL_SECRET, "kubernetes.io/dockerconfigjson", {".dockerconfigjson": pulumi.Output.from_input(
                settings.ghcr_token).apply(lambda token: dockerconfigjson(username=settings.ghcr_username,
                                                                          token=token))}),
            secret(DATABASE_SECRET, "Opaque", {"DATABASE_URL": pulumi.Output.all(db_password, postgres.host).apply(
                lambda values: database_url(role=stage.db_role, password=values[0], host=values[1],
                                            database=stage.database, options=postgres.options))},
                   options={"ignore_changes": ["stringData", "data"]} if postgres.switching else None),
        ]
        if any(app.smtp for app in apps):
            smtp = pulumi.Output.all(smtp_username, smtp_password)
            secrets.append(secret(SMTP_SECRET, "Opaque", {
                "SMTP_USERNAME": smtp_username,
                "SMTP_PASSWORD": smtp_password,
                "MAILER_DSN": smtp.apply(lambda c: mailer_dsn(username=c[0], password=c[1])),
            }))

        # Default deny last, once every allowance is in place: in a namespace whose pods already run, no pod
        # is ever denied, even for a moment, what its own policy allows.
        policies = network_policies(apps, namespace=ns, postgres_cidr=postgres.cidr)
        allowances = [declare(k8s.networking.v1.NetworkPolicy, f"{name}-netpol-{p['metadata']['name']}", namespace,
                              metadata=p["metadata"], spec=p["spec"])
                      for p in policies if p["metadata"]["name"] != DEFAULT_DENY]
        [deny] = [p for p in policies if p["metadata"]["name"] == DEFAULT_DENY]
        declare(k8s.networking.v1.NetworkPolicy, f"{name}-netpol-{DEFAULT_DENY}", namespace, *allowances,
                metadata=deny["metadata"], spec=deny["spec"])

        role = ci_role(namespace=ns)
        declare(k8s.rbac.v1.Role, f"{name}-ci-role", namespace, metadata=role["metadata"], rules=role["rules"])
        binding = ci_role_binding(namespace=ns)
        declare(k8s.rbac.v1.RoleBinding, f"{name}-ci-role-binding", namespace, metadata=binding["metadata"],
                role_ref=binding["roleRef"], subjects=binding["subjects"])

        vpn_only = stage.name in VPN_ONLY_STAGES
        route_deps: list[pulumi.Resource] = [namespace]
        if vpn_only:
            allow_list = _middleware(VPN_ONLY_MIDDLEWARE, ns, pulumi.Output.from_input(vpn_private_ip).apply(
                lambda ip: vpn_only_middleware(_warn_if_unknown(ip), namespace=ns)["spec"]))
            route_deps.append(custom(f"{name}-mw-{VPN_ONLY_MIDDLEWARE}", allow_list, namespace))

        def digest_for(app: App) -> pulumi.Output[str]:
            read = {k: v for k, v in env_values.items() if app.smtp or not k.startswith(f"{SMTP_SECRET}/")}
            # A digest of high-entropy credentials reveals none of them: shown, not hidden as a secret.
            return pulumi.Output.unsecret(pulumi.Output.from_input(read).apply(secrets_digest))

        for app in apps:
            manifest = deployment(app, stage=stage.name, namespace=ns, image_tag=settings.image_tags[app.name],
                                  secrets_sha256=digest_for(app))
            resource_name = f"{name}-{app.name}"
            declare(k8s.apps.v1.Deployment, resource_name, *secrets, metadata=manifest["metadata"],
                    spec=manifest["spec"], options={"ignore_changes": list(IMAGE_FIELDS)})
            svc = service(app, namespace=ns)
            declare(k8s.core.v1.Service, f"{name}-{app.name}-service", namespace, metadata=svc["metadata"],
                    spec=svc["spec"])
            for route in routes_in(app, stage.name):
                own = [custom(f"{name}-mw-{m['metadata']['name']}", m, namespace)
                       for m in route_middlewares(app, route, namespace=ns)]
                custom(f"{name}-route-{route_name(app, route)}",
                       ingress_route(app, route, namespace=ns, vpn_only=vpn_only), *route_deps, *own)

        self.register_outputs({"namespace": ns, "apps": [app.name for app in apps]})
