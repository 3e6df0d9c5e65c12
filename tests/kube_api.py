"""A small Kubernetes API server for tests, on 127.0.0.1, and the objects a live k3s of the estate holds.

`KubeApi` answers the REST paths a client uses: GET of one object (`/api/v1/namespaces/<ns>/<plural>/
<name>`, `/apis/<group>/<version>/...`, cluster-wide objects without `namespaces/<ns>`), lists with
`labelSelector` (=, ==, !=, exists, !exists, in, notin) and `fieldSelector` (metadata.name and
metadata.namespace), watches (`?watch=true`: a stream of JSON events, one a line, from a
`resourceVersion` or from the current state), pod logs (`.../pods/<name>/log`, `container`, `sinceSeconds`,
`previous`, `follow` streamed until the container ends), and PATCH (JSON patch, merge patch; a strategic
merge patch is applied as a merge patch). It checks the bearer token of its kubeconfig, answers errors as
Kubernetes `Status` objects, and refuses to store a built-in object that Kubernetes 1.34 would not accept
(kubernetes-validate, strict), a patched one included. More endpoints plug in with `KubeApi.route`: a
handler gets the server, the matched path and the query (and the body, for a method that has one), and
returns a `Reply`. `KubeApi.answering` makes requests fail for a while: an error Status, a proxy's bare
reply, or a stream that breaks off (`Reset`).

`live_estate()` is the cluster as the spec's operators left it, not as the program would make it:
the four apps' Deployments and Services in `default`, two in `qa`, namespace `ci` with CI's account,
k3s's Traefik configured by the manifest file /var/lib/rancher/k3s/server/manifests/traefik-config.yaml
(so HelmChartConfig kube-system/traefik carries the deploy controller's annotations and an Addon
tracks it, with the DNS-challenge credentials inline, as the spec says), and Traefik's certificate PVC.
Values in `PLANTED` are secrets planted in it: no discovery output may ever show one. The session
fixture `kube_api` serves it, with `pytest_plugins = ["tests.kube_api"]` in a test module.

`running_estate()` is the cluster after the program's first deployment, as `hearth` reads it: the
program's own Deployments (infra/apps.py) with their ReplicaSet history and running pods writing logs,
and the node. `DeploymentController` plays kube-controller-manager's part when a Deployment's pod
template changes: the ReplicaSet of that template (an old one reused, as a rollback does, or a new one)
gets the next revision, and its pod starts, fails its migration, or crash-loops, as the test chose.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import datetime
import gzip
import hashlib
import json
import re
import secrets
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union
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
    Kind("v1", "Node", "nodes", namespaced=False),
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
    the API server sends a watch or a followed log. A stream that raises `Reset` ends in a TCP reset."""
    status: int
    body: Union[dict, Iterable[bytes]]
    content_type: str = "application/json"


class Reset(Exception):
    """Raised by a stream's body: the connection is reset there, mid-stream (RST, no final chunk)."""


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


_FIELD = re.compile(r"^\s*(?P<key>[\w.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*$")
FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace")}


