"""A small Kubernetes API server for tests, on 127.0.0.1, and the objects a live k3s of the estate holds.

`KubeApi` answers the REST paths a client uses: GET of one object (`/api/v1/namespaces/<ns>/<plural>/
<name>`, `/apis/<group>/<version>/...`, cluster-wide objects without `namespaces/<ns>`) and lists, with
`labelSelector` (=, ==, !=, exists, !exists, in, notin). It checks the bearer token of its kubeconfig,
answers errors as Kubernetes `Status` objects, and refuses to serve a built-in object that Kubernetes
1.34 would not accept (kubernetes-validate, strict). More endpoints (watch, pod logs) plug in with
`KubeApi.route`: a handler gets the server, the matched path and the query, and returns a `Reply`.

`live_estate()` is the cluster as the spec's operators left it, not as the program would make it:
the four apps' Deployments and Services in `default`, two in `qa`, namespace `ci` with CI's account,
k3s's Traefik configured by the manifest file /var/lib/rancher/k3s/server/manifests/traefik-config.yaml
(so HelmChartConfig kube-system/traefik carries the deploy controller's annotations and an Addon
tracks it, with the DNS-challenge credentials inline, as the spec says), and Traefik's certificate PVC.
Values in `PLANTED` are secrets planted in it: no discovery output may ever show one. The session
fixture `kube_api` serves it, with `pytest_plugins = ["tests.kube_api"]` in a test module.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Optional, Union
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml

KUBERNETES_VERSION = "1.34.0"
CREATED = "2025-03-02T10:15:00Z"  # when the estate was set up by hand


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True
    builtin: bool = True  # in Kubernetes' own schema, so validated before it is served


KINDS = (
    Kind("v1", "Namespace", "namespaces", namespaced=False),
    Kind("v1", "Secret", "secrets"),
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Kind("v1", "Pod", "pods"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("apps/v1", "ReplicaSet", "replicasets"),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    Kind("helm.cattle.io/v1", "HelmChart", "helmcharts", builtin=False),
    Kind("helm.cattle.io/v1", "HelmChartConfig", "helmchartconfigs", builtin=False),
    Kind("k3s.cattle.io/v1", "Addon", "addons", builtin=False),
    Kind("traefik.io/v1alpha1", "IngressRoute", "ingressroutes", builtin=False),
    Kind("traefik.io/v1alpha1", "Middleware", "middlewares", builtin=False),
)

# /api/v1[/namespaces/<ns>]/<plural>[/<name>[/<subresource>]], and /apis/<group>/<version>/... alike.
RESOURCE_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                           r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)"
                           r"(?:/(?P<name>[^/]+))?(?:/(?P<subresource>[^/]+))?$")


@dataclass
class Reply:
    """A JSON object, or a stream: an iterable of byte chunks sent as they come (chunked encoding), as
    the API server sends a watch or a followed log."""
    status: int
    body: Union[dict, Iterable[bytes]]
    content_type: str = "application/json"


def status(code: int, reason: str, message: str) -> Reply:
    return Reply(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": message, "reason": reason, "code": code})


# --- label selectors -------------------------------------------------------------------------------

_REQUIREMENT = re.compile(r"\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)"
                          r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
                          r"|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)")


def selector(text: str) -> Callable[[dict], bool]:
    """A label selector as Kubernetes parses it (equality- and set-based), as a predicate on labels."""
    tests: list[Callable[[dict], bool]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        m = _REQUIREMENT.match(text, position)
        if not m or m.end() == position:
            raise ValueError(f"unable to parse requirement: {text[position:]!r}")
        position = m.end()
        if m["absent"]:
            tests.append(lambda labels, k=m["absent"]: k not in labels)
        elif m["op"]:
            want, key = m["value"], m["key"]
            tests.append((lambda labels, k=key, v=want: labels.get(k) != v) if m["op"] == "!=" else
                         (lambda labels, k=key, v=want: labels.get(k) == v))
        elif m["set"]:
            values = {v.strip() for v in m["values"].split(",")}
            tests.append((lambda labels, k=m["key"], vs=values: labels.get(k) in vs) if m["set"] == "in" else
                         (lambda labels, k=m["key"], vs=values: labels.get(k) not in vs))
        else:
            tests.append(lambda labels, k=m["key"]: k in labels)
    return lambda labels: all(test(labels) for test in tests)


# --- the server ------------------------------------------------------------------------------------

Handler = Callable[["KubeApi", re.Match, dict], Reply]


@dataclass
class KubeApi:
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    kinds: tuple[Kind, ...] = KINDS

    def __post_init__(self) -> None:
        self.objects: dict[tuple[Kind, Optional[str], str], dict] = {}
        self.lock = threading.Lock()
        self.version = 0
        self.routes: list[tuple[str, re.Pattern, Handler]] = []
        self.requests: list[str] = []  # "METHOD path?query" of every request, in order
        self.route("GET", RESOURCE_PATH)(_get_or_list)
        self.server: Optional[ThreadingHTTPServer] = None

    # objects -----------------------------------------------------------------------------------

    def kind_of(self, api_version: str, kind: str) -> Kind:
        return next(k for k in self.kinds if (k.api_version, k.kind) == (api_version, kind))

    def add(self, *objects: dict) -> None:
        """Serve these objects, as the API server stores them: a built-in one must be valid
        Kubernetes 1.34; uid, resourceVersion and creationTimestamp are filled in when absent."""
        for obj in objects:
            kind = self.kind_of(obj["apiVersion"], obj["kind"])
            meta = obj["metadata"]
            namespace = meta.get("namespace") if kind.namespaced else None
            if kind.namespaced and not namespace:
                raise ValueError(f"{kind.kind} {meta['name']} needs a namespace")
            with self.lock:
                self.version += 1
                meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind.kind}/{namespace}/{meta['name']}")))
                meta.setdefault("creationTimestamp", CREATED)
                meta["resourceVersion"] = str(self.version)
            if kind.builtin:
                try:
                    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as error:
                    raise ValueError(f"{kind.kind} {namespace}/{meta['name']} is not valid Kubernetes "
                                     f"{KUBERNETES_VERSION}: {error.message} at {list(error.path)}") from None
            with self.lock:
                self.objects[(kind, namespace, meta["name"])] = obj

    def remove(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> None:
        with self.lock:
            del self.objects[(self.kind_of(api_version, kind), namespace, name)]

    # routes ------------------------------------------------------------------------------------

    def route(self, method: str, pattern: re.Pattern) -> Callable[[Handler], Handler]:
        """Register a handler; later routes come first, so a specific path can take over from the
        generic resource path (for example `.../pods/<name>/log`)."""
        def register(handler: Handler) -> Handler:
            self.routes.insert(0, (method, pattern, handler))
            return handler
        return register

    def handle(self, method: str, target: str, authorization: Optional[str]) -> Reply:
        self.requests.append(f"{method} {target}")
        if authorization != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        for route_method, pattern, handler in self.routes:
            match = pattern.match(url.path)
            if match and route_method == method:
                return handler(self, match, query)
        return status(404, "NotFound", f"the server could not find the requested resource ({method} {url.path})")

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "KubeApi":
        api = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked streams need it
            # Headers and body go out in separate writes: without this each reply on a kept-alive
            # connection waits ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                reply = api.handle("GET", self.path, self.headers.get("Authorization"))
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                if isinstance(reply.body, dict):
                    body = json.dumps(reply.body).encode()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in reply.body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path, context: str = "katforge") -> Path:
        """A kubeconfig for this server, as an operator's ~/.kube/katforge-config would be (mode 0600)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        }))
        path.chmod(0o600)
        return path


