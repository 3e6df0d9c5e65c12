"""`hearth rollback` against the running estate (tests/kube_api.py): the PATCH it sends, the rollout the
deployment controller then plays, and how each ending is told."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time

import pytest

from hearth import rollout
from hearth.cli import main
from tests.kube_api import Reply, Reset, _deployment, status
from tests.test_hearth_status import Result

pytest_plugins = ["tests.kube_api"]


@pytest.fixture
def hearth(running_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(running_cluster.kubeconfig(tmp_path / "katforge-config")))

    def run(*argv: str, stdin: str = "") -> Result:
        out, err = io.StringIO(), io.StringIO()
        code = main([argv[0], "--timeout", "10s", *argv[1:]], environ=os.environ, stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return Result(code, out.getvalue(), err.getvalue())
    with running_cluster.kept():
        yield run
        running_cluster.controller.settle()  # a rollout the test started has played out
        running_cluster.controller.outcomes.clear()


def deployment(api, app: str = "api", namespace: str = "default") -> dict:
    return api.get("apps/v1", "Deployment", app, namespace)


def patches(api) -> list[str]:
    return [r for r in api.requests if r.startswith("PATCH ")]


def test_back_to_the_previous_release_after_asking(hearth, running_cluster):
    before = len(patches(running_cluster))
    result = hearth("rollback", "api", stdin="y\n")
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[:4] == [
        "api in prod (namespace default): v1.4.2 (revision 7) -> v1.4.1 (revision 6)",
        "  api: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1",
        "  migrate: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1",
        "Roll api back to v1.4.1? [y/N] api rolled back to the template of revision 6",
    ]
    assert "deployment api: successfully rolled out" in lines
    assert lines[-3:] == [
        "Pulumi: only the images changed, and the program ignores them (infra/apps.py, IMAGE_FIELDS): "
        "the next `pulumi up` refreshes first (Pulumi.yaml) and keeps this rollback.",
        "The GitHub Release of v1.4.2 still says it is the latest: re-ship a fix, or edit that release in GitHub "
        "(mark it a draft, set the release of v1.4.1 as latest; the workflow re-fires).",
        "api runs v1.4.1"]
    assert patches(running_cluster)[before:] == ["PATCH /apis/apps/v1/namespaces/default/deployments/api?fieldManager=hearth"]
    now = deployment(running_cluster)
    assert rollout.image_of(now["spec"]["template"], "api").endswith(":v1.4.1")
    assert rollout.TEMPLATE_HASH not in now["spec"]["template"]["metadata"]["labels"]
    assert now["metadata"]["annotations"][rollout.REVISION] == "8"  # the reused ReplicaSet's new revision
    assert [c["type"] for c in now["status"]["conditions"]] == ["Available", "Progressing"]


def test_to_a_chosen_revision_in_qa(hearth, running_cluster):
    result = hearth("rollback", "web", "--qa", "--to-revision", "5", "--yes")
    assert result.code == 0, result.err
    assert result.out.startswith("web in qa (namespace qa): v1.4.2 (revision 7) -> v1.4.0 (revision 5)\n")
    assert rollout.image_of(deployment(running_cluster, "web", "qa")["spec"]["template"], "web").endswith(":v1.4.0")
    assert rollout.image_of(deployment(running_cluster, "web")["spec"]["template"], "web").endswith(":v1.4.2")


def test_a_failed_migration_fails_the_rollback_with_its_reason(hearth, running_cluster):
    running_cluster.controller.outcomes[("default", "api")] = "migrate-failed"
    result = hearth("rollback", "api", "--yes")
    assert result.code == 1
    assert result.err == ("hearth: the rollback of api to v1.4.1 failed: migrate failed 4 times, exit code 1 (Error): "
                          "In AbstractPostgreSQLDriver.php line 79: An exception occurred in the driver: SQLSTATE[08006] "
                          "[7] connection to server at \"172.31.14.98\", port 5432 failed: FATAL: password "
                          "authentication failed for user \"katforge\"\n")
    assert "Pulumi: only the images changed" in result.out and "api runs" not in result.out


def test_a_crash_looping_release_fails_the_rollback_too(hearth, running_cluster):
    running_cluster.controller.outcomes[("default", "web")] = "crash-loop"
    result = hearth("rollback", "web", "--yes")
    assert result.code == 1
    assert result.err == ("hearth: the rollback of web to v1.4.1 failed: web is crash-looping: restarted 3 times, "
                          "last exit code 255 (Error)\n")


def older_template(api, app: str = "api", revision: str = "6") -> dict:
    """Make the ReplicaSet of `revision` one of a release whose template differed beyond its image, as an
    older release's did (or the hand-made template before the program's first deployment): another
    Secrets digest, an env variable since gone and the SMTP ones not yet there, no readiness probe, another
    memory limit. Returns the Deployment as it is before the rollback."""
    [rs] = [o for (k, ns, _), o in api.objects.items() if k.kind == "ReplicaSet" and ns == "default"
            and o["metadata"]["labels"]["app"] == app and o["metadata"]["annotations"][rollout.REVISION] == revision]
    rs = copy.deepcopy(rs)
    template = rs["spec"]["template"]
    template["metadata"]["annotations"]["katforge.com/secrets-sha256"] = "0f" * 32
    [container] = template["spec"]["containers"]
    container["env"] = [e for e in container["env"] if not e["name"].startswith(("SMTP_", "MAILER_"))] + [
        {"name": "LEGACY_SESSIONS", "value": "1"}]
    del container["readinessProbe"]
    container["resources"]["limits"]["memory"] = "320Mi"
    api.add(rs)
    return deployment(api, app)


TEMPLATE_CHANGES = [
    "Revision 6 also differs from what runs here (the rollback puts these back too):",
    f"  pod annotation katforge.com/secrets-sha256: {hashlib.sha256(b'prod-secrets').hexdigest()[:12]}… -> 0f0f0f0f0f0f…",
    "  container api: env + LEGACY_SESSIONS; - SMTP_HOST, SMTP_PORT, SMTP_USERNAME, SMTP_PASSWORD, MAILER_DSN",
    "  container api: readinessProbe tcpSocket :http -> none",
    "  container api: resources limits.memory 256Mi -> 320Mi",
    "warning: revision 6 differs from what runs in more than its images (above): the rollback puts back its whole pod "
    "template, as kubectl rollout undo does, until the next `pulumi up` puts the program's back. "
    "To roll back the images only: hearth rollback api --image-only",
]


def test_a_revision_that_differs_beyond_its_images_is_shown_whole_and_warned_of(hearth, running_cluster):
    """kubectl rollout undo puts back the whole template: every difference is shown before asking, and the
    note after says what Pulumi will and will not put back."""
    older_template(running_cluster)
    result = hearth("rollback", "api", stdin="y\n")
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[3:3 + len(TEMPLATE_CHANGES)] == TEMPLATE_CHANGES
    assert lines[3 + len(TEMPLATE_CHANGES)].startswith("Roll api back to v1.4.1? [y/N] api rolled back to the template")
    assert lines[-3] == (
        "Pulumi: the images are the ship pipeline's, but the rest of the pod template is the program's: the next "
        "`pulumi up` refreshes first (Pulumi.yaml), sees the differences above (`pulumi preview` shows them) and "
        "patches the program's template back over the live Deployment, keeping this image: the app then rolls out "
        "once more.")
    [container] = deployment(running_cluster)["spec"]["template"]["spec"]["containers"]
    assert "readinessProbe" not in container and container["env"][-1]["name"] == "LEGACY_SESSIONS"


def test_image_only_sets_the_revisions_images_and_keeps_the_template(hearth, running_cluster):
    before = older_template(running_cluster)
    requests = len(patches(running_cluster))
    result = hearth("rollback", "api", "--image-only", stdin="y\n")
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[:4] == [
        "api in prod (namespace default): v1.4.2 (revision 7) -> v1.4.1 (the images of revision 6; the template stays)",
        "  api: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1",
        "  migrate: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1",
        "Roll api back to v1.4.1? [y/N] api rolled back to the images of revision 6",
    ]
    assert lines[-3:-1] == ["Pulumi: only the images changed, and the program ignores them (infra/apps.py, "
                            "IMAGE_FIELDS): the next `pulumi up` refreshes first (Pulumi.yaml) and keeps this rollback.",
                            RELEASE_NOTE_4_2]
    assert lines[-1] == "api runs v1.4.1"
    assert len(patches(running_cluster)) == requests + 1
    after = deployment(running_cluster)
    template = copy.deepcopy(before["spec"]["template"])
    for container in template["spec"]["containers"] + template["spec"]["initContainers"]:
        container["image"] = "ghcr.io/katforge/api.katforge.com:v1.4.1"
    assert after["spec"]["template"] == template  # the images, and nothing else
    assert after["metadata"]["annotations"][rollout.REVISION] == "8"  # a new ReplicaSet: a template never run


def test_right_after_adoption_the_previous_revision_is_the_hand_made_template(hearth, running_cluster):
    """Revision 6 is the template the operators left (tests/kube_api.py's live estate): an undo would drop the
    migrate init container, the probes and the program's env; --image-only goes back to its release alone."""
    [rs] = [o for (k, ns, _), o in running_cluster.objects.items() if k.kind == "ReplicaSet" and ns == "default"
            and o["metadata"]["labels"]["app"] == "api" and o["metadata"]["annotations"][rollout.REVISION] == "6"]
    rs = copy.deepcopy(rs)
    handmade = _deployment("default", "api")["spec"]["template"]
    handmade["spec"]["containers"][0]["image"] = "ghcr.io/katforge/api.katforge.com:v1.4.1"
    handmade["metadata"]["labels"][rollout.TEMPLATE_HASH] = rs["spec"]["template"]["metadata"]["labels"][rollout.TEMPLATE_HASH]
    rs["spec"]["template"] = handmade
    running_cluster.add(rs)
    before = deployment(running_cluster)
    asked = hearth("rollback", "api", stdin="n\n")
    assert asked.code == 1 and deployment(running_cluster) == before
    shown = asked.out.splitlines()
    assert shown[:2] == ["api in prod (namespace default): v1.4.2 (revision 7) -> v1.4.1 (revision 6)",
                         "  api: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1"]
    assert {"  init container migrate: removed", "  container api: readinessProbe tcpSocket :http -> none"} <= set(shown)
    assert shown[-2].startswith("warning: revision 6 differs from what runs in more than its images")
    result = hearth("rollback", "api", "--image-only", "--yes")
    assert result.code == 0, result.err
    assert result.out.splitlines()[1:3] == [
        "  api: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1",
        "  migrate: ghcr.io/katforge/api.katforge.com:v1.4.2 -> ghcr.io/katforge/api.katforge.com:v1.4.1"]
    template = deployment(running_cluster)["spec"]["template"]["spec"]
    assert [(c["name"], c["image"].rsplit(":", 1)[1]) for c in template["initContainers"] + template["containers"]] == [
        ("migrate", "v1.4.1"), ("api", "v1.4.1")]


def test_image_only_watches_the_new_replica_set_for_a_failed_migration(hearth, running_cluster):
    running_cluster.controller.outcomes[("default", "api")] = "migrate-failed"
    result = hearth("rollback", "api", "--image-only", "--yes")
    assert result.code == 1
    assert result.err.startswith("hearth: the rollback of api to v1.4.1 failed: migrate failed 4 times, exit code 1")


RELEASE_NOTE_4_2 = ("The GitHub Release of v1.4.2 still says it is the latest: re-ship a fix, or edit that release in "
                    "GitHub (mark it a draft, set the release of v1.4.1 as latest; the workflow re-fires).")


@pytest.mark.parametrize("answer", ["n\n", "", "yes please\n"])
def test_nothing_changes_unless_confirmed(hearth, running_cluster, answer):
    before, requests = deployment(running_cluster), len(patches(running_cluster))
    result = hearth("rollback", "api", stdin=answer)
    assert result.code == 1 and result.err == "hearth: rollback not confirmed: nothing changed\n"
    assert deployment(running_cluster) == before and len(patches(running_cluster)) == requests


def test_no_previous_revision(hearth, running_cluster):
    for (kind, namespace, name), obj in list(running_cluster.objects.items()):
        if kind.kind == "ReplicaSet" and namespace == "default" and name.startswith("stumper-") and \
                obj["metadata"]["annotations"][rollout.REVISION] != "7":
            running_cluster.remove("apps/v1", "ReplicaSet", name, namespace)
    result = hearth("rollback", "stumper", "--yes")
    assert (result.code, result.out) == (1, "")
    assert result.err == "hearth: cannot roll back: stumper has no previous revision to go back to (only revision 7 is recorded)\n"


def test_the_current_revision_is_skipped_as_kubectl_does(hearth, running_cluster):
    requests = len(patches(running_cluster))
    result = hearth("rollback", "lextris", "--to-revision", "7", "--yes")
    assert (result.code, result.err) == (0, "")
    assert result.out == "lextris already runs the template of revision 7 (v1.4.2): nothing to roll back\n"
    assert len(patches(running_cluster)) == requests


def test_an_app_the_stage_does_not_run_or_a_missing_deployment(hearth, running_cluster):
    unknown = hearth("rollback", "lextris", "--qa", "--yes")
    assert unknown.code == 2 and unknown.err == "hearth: lextris: not an app of qa (its apps: api, web)\n"
    running_cluster.remove("apps/v1", "Deployment", "stumper", "default")
    missing = hearth("rollback", "stumper", "--yes")
    assert missing.code == 1 and missing.err == "hearth: no Deployment stumper in namespace default\n"


def test_a_rollout_that_never_finishes_is_given_up_after_the_timeout(hearth, running_cluster):
    running_cluster.listeners.remove(running_cluster.controller.changed)  # no controller: nothing rolls
    try:
        result = hearth("rollback", "api", "--yes", "--timeout", "0.3s")
    finally:
        running_cluster.listen(running_cluster.controller.changed)
    assert result.code == 1
    assert result.err == ("hearth: the rollback of api to v1.4.1 failed: it did not finish within 0.3 s (waiting for the "
                          "deployment spec update to be observed); it goes on in the cluster: hearth status\n")


def test_an_error_answer_or_a_watch_that_breaks_off(hearth, running_cluster):
    """Before the patch, an error answer is one line and nothing changes; after it, the line says the
    rollback went through."""
    before, requests = deployment(running_cluster), len(patches(running_cluster))
    with running_cluster.answering("GET", r"^/apis/apps/v1/namespaces/default/replicasets$",
                                   lambda: status(500, "InternalError", "etcdserver: request timed out")):
        refused = hearth("rollback", "api", "--yes")
    assert (refused.code, refused.out) == (2, "")
    assert refused.err == (f"hearth: the cluster at {running_cluster.url} answered GET "
                           "/apis/apps/v1/namespaces/default/replicasets with 500: etcdserver: request timed out\n")
    assert deployment(running_cluster) == before and len(patches(running_cluster)) == requests

    def reset():
        def body():
            time.sleep(0.1)
            yield b""
            raise Reset
        return Reply(200, body())
    with running_cluster.answering("GET", r"^/apis/apps/v1/namespaces/default/deployments$", reset):
        broken = hearth("rollback", "api", "--yes")
    assert broken.code == 2 and broken.err.count("\n") == 1
    assert broken.err.startswith(f"hearth: api was rolled back, then waiting for its rollout stopped: the connection "
                                 f"to the cluster at {running_cluster.url} broke off during GET "
                                 "/apis/apps/v1/namespaces/default/deployments (")
    assert broken.err.endswith("); the rollout goes on in the cluster (hearth status)\n")
    assert len(patches(running_cluster)) == requests + 1


def test_the_patch_request_is_a_json_patch(running_cluster):
    """What went over the wire in the tests above is kubectl's: JSON patch of /spec/template and annotations."""
    from tests.kube_api import Body, RESOURCE_PATH, _patch  # the server applies exactly the media type it is sent
    with running_cluster.kept():
        current = deployment(running_cluster, "web")
        body = Body("application/json-patch+json", json.dumps([{"op": "replace", "path": "/spec/replicas", "value": 2}]).encode())
        reply = _patch(running_cluster, RESOURCE_PATH.match("/apis/apps/v1/namespaces/default/deployments/web"), {}, body)
        assert reply.status == 200 and reply.body["spec"]["replicas"] == 2
        assert reply.body["metadata"]["generation"] == current["metadata"]["generation"] + 1
        running_cluster.controller.settle()
        bad = _patch(running_cluster, RESOURCE_PATH.match("/apis/apps/v1/namespaces/default/deployments/web"), {},
                     Body("application/json-patch+json", b'[{"op": "replace", "path": "/spec/replicas", "value": "two"}]'))
        assert bad.status == 422  # Kubernetes 1.34 would not store it either