def field_selector(text: str) -> Callable[[dict], bool]:
    """A field selector on the fields every kind supports (metadata.name, metadata.namespace)."""
    tests: list[Callable[[dict], bool]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FIELD.match(part)
        if not m or m["key"] not in FIELDS:
            raise ValueError(f"field label not supported: {part!r}")
        section, key = FIELDS[m["key"]]
        equal = m["op"] != "!="
        tests.append(lambda obj, s=section, k=key, v=m["value"], eq=equal: (obj.get(s, {}).get(k) == v) is eq)
    return lambda obj: all(test(obj) for test in tests)


# --- patches ---------------------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902's add, remove, replace (what `kubectl rollout undo` sends) and test (which fails the whole
    patch when a value is not what the client expected), on a copy."""
    document = copy.deepcopy(document)
    for op in operations:
        *parents, last = _pointer(op["path"])
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if op["op"] == "add":
                target.insert(index, op["value"])
            elif op["op"] == "remove":
                del target[index]
            elif op["op"] == "replace":
                target[index] = op["value"]
            elif op["op"] == "test":
                if target[index] != op["value"]:
                    raise ValueError(f"test failed: {op['path']} is not {op['value']!r}")
            else:
                raise ValueError(f"unsupported operation {op['op']!r}")
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace" and last not in target:
                raise ValueError(f"replace of a missing member: {op['path']}")
            target[last] = op["value"]
        elif op["op"] == "remove":
            del target[last]
        elif op["op"] == "test":
            if last not in target or target[last] != op["value"]:
                raise ValueError(f"test failed: {op['path']} is not {op['value']!r}")
        else:
            raise ValueError(f"unsupported operation {op['op']!r}")
    return document


def merge_patch(document, patch):
    """RFC 7386: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(document) if isinstance(document, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- the server ------------------------------------------------------------------------------------

Handler = Callable[..., Reply]


@dataclass(frozen=True)
class Body:
    """A request's body, for the handlers of methods that have one."""
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Event:
    version: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: Kind
    namespace: Optional[str]
    object: dict  # as it was then


@dataclass
class ContainerLog:
    """One run of a container: what it wrote (when, line), and whether it has ended."""
    lines: list[tuple[float, str]] = field(default_factory=list)
    ended: bool = False


def _frozen(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


@dataclass
class KubeApi:
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    kinds: tuple[Kind, ...] = KINDS

    def __post_init__(self) -> None:
        self.objects: dict[tuple[Kind, Optional[str], str], dict] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on every change of objects or logs
        self.version = 0
        self.events: list[Event] = []
        self.logs: dict[tuple[str, str, str], list[ContainerLog]] = {}  # (namespace, pod, container) -> runs
        self.listeners: list[Callable[[Event], None]] = []
        self.stopping = False
        self.routes: list[tuple[str, re.Pattern, Handler]] = []
        self.requests: list[str] = []  # "METHOD path?query" of every request, in order
        self.route("GET", RESOURCE_PATH)(_get_or_list)
        self.route("PATCH", RESOURCE_PATH)(_patch)
        self.route("GET", POD_LOG_PATH)(_pod_log)
        self.server: Optional[ThreadingHTTPServer] = None

    # objects -----------------------------------------------------------------------------------

    def kind_of(self, api_version: str, kind: str) -> Kind:
        return next(k for k in self.kinds if (k.api_version, k.kind) == (api_version, kind))

    def add(self, *objects: dict) -> None:
        """Serve these objects, as the API server stores them: a built-in one must be valid
        Kubernetes 1.34; uid, resourceVersion and creationTimestamp are filled in when absent. An object
        already served at that name is replaced (a MODIFIED event)."""
        for obj in objects:
            kind = self.kind_of(obj["apiVersion"], obj["kind"])
            meta = obj["metadata"]
            namespace = meta.get("namespace") if kind.namespaced else None
            if kind.namespaced and not namespace:
                raise ValueError(f"{kind.kind} {meta['name']} needs a namespace")
            meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind.kind}/{namespace}/{meta['name']}")))
            meta.setdefault("creationTimestamp", CREATED)
            if kind.builtin:
                try:
                    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as error:
                    raise ValueError(f"{kind.kind} {namespace}/{meta['name']} is not valid Kubernetes "
                                     f"{KUBERNETES_VERSION}: {error.message} at {list(error.path)}") from None
            with self.lock:
                self.version += 1
                meta["resourceVersion"] = str(self.version)
                key = (kind, namespace, meta["name"])
                event = Event(self.version, "MODIFIED" if key in self.objects else "ADDED", kind, namespace,
                              _frozen(obj))
                self.objects[key] = obj
                self.events.append(event)
                self.changed.notify_all()
            self._tell(event)

    def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> dict:
        """A copy of a served object, to change and `add` again."""
        with self.lock:
            return copy.deepcopy(self.objects[(self.kind_of(api_version, kind), namespace, name)])

    def remove(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> None:
        with self.lock:
            key = (self.kind_of(api_version, kind), namespace, name)
            obj = _frozen(self.objects.pop(key))
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            event = Event(self.version, "DELETED", key[0], namespace, obj)
            self.events.append(event)
            if kind == "Pod":  # its containers are gone, and their logs end
                for (ns, pod, _), runs in self.logs.items():
                    if (ns, pod) == (namespace, name):
                        runs[-1].ended = True
            self.changed.notify_all()
        self._tell(event)

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call `listener` after every change (from the thread that made it), as a controller watches."""
        self.listeners.append(listener)

    def _tell(self, event: Event) -> None:
        for listener in list(self.listeners):
            listener(event)

    # logs --------------------------------------------------------------------------------------

    def write_log(self, namespace: str, pod: str, container: str, *lines: str, at: Optional[float] = None) -> None:
        """The container's current run writes these lines (at `at`, seconds since the epoch, or now)."""
        with self.lock:
            runs = self.logs.setdefault((namespace, pod, container), [ContainerLog()])
            runs[-1].lines += [(time.time() if at is None else at, line) for line in lines]
            self.changed.notify_all()

    def end_log(self, namespace: str, pod: str, container: str, *, restart: bool = False) -> None:
        """The container's current run ends; with `restart`, the kubelet starts the next one."""
        with self.lock:
            runs = self.logs.setdefault((namespace, pod, container), [ContainerLog()])
            runs[-1].ended = True
            if restart:
                runs.append(ContainerLog())
            self.changed.notify_all()

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Whatever a test changes inside (objects, logs) is put back afterwards: the served estate is shared."""
        with self.lock:
            saved = {key: _frozen(obj) for key, obj in self.objects.items()}
            logs = copy.deepcopy(self.logs)
        try:
            yield
        finally:
            for key in [key for key in list(self.objects) if key not in saved]:
                self.remove(key[0].api_version, key[0].kind, key[2], key[1])
            for key, obj in saved.items():
                if self.objects.get(key) != obj:
                    self.add(obj)
            with self.lock:
                self.logs = logs

    # routes ------------------------------------------------------------------------------------

    def route(self, method: str, pattern: re.Pattern) -> Callable[[Handler], Handler]:
        """Register a handler; later routes come first, so a specific path can take over from the
        generic resource path (for example `.../pods/<name>/log`)."""
        def register(handler: Handler) -> Handler:
            self.routes.insert(0, (method, pattern, handler))
            return handler
        return register

    @contextlib.contextmanager
    def answering(self, method: str, path: str, answer: Callable[[], Reply]) -> Iterator[None]:
        """While inside, requests of `method` whose path matches the regex `path` get `answer()` (an error
        Status, a stream that breaks off) instead of what the server would answer."""
        entry = (method, re.compile(path), lambda *_: answer())
        self.routes.insert(0, entry)
        try:
            yield
        finally:
            self.routes.remove(entry)

    def handle(self, method: str, target: str, authorization: Optional[str], body: Optional[Body] = None) -> Reply:
        self.requests.append(f"{method} {target}")
        if authorization != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        for route_method, pattern, handler in self.routes:
            match = pattern.match(url.path)
            if match and route_method == method:
                return handler(self, match, query) if body is None else handler(self, match, query, body)
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
                self.send(api.handle("GET", self.path, self.headers.get("Authorization")))

            def do_PATCH(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = Body(self.headers.get("Content-Type", ""), data)
                self.send(api.handle("PATCH", self.path, self.headers.get("Authorization"), body))

            def send(self, reply: Reply) -> None:
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
                try:
                    for chunk in reply.body:
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client left a stream: nothing more to send
                except Reset:  # SO_LINGER 0: closing sends RST, as a dropped connection looks to the client
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopping = True  # open streams end
            self.changed.notify_all()
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def wait(self, seconds: float) -> None:
        """Wait for the next change, at most `seconds` (call it holding `lock`)."""
        self.changed.wait(seconds)

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


POD_LOG_PATH = re.compile(r"^/api/v1/namespaces/(?P<namespace>[^/]+)/pods/(?P<name>[^/]+)/log$")
WAKE_SECONDS = 0.25  # how often an idle stream looks whether its client is gone or the server stops


def _kind(api: KubeApi, match: re.Match) -> Optional[Kind]:
    api_version = match["core"] or f"{match['group']}/{match['version']}"
    return next((k for k in api.kinds if (k.api_version, k.plural) == (api_version, match["plural"])), None)


def _get_or_list(api: KubeApi, match: re.Match, query: dict) -> Reply:
    kind = _kind(api, match)
    if kind is None or match["subresource"]:
        return status(404, "NotFound", f"the server could not find the requested resource ({match.string})")
    namespace = match["namespace"]
    with api.lock:
        objects = dict(api.objects)
        version = api.version
    if match["name"]:
        obj = objects.get((kind, namespace if kind.namespaced else None, match["name"]))
        if obj is None:
            return status(404, "NotFound", f'{kind.plural} "{match["name"]}" not found')
        return Reply(200, obj)
    try:
        labels = selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""))
    except ValueError as error:
        return status(400, "BadRequest", str(error))

    def wanted(kind_: Kind, ns: Optional[str], obj: dict) -> bool:
        return (kind_ == kind and (namespace is None or ns == namespace)
                and labels(obj["metadata"].get("labels", {})) and fields(obj))

    if query.get("watch") in ("true", "1"):
        return Reply(200, _watch(api, wanted, query), "application/json")
    items = [o for (k, ns, _), o in sorted(objects.items(), key=lambda item: (item[0][1] or "", item[0][2]))
             if wanted(k, ns, o)]
    return Reply(200, {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                       "metadata": {"resourceVersion": str(version)}, "items": items})


def _event_line(type_: str, obj: dict) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


def _watch(api: KubeApi, wanted: Callable[[Kind, Optional[str], dict], bool], query: dict) -> Iterator[bytes]:
    """The events after `resourceVersion`; without one, the current objects as ADDED first (the API
    server's "most recent" start). Ends after `timeoutSeconds`, or when the server stops."""
    since = query.get("resourceVersion") or "0"
    timeout = float(query.get("timeoutSeconds") or 0)
    deadline = time.monotonic() + timeout if timeout else None
    with api.lock:
        if since == "0":
            start = api.version
            initial = [_frozen(o) for (k, ns, _), o in sorted(api.objects.items(), key=lambda i: (i[0][1] or "", i[0][2]))
                       if wanted(k, ns, o)]
        else:
            start, initial = int(since), []
        position = bisect.bisect_right([e.version for e in api.events], start)
    for obj in initial:
        yield _event_line("ADDED", obj)
    while deadline is None or time.monotonic() < deadline:
        with api.lock:
            if position >= len(api.events) and not api.stopping:
                api.wait(WAKE_SECONDS)
            new, position = api.events[position:], len(api.events)
            stopping = api.stopping
        for event in new:
            if wanted(event.kind, event.namespace, event.object):
                yield _event_line(event.type, event.object)
        if stopping:
            return
        yield b""  # a chance to notice a client that left (an empty chunk is never sent)


def _patch(api: KubeApi, match: re.Match, query: dict, body: Body) -> Reply:
    kind = _kind(api, match)
    namespace = match["namespace"] if kind and kind.namespaced else None
    with api.lock:
        current = api.objects.get((kind, namespace, match["name"])) if kind and match["name"] else None
        current = copy.deepcopy(current)
    if current is None:
        return status(404, "NotFound", f'{match["plural"]} "{match["name"]}" not found')
    content_type = body.content_type.split(";")[0].strip()
    try:
        patch = json.loads(body.data)
        if content_type == "application/json-patch+json":
            patched = json_patch(current, patch)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            patched = merge_patch(current, patch)
        else:
            return status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                       f"accepted media types include: application/json-patch+json, "
                                                       f"application/merge-patch+json")
    except (ValueError, KeyError, IndexError, TypeError) as error:
        return status(422, "Invalid", f"the patch could not be applied: {error}")
    for immutable in ("name", "namespace", "uid", "creationTimestamp"):
        if immutable in current["metadata"]:
            patched["metadata"][immutable] = current["metadata"][immutable]
    if patched.get("spec") != current.get("spec") and "generation" in current["metadata"]:
        patched["metadata"]["generation"] = current["metadata"]["generation"] + 1  # a new spec, as the API server counts
    try:
        api.add(patched)
    except ValueError as error:
        return status(422, "Invalid", str(error))
    return Reply(200, patched)


def _pod_log(api: KubeApi, match: re.Match, query: dict) -> Reply:
    namespace, name = match["namespace"], match["name"]
    with api.lock:
        pod = api.objects.get((api.kind_of("v1", "Pod"), namespace, name))
        pod = copy.deepcopy(pod)
    if pod is None:
        return status(404, "NotFound", f'pods "{name}" not found')
    containers = [c["name"] for c in pod["spec"]["containers"]]
    init = [c["name"] for c in pod["spec"].get("initContainers", [])]
    container = query.get("container")
    if not container:  # the kubelet's messages (pkg/registry/core/pod/strategy.go, LogLocation)
        if len(containers) > 1 or init:
            return status(400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: "
                                             f"[{' '.join(containers)}] or one of the init containers: [{' '.join(init)}]")
        container = containers[0]
    if container not in containers + init:
        return status(400, "BadRequest", f"container {container} is not valid for pod {name}")
    with api.lock:
        runs = list(api.logs.get((namespace, name, container), []))
    if query.get("previous") == "true":
        if len(runs) < 2:
            return status(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found')
        log = runs[-2]
    elif not runs:
        return status(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: PodInitializing')
    else:
        log = runs[-1]
    since = time.time() - float(query["sinceSeconds"]) if query.get("sinceSeconds") else None
    follow = query.get("follow") == "true"

    def lines() -> Iterator[bytes]:
        position = 0
        while True:
            with api.lock:
                if position >= len(log.lines) and follow and not (log.ended or api.stopping):
                    api.wait(WAKE_SECONDS)
                new, position = log.lines[position:], len(log.lines)
                done = not follow or log.ended or api.stopping
            chunk = "".join(line + "\n" for at, line in new if since is None or at >= since).encode()
            yield chunk
            if done and position >= len(log.lines):
                return

    return Reply(200, lines(), "text/plain")


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


# --- the running estate, as hearth reads it --------------------------------------------------------

NODE = "ip-172-31-14-98"
REVISION = "deployment.kubernetes.io/revision"
TEMPLATE_HASH = "pod-template-hash"
HISTORY = ("v1.4.0", "v1.4.1", "v1.4.2")  # each app's releases, oldest first: revisions 5, 6 and 7
FIRST_REVISION = 5  # older ReplicaSets went with revisionHistoryLimit
RELEASED_DAYS_AGO = (20, 10, 3)
MIGRATION_ERROR = ("In AbstractPostgreSQLDriver.php line 79: An exception occurred in the driver: SQLSTATE[08006] "
                   "[7] connection to server at \"172.31.14.98\", port 5432 failed: FATAL: password "
                   "authentication failed for user \"katforge\"")
_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of the names Kubernetes generates (apimachinery rand)


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _safe(text: str, length: int) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return "".join(_SAFE[b % len(_SAFE)] for b in digest[:length])


def without_hash(template: dict) -> dict:
    template = copy.deepcopy(template)
    template["metadata"].get("labels", {}).pop(TEMPLATE_HASH, None)
    return template


def template_hash(template: dict) -> str:
    """What the pod-template-hash label holds: a digest of the template, in Kubernetes' safe alphabet
    (kube-controller-manager hashes the template with FNV; any stable digest does for a test)."""
    return _safe(json.dumps(without_hash(template), sort_keys=True), 10)


def node(*, allocatable_mib: int, capacity_mib: int, memory_pressure: bool = False, since: str = CREATED) -> dict:
    def condition(type_: str, status_: str, reason: str, message: str) -> dict:
        return {"type": type_, "status": status_, "reason": reason, "message": message,
                "lastHeartbeatTime": since, "lastTransitionTime": since}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux",
                                                  "node-role.kubernetes.io/control-plane": "true"}},
            "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"], "providerID": f"k3s://{NODE}"},
            "status": {
                "capacity": {"cpu": "2", "memory": f"{capacity_mib * 1024}Ki", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": f"{allocatable_mib * 1024}Ki", "pods": "110"},
                "conditions": [
                    condition("MemoryPressure", "True", "KubeletHasInsufficientMemory", "kubelet has insufficient memory available")
                    if memory_pressure else
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                    condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                ],
                "addresses": [{"type": "InternalIP", "address": "172.31.14.98"}, {"type": "Hostname", "address": NODE}],
                "nodeInfo": {"machineID": "ec2a8f0c1d2e3f405162738495a6b7c8", "systemUUID": "ec2a8f0c-1d2e-3f40-5162-738495a6b7c8",
                             "bootID": "5b0c7d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e", "kernelVersion": "6.8.0-1021-aws",
                             "osImage": "Ubuntu 24.04.1 LTS", "containerRuntimeVersion": "containerd://2.0.5-k3s1",
                             "kubeletVersion": "v1.34.6+k3s1", "kubeProxyVersion": "v1.34.6+k3s1",
                             "operatingSystem": "linux", "architecture": "amd64"}}}


