"""Discovery of the cluster through lightkube against tests/kube_api.py, a local API server serving the
live estate's objects (each built-in one valid Kubernetes 1.34, strict), and the server itself."""
from __future__ import annotations

import base64
import gzip
import json
import re
import urllib.error
import urllib.request

import pytest

from tests.kube_api import PLANTED, TRAEFIK_ADDON, TRAEFIK_MANIFEST, KubeApi, Reply, live_estate, selector, serve

pytest.importorskip("lightkube", reason="lightkube is not installed: make test must install requirements-tools.txt")
from tools import discover_cluster  # noqa: E402
from tools.discover_targets import targets

# Session fixtures (servers), shared by every module that names them here: imported, each module would
# start its own.
pytest_plugins = ["tests.kube_api"]


@pytest.fixture(scope="module")
def kubeconfig(kube_api, tmp_path_factory):
    return kube_api.kubeconfig(tmp_path_factory.mktemp("kube") / "katforge-config")


@pytest.fixture(scope="module")
def prod(kubeconfig):
    return discover_cluster.discover(targets("prod"), kubeconfig)


@pytest.fixture(scope="module")
def qa(kubeconfig):
    return discover_cluster.discover(targets("qa"), kubeconfig)


def test_objects_at_declared_names_are_found_with_their_import_ids(prod):
    objects = prod["objects"]
    for app in ("api", "web", "lextris", "stumper"):
        assert objects[f"Deployment default/{app}"]["import"] == {"type": "kubernetes:apps/v1:Deployment",
                                                                   "id": f"default/{app}"}
        assert objects[f"Service default/{app}"]["import"] == {"type": "kubernetes:core/v1:Service",
                                                                "id": f"default/{app}"}
    assert objects["Namespace ci"]["import"] == {"type": "kubernetes:core/v1:Namespace", "id": "ci"}
    assert objects["Deployment default/api"]["images"] == {"api": "ghcr.io/katforge/api.katforge.com:v1.4.2"}
    assert objects["Deployment default/api"]["managers"] == ["kubectl", "kubectl-client-side-apply"]
    # default is patched, never imported; CI's account goes by another name live.
    assert objects["Namespace default"] == {**objects["Namespace default"], "exists": True, "import": None}
    assert objects["ServiceAccount ci/deployer"] == {"exists": False}
    assert objects["Secret default/database"] == {"exists": False}


def test_qa_reads_its_own_namespace_and_the_specs_namespaces(qa):
    objects = qa["objects"]
    assert objects["Namespace qa"]["import"] == {"type": "kubernetes:core/v1:Namespace", "id": "qa"}
    assert objects["Deployment qa/api"]["exists"] and objects["Service qa/web"]["exists"]
    assert {"Namespace default", "Namespace ci"} <= set(objects)
    assert not [key for key in objects if " default/" in key or "kube-system" in key]


def test_traefik_config_is_found_owned_by_the_manifest_file(prod):
    config = prod["objects"]["HelmChartConfig kube-system/traefik"]
    assert config["import"] == {"type": "kubernetes:helm.cattle.io/v1:HelmChartConfig", "id": "kube-system/traefik"}
    assert config["deployController"] == {"owned": True, "ownerGvk": "k3s.cattle.io/v1, Kind=Addon",
                                          "owner": f"kube-system/{TRAEFIK_ADDON}",
                                          "addon": {"exists": True, "source": TRAEFIK_MANIFEST}}
    assert config["inlineSecrets"] == ["env[0][name=AWS_ACCESS_KEY_ID].value", "env[1][name=AWS_SECRET_ACCESS_KEY].value"]


def test_traefik_config_applied_by_hand_is_not_the_files(tmp_path):
    api = serve(live_estate(traefik_owned_by_file=False))
    try:
        found = discover_cluster.discover(targets("prod"), api.kubeconfig(tmp_path / "config"))
    finally:
        api.stop()
    config = found["objects"]["HelmChartConfig kube-system/traefik"]
    assert config["exists"] and "deployController" not in config


def test_traefiks_pvc(prod):
    assert prod["objects"]["PersistentVolumeClaim kube-system/traefik"] == {
        **prod["objects"]["PersistentVolumeClaim kube-system/traefik"],
        "exists": True, "import": None, "storageClassName": "local-path", "capacity": "128Mi", "phase": "Bound",
        "accessModes": ["ReadWriteOnce"], "volumeName": "pvc-3b7c2d4e-5f60-4a1b-8c9d-0e1f2a3b4c5d"}


