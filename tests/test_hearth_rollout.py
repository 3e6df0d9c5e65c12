"""hearth's kubectl logic on recorded objects: which ReplicaSet `rollout undo` goes back to and the patch it
sends (kubernetes/kubectl pkg/polymorphichelpers/rollback.go), `rollout status`'s verdict
(rollout_status.go), and why pods are not serving. No server: the histories are the API's objects as
tests/kube_api.py records them."""
from __future__ import annotations

import copy
import datetime

import pytest

from hearth import rollout
from tests.kube_api import (MIGRATION_ERROR, TEMPLATE_HASH, _deployment, app_objects, json_patch, pod, replica_set,
                            with_status)

NOW = datetime.datetime(2025, 6, 3, 12, 0, tzinfo=datetime.timezone.utc)


def history(app: str = "api", tags=("v1.4.0", "v1.4.1", "v1.4.2")) -> tuple[dict, list[dict]]:
    objects, _ = app_objects("prod", app, NOW, tags=tags)
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    return deployment, [o for o in objects if o["kind"] == "ReplicaSet"]


def tag(rs: dict) -> str:
    return rollout.tag_of(rollout.image_of(rs["spec"]["template"], rs["metadata"]["labels"]["app"]))


def test_undo_goes_to_the_previous_revision():
    deployment, sets = history()
    assert [rollout.revision(rs) for rs in sets] == [5, 6, 7]
    assert tag(rollout.rollback_target(deployment, sets)) == "v1.4.1"
    assert tag(rollout.rollback_target(deployment, list(reversed(sets)))) == "v1.4.1"  # order does not matter


def test_revisions_compare_as_numbers():
    deployment, sets = history()
    sets[0]["metadata"]["annotations"][rollout.REVISION] = "10"  # v1.4.0 rolled back to after 9 others
    sets[1]["metadata"]["annotations"][rollout.REVISION] = "9"
    deployment["metadata"]["annotations"][rollout.REVISION] = "10"
    assert tag(rollout.rollback_target(deployment, sets)) == "v1.4.1"  # 9 is below 10, whatever "9" > "10" says


def test_to_revision_and_a_revision_that_is_not_there():
    deployment, sets = history()
    assert tag(rollout.rollback_target(deployment, sets, to_revision=5)) == "v1.4.0"
    with pytest.raises(rollout.RollbackRefused, match=r"^api has no revision 3 \(recorded: 5, 6, 7\)$"):
        rollout.rollback_target(deployment, sets, to_revision=3)


def test_no_previous_revision_is_refused():
    deployment, sets = history(tags=("v1.4.2",))
    with pytest.raises(rollout.RollbackRefused,
                       match=r"^api has no previous revision to go back to \(only revision 5 is recorded\)$"):
        rollout.rollback_target(deployment, sets)
    with pytest.raises(rollout.RollbackRefused, match=r"no revision is recorded"):
        rollout.rollback_target(deployment, [])


def test_replica_sets_another_deployment_controls_are_not_history():
    """kubectl lists by the selector, then keeps what the Deployment controls (deployment.go, listReplicaSets)."""
    deployment, sets = history()
    stranger = copy.deepcopy(sets[1])
    stranger["metadata"].update(name="api-stranger", uid="0f0f0f0f-0000-4000-8000-000000000000")
    stranger["metadata"]["ownerReferences"][0]["uid"] = "another-deployment"
    stranger["metadata"]["annotations"][rollout.REVISION] = "99"
    assert tag(rollout.rollback_target(deployment, [*sets, stranger])) == "v1.4.1"
    only_mine = [sets[2], stranger]
    with pytest.raises(rollout.RollbackRefused, match="no previous revision"):
        rollout.rollback_target(deployment, only_mine)


def test_a_paused_deployment_is_refused():
    deployment, sets = history()
    deployment["spec"]["paused"] = True
    with pytest.raises(rollout.RollbackRefused, match=r"^api is paused: resume it first"):
        rollout.rollback_target(deployment, sets)