def _condition(type_: str, status_: str, reason: str, message: str, at: str) -> dict:
    return {"type": type_, "status": status_, "reason": reason, "message": message,
            "lastUpdateTime": at, "lastTransitionTime": at}


def with_status(deployment: dict, *, replicas: int, updated: int, ready: int, available: int,
                progressing: tuple[str, str, str], at: str) -> dict:
    """The Deployment with the status kube-controller-manager writes (deployment/sync.go, progress.go)."""
    desired = deployment["spec"]["replicas"]
    status_ = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
               "updatedReplicas": updated, "readyReplicas": ready, "availableReplicas": available,
               "conditions": [
                   _condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.", at)
                   if available >= desired else
                   _condition("Available", "False", "MinimumReplicasUnavailable",
                              "Deployment does not have minimum availability.", at),
                   _condition("Progressing", *progressing, at)]}
    if replicas > available:
        status_["unavailableReplicas"] = replicas - available
    for key in ("updatedReplicas", "readyReplicas", "availableReplicas"):
        if not status_[key]:
            del status_[key]  # the API server omits zero counts
    deployment["status"] = status_
    return deployment


def _owner(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def replica_set(deployment: dict, template: dict, *, revision: int, replicas: int, created: str) -> dict:
    template = without_hash(template)
    pod_hash = template_hash(template)
    template["metadata"]["labels"][TEMPLATE_HASH] = pod_hash
    meta = deployment["metadata"]
    annotations = {k: v for k, v in meta.get("annotations", {}).items() if k != REVISION}
    annotations.update({REVISION: str(revision), "deployment.kubernetes.io/desired-replicas": "1",
                        "deployment.kubernetes.io/max-replicas": "2"})
    status_ = {"replicas": replicas, "observedGeneration": 1}
    if replicas:
        status_.update({"fullyLabeledReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas})
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{pod_hash}", "namespace": meta["namespace"],
                         "labels": template["metadata"]["labels"], "annotations": annotations,
                         "ownerReferences": [_owner(deployment)], "creationTimestamp": created, "generation": 1,
                         "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ReplicaSet/{meta['namespace']}/{pod_hash}"))},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {**deployment["spec"]["selector"]["matchLabels"],
                                                                        TEMPLATE_HASH: pod_hash}},
                     "template": template},
            "status": status_}


