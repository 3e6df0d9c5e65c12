"""`hearth rollback APP`: `kubectl rollout undo`, then `kubectl rollout status`, with what they leave out.

The rollback itself is kubectl's (hearth/rollout.py: the same revision, the same refusals, the same
JSON patch). Before it, hearth shows from and to which release (image tags) and asks. After it, it waits
as `rollout status` does, with one progress line, but it also watches the pods of the ReplicaSet it went
back to: their migrate init container is the migration's health check (the operators' page), so its
failure ends the wait at once, exit 1, with the container's reason, as does a crash-looping or unpullable
container (kubectl would wait for the progress deadline, 10 minutes).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional, TextIO

from hearth import kube, rollout
from hearth.estate import Estate
from hearth.kube import Cluster, HearthError

# What stays true after a rollback, said every time (README, "Rolling back"; the operators' page, Rollback).
PULUMI_NOTE = ("Pulumi keeps this rollback: the Deployments' images are ignored by the program and applied "
               "client-side, so the next `pulumi up` never sends a tag back (infra/bootstrap.py, "
               "kubernetes_providers).")
RELEASE_NOTE = ("The GitHub Release of {bad} still says it is the latest: re-ship a fix, or edit that release in "
                "GitHub (mark it a draft, set the release of {good} as latest; the workflow re-fires).")


def _images(template: dict) -> dict[str, str]:
    spec = template.get("spec") or {}
    return {c["name"]: c.get("image", "") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}


def _confirm(question: str, stdin: TextIO, out: TextIO) -> bool:
    out.write(f"{question} [y/N] ")
    out.flush()
    answer = stdin.readline()
    if not answer:
        out.write("\n")
    return answer.strip().lower() in ("y", "yes")


class Progress:
    """One line that changes in place on a terminal; elsewhere, a line per change."""

    def __init__(self, out: TextIO, tty: bool):
        self.out, self.tty, self.last = out, tty, ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        self.out.write(f"\r\x1b[2K{text}" if self.tty else f"{text}\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")


def wait(cluster: Cluster, namespace: str, name: str, deployment: dict, pod_hash: Optional[str], out: TextIO,
         tty: bool, timeout: float = 0) -> Optional[str]:
    """Until the rollout completes (None), fails (why) or `timeout` seconds pass (0: no limit but the
    Deployment's progress deadline). The Deployment and the target's pods are watched."""
    deadline = time.monotonic() + timeout if timeout else None
    events: "queue.Queue" = queue.Queue()
    version = deployment["metadata"]["resourceVersion"]
    threading.Thread(target=kube.pump, daemon=True,
                     args=(events, kube.watch_deployment(cluster, namespace, name, version))).start()
    pods: dict[str, dict] = {}
    if pod_hash:
        listed, pods_version = kube.pod_listing(cluster, namespace, {rollout.TEMPLATE_HASH: pod_hash})
        pods = {p["metadata"]["name"]: p for p in listed}
        threading.Thread(target=kube.pump, daemon=True, args=(events, kube.watch_pods(
            cluster, namespace, {rollout.TEMPLATE_HASH: pod_hash}, pods_version))).start()
    progress = Progress(out, tty)
    try:
        while True:
            problems = [p for pod in pods.values() for p in rollout.pod_problems(pod)]
            if problems:
                return problems[0]
            state = rollout.rollout(deployment)
            if state.state == "failed":
                return state.message
            if state.done:
                progress.show(f"deployment {name}: {state.message}")
                return None
            progress.show(f"waiting for deployment {name}: {state.message}")
            try:
                kind, obj = events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return (f"it did not finish within {timeout:g} s ({state.message}); it goes on in the cluster: "
                        "hearth status")
            if kind == "ERROR":
                raise obj
            if obj.get("kind") == "Deployment" or "template" in (obj.get("spec") or {}):
                deployment = obj
            elif kind == "DELETED":
                pods.pop(obj["metadata"]["name"], None)
            else:
                pods[obj["metadata"]["name"]] = obj
    finally:
        progress.end()


def run(cluster: Cluster, estate: Estate, app: str, *, to_revision: int, yes: bool, stdin: TextIO, out: TextIO,
        tty: bool, timeout: float = 0) -> int:
    ns = estate.namespace
    deployment = cluster.deployment(ns, app)
    if deployment is None:
        raise HearthError(f"no Deployment {app} in namespace {ns}")
    sets = cluster.replica_sets(ns, labels=deployment["spec"]["selector"].get("matchLabels"))
    try:
        target = rollout.rollback_target(deployment, sets, to_revision)
    except rollout.RollbackRefused as refused:
        raise HearthError(f"cannot roll back: {refused}") from None
    current = rollout.current_set(deployment, sets)
    now_image = rollout.image_of(deployment["spec"]["template"], app)
    to_image = rollout.image_of(target["spec"]["template"], app)
    bad, good = rollout.tag_of(now_image), rollout.tag_of(to_image)
    now_revision = rollout.revision(current) if current else rollout.revision(deployment)
    to_revision_found = rollout.revision(target)
    if rollout.same_template(target["spec"]["template"], deployment["spec"]["template"]):
        out.write(f"{app} already runs the template of revision {to_revision_found} ({good}): nothing to roll back\n")
        return 0
    out.write(f"{app} in {estate.stage.name} (namespace {ns}): {bad} (revision {now_revision}) -> {good} "
              f"(revision {to_revision_found})\n")
    before, after = _images(deployment["spec"]["template"]), _images(target["spec"]["template"])
    for container in sorted(set(before) | set(after)):
        if before.get(container) != after.get(container):
            out.write(f"  {container}: {before.get(container, '-')} -> {after.get(container, '-')}\n")
    if not yes and not _confirm(f"Roll {app} back to {good}?", stdin, out):
        raise HearthError("rollback not confirmed: nothing changed")
    patched = kube.patch_deployment(cluster, ns, app, rollout.rollback_patch(deployment, target))
    out.write(f"{app} rolled back to the template of revision {to_revision_found}\n")
    pod_hash = (target["metadata"].get("labels") or {}).get(rollout.TEMPLATE_HASH)
    status = f"hearth status{' --qa' if estate.stage.name == 'qa' else ''}"
    try:
        failure = wait(cluster, ns, app, patched, pod_hash, out, tty, timeout)
    except KeyboardInterrupt:
        raise HearthError(f"stopped waiting: the rollout of {app} goes on in the cluster ({status})", 130) from None
    except HearthError as error:  # the patch went through: say so, whatever ended the wait
        raise HearthError(f"{app} was rolled back, then waiting for its rollout stopped: {error}; the rollout goes "
                          f"on in the cluster ({status})", error.code) from None
    out.write(f"{PULUMI_NOTE}\n{RELEASE_NOTE.format(bad=bad, good=good)}\n")
    if failure:
        raise HearthError(f"the rollback of {app} to {good} failed: {failure}")
    out.write(f"{app} runs {good}\n")
    return 0