def _get_or_list(api: KubeApi, match: re.Match, query: dict) -> Reply:
    api_version = match["core"] or f"{match['group']}/{match['version']}"
    kind = next((k for k in api.kinds if (k.api_version, k.plural) == (api_version, match["plural"])), None)
    if kind is None or match["subresource"]:
        return status(404, "NotFound", f"the server could not find the requested resource ({match.string})")
    namespace = match["namespace"]
    with api.lock:
        objects = dict(api.objects)
    if match["name"]:
        obj = objects.get((kind, namespace if kind.namespaced else None, match["name"]))
        if obj is None:
            return status(404, "NotFound", f'{kind.plural} "{match["name"]}" not found')
        return Reply(200, obj)
    try:
        wanted = selector(query.get("labelSelector", ""))
    except ValueError as error:
        return status(400, "BadRequest", str(error))
    items = [o for (k, ns, _), o in sorted(objects.items(), key=lambda item: (item[0][1] or "", item[0][2]))
             if k == kind and (namespace is None or ns == namespace) and wanted(o["metadata"].get("labels", {}))]
    return Reply(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                       "metadata": {"resourceVersion": str(api.version)}, "items": items})


# --- the live estate -------------------------------------------------------------------------------

APPS = {"default": ("api", "web", "lextris", "stumper"), "qa": ("api", "web")}
IMAGES = {"api": "ghcr.io/katforge/api.katforge.com", "web": "ghcr.io/katforge/katforge.com",
          "lextris": "ghcr.io/katforge/lextris.com", "stumper": "ghcr.io/katforge/stumper.gg"}