def _image(container: dict) -> str:
    return container["image"]


def _terminated(exit_code: int, reason: str, started: str, finished: str, message: str = "") -> dict:
    terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": finished,
                  "containerID": f"containerd://{_safe(started + reason + message, 32)}"}
    if message:
        terminated["message"] = message
    return {"terminated": terminated}


def pod(rs: dict, *, state: str, started: datetime.datetime, restarts: int = 0, suffix: str = "") -> dict:
    """A pod of the ReplicaSet: `running` (migrated, serving), `starting` (migrating), `migrate-failed`
    (its migrate init container fails and is retried), `crash-loop` (the app exits, restarted again and again)."""
    meta, template = rs["metadata"], rs["spec"]["template"]
    suffix = suffix or _safe(meta["name"] + state + iso(started), 5)
    spec = copy.deepcopy(template["spec"])
    spec.update({"nodeName": NODE, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                 "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30})
    at, later = iso(started), iso(started + datetime.timedelta(seconds=4))
    [migrate], [app] = spec["initContainers"], spec["containers"]

    def status_of(container: dict, ready: bool, state_: dict, restart_count: int = 0, last: Optional[dict] = None,
                  started_: Optional[bool] = None) -> dict:
        found = {"name": container["name"], "image": _image(container), "ready": ready, "restartCount": restart_count,
                 "imageID": f"{_image(container).split(':')[0]}@sha256:{hashlib.sha256(_image(container).encode()).hexdigest()}",
                 "state": state_, "lastState": last or {}}
        if started_ is not None:
            found["started"] = started_
        return found

    migrated = status_of(migrate, True, _terminated(0, "Completed", at, later))
    initializing = status_of(app, False, {"waiting": {"reason": "PodInitializing"}}, started_=False)
    running = {"running": {"startedAt": later}}
    if state == "running":
        init, main, phase, ready = [migrated], [status_of(app, True, running, restarts, started_=True)], "Running", True
    elif state == "starting":
        init, main, phase, ready = [status_of(migrate, False, {"running": {"startedAt": at}})], [initializing], "Pending", False
    elif state == "migrate-failed":
        failed = _terminated(1, "Error", at, later, MIGRATION_ERROR)
        waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off 40s restarting failed container="
                                                                        f"migrate pod={meta['name']}-{suffix}"}}
        init = [status_of(migrate, False, waiting, restarts or 3, failed)]
        main, phase, ready = [initializing], "Pending", False
    elif state == "crash-loop":
        crashed = _terminated(255, "Error", later, iso(started + datetime.timedelta(minutes=restarts or 7)))
        waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off 5m0s restarting failed container="
                                                                        f"{app['name']} pod={meta['name']}-{suffix}"}}
        init, main, phase, ready = [migrated], [status_of(app, False, waiting, restarts or 7, crashed, False)], "Running", False
    else:
        raise ValueError(f"no pod state {state!r}")
    conditions = [{"type": t, "status": "True" if ok else "False", "lastTransitionTime": at}
                  for t, ok in (("PodReadyToStartContainers", True), ("Initialized", state in ("running", "crash-loop")),
                                ("Ready", ready), ("ContainersReady", ready), ("PodScheduled", True))]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{meta['name']}-{suffix}", "generateName": f"{meta['name']}-",
                         "namespace": meta["namespace"], "labels": dict(template["metadata"]["labels"]),
                         "annotations": dict(template["metadata"].get("annotations", {})),
                         "ownerReferences": [_owner(rs)], "creationTimestamp": at},
            "spec": spec,
            "status": {"phase": phase, "conditions": conditions, "hostIP": "172.31.14.98",
                       "hostIPs": [{"ip": "172.31.14.98"}], "podIP": f"10.42.0.{int(_safe(suffix, 2).encode().hex(), 16) % 200 + 20}",
                       "startTime": at, "qosClass": "Burstable", "initContainerStatuses": init, "containerStatuses": main}}


