"""`hearth rollback APP`: `kubectl rollout undo`, then `kubectl rollout status`, with what they leave out.

The rollback itself is kubectl's (hearth/rollout.py: the same revision, the same refusals, the same
JSON patch): it puts back the revision's whole pod template, not only its images. Before it, hearth shows
from and to which release (image tags), every other difference the rollback brings (env names, probes,
resources, init containers, annotations), warns when there is any, and asks. `--image-only` sets only
the revision's images instead, as `kubectl set image` would. After it, hearth waits as `rollout status`
does, with one progress line, but it also watches the pods of the ReplicaSet it went to: their migrate
init container is the migration's health check (the operators' page), so its failure ends the wait at
once, exit 1, with the container's reason, as does a crash-looping or unpullable container (kubectl
would wait for the progress deadline, 10 minutes).

What Pulumi does afterwards (the notes below): every preview and up refreshes first (Pulumi.yaml,
`refresh: always`), which records the live Deployment, rolled-back image and template included. The
Deployments go through a client-side-apply provider with the image fields ignored (infra/bootstrap.py,
kubernetes_providers): an ignored field keeps the refreshed value, and the update's three-way patch
against the live object puts the program's other fields back (pulumi-kubernetes provider/pkg/provider/
provider.go, Diff and Read; provider/pkg/await/await.go, csaUpdate; apimachinery's
CreateThreeWayMergePatch: "the difference from current to modified").
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
PULUMI_IMAGES_NOTE = ("Pulumi: only the images changed, and the program ignores them (infra/apps.py, IMAGE_FIELDS): "
                      "the next `pulumi up` refreshes first (Pulumi.yaml) and keeps this rollback.")
PULUMI_TEMPLATE_NOTE = ("Pulumi: the images are the ship pipeline's, but the rest of the pod template is the "
                        "program's: the next `pulumi up` refreshes first (Pulumi.yaml), sees the differences above "
                        "(`pulumi preview` shows them) and patches the program's template back over the live "
                        "Deployment, keeping this image: the app then rolls out once more.")
TEMPLATE_WARNING = ("warning: revision {revision} differs from what runs in more than its images (above): the "
                    "rollback puts back its whole pod template, as kubectl rollout undo does, until the next "
                    "`pulumi up` puts the program's back. To roll back the images only: "
                    "hearth rollback {app}{options} --image-only")
RELEASE_NOTE = ("The GitHub Release of {bad} still says it is the latest: re-ship a fix, or edit that release in "
                "GitHub (mark it a draft, set the release of {good} as latest; the workflow re-fires).")


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
    Deployment's progress deadline). The Deployment and the pods of its new ReplicaSet are watched: that
    ReplicaSet's `pod_hash`, or, when it is not known beforehand (a new template), the one the Deployment's
    template has once the controller has seen it."""
    deadline = time.monotonic() + timeout if timeout else None
    events: "queue.Queue" = queue.Queue()
    version = deployment["metadata"]["resourceVersion"]
    threading.Thread(target=kube.pump, daemon=True,
                     args=(events, kube.watch_deployment(cluster, namespace, name, version))).start()
    pods: dict[str, dict] = {}

    def watch_pods(template_hash: str) -> None:
        listed, pods_version = kube.pod_listing(cluster, namespace, {rollout.TEMPLATE_HASH: template_hash})
        pods.update({p["metadata"]["name"]: p for p in listed})
        threading.Thread(target=kube.pump, daemon=True, args=(events, kube.watch_pods(
            cluster, namespace, {rollout.TEMPLATE_HASH: template_hash}, pods_version))).start()

    if pod_hash:
        watch_pods(pod_hash)
    progress = Progress(out, tty)
    try:
        while True:
            if not pod_hash and rollout.observed(deployment):
                new = rollout.current_set(deployment, cluster.replica_sets(
                    namespace, labels=deployment["spec"]["selector"].get("matchLabels")))
                pod_hash = ((new or {}).get("metadata", {}).get("labels") or {}).get(rollout.TEMPLATE_HASH)
                if pod_hash:
                    watch_pods(pod_hash)
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
        tty: bool, timeout: float = 0, image_only: bool = False) -> int:
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
    template, then = deployment["spec"]["template"], target["spec"]["template"]
    bad, good = (rollout.tag_of(rollout.image_of(t, app)) for t in (template, then))
    now_revision = rollout.revision(current) if current else rollout.revision(deployment)
    to_revision_found = rollout.revision(target)
    if image_only:
        operations, changes = rollout.image_patch(deployment, target, app), []
        if not operations:
            out.write(f"{app} already runs the images of revision {to_revision_found} ({good}): nothing to roll back\n")
            return 0
    else:
        if rollout.same_template(then, template):
            out.write(f"{app} already runs the template of revision {to_revision_found} ({good}): nothing to roll "
                      "back\n")
            return 0
        operations, changes = rollout.rollback_patch(deployment, target), rollout.undo_changes(deployment, target)
    stage = f"{app} in {estate.stage.name} (namespace {ns})"
    out.write(f"{stage}: {bad} (revision {now_revision}) -> {good} (" + (
        f"the images of revision {to_revision_found}; the template stays" if image_only else
        f"revision {to_revision_found}") + ")\n")
    out.writelines(f"  {line}\n" for line in rollout.image_changes(rollout.images(template), (
        rollout.images_only(deployment, target, app) if image_only else rollout.images(then))))
    qa = " --qa" if estate.stage.name == "qa" else ""
    if changes:
        out.write(f"Revision {to_revision_found} also differs from what runs here (the rollback puts these back too):\n")
        out.writelines(f"  {line}\n" for line in changes)
        out.write(TEMPLATE_WARNING.format(revision=to_revision_found, app=app, options=qa + (
            f" --to-revision {to_revision}" if to_revision else "")) + "\n")
    if not yes and not _confirm(f"Roll {app} back to {good}?", stdin, out):
        raise HearthError("rollback not confirmed: nothing changed")
    patched = kube.patch_deployment(cluster, ns, app, operations)
    out.write(f"{app} rolled back to the " + ("images" if image_only else "template") +
              f" of revision {to_revision_found}\n")
    # Back to an old template, its ReplicaSet is reused; new images make a new one, found once the controller has.
    pod_hash = None if image_only else (target["metadata"].get("labels") or {}).get(rollout.TEMPLATE_HASH)
    status = f"hearth status{qa}"
    try:
        failure = wait(cluster, ns, app, patched, pod_hash, out, tty, timeout)
    except KeyboardInterrupt:
        raise HearthError(f"stopped waiting: the rollout of {app} goes on in the cluster ({status})", 130) from None
    except HearthError as error:  # the patch went through: say so, whatever ended the wait
        raise HearthError(f"{app} was rolled back, then waiting for its rollout stopped: {error}; the rollout goes "
                          f"on in the cluster ({status})", error.code) from None
    out.write(f"{PULUMI_TEMPLATE_NOTE if changes else PULUMI_IMAGES_NOTE}\n{RELEASE_NOTE.format(bad=bad, good=good)}\n")
    if failure:
        raise HearthError(f"the rollback of {app} to {good} failed: {failure}")
    out.write(f"{app} runs {good}\n")
    return 0