TRAEFIK_MANIFEST = "/var/lib/rancher/k3s/server/manifests/traefik-config.yaml"
TRAEFIK_ADDON = "traefik-config"  # k3s names an Addon after its file, up to the first dot

# Secrets planted in the live cluster: discovery must never print or write any of them.
PLANTED = {
    "ghcr_token": "ghp_PLANTEDghcrTokenNeverShown0000000000",
    "route53_key_id": "AKIAPLANTEDKEYID0000",
    "route53_secret": "PLANTED/route53+SecretAccessKey/NeverShown00",
    "database_url": "postgresql://postgres:PLANTED-db-password@172.31.14.98:5432/katforge",
}

# k3s's deploy controller applies a manifest's objects with wrangler's apply, owned by the file's
# Addon: wrangler's GetLabelsAndAnnotations sets these annotations, and the hash label is sha1 of the
# set ID, owner GVK, name and namespace in that order (rancher/wrangler pkg/apply/desiredset_apply.go;
# k3s-io/k3s pkg/deploy/controller.go, deploy(): apply.WithOwner(&addon)).
OWNER_GVK = "k3s.cattle.io/v1, Kind=Addon"


def deploy_controller_metadata(addon: str, applied: dict) -> tuple[dict, dict]:
    annotations = {"objectset.rio.cattle.io/id": "", "objectset.rio.cattle.io/owner-gvk": OWNER_GVK,
                   "objectset.rio.cattle.io/owner-name": addon, "objectset.rio.cattle.io/owner-namespace": "kube-system",
                   # wrangler keeps the applied object, gzipped and base64-encoded: secrets and all.
                   "objectset.rio.cattle.io/applied": base64.b64encode(gzip.compress(
                       json.dumps(applied, sort_keys=True).encode(), mtime=0)).decode()}
    digest = hashlib.sha1("".join([annotations["objectset.rio.cattle.io/id"], OWNER_GVK, addon, "kube-system"])
                          .encode()).hexdigest()
    return annotations, {"objectset.rio.cattle.io/hash": digest}


def _namespace(name: str, labels: Optional[dict] = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def _deployment(namespace: str, app: str) -> dict:
    labels = {"app": app}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": namespace, "generation": 7, "labels": labels,
                     "annotations": {"deployment.kubernetes.io/revision": "7"},
                     "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                        "apiVersion": "apps/v1", "time": CREATED, "fieldsType": "FieldsV1",
                                        "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                                       {"manager": "kubectl", "operation": "Update", "apiVersion": "apps/v1",
                                        "time": CREATED, "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
        "spec": {
            "replicas": 1, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "imagePullSecrets": [{"name": "ghcr"}],
                    "containers": [{"name": app, "image": f"{IMAGES[app]}:v1.4.2", "imagePullPolicy": "IfNotPresent",
                                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                    "env": [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {
                                        "name": "app-env", "key": "DATABASE_URL"}}}],
                                    "resources": {}, "terminationMessagePath": "/dev/termination-log",
                                    "terminationMessagePolicy": "File"}],
                    "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                    "securityContext": {}, "terminationGracePeriodSeconds": 30,
                },
            },
        },
        "status": {"observedGeneration": 7, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
                   "availableReplicas": 1,
                   "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                                   "message": "Deployment has minimum availability.",
                                   "lastUpdateTime": CREATED, "lastTransitionTime": CREATED}]},
    }