def test_the_patch_is_kubectls():
    """The target's template without pod-template-hash replaces the Deployment's; the annotations are the
    Deployment's kept ones (its revision) and the ReplicaSet's others."""
    deployment, sets = history()
    target = sets[1]
    target["metadata"]["annotations"]["kubernetes.io/change-cause"] = "kubectl set image api=v1.4.1"
    patch = rollout.rollback_patch(deployment, target)
    assert [(op["op"], op["path"]) for op in patch] == [("replace", "/spec/template"), ("replace", "/metadata/annotations")]
    patched = json_patch(deployment, patch)
    template = patched["spec"]["template"]
    assert TEMPLATE_HASH not in template["metadata"]["labels"] and TEMPLATE_HASH in target["spec"]["template"]["metadata"]["labels"]
    assert rollout.same_template(template, target["spec"]["template"])
    assert rollout.image_of(template, "api") == "ghcr.io/katforge/api.katforge.com:v1.4.1"
    annotations = patched["metadata"]["annotations"]
    assert annotations[rollout.REVISION] == "7"  # the Deployment's: the controller sets the next
    assert annotations["kubernetes.io/change-cause"] == "kubectl set image api=v1.4.1"
    assert "deployment.kubernetes.io/desired-replicas" not in annotations  # the ReplicaSet's own, skipped
    assert rollout.same_template(target["spec"]["template"], deployment["spec"]["template"]) is False


def adopted_history(app: str = "api") -> tuple[dict, list[dict]]:
    """Right after the program's first deployment: the previous revision is the hand-made template the
    operators left (tests/kube_api.py's live estate, an inline secret added), the current one the program's."""
    deployment, sets = history(app, tags=("v1.4.2", "v1.4.2"))
    handmade = _deployment("default", app)["spec"]["template"]
    handmade["spec"]["containers"][0]["env"].append({"name": "APP_SECRET", "value": "PLANTED-inline-secret"})
    old = sets[0]
    old["spec"]["template"] = {**handmade, "metadata": {"labels": {
        **handmade["metadata"]["labels"], TEMPLATE_HASH: old["spec"]["template"]["metadata"]["labels"][TEMPLATE_HASH]}}}
    old["metadata"]["annotations"] = {rollout.REVISION: old["metadata"]["annotations"][rollout.REVISION]}  # no others
    return deployment, sets


def test_what_an_undo_brings_back_beyond_the_images():
    """Undoing the program's first deployment goes back to the hand-made template: every difference is
    named, values never shown (an env value may be a secret)."""
    deployment, sets = adopted_history()
    changes = rollout.undo_changes(deployment, rollout.rollback_target(deployment, sets))
    assert changes[:5] == [
        "pod annotation katforge.com/secrets-sha256: " + deployment["spec"]["template"]["metadata"]["annotations"][
            "katforge.com/secrets-sha256"][:12] + "… -> none",
        "pod label app.kubernetes.io/name: api -> none",
        "pod label app.kubernetes.io/part-of: katforge -> none",
        "init container migrate: removed",
        "container api: env + APP_SECRET; - APP_ENV, SMTP_HOST, SMTP_PORT, SMTP_USERNAME, SMTP_PASSWORD, MAILER_DSN; "
        "~ DATABASE_URL",
    ]
    assert {"container api: readinessProbe tcpSocket :http -> none", "container api: livenessProbe tcpSocket :http -> none",
            "container api: resources limits.cpu 1 -> none, limits.memory 256Mi -> none, requests.cpu 100m -> none, "
            "requests.memory 160Mi -> none",
            'pod securityContext: {"seccompProfile":{"type":"RuntimeDefault"}} -> none'} <= set(changes)
    assert [c.split(":")[0] for c in changes if c.startswith("deployment annotation")] == [
        f"deployment annotation checkov.io/skip{n}" for n in range(1, 8)]  # the patch takes the ReplicaSet's
    assert not any("PLANTED" in line for line in changes)
    same = history()
    assert rollout.undo_changes(same[0], rollout.rollback_target(*same)) == []  # a release that changed only its images


