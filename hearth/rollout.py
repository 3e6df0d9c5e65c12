"""What kubectl knows about a Deployment's rollouts, as pure functions on the API's objects (dicts).

Modelled on kubectl itself (kubernetes/kubectl, pkg/polymorphichelpers/rollback.go and
rollout_status.go, pkg/util/deployment/deployment.go): a Deployment's ReplicaSets are those its selector
lists and it controls (ownerReferences); a ReplicaSet's revision is its `deployment.kubernetes.io/revision`
annotation; `rollout undo` goes to the second-highest revision (or the one asked for), refuses when there
is none, skips when the Deployment already has that template, and sends a JSON patch that replaces the
pod template (without `pod-template-hash`) and the annotations; `rollout status` reads the Deployment's
generation, status counts and Progressing condition.

On top of kubectl: the pods say why a rollout cannot finish. The migrate init container
(infra/apps.py, `deployment()`) runs the Doctrine migrations before the app starts, so its failure is
the migration's failure: the operators' page makes the rollout the migration health check.
"""
from __future__ import annotations

import copy
import datetime
import json
import re
from dataclasses import dataclass
from typing import Iterable, Optional

REVISION = "deployment.kubernetes.io/revision"
TEMPLATE_HASH = "pod-template-hash"
MIGRATE = "migrate"  # the init container infra/apps.py runs the migrations in
DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"  # kubectl's deploymentutil.TimedOutReason

# Annotations `rollout undo` keeps from the Deployment instead of taking the ReplicaSet's (rollback.go,
# annotationsToSkip).
KEPT_ANNOTATIONS = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration", REVISION, "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas", "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
})
# Waiting reasons that are a pod on its way, not a problem.
STARTING = frozenset({"ContainerCreating", "PodInitializing"})


class RollbackRefused(Exception):
    """`rollout undo` cannot go on: no such revision, no previous one, a paused Deployment."""


def parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def revision(obj: dict) -> Optional[int]:
    try:
        return int((obj["metadata"].get("annotations") or {})[REVISION])
    except (KeyError, ValueError):
        return None


def controlled_by(obj: dict, owner: dict) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("controller") and ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def owned_sets(deployment: dict, replica_sets: Iterable[dict]) -> list[dict]:
    return [rs for rs in replica_sets if controlled_by(rs, deployment)]


def without_hash(template: dict) -> dict:
    template = copy.deepcopy(template)
    labels = (template.get("metadata") or {}).get("labels") or {}
    labels.pop(TEMPLATE_HASH, None)
    return template


def same_template(a: dict, b: dict) -> bool:
    """kubectl's equalIgnoreHash (a semantic DeepEqual: absent and empty alike)."""
    return _pruned(without_hash(a)) == _pruned(without_hash(b))


def _pruned(value):
    if isinstance(value, dict):
        pruned = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def current_set(deployment: dict, replica_sets: Iterable[dict]) -> Optional[dict]:
    """The ReplicaSet of the Deployment's template (kubectl's FindNewReplicaSet), the newest if several."""
    template = deployment["spec"]["template"]
    matching = [rs for rs in owned_sets(deployment, replica_sets) if same_template(rs["spec"]["template"], template)]
    return max(matching, key=lambda rs: rs["metadata"].get("creationTimestamp") or "", default=None)


# --- images ------------------------------------------------------------------------------------------

def image_of(template: dict, app: str) -> str:
    """The app's own container's image (named after the app in infra/apps.py), else the first's."""
    containers = template.get("spec", {}).get("containers") or [{}]
    return next((c.get("image", "") for c in containers if c.get("name") == app), containers[0].get("image", ""))


def tag_of(image: str) -> str:
    """The version an image reference names: its tag, else its digest (shortened), else `latest`."""
    if "@" in image:
        return image.split("@", 1)[1][:19]
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else "latest"


# --- rollout undo --------------------------------------------------------------------------------------

