"""`hearth rollback` against the running estate (tests/kube_api.py): the PATCH it sends, the rollout the
deployment controller then plays, and how each ending is told."""
from __future__ import annotations

import io
import json
import os
import time

import pytest

from hearth import rollout
from hearth.cli import main
from tests.kube_api import Reply, Reset, status
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
        "Pulumi keeps this rollback: the Deployments' images are ignored by the program and applied client-side, so "
        "the next `pulumi up` never sends a tag back (infra/bootstrap.py, kubernetes_providers).",
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
    assert "Pulumi keeps this rollback" in result.out and "api runs" not in result.out


def test_a_crash_looping_release_fails_the_rollback_too(hearth, running_cluster):
    running_cluster.controller.outcomes[("default", "web")] = "crash-loop"
    result = hearth("rollback", "web", "--yes")
    assert result.code == 1
    assert result.err == ("hearth: the rollback of web to v1.4.1 failed: web is crash-looping: restarted 3 times, "
                          "last exit code 255 (Error)\n")


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