def _service(namespace: str, app: str, cluster_ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": app, "namespace": namespace, "labels": {"app": app}},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                     "sessionAffinity": "None", "selector": {"app": app},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {}}}


def _secret(namespace: str, name: str, type_: str, data: dict[str, str]) -> dict:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    applied = {"apiVersion": "v1", "kind": "Secret", "type": type_, "data": encoded,
               "metadata": {"annotations": {}, "name": name, "namespace": namespace}}
    # `kubectl apply` keeps the whole object, data included, in this annotation.
    return {"apiVersion": "v1", "kind": "Secret", "type": type_, "data": encoded,
            "metadata": {"name": name, "namespace": namespace, "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps(applied) + "\n"}}}


def traefik_values() -> str:
    """The live valuesContent: the DNS challenge's IAM key inline, as the spec describes it."""
    return yaml.safe_dump({
        "additionalArguments": ["--certificatesresolvers.letsencrypt.acme.dnschallenge=true",
                                "--certificatesresolvers.letsencrypt.acme.dnschallenge.provider=route53",
                                "--certificatesresolvers.letsencrypt.acme.email=ops@katforge.com",
                                "--certificatesresolvers.letsencrypt.acme.storage=/data/acme.json"],
        "env": [{"name": "AWS_ACCESS_KEY_ID", "value": PLANTED["route53_key_id"]},
                {"name": "AWS_SECRET_ACCESS_KEY", "value": PLANTED["route53_secret"]},
                {"name": "AWS_REGION", "value": "us-east-2"}],
        "persistence": {"enabled": True},
    }, sort_keys=False)


def traefik_objects(owned_by_file: bool = True) -> list[dict]:
    """HelmChartConfig kube-system/traefik (applied from the manifest file by k3s, or by hand), its Addon,
    and the PVC the chart made for the certificates."""
    spec = {"valuesContent": traefik_values()}
    config = {"apiVersion": "helm.cattle.io/v1", "kind": "HelmChartConfig",
              "metadata": {"name": "traefik", "namespace": "kube-system"}, "spec": spec}
    objects = [config]
    if owned_by_file:
        annotations, labels = deploy_controller_metadata(TRAEFIK_ADDON, config)
        config["metadata"] = {**config["metadata"], "annotations": annotations, "labels": labels}
        objects.append({"apiVersion": "k3s.cattle.io/v1", "kind": "Addon",
                        "metadata": {"name": TRAEFIK_ADDON, "namespace": "kube-system",
                                     "annotations": {"addon.k3s.cattle.io/gvks": "helm.cattle.io/v1, Kind=HelmChartConfig"}},
                        "spec": {"source": TRAEFIK_MANIFEST,
                                 "checksum": hashlib.sha256(traefik_values().encode()).hexdigest()}})
    volume = "pvc-3b7c2d4e-5f60-4a1b-8c9d-0e1f2a3b4c5d"
    objects.append({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "traefik", "namespace": "kube-system",
                     "labels": {"app.kubernetes.io/instance": "traefik-kube-system",
                                "app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "traefik"},
                     "annotations": {"helm.sh/resource-policy": "keep", "meta.helm.sh/release-name": "traefik",
                                     "meta.helm.sh/release-namespace": "kube-system",
                                     "pv.kubernetes.io/bind-completed": "yes",
                                     "volume.kubernetes.io/selected-node": "ip-172-31-14-98",
                                     "volume.kubernetes.io/storage-provisioner": "rancher.io/local-path"},
                     "finalizers": ["kubernetes.io/pvc-protection"]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "128Mi"}},
                 "storageClassName": "local-path", "volumeMode": "Filesystem", "volumeName": volume},
        "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "128Mi"}},
    })
    return objects


def live_estate(*, traefik_owned_by_file: bool = True) -> list[dict]:
    objects = [_namespace(n) for n in ("default", "kube-system", "kube-public", "kube-node-lease", "qa", "ci")]
    for octet, (namespace, app) in enumerate(((ns, app) for ns, apps in APPS.items() for app in apps), start=10):
        objects += [_deployment(namespace, app), _service(namespace, app, f"10.43.0.{octet}")]
    for namespace in APPS:
        registry = json.dumps({"auths": {"ghcr.io": {"username": "katforge-deploy", "password": PLANTED["ghcr_token"]}}})
        objects.append(_secret(namespace, "ghcr", "kubernetes.io/dockerconfigjson", {".dockerconfigjson": registry}))
        objects.append(_secret(namespace, "app-env", "Opaque", {"DATABASE_URL": PLANTED["database_url"]}))
    objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "github-actions", "namespace": "ci"}})
    return objects + traefik_objects(traefik_owned_by_file)


def serve(objects: Iterable[dict]) -> KubeApi:
    api = KubeApi().start()
    api.add(*objects)
    return api


@pytest.fixture(scope="session")
def kube_api():
    """The live estate's cluster, served for the whole session (read-only: build your own KubeApi to change it)."""
    api = serve(live_estate())
    try:
        yield api
    finally:
        api.stop()