def rollback_target(deployment: dict, replica_sets: Iterable[dict], to_revision: int = 0) -> dict:
    """The ReplicaSet `kubectl rollout undo [--to-revision N]` goes back to (rollback.go, deploymentRevision)."""
    name = deployment["metadata"]["name"]
    if to_revision < 0:
        raise RollbackRefused(f"unable to find the specified revision {to_revision}")
    if deployment["spec"].get("paused"):
        raise RollbackRefused(f"{name} is paused: resume it first (kubectl rollout resume deployment/{name})")
    numbered = [(revision(rs), rs) for rs in owned_sets(deployment, replica_sets) if revision(rs) is not None]
    if to_revision:
        found = [rs for number, rs in numbered if number == to_revision]
        if not found:
            known = ", ".join(str(n) for n, _ in sorted(numbered, key=lambda item: item[0])) or "none"
            raise RollbackRefused(f"{name} has no revision {to_revision} (recorded: {known})")
        return found[0]
    ordered = sorted(numbered, key=lambda item: item[0], reverse=True)
    if len(ordered) < 2:
        only = f"only revision {ordered[0][0]} is recorded" if ordered else "no revision is recorded"
        raise RollbackRefused(f"{name} has no previous revision to go back to ({only})")
    return ordered[1][1]


def rollback_patch(deployment: dict, target: dict) -> list[dict]:
    """The JSON patch `rollout undo` sends (rollback.go, getDeploymentPatch): the target's pod template
    without its pod-template-hash label, and the annotations: the Deployment's own kept ones, the
    ReplicaSet's others."""
    template = without_hash(target["spec"]["template"])
    kept = {k: v for k, v in (deployment["metadata"].get("annotations") or {}).items() if k in KEPT_ANNOTATIONS}
    taken = {k: v for k, v in (target["metadata"].get("annotations") or {}).items() if k not in KEPT_ANNOTATIONS}
    return [{"op": "replace", "path": "/spec/template", "value": template},
            {"op": "replace", "path": "/metadata/annotations", "value": {**kept, **taken}}]


def images(template: dict) -> dict[str, str]:
    """Container name -> image, init containers included."""
    spec = template.get("spec") or {}
    return {c["name"]: c.get("image", "") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}


def images_only(deployment: dict, target: dict, app: str) -> dict[str, str]:
    """`--image-only`: the image each container of the Deployment gets, as `kubectl set image` would set
    the target's: the image of the target's container of its name; for one the target lacks (the migrate
    init container, before the program added it), the target's app image if it ran the app's, as
    infra/apps.py has migrate run the release it migrates for; otherwise its own."""
    now, then = images(deployment["spec"]["template"]), images(target["spec"]["template"])
    app_now, app_then = image_of(deployment["spec"]["template"], app), image_of(target["spec"]["template"], app)
    return {name: then.get(name) or (app_then if image == app_now else image) for name, image in now.items()}


def image_patch(deployment: dict, target: dict, app: str) -> list[dict]:
    """The JSON patch that sets `images_only` and nothing else. Each replace is guarded by a test of what it
    replaces, so an image changed meanwhile (the pipeline shipping) fails the patch."""
    wanted = images_only(deployment, target, app)
    operations = []
    for field in ("initContainers", "containers"):
        for index, container in enumerate((deployment["spec"]["template"].get("spec") or {}).get(field) or []):
            if wanted[container["name"]] != container.get("image", ""):
                path = f"/spec/template/spec/{field}/{index}"
                operations += [{"op": "test", "path": f"{path}/name", "value": container["name"]},
                               {"op": "test", "path": f"{path}/image", "value": container.get("image")},
                               {"op": "replace", "path": f"{path}/image", "value": wanted[container["name"]]}]
    return operations


def image_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """`container: from -> to` for each container (in both) whose image differs."""
    return [f"{name}: {before[name]} -> {after[name]}" for name in sorted(set(before) & set(after))
            if before[name] != after[name]]


# --- what a rollback changes beyond the images ----------------------------------------------------------
# `rollout undo` puts back the whole pod template of the revision, and the Deployment's annotations as the
# ReplicaSet recorded them. Env values are never shown (one may be a secret written inline): only names.

PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
SHORT = 60  # characters of a value shown