def test_image_only_patches_the_images_and_fails_on_one_changed_meanwhile():
    deployment, sets = adopted_history()
    target = rollout.rollback_target(deployment, sets)
    target["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/katforge/api.katforge.com:v1.4.1"
    patch = rollout.image_patch(deployment, target, "api")
    patched = json_patch(deployment, patch)
    images = {c["name"]: c["image"] for c in patched["spec"]["template"]["spec"]["initContainers"]
              + patched["spec"]["template"]["spec"]["containers"]}
    # migrate, which the hand-made template did not have, follows the app's image
    assert images == dict.fromkeys(["migrate", "api"], "ghcr.io/katforge/api.katforge.com:v1.4.1")
    for container in patched["spec"]["template"]["spec"]["initContainers"] + patched["spec"]["template"]["spec"]["containers"]:
        container["image"] = "ghcr.io/katforge/api.katforge.com:v1.4.2"
    assert patched == deployment  # nothing else
    shipped = copy.deepcopy(deployment)
    shipped["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/katforge/api.katforge.com:v1.4.3"
    with pytest.raises(ValueError, match="test failed: /spec/template/spec/containers/0/image"):
        json_patch(shipped, patch)  # the pipeline shipped between hearth's read and its patch
    assert rollout.image_patch(json_patch(deployment, patch), target, "api") == []  # there already


def test_the_current_template_is_recognised_whatever_the_hash():
    deployment, sets = history()
    assert rollout.current_set(deployment, sets) is sets[2]
    assert rollout.same_template(sets[2]["spec"]["template"], deployment["spec"]["template"])


def test_rollout_status_as_kubectl_reads_it():
    deployment, _ = history()
    at = "2025-06-03T11:00:00Z"
    progressing = ("True", "ReplicaSetUpdated", 'ReplicaSet "api-x" is progressing.')
    cases = [
        (dict(replicas=1, updated=1, ready=1, available=1), 0, "complete", "successfully rolled out"),
        (dict(replicas=1, updated=1, ready=1, available=1), 1, "progressing",
         "waiting for the deployment spec update to be observed"),
        (dict(replicas=1, updated=0, ready=1, available=1), 0, "progressing", "0 out of 1 new replicas have been updated"),
        (dict(replicas=2, updated=1, ready=1, available=1), 0, "progressing", "1 old replicas are pending termination"),
        (dict(replicas=1, updated=1, ready=0, available=0), 0, "progressing", "0 of 1 updated replicas are available"),
    ]
    for counts, unobserved, state, message in cases:
        d = with_status(copy.deepcopy(deployment), **counts, progressing=progressing, at=at)
        d["metadata"]["generation"] += unobserved
        assert (rollout.rollout(d).state, rollout.rollout(d).message) == (state, message)
    stuck = with_status(copy.deepcopy(deployment), replicas=2, updated=1, ready=1, available=1, at=at,
                        progressing=("False", "ProgressDeadlineExceeded", 'ReplicaSet "api-x" has timed out progressing.'))
    assert rollout.rollout(stuck) == rollout.Rollout("failed", "deployment api exceeded its progress deadline")


def test_the_last_rollout_is_when_the_progressing_condition_moved():
    deployment, sets = history()
    progressing = [c for c in deployment["status"]["conditions"] if c["type"] == "Progressing"][0]
    assert rollout.last_rollout(deployment, sets) == rollout.parse_time(progressing["lastUpdateTime"])
    del deployment["status"]["conditions"]
    assert rollout.last_rollout(deployment, sets) == rollout.parse_time(sets[2]["metadata"]["creationTimestamp"])


def test_what_the_pods_say():
    _, sets = history()
    started = NOW - datetime.timedelta(minutes=5)
    assert rollout.pod_problems(pod(sets[2], state="running", started=started)) == []
    assert rollout.pod_problems(pod(sets[2], state="starting", started=started)) == []
    failed = pod(sets[2], state="migrate-failed", started=started)
    assert rollout.pod_problems(failed) == [f"migrate failed 4 times, exit code 1 (Error): {MIGRATION_ERROR}"]
    recovered = copy.deepcopy(failed)  # the next try succeeded: the failure is history
    recovered["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    assert rollout.migrate_failure(recovered) is None
    crashing = pod(sets[2], state="crash-loop", started=started)
    assert rollout.pod_problems(crashing) == ["api is crash-looping: restarted 7 times, last exit code 255 (Error)"]
    assert rollout.restarts([crashing, failed]) == 7 + 3
    unpullable = pod(sets[2], state="starting", started=started)
    unpullable["status"]["initContainerStatuses"][0]["state"] = {"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/katforge/api.katforge.com:v9"'}}
    assert rollout.pod_problems(unpullable) == [
        'cannot pull ghcr.io/katforge/api.katforge.com:v1.4.2: ImagePullBackOff: Back-off pulling image '
        '"ghcr.io/katforge/api.katforge.com:v9"']


@pytest.mark.parametrize("image, version", [
    ("ghcr.io/katforge/api.katforge.com:v1.4.2", "v1.4.2"), ("localhost:5000/api", "latest"),
    ("ghcr.io/katforge/web@sha256:0123456789abcdef0123", "sha256:0123456789ab"), ("nginx", "latest"),
])
def test_the_version_is_the_images_tag(image, version):
    assert rollout.tag_of(image) == version