def app_lines(app: str, count: int = 3) -> list[str]:
    return [f'10.42.0.1 - - "GET /{app}/{i} HTTP/1.1" 200 512' for i in range(count)]


MIGRATE_LINES = ["[notice] Migrating up to DoctrineMigrations\\Version20250301120000",
                 "[notice] finished in 41.3ms, used 18M memory, 1 migrations executed, 2 sql queries"]


@dataclass
class AppState:
    """How one app of the running estate is: `running`, `crash-loop` (its pod keeps exiting), or
    `migrate-failed` (a rollout to `failed_tag` whose migration fails; the previous release keeps serving)."""
    state: str = "running"
    failed_tag: str = "v1.5.0"


def app_objects(stage: str, app_name: str, now: datetime.datetime, *, tags: tuple[str, ...] = HISTORY,
                state: AppState = AppState()) -> tuple[list[dict], list[tuple[str, str, list[str]]]]:
    """An app of a stage as the cluster holds it after its releases `tags`: the program's Deployment
    (infra/apps.py), one ReplicaSet per release, the pod of the current one; and what its containers logged
    (pod, container, lines)."""
    from infra import apps as program  # the program's own Deployment
    from infra.settings import STAGES

    [app] = [a for a in program.APPS if a.name == app_name]
    namespace = STAGES[stage].namespace
    releases = list(tags) + ([state.failed_tag] if state.state == "migrate-failed" else [])
    revisions = list(range(FIRST_REVISION, FIRST_REVISION + len(releases)))
    days = list(RELEASED_DAYS_AGO[-len(tags):]) + ([0.02] if state.state == "migrate-failed" else [])
    released = [now - datetime.timedelta(days=d) for d in days]
    deployment = program.deployment(app, stage=stage, namespace=namespace, image_tag=releases[-1],
                                    secrets_sha256=hashlib.sha256(f"{stage}-secrets".encode()).hexdigest())
    deployment["metadata"].update({"generation": len(releases) + 1, "creationTimestamp": iso(now - datetime.timedelta(days=90)),
                                   "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"Deployment/{namespace}/{app.name}"))})
    deployment["metadata"]["annotations"][REVISION] = str(revisions[-1])
    deployment["spec"].update({"revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                               "strategy": {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}})

    def template(tag: str) -> dict:
        t = copy.deepcopy(deployment["spec"]["template"])
        for c in t["spec"]["containers"] + t["spec"]["initContainers"]:
            c["image"] = f"{app.image}:{tag}"
        return t

    serving = len(tags) - 1  # the release whose pod serves
    sets = [replica_set(deployment, template(tag), revision=rev, replicas=int(i == serving or i == len(releases) - 1),
                        created=iso(at)) for i, (tag, rev, at) in enumerate(zip(releases, revisions, released))]
    finished = iso(released[serving] + datetime.timedelta(minutes=1))
    pods, logs = [], []
    current = pod(sets[serving], state="crash-loop" if state.state == "crash-loop" else "running",
                  started=released[serving])
    pods.append(current)
    logs.append((current["metadata"]["name"], "migrate", MIGRATE_LINES))
    logs.append((current["metadata"]["name"], app.name, app_lines(app.name)))
    if state.state == "migrate-failed":
        failing = pod(sets[-1], state="migrate-failed", started=released[-1])
        pods.append(failing)
        logs.append((failing["metadata"]["name"], "migrate", [MIGRATION_ERROR]))
        rs_name = sets[-1]["metadata"]["name"]
        with_status(deployment, replicas=2, updated=1, ready=1, available=1, at=iso(released[-1]),
                    progressing=("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.'))
    elif state.state == "crash-loop":
        with_status(deployment, replicas=1, updated=1, ready=0, available=0, at=finished,
                    progressing=("True", "NewReplicaSetAvailable",
                                 f'ReplicaSet "{sets[serving]["metadata"]["name"]}" has successfully progressed.'))
    else:
        with_status(deployment, replicas=1, updated=1, ready=1, available=1, at=finished,
                    progressing=("True", "NewReplicaSetAvailable",
                                 f'ReplicaSet "{sets[serving]["metadata"]["name"]}" has successfully progressed.'))
    return [deployment, *sets, *pods], logs


def running_estate(now: datetime.datetime, *, states: Optional[dict[tuple[str, str], AppState]] = None,
                   memory_pressure: bool = False, allocatable_mib: Optional[int] = None
                   ) -> tuple[list[dict], list[tuple[str, str, str, list[str]]]]:
    """Both stages' apps after three releases each (`states` changes some: (stage, app) -> AppState), the
    node with what infra/capacity.py leaves to pods; and the logs, as (namespace, pod, container, lines)."""
    from infra import apps as program, capacity
    from infra.settings import STAGES

    budget = capacity.estate_report()
    objects = [_namespace(n) for n in ("default", "kube-system", "kube-public", "kube-node-lease", "qa", "ci")]
    objects.append(node(allocatable_mib=budget.allocatable_mib if allocatable_mib is None else allocatable_mib,
                        capacity_mib=budget.memtotal_mib, memory_pressure=memory_pressure))
    logs = []
    for stage in STAGES.values():
        for app in program.apps_in(stage.name):
            made, written = app_objects(stage.name, app.name, now, state=(states or {}).get((stage.name, app.name),
                                                                                               AppState()))
            objects += made
            logs += [(stage.namespace, *entry) for entry in written]
    return objects, logs


def serve_running(now: datetime.datetime, **options) -> KubeApi:
    objects, logs = running_estate(now, **options)
    api = serve(objects)
    for namespace, pod_name, container, lines in logs:
        api.write_log(namespace, pod_name, container, *lines, at=now.timestamp() - 60)
        if container == "migrate":
            api.end_log(namespace, pod_name, container)
    return api


class DeploymentController:
    """kube-controller-manager's part when a Deployment gets a new pod template (pkg/controller/deployment):
    the ReplicaSet whose template equals it, ignoring pod-template-hash, is reused (a rollback), or a new one
    is made; it gets the next revision (the old one goes to revision-history), its pod starts, and then,
    as `outcomes[(namespace, name)]` says: `ready` (the old ReplicaSet scales to zero, its pod ends),
    `migrate-failed` or `crash-loop` (the old pod keeps serving). `step` seconds pass between the phases."""

    def __init__(self, api: KubeApi, outcomes: Optional[dict[tuple[str, str], str]] = None, step: float = 0.05):
        self.api, self.outcomes, self.step = api, outcomes or {}, step
        self.rolls: list[threading.Thread] = []
        api.listen(self.changed)

    def settle(self, timeout: float = 5) -> None:
        """Wait for the rollouts under way to play out."""
        for roll in self.rolls:
            roll.join(timeout)
        self.rolls = [roll for roll in self.rolls if roll.is_alive()]

    def changed(self, event: Event) -> None:
        obj = event.object
        if event.kind.kind == "Deployment" and event.type == "MODIFIED" and \
                obj["metadata"].get("generation", 0) > obj.get("status", {}).get("observedGeneration", 0):
            roll = threading.Thread(target=self.roll, args=(obj["metadata"]["namespace"], obj["metadata"]["name"]),
                                    daemon=True)
            self.rolls.append(roll)
            roll.start()

    def owned(self, owners: Iterable[dict], kind: str) -> list[dict]:
        uids = {owner["metadata"]["uid"] for owner in owners}
        with self.api.lock:
            return [copy.deepcopy(o) for (k, _, _), o in self.api.objects.items()
                    if k.kind == kind and any(ref.get("uid") in uids for ref in o["metadata"].get("ownerReferences", []))]

    def roll(self, namespace: str, name: str) -> None:
        api = self.api
        deployment = api.get("apps/v1", "Deployment", name, namespace)
        sets = self.owned([deployment], "ReplicaSet")
        template = deployment["spec"]["template"]
        revision = max(int(rs["metadata"]["annotations"][REVISION]) for rs in sets) + 1
        now = datetime.datetime.now(datetime.timezone.utc)
        [target] = [rs for rs in sets if without_hash(rs["spec"]["template"]) == template] or [
            replica_set(deployment, template, revision=revision, replicas=0, created=iso(now))]
        if target in sets and int(target["metadata"]["annotations"][REVISION]) == revision - 1:
            # The template it already runs (a scale, say): nothing rolls, the new spec is observed.
            deployment["status"]["observedGeneration"] = deployment["metadata"]["generation"]
            api.add(deployment)
            return
        annotations = target["metadata"]["annotations"]
        if REVISION in annotations and annotations[REVISION] != str(revision) and target in sets:
            annotations["deployment.kubernetes.io/revision-history"] = annotations[REVISION]
        annotations[REVISION] = str(revision)
        target["spec"]["replicas"] = 1
        target["status"] = {"replicas": 1, "observedGeneration": target["metadata"].get("generation", 1)}
        old_pods = self.owned([rs for rs in sets if rs["metadata"]["name"] != target["metadata"]["name"]], "Pod")
        deployment["metadata"].setdefault("annotations", {})[REVISION] = str(revision)
        rs_name = target["metadata"]["name"]
        with_status(deployment, replicas=2, updated=1, ready=1, available=1, at=iso(now),
                    progressing=("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.'))
        api.add(target, deployment)
        outcome = self.outcomes.get((namespace, name), "ready")
        new = pod(target, state="starting", started=now)
        api.add(new)
        pod_name = new["metadata"]["name"]
        time.sleep(self.step)
        api.write_log(namespace, pod_name, "migrate", *MIGRATE_LINES[:1])
        time.sleep(self.step)
        deployment = api.get("apps/v1", "Deployment", name, namespace)
        if outcome == "migrate-failed":
            api.write_log(namespace, pod_name, "migrate", MIGRATION_ERROR)
            api.end_log(namespace, pod_name, "migrate", restart=True)
            api.add(pod(target, state="migrate-failed", started=now, suffix=pod_name.rsplit("-", 1)[1]))
        elif outcome == "crash-loop":
            api.write_log(namespace, pod_name, "migrate", *MIGRATE_LINES[1:])
            api.end_log(namespace, pod_name, "migrate")
            api.write_log(namespace, pod_name, name, "PHP Fatal error: Uncaught Error: Class not found")
            api.end_log(namespace, pod_name, name, restart=True)
            api.add(pod(target, state="crash-loop", started=now, suffix=pod_name.rsplit("-", 1)[1], restarts=3))
        else:
            api.write_log(namespace, pod_name, "migrate", *MIGRATE_LINES[1:])
            api.end_log(namespace, pod_name, "migrate")
            api.add(pod(target, state="running", started=now, suffix=pod_name.rsplit("-", 1)[1]))
            api.write_log(namespace, pod_name, name, *app_lines(name, 2))
            for old in old_pods:
                api.remove("v1", "Pod", old["metadata"]["name"], namespace)
            for rs in self.owned([deployment], "ReplicaSet"):
                if rs["metadata"]["name"] != rs_name and rs["spec"]["replicas"]:
                    rs["spec"]["replicas"] = 0
                    rs["status"] = {"replicas": 0, "observedGeneration": rs["metadata"].get("generation", 1)}
                    api.add(rs)
            with_status(deployment, replicas=1, updated=1, ready=1, available=1, at=iso(now),
                        progressing=("True", "NewReplicaSetAvailable", f'ReplicaSet "{rs_name}" has successfully progressed.'))
            api.add(deployment)


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


@pytest.fixture(scope="session")
def running_cluster():
    """The running estate (`running_estate`), served for the whole session, with its deployment
    controller (`running_cluster.controller`, outcomes per (namespace, app)) and the moment it was built
    (`running_cluster.now`). A test that changes it does so inside `with running_cluster.kept():`."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    api = serve_running(now)
    api.now = now
    api.controller = DeploymentController(api)
    try:
        yield api
    finally:
        api.stop()
