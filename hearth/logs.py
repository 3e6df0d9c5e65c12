"""`hearth logs`: every pod of the chosen apps, each line prefixed `app/pod-suffix` in the app's color.

Followed like `kubectl logs -f` of each container, plus what kubectl does not do: the pods are watched,
so a pod a rollout starts is attached as soon as its containers run, a restarted container is attached
again (each run is a log stream of its own, which ends when the run does), and a deleted pod is dropped.
`--since` reaches back for the pods there at the start; a new pod or a new run is shown from its first
line. The migrate init container's lines come too, marked `:migrate`. Notices go to stderr, log lines to
stdout.

A stream the API server refuses (a pod gone, a node's kubelet down) is a notice, and the others go on; a
connection to the API server that breaks off, a stream's or the watch's, ends the command with that one
line (exit 2) rather than leave it following some pods and silently not others.
"""
from __future__ import annotations

import queue
import threading
from typing import Optional, Sequence, TextIO

from hearth import kube
from hearth.estate import Estate
from hearth.kube import Cluster, HearthError, Refused

GONE = (400, 404)  # a container not started yet, or a pod deleted meanwhile: the next event tells

PALETTE = ("36", "35", "33", "32", "34", "91", "96", "95")  # cyan, magenta, yellow, green, blue, bright...


def suffix(pod_name: str) -> str:
    """What tells a Deployment's pods apart: the last part of the generated name."""
    return pod_name.rsplit("-", 1)[-1]


def _started(status: dict) -> bool:
    state = status.get("state") or {}
    return "running" in state or "terminated" in state


class Printer:
    def __init__(self, out: TextIO, err: TextIO, apps: Sequence[str], color: bool):
        self.out, self.err, self.color = out, err, color
        self.colors = {app: PALETTE[i % len(PALETTE)] for i, app in enumerate(apps)}
        self.lock = threading.Lock()
        self.closed = False

    def prefix(self, app: str, pod: str, container: str) -> str:
        text = f"{app}/{suffix(pod)}" + (f":{container}" if container != app else "")
        return f"\x1b[{self.colors[app]}m{text}\x1b[0m" if self.color else text

    def line(self, app: str, pod: str, container: str, text: str) -> None:
        with self.lock:
            if not self.closed:
                self.out.write(f"{self.prefix(app, pod, container)} {text}\n")
                self.out.flush()

    def notice(self, text: str) -> None:
        with self.lock:
            if not self.closed:
                self.err.write(f"hearth: {text}\n")
                self.err.flush()


def _app_of(pod: dict, apps: Sequence[str]) -> Optional[str]:
    name = (pod["metadata"].get("labels") or {}).get("app")
    return name if name in apps else None


def _containers(pod: dict) -> list[dict]:
    status = pod.get("status") or {}
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


class Follower:
    """Attaches a stream to each container run it has not followed yet, on every pod event and whenever
    a stream ends (a restart may have come meanwhile)."""

    def __init__(self, cluster: Cluster, namespace: str, apps: Sequence[str], printer: Printer, since: int):
        self.cluster, self.namespace, self.apps, self.printer, self.since = cluster, namespace, apps, printer, since
        self.lock = threading.Lock()
        self.pods: dict[str, dict] = {}
        self.followed: dict[tuple[str, str], int] = {}  # (pod, container) -> the run (restartCount) followed
        self.following: set[tuple[str, str]] = set()
        self.initial: set[str] = set()  # pods there at the start: --since applies to their first runs
        self.events: "queue.Queue" = queue.Queue()  # the watch's events, and ("ERROR", error) from any thread

    def consider(self, pod: dict) -> None:
        name, app = pod["metadata"]["name"], _app_of(pod, self.apps)
        if app is None:
            return
        with self.lock:
            self.pods[name] = pod
            for status in _containers(pod):
                key, run = (name, status["name"]), status.get("restartCount", 0)
                if not _started(status) or key in self.following or self.followed.get(key, -1) >= run:
                    continue
                since = self.since if name in self.initial and key not in self.followed else None
                self.following.add(key)
                self.followed[key] = run
                threading.Thread(target=self.stream, args=(app, name, status["name"], since), daemon=True).start()

    def stream(self, app: str, pod: str, container: str, since: Optional[int]) -> None:
        try:
            for text in kube.log_lines(self.cluster, self.namespace, pod, container, follow=True, since=since):
                self.printer.line(app, pod, container, text)
        except Refused as refused:
            if refused.status in GONE:
                with self.lock:
                    self.followed.pop((pod, container), None)
            else:
                self.printer.notice(f"{app}/{suffix(pod)}:{container}: {refused.status} {refused.reason}")
        except HearthError as error:  # the connection broke off: the command ends with it
            self.events.put(("ERROR", error))
            return
        finally:
            with self.lock:
                self.following.discard((pod, container))
                latest = self.pods.get(pod)
        if latest is not None:
            self.consider(latest)

    def run(self) -> None:
        labels = {"app": tuple(self.apps)}
        pods, version = kube.pod_listing(self.cluster, self.namespace, labels)
        self.initial = {p["metadata"]["name"] for p in pods}
        for pod in pods:
            self.consider(pod)
        threading.Thread(target=kube.pump, daemon=True, args=(
            self.events, kube.watch_pods(self.cluster, self.namespace, labels, version))).start()
        while True:
            kind, pod = self.events.get()
            if kind == "ERROR":
                raise pod
            name = pod["metadata"]["name"]
            if kind == "DELETED":
                with self.lock:
                    self.pods.pop(name, None)
                app = _app_of(pod, self.apps)
                if app:
                    self.printer.notice(f"{app}/{suffix(name)} ended")
            else:
                if name not in self.pods and _app_of(pod, self.apps):
                    self.printer.notice(f"{_app_of(pod, self.apps)}/{suffix(name)} started")
                self.consider(pod)


def print_once(cluster: Cluster, namespace: str, apps: Sequence[str], printer: Printer, since: int) -> None:
    pods, _ = kube.pod_listing(cluster, namespace, {"app": tuple(apps)})
    order = {app: i for i, app in enumerate(apps)}
    for pod in sorted(pods, key=lambda p: (order.get(_app_of(p, apps), 0), p["metadata"].get("creationTimestamp") or "",
                                           p["metadata"]["name"])):
        app = _app_of(pod, apps)
        for status in _containers(pod):
            if app is None or not _started(status):
                continue
            try:
                for text in kube.log_lines(cluster, namespace, pod["metadata"]["name"], status["name"], follow=False,
                                           since=since):
                    printer.line(app, pod["metadata"]["name"], status["name"], text)
            except Refused as refused:
                if refused.status not in GONE:
                    raise


def run(cluster: Cluster, estate: Estate, names: Sequence[str], *, since: float, follow: bool, out: TextIO,
        err: TextIO, color: bool) -> int:
    since = max(1, round(since))  # the API takes whole seconds (sinceSeconds)
    apps = list(names) or [app.name for app in estate.apps]
    printer = Printer(out, err, [app.name for app in estate.apps], color)
    if not follow:
        print_once(cluster, estate.namespace, apps, printer, since)
        return 0
    try:
        Follower(cluster, estate.namespace, apps, printer, since).run()
    finally:
        printer.closed = True  # the streams' threads print nothing more while the process leaves
    return 0