def _short(value) -> str:
    if value in (None, "", [], {}):
        return "none"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
    if re.fullmatch(r"[0-9a-f]{40,}", text):  # a digest: its start tells them apart
        return text[:12] + "…"
    return text if len(text) <= SHORT else text[:SHORT - 1] + "…"


def _probe(probe: Optional[dict]) -> str:
    """A probe as its check: `httpGet /:http`, `tcpSocket :http`, `exec php -v`, or none."""
    if not probe:
        return "none"
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            check = probe[kind]
            return f"{kind} {check.get('path', '')}:{check.get('port', '')}"
    if "exec" in probe:
        return "exec " + _short(" ".join((probe["exec"] or {}).get("command") or []))
    return _short(probe)


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value} if prefix else {}


def _mapping_changes(what: str, before: dict, after: dict) -> list[str]:
    return [f"{what} {key}: {_short(before.get(key))} -> {_short(after.get(key))}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def _container_changes(before: dict, after: dict) -> list[str]:
    changes = []
    old_env = {e["name"]: e for e in before.get("env") or []}
    new_env = {e["name"]: e for e in after.get("env") or []}
    env = [f"{sign} {', '.join(names)}" for sign, names in (
        ("+", [n for n in new_env if n not in old_env]), ("-", [n for n in old_env if n not in new_env]),
        ("~", [n for n in new_env if n in old_env and new_env[n] != old_env[n]])) if names]
    if env:
        changes.append(f"env {'; '.join(env)}")
    for probe in PROBES:
        if before.get(probe) != after.get(probe):
            old, new = _probe(before.get(probe)), _probe(after.get(probe))
            changes.append(f"{probe} {old} -> {new}" if old != new else f"{probe} {new}: its timing changes")
    resources = _flat(_pruned(before.get("resources") or {})), _flat(_pruned(after.get("resources") or {}))
    if resources[0] != resources[1]:
        changes.append("resources " + ", ".join(f"{key} {_short(resources[0].get(key))} -> {_short(resources[1].get(key))}"
                                                for key in sorted(set(resources[0]) | set(resources[1]))
                                                if resources[0].get(key) != resources[1].get(key)))
    seen = {"name", "image", "env", "resources", *PROBES}
    for key in sorted((set(before) | set(after)) - seen):
        if before.get(key) != after.get(key):
            changes.append(f"{key} {_short(before.get(key))} -> {_short(after.get(key))}")
    return changes


def undo_changes(deployment: dict, target: dict) -> list[str]:
    """What `rollout undo` to `target` changes besides the images, one line each: the pod template's
    annotations (katforge.com/secrets-sha256 among them) and labels, its containers (added, removed; per
    container env names, probes, resources, anything else), the pod's other fields, and the Deployment's
    own annotations, which the patch takes from the ReplicaSet."""
    now, then = (_pruned(without_hash(t)) for t in (deployment["spec"]["template"], target["spec"]["template"]))
    changes = []
    for where in ("annotations", "labels"):
        changes += _mapping_changes(f"pod {where[:-1]}", (now.get("metadata") or {}).get(where) or {},
                                    (then.get("metadata") or {}).get(where) or {})
    spec_now, spec_then = now.get("spec") or {}, then.get("spec") or {}
    for field, kind in (("initContainers", "init container"), ("containers", "container")):
        old = {c["name"]: c for c in spec_now.get(field) or []}
        new = {c["name"]: c for c in spec_then.get(field) or []}
        for name in [*old, *(n for n in new if n not in old)]:
            if name not in new:
                changes.append(f"{kind} {name}: removed")
            elif name not in old:
                changes.append(f"{kind} {name}: added")
            else:
                changes += [f"{kind} {name}: {change}" for change in _container_changes(old[name], new[name])]
    changes += _mapping_changes("pod", {k: v for k, v in spec_now.items() if k not in ("initContainers", "containers")},
                                {k: v for k, v in spec_then.items() if k not in ("initContainers", "containers")})
    annotations = rollback_patch(deployment, target)[1]["value"]
    changes += _mapping_changes("deployment annotation", deployment["metadata"].get("annotations") or {}, annotations)
    return changes


# --- rollout status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rollout:
    state: str  # complete, progressing, failed
    message: str

    @property
    def done(self) -> bool:
        return self.state == "complete"


def observed(deployment: dict) -> bool:
    """The controller has seen the Deployment's spec as it is (its generation)."""
    return deployment["metadata"].get("generation", 0) <= (deployment.get("status") or {}).get("observedGeneration", 0)


def rollout(deployment: dict) -> Rollout:
    """kubectl's DeploymentStatusViewer.Status (rollout_status.go), as a state and its message."""
    name = deployment["metadata"]["name"]
    status = deployment.get("status") or {}
    if not observed(deployment):
        return Rollout("progressing", "waiting for the deployment spec update to be observed")
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("reason") == DEADLINE_EXCEEDED:
        return Rollout("failed", f"deployment {name} exceeded its progress deadline")
    desired = deployment["spec"].get("replicas", 1)
    updated, replicas = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < desired:
        return Rollout("progressing", f"{updated} out of {desired} new replicas have been updated")
    if replicas > updated:
        return Rollout("progressing", f"{replicas - updated} old replicas are pending termination")
    if available < updated:
        return Rollout("progressing", f"{available} of {updated} updated replicas are available")
    return Rollout("complete", "successfully rolled out")


def last_rollout(deployment: dict, replica_sets: Iterable[dict]) -> Optional[datetime.datetime]:
    """When the last rollout last moved: the Progressing condition's lastUpdateTime (set as the rollout
    progresses and when it completes, and kept while nothing changes); else the current ReplicaSet's birth."""
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("lastUpdateTime"):
            return parse_time(condition["lastUpdateTime"])
    current = current_set(deployment, replica_sets)
    return parse_time((current or deployment)["metadata"].get("creationTimestamp"))


# --- what the pods say ---------------------------------------------------------------------------------

def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _exit(terminated: dict) -> str:
    text = f"exit code {terminated.get('exitCode')} ({terminated.get('reason') or 'Error'})"
    return text + (f": {_one_line(terminated['message'])}" if terminated.get("message") else "")


def restarts(pods: Iterable[dict]) -> int:
    return sum(s.get("restartCount", 0) for pod in pods
               for s in ((pod.get("status") or {}).get("initContainerStatuses") or [])
               + ((pod.get("status") or {}).get("containerStatuses") or []))


def migrate_failure(pod: dict) -> Optional[str]:
    """Why the pod's migration failed, if it did and has not succeeded since."""
    for s in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if s.get("name") != MIGRATE:
            continue
        state, last = s.get("state") or {}, s.get("lastState") or {}
        now = state.get("terminated")
        if now and now.get("exitCode") == 0:
            return None
        failed = now if now and now.get("exitCode") else last.get("terminated")
        if failed and failed.get("exitCode"):
            tries = s.get("restartCount", 0) + 1
            return f"migrate failed{f' {tries} times' if tries > 1 else ''}, {_exit(failed)}"
    return None


def pod_problems(pod: dict) -> list[str]:
    """Why a pod is not serving: a failed migration, a crash-looping or unstartable container."""
    problems = [p for p in [migrate_failure(pod)] if p]
    status = pod.get("status") or {}
    for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (s.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if not reason or reason in STARTING or (s.get("name") == MIGRATE and problems):
            continue
        if reason == "CrashLoopBackOff":
            last = (s.get("lastState") or {}).get("terminated") or {}
            problems.append(f"{s['name']} is crash-looping: restarted {s.get('restartCount', 0)} times"
                            + (f", last {_exit(last)}" if last else ""))
        elif reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
            problems.append(f"cannot pull {s.get('image')}: {reason}" + (f": {_one_line(waiting['message'])}"
                                                                         if waiting.get("message") else ""))
        else:
            problems.append(f"{s['name']} cannot start: {reason}" + (f": {_one_line(waiting['message'])}"
                                                                     if waiting.get("message") else ""))
    return problems
