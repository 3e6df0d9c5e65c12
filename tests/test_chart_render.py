"""The real Traefik chart, rendered by a real `helm template` the way k3s's helm-controller installs it,
and the program's Traefik objects against the chart's own CRDs.

helm-controller passes the HelmChart's values, then the HelmChartConfig's, as values files in that
order (values-0-000-HelmChart-ValuesContent.yaml, values-1-000-HelmChartConfig-ValuesContent.yaml:
k3s-io/helm-controller, pkg/controllers/chart/chart.go). The first is k3s's own (tests/data), the
second the valuesContent the prod plan declares. Needs ../shared (the vendored chart) and helm; each
test skips with the reason when one is missing.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra import apps, traefik_values
from infra.settings import K3S_TRAEFIK_CHART
from tests.shared import CHARTS, helm, require
from tools.offline import project_config_schema, unwrap

K3S_VALUES = Path(__file__).parent / "data" / "k3s-traefik-values.yaml"
CHART_VERSION = K3S_TRAEFIK_CHART[project_config_schema()["k3sVersion"]["default"]]
KUBERNETES_VERSION = "1.34.0"
CRD_GROUP = "traefik.io"


def chart_dir() -> Path:
    return require(CHARTS / f"chart-v{CHART_VERSION}" / "traefik",
                   f"to render Traefik chart {CHART_VERSION}, the one the pinned k3s bundles")


def helm_chart_config(plan):
    [config] = plan.of_type("kubernetes:helm.cattle.io/v1:HelmChartConfig")
    return config


@pytest.fixture(scope="session")
def rendered(tmp_path_factory, prod) -> list[dict]:
    """Every object `helm template` makes of the chart with k3s's values and the program's."""
    chart, binary = chart_dir(), helm()
    ours = tmp_path_factory.mktemp("helm") / "values-1-000-HelmChartConfig-ValuesContent.yaml"
    ours.write_text(helm_chart_config(prod).raw_inputs["spec"]["valuesContent"])
    done = subprocess.run([binary, "template", traefik_values.RELEASE, str(chart), "--namespace",
                           traefik_values.NAMESPACE, "--kube-version", KUBERNETES_VERSION,
                           "--values", str(K3S_VALUES), "--values", str(ours)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict]:
    """kind -> openAPIV3Schema of the chart's traefik.io CRDs, strict about fields they do not name."""
    schemas = {}
    for path in sorted((chart_dir() / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd and crd["kind"] == "CustomResourceDefinition":
                [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
                schemas[crd["spec"]["names"]["kind"]] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def strict(schema: dict) -> dict:
    """The schema with every object that names its fields closed to others. The API server drops a
    field its schema does not know (or refuses it, with strict field validation), so a misspelt field
    would otherwise pass here and vanish there."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


# --- what the chart makes of the values ---------------------------------------------------------

def test_traefik_solves_the_dns_challenge_with_the_key_from_the_secret(rendered):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = set(container["args"])
    resolver = f"--certificatesresolvers.{traefik_values.DNS_RESOLVER}.acme"
    assert {f"{resolver}.dnsChallenge.provider=route53", f"{resolver}.email=ops@katforge.com",
            f"{resolver}.storage={traefik_values.ACME_STORAGE}",
            f"--entryPoints.websecure.http.tls.certResolver={traefik_values.DNS_RESOLVER}"} <= args
    assert not any("tlschallenge" in arg.lower() for arg in args)
    env = {e["name"]: e for e in container["env"]}
    assert "AWS_HOSTED_ZONE_ID" not in env and env["AWS_REGION"]["value"] == "us-east-2"
    for key in (traefik_values.ACCESS_KEY_ID, traefik_values.SECRET_ACCESS_KEY):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
            "name": traefik_values.CREDENTIALS_SECRET, "key": key}}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[str(Path(traefik_values.ACME_STORAGE).parent)]]


def test_traefik_logs_access_and_runs_one_pod_at_a_time(rendered):
    deployment = one(rendered, "Deployment")
    assert "--accesslog=true" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1


def test_a_new_dns_challenge_key_changes_the_pod_template(rendered, prod):
    annotations = one(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    key_id = unwrap(prod.raw_outputs["dnsChallengeAccessKeyId"])
    assert annotations[traefik_values.CREDENTIALS_HASH_ANNOTATION] == traefik_values.credentials_hash(key_id)


def test_k3s_own_values_still_apply(rendered):
    """The HelmChartConfig adds to k3s's values; it does not replace them."""
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["containers"][0]["image"].endswith("rancher/mirrored-library-traefik:3.6.10")


def test_the_service_keeps_client_addresses_and_takes_the_nodes_address(rendered):
    spec = one(rendered, "Service")["spec"]
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["externalIPs"] == ["172.31.14.98"]
    assert {p["port"] for p in spec["ports"]} == {80, 443}


def test_traefiks_memory_limit_is_the_budgeted_one(rendered):
    [container] = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == f"{traefik_values.MEMORY_LIMIT_MIB}Mi"


# --- validity -------------------------------------------------------------------------------------

def test_every_rendered_object_is_valid(rendered, crd_schemas):
    kinds = set()
    for obj in rendered:
        if obj["apiVersion"].startswith(f"{CRD_GROUP}/"):
            jsonschema.validate(obj, crd_schemas[obj["kind"]])
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message} at {list(error.path)}")
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_every_ingress_route_and_middleware_matches_the_crd(stack, request, crd_schemas):
    checked = set()
    for resource in request.getfixturevalue(stack).resources:
        if resource.type.startswith(f"kubernetes:{CRD_GROUP}/"):
            obj = unwrap(resource.raw_inputs)
            errors = sorted(jsonschema.Draft7Validator(crd_schemas[obj["kind"]]).iter_errors(obj), key=str)
            assert not errors, f"{resource.name}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
            checked.add(obj["kind"])
    assert checked == {"IngressRoute", "Middleware"}


def test_the_crd_check_refuses_a_misspelt_field(crd_schemas):
    route = apps.ingress_route(apps.APPS[0], apps.APPS[0].routes["prod"][0], namespace="default", vpn_only=False)
    jsonschema.validate(route, crd_schemas["IngressRoute"])
    route["spec"]["routes"][0]["midlewares"] = [{"name": "x"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, crd_schemas["IngressRoute"])

