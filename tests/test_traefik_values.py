"""Traefik's chart values, checked without Pulumi: against the chart's own schema and against what
the chart's templates make of them."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra import traefik_values
from infra.settings import K3S_TRAEFIK_CHART
from tests.shared import CHARTS, require

ARGS = {"acme_email": "ops@katforge.com", "aws_region": "us-east-2", "node_ip": "172.31.14.98",
        "credentials_hash": traefik_values.credentials_hash("AKIAEXAMPLE")}


def helm_merge(defaults: dict, overrides: dict) -> dict:
    """Helm's coalescing of user values over chart defaults: maps merge, null deletes, everything else
    replaces."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def chart_flags(path: str, content: dict) -> list[str]:
    """What the chart's `traefik.yaml2CommandLineArgs` helper makes of a values map: maps flatten
    into dotted flags, lists join with commas, and empty or false values vanish."""
    flags = []
    for key, value in sorted(content.items()):
        if isinstance(value, dict):
            flags += chart_flags(f"{path}.{key}", value)
        elif not value:
            continue  # the template's `with` drops empty and false values
        elif isinstance(value, list):
            flags.append(f"--{path}.{key}={','.join(value)}")
        else:  # Go prints booleans in lower case
            flags.append(f"--{path}.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return flags


@pytest.fixture(scope="module")
def values() -> dict:
    return traefik_values.values(**ARGS)


@pytest.fixture(scope="module", params=sorted(set(K3S_TRAEFIK_CHART.values())))
def chart(request) -> tuple[dict, dict]:
    """(default values, schema) of the chart a pinnable k3s release bundles."""
    charts = require(CHARTS, "to check the values against the chart's values.schema.json")
    version = request.param
    assert (charts / f"values.schema.v{version}.json").is_file(), \
        f"Traefik chart {version} (bundled by a k3s in K3S_TRAEFIK_CHART) is not vendored in {charts}"
    defaults = yaml.safe_load((charts / f"values.v{version}.yaml").read_text())
    schema = json.loads((charts / f"values.schema.v{version}.json").read_text())
    return defaults, schema


def test_values_satisfy_the_chart_schema(values, chart):
    defaults, schema = chart
    merged = helm_merge(defaults, values)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(merged), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_values_use_entry_points_and_volume_the_chart_defines(values, chart):
    defaults, _ = chart
    assert set(values["ports"]) <= set(defaults["ports"])
    assert values["ports"]["web"]["http"]["redirections"]["entryPoint"]["to"] in defaults["ports"]
    storage = Path(values["certificatesResolvers"][traefik_values.DNS_RESOLVER]["acme"]["storage"])
    assert storage.parent == Path(defaults["persistence"]["path"]), "acme.json must live on the persistent volume"


def test_yaml_rendering_round_trips(values):
    assert yaml.safe_load(traefik_values.values_yaml(**ARGS)) == values


def test_route53_dns_challenge_with_the_acme_email():
    flags = chart_flags("certificatesresolvers", traefik_values.values(**ARGS)["certificatesResolvers"])
    dns = f"--certificatesresolvers.{traefik_values.DNS_RESOLVER}.acme"
    assert f"{dns}.dnsChallenge.provider=route53" in flags
    assert f"{dns}.email=ops@katforge.com" in flags
    assert f"{dns}.storage=/data/acme.json" in flags


def test_one_resolver_the_dns_challenge_for_every_name(values):
    """stumper.gg too: no zone is pinned, so lego looks up each name's own zone."""
    assert list(values["certificatesResolvers"]) == [traefik_values.DNS_RESOLVER]
    assert "AWS_HOSTED_ZONE_ID" not in {e["name"] for e in values["env"]}


def test_aws_settings_in_env_and_credentials_only_by_reference(values):
    env = {e["name"]: e for e in values["env"]}
    assert env["AWS_REGION"]["value"] == "us-east-2"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": traefik_values.CREDENTIALS_SECRET, "key": key}


def test_https_everywhere_and_client_addresses_kept(values):
    assert values["ports"]["web"]["http"]["redirections"]["entryPoint"] == {
        "to": "websecure", "scheme": "https", "permanent": True}
    assert values["ports"]["websecure"]["http"]["tls"]["enabled"] is True
    assert values["ports"]["websecure"]["http"]["tls"]["certResolver"] == traefik_values.DNS_RESOLVER
    assert values["persistence"]["enabled"] is True
    assert values["service"]["spec"]["externalTrafficPolicy"] == "Local"


def test_memory_limit_matches_the_budgeted_figure(values):
    assert values["resources"]["limits"]["memory"] == f"{traefik_values.MEMORY_LIMIT_MIB}Mi"


def test_access_log_on(values):
    assert values["logs"]["access"]["enabled"] is True


def test_one_pod_at_a_time(values, chart):
    """Recreate, with the chart's rollingUpdate defaults dropped: the API refuses them beside Recreate."""
    defaults, _ = chart
    merged = helm_merge(defaults, values)["updateStrategy"]
    assert merged == {"type": "Recreate"}


def test_a_new_dns_challenge_key_restarts_traefik():
    annotations = [traefik_values.values(**{**ARGS, "credentials_hash": traefik_values.credentials_hash(key)})
                   ["deployment"]["podAnnotations"] for key in ("AKIAOLD", "AKIANEW")]
    assert annotations[0] != annotations[1]
    assert set(annotations[0]) == {traefik_values.CREDENTIALS_HASH_ANNOTATION}
    assert "AKIAOLD" not in str(annotations[0])


def test_the_service_takes_the_nodes_private_address_itself(values):
    """kube-proxy, not ServiceLB's masquerading svclb pod, must handle traffic to 172.31.14.98, where
    AWS delivers the Elastic IP's packets: otherwise the qa allow list sees only pod addresses."""
    assert values["service"]["externalIPs"] == [ARGS["node_ip"]]
    assert values["service"]["spec"]["externalTrafficPolicy"] == "Local"