def test_no_secret_value_is_kept_only_where_secrets_are(prod, kube_api):
    text = json.dumps(prod)
    applied = kube_api.objects[(kube_api.kind_of("helm.cattle.io/v1", "HelmChartConfig"), "kube-system", "traefik")]
    encoded = [applied["metadata"]["annotations"]["objectset.rio.cattle.io/applied"], kube_api.token,
               *(base64.b64encode(v.encode()).decode() for v in PLANTED.values())]
    assert not [v for v in [*PLANTED.values(), *encoded] if v in text]
    assert prod["objects"]["Secret default/ghcr"]["keys"] == [".dockerconfigjson"]
    assert {s["where"]: s["configKey"] for s in prod["secrets"]} == {
        "cluster: Secret default/ghcr, keys .dockerconfigjson": "ghcrToken",
        "cluster: HelmChartConfig kube-system/traefik spec.valuesContent env[0][name=AWS_ACCESS_KEY_ID].value, "
        "env[1][name=AWS_SECRET_ACCESS_KEY].value": None}


def test_the_kubeconfig_is_chosen_as_documented(tmp_path):
    assert discover_cluster.kubeconfig_path("~/mine", {"KUBECONFIG": "/a:/b"}).name == "mine"
    assert str(discover_cluster.kubeconfig_path(None, {"KUBECONFIG": "/a:/b"})) == "/a"
    assert discover_cluster.kubeconfig_path(None, {}).name == "katforge-config"


# --- the test server itself ------------------------------------------------------------------------

def test_the_server_refuses_an_object_kubernetes_would_not_accept():
    api = KubeApi()
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "default"},
           "spec": {"ports": [{"port": "eighty"}]}}
    with pytest.raises(ValueError, match="not valid Kubernetes 1.34.0"):
        api.add(bad)


def test_the_server_wants_the_kubeconfigs_token(kube_api):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{kube_api.url}/api/v1/namespaces/default")
    assert refused.value.code == 401


def test_the_applied_annotation_is_wranglers_encoding_of_the_object(kube_api):
    config = kube_api.objects[(kube_api.kind_of("helm.cattle.io/v1", "HelmChartConfig"), "kube-system", "traefik")]
    applied = json.loads(gzip.decompress(base64.b64decode(config["metadata"]["annotations"]["objectset.rio.cattle.io/applied"])))
    assert applied["spec"] == config["spec"]


@pytest.mark.parametrize("text, labels, matches", [
    ("app=web", {"app": "web"}, True), ("app==web", {"app": "api"}, False), ("app!=web", {}, True),
    ("app", {"app": ""}, True), ("!app", {"app": "x"}, False), ("app in (web, api)", {"app": "api"}, True),
    ("app notin (web,api)", {"app": "api"}, False), ("app=web,tier", {"app": "web"}, False), ("", {}, True),
])
def test_label_selectors_as_kubernetes_reads_them(text, labels, matches):
    assert selector(text)(labels) is matches


def test_lists_filter_by_label_across_namespaces(kube_api):
    request = urllib.request.Request(f"{kube_api.url}/apis/apps/v1/deployments?labelSelector=app%20in%20(web)",
                                     headers={"Authorization": f"Bearer {kube_api.token}"})
    listed = json.load(urllib.request.urlopen(request))
    assert listed["kind"] == "DeploymentList"
    assert [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in listed["items"]] == [("default", "web"),
                                                                                              ("qa", "web")]


def test_a_streamed_endpoint_plugs_in_as_a_route(tmp_path):
    """How watch and pod logs extend the server: a route of its own whose reply is a stream of chunks."""
    api = serve(live_estate())
    try:
        @api.route("GET", re.compile(r"^/api/v1/namespaces/(?P<namespace>[^/]+)/pods/(?P<name>[^/]+)/log$"))
        def log(server, match, query):
            return Reply(200, (f"{match['name']} line {i}\n".encode() for i in range(3)), "text/plain")

        def get(path: str):
            return urllib.request.urlopen(urllib.request.Request(
                f"{api.url}{path}", headers={"Authorization": f"Bearer {api.token}"}))

        assert get("/api/v1/namespaces/default/pods/api-1/log?follow=true").read() == (
            b"api-1 line 0\napi-1 line 1\napi-1 line 2\n")
        assert json.load(get("/api/v1/namespaces/qa"))["metadata"]["name"] == "qa"
    finally:
        api.stop()
