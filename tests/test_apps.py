"""The apps: the table against the issue, and what each stage declares for them in its namespace."""
from __future__ import annotations

import base64
import ipaddress
import json
import re
from urllib.parse import unquote, urlsplit

import pytest

from infra import apps, traefik_values
from tests.kube_api import live_estate
from tests.shared import SPEC
from tools.offline import evaluate, unwrap

IMAGES = {  # the issue's table
    "api": "ghcr.io/katforge/api.katforge.com",
    "web": "ghcr.io/katforge/katforge.com",
    "lextris": "ghcr.io/katforge/lextris.com",
    "stumper": "ghcr.io/katforge/stumper.gg",
}
MIGRATE = "php bin/console doctrine:migrations:migrate --no-interaction --allow-no-migration"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
INGRESS_ROUTE = "kubernetes:traefik.io/v1alpha1:IngressRoute"
MIDDLEWARE = "kubernetes:traefik.io/v1alpha1:Middleware"
POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"


def deployments(plan) -> dict:
    return {r.inputs["metadata"]["name"]: r for r in plan.of_type(DEPLOYMENT)}


def pod(deployment) -> dict:
    return deployment.inputs["spec"]["template"]["spec"]


def pod_labels(deployment) -> dict:
    return deployment.inputs["spec"]["template"]["metadata"]["labels"]


def by_name(plan, token) -> dict:
    return {r.inputs["metadata"]["name"]: r.inputs for r in plan.of_type(token)}


def routes(plan) -> dict:
    """host + path -> (service, middleware specs, tls) of every IngressRoute rule; an exact Path is
    keyed with a trailing "=" ("katforge.com/play/lextris=")."""
    middlewares = by_name(plan, MIDDLEWARE)
    found = {}
    for route in by_name(plan, INGRESS_ROUTE).values():
        for rule in route["spec"]["routes"]:
            host = re.search(r"Host\(`([^`]+)`\)", rule["match"]).group(1)
            prefix = re.search(r"PathPrefix\(`([^`]+)`\)", rule["match"])
            exact = re.search(r"\bPath\(`([^`]+)`\)", rule["match"])
            path = f"{exact.group(1)}=" if exact else prefix.group(1) if prefix else ""
            [service] = rule["services"]
            specs = [middlewares[m["name"]]["spec"] for m in rule.get("middlewares", [])]
            found[host + path] = (service, specs, route["spec"]["tls"])
    return found


def resolve(document, path: str):
    """The value at a Pulumi property path such as `spec.containers[0].image`."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        document = document[int(part[1:-1])] if part.startswith("[") else document[part]
    return document


# --- the table ---------------------------------------------------------------------------------

def test_table_holds_the_four_apps_with_their_images():
    assert {app.name: app.image for app in apps.APPS} == IMAGES


def test_qa_runs_only_api_and_web():
    assert [a.name for a in apps.apps_in("qa")] == ["api", "web"]
    assert [a.name for a in apps.apps_in("prod")] == ["api", "web", "lextris", "stumper"]


def test_database_url_escapes_the_password():
    url = apps.database_url(role="katforge", password="p@ss/w:rd?#", host="172.31.14.98", database="katforge")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("postgres", "172.31.14.98", 5432, "/katforge")
    assert (parts.username, unquote(parts.password)) == ("katforge", "p@ss/w:rd?#")


def test_pull_secret_authenticates_to_ghcr():
    config = json.loads(apps.dockerconfigjson(username="katforge-deploy", token="ghp_x"))
    assert base64.b64decode(config["auths"]["ghcr.io"]["auth"]).decode() == "katforge-deploy:ghp_x"


def test_https_egress_only_for_apps_that_ask_for_it():
    caller = apps.App("caller", "ghcr.io/katforge/caller", routes={"prod": (apps.Route("caller.katforge.com"),)},
                      resources=apps.APPS[0].resources, https_egress=True)
    policies = {p["metadata"]["name"]: p for p in apps.network_policies(
        [caller, apps.APPS[1]], namespace="default", postgres_host="172.31.14.98")}
    ports = {name: {port["port"] for rule in p["spec"].get("egress", []) for port in rule["ports"]}
             for name, p in policies.items()}
    assert 443 in ports["caller"] and 443 not in ports["web"]


# --- deployments -------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_each_app_runs_its_image_at_the_configured_tag_with_migrations_first(stack, request):
    plan = request.getfixturevalue(stack)
    found = deployments(plan)
    assert set(found) == {a.name for a in apps.apps_in(stack)}
    for name, deployment in found.items():
        spec = pod(deployment)
        [migrate] = spec["initContainers"]
        [main] = spec["containers"]
        assert main["image"] == migrate["image"] == f"{IMAGES[name]}:offline-plan"  # tools/offline.py's imageTags placeholder
        assert " ".join(migrate["command"]) == MIGRATE
        assert migrate["env"] == main["env"], "migrations need the same database as the app"


@pytest.mark.parametrize("stack", ["prod", "qa"])
def test_images_belong_to_the_ship_pipeline(stack, request):
    for deployment in deployments(request.getfixturevalue(stack)).values():
        ignored = deployment.options["ignore_changes"]
        assert sorted(ignored) == ["spec.template.spec.containers[0].image",
                                   "spec.template.spec.initContainers[0].image"]
        for path in ignored:
            assert resolve(deployment.inputs, path).startswith("ghcr.io/katforge/"), path


def test_pods_are_locked_down(prod):
    for name, deployment in deployments(prod).items():
        spec = pod(deployment)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["imagePullSecrets"] == [{"name": apps.PULL_SECRET}]
        for container in spec["initContainers"] + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert "privileged" not in context
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_probes_watch_the_http_port(prod):
    for deployment in deployments(prod).values():
        [main] = pod(deployment)["containers"]
        assert main["ports"][0]["name"] == "http"
        for probe in ("readinessProbe", "livenessProbe"):
            check = main[probe].get("httpGet") or main[probe].get("tcpSocket")
            assert check["port"] == "http", probe


def test_secrets_come_by_reference_and_smtp_only_to_the_api(prod):
    for name, deployment in deployments(prod).items():
        [main] = pod(deployment)["containers"]
        env = {e["name"]: e for e in main["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": apps.DATABASE_SECRET,
                                                                     "key": "DATABASE_URL"}
        has_smtp = "SMTP_PASSWORD" in env
        assert has_smtp == (name == "api"), name
        if has_smtp:
            assert env["SMTP_HOST"]["value"] == "email-smtp.us-east-2.amazonaws.com"
            assert env["SMTP_PORT"]["value"] == "587"
            assert "value" not in env["SMTP_PASSWORD"] and "value" not in env["SMTP_USERNAME"]


@pytest.mark.parametrize("stack, database, namespace", [("prod", "katforge", "default"), ("qa", "katforge_qa", "qa")])
def test_database_url_secret_points_at_the_stage_database(stack, database, namespace, request):
    plan = request.getfixturevalue(stack)
    [secret] = [r for r in plan.of_type("kubernetes:core/v1:Secret")
                if r.inputs["metadata"]["name"] == apps.DATABASE_SECRET
                and r.inputs["metadata"]["namespace"] == namespace]
    assert secret.inputs["stringData"] == "[secret]"
    url = urlsplit(unwrap(secret.raw_inputs)["stringData"]["DATABASE_URL"])
    assert (url.hostname, url.port, url.path, url.username) == ("172.31.14.98", 5432, f"/{database}", database)
    assert unquote(url.password).startswith("offline-placeholder-dbPassword-")


def test_qa_gets_smtp_credentials_from_prod(qa):
    [secret] = [r for r in qa.of_type("kubernetes:core/v1:Secret") if r.inputs["metadata"]["name"] == apps.SMTP_SECRET]
    data = unwrap(secret.raw_inputs)["stringData"]
    assert data["SMTP_PASSWORD"].startswith("offline-smtp-")
    assert urlsplit(data["MAILER_DSN"]).hostname == "email-smtp.us-east-2.amazonaws.com"


# --- routing -----------------------------------------------------------------------------------

def test_prod_routing_matches_the_spec(prod):
    found = routes(prod)
    assert set(found) == {"katforge.com", "www.katforge.com", "api.katforge.com", "stumper.gg",
                          "katforge.com/play/lextris/", "katforge.com/play/lextris="}
    assert found["katforge.com"][0]["name"] == "web"
    assert found["api.katforge.com"][0]["name"] == "api"
    assert found["stumper.gg"][0]["name"] == "stumper"
    service, middlewares, _ = found["katforge.com/play/lextris/"]
    assert service["name"] == "lextris"
    [strip] = middlewares
    path = "/play/lextris/assets/app.js"
    [prefix] = strip["stripPrefix"]["prefixes"]
    assert path[len(prefix):] == "/assets/app.js" and path.startswith(prefix)


def test_www_answers_a_permanent_redirect_to_the_apex(prod):
    _, [redirect], _ = routes(prod)["www.katforge.com"]
    rule = redirect["redirectRegex"]
    assert rule["permanent"] is True
    replacement = rule["replacement"].replace("${1}", r"\1")
    assert re.sub(rule["regex"], replacement, "https://www.katforge.com/news?id=3") == "https://katforge.com/news?id=3"


def test_lextris_without_its_slash_redirects_to_it(prod):
    """`/play/lextris` would otherwise fall through to web's `/` route and answer 404."""
    service, [redirect], _ = routes(prod)["katforge.com/play/lextris="]
    rule = redirect["redirectRegex"]
    assert rule["permanent"] is True
    replacement = rule["replacement"].replace("${1}", r"\1").replace("${2}", r"\2")  # Go's syntax, Python's
    for url, target in [("https://katforge.com/play/lextris", "https://katforge.com/play/lextris/"),
                        ("https://katforge.com/play/lextris?level=3", "https://katforge.com/play/lextris/?level=3")]:
        assert re.sub(rule["regex"], replacement, url) == target
    assert not re.match(rule["regex"], "https://katforge.com/play/lextrisx")
    # Traefik tries the longest rule first (its default priority is the rule's length): web's
    # `Host(katforge.com)` must lose to the redirect.
    rules = {r["spec"]["routes"][0]["match"] for r in by_name(prod, INGRESS_ROUTE).values()}
    redirect_rule = next(m for m in rules if "Path(`/play/lextris`)" in m)
    assert len(redirect_rule) > len("Host(`katforge.com`)") and "Host(`katforge.com`)" in rules


def test_every_path_route_gets_the_redirect_of_its_slashless_form():
    app = apps.App("docs", "ghcr.io/katforge/docs", resources=apps.APPS[0].resources, routes={"prod": (
        apps.Route("katforge.com", path="/docs/"), apps.Route("katforge.com", path="/raw"),
        apps.Route("www.katforge.com", path="/old/", redirect_to="katforge.com"))})
    derived = [(r.host, r.path) for r in apps.routes_in(app, "prod") if r.add_slash]
    assert derived == [("katforge.com", "/docs")]


def test_every_route_is_https_with_the_dns_challenge_resolver(prod, qa):
    for plan in (prod, qa):
        for route in by_name(plan, INGRESS_ROUTE).values():
            assert route["spec"]["entryPoints"] == ["websecure"]
        for host, (_, _, tls) in routes(plan).items():
            assert tls == {"certResolver": traefik_values.DNS_RESOLVER}, host


def test_routed_hosts_are_every_name_of_every_stage(prod, qa):
    hosts = {re.search(r"Host\(`([^`]+)`\)", route["spec"]["routes"][0]["match"]).group(1)
             for plan in (prod, qa) for route in by_name(plan, INGRESS_ROUTE).values()}
    assert apps.routed_hosts() == sorted(hosts)


def test_qa_routes_admit_only_the_vpn_host(qa, prod):
    """VPN clients reach Traefik masqueraded to the VPN host's private address (wireguard.sh), so that
    /32, which prod exports and qa reads, is the whole allow list."""
    found = routes(qa)
    assert set(found) == {"qa.katforge.com", "qa.api.katforge.com"}
    address = prod.raw_outputs["vpnPrivateIp"]
    ipaddress.IPv4Address(address)
    for host, (_, middlewares, _) in found.items():
        assert middlewares[0] == {"ipAllowList": {"sourceRange": [f"{address}/32"]}}, host
    for host, (_, middlewares, _) in routes(prod).items():
        assert not any("ipAllowList" in m for m in middlewares), host


def test_the_allow_list_takes_one_address_not_a_range():
    assert apps.vpn_only_middleware("172.31.1.10", namespace="qa")["spec"]["ipAllowList"] == {
        "sourceRange": ["172.31.1.10/32"]}
    with pytest.raises(ValueError):
        apps.vpn_only_middleware("172.31.0.0/16", namespace="qa")


def test_route_services_exist_in_the_same_namespace(prod, qa):
    for plan in (prod, qa):
        services = {(s.inputs["metadata"]["namespace"], s.inputs["metadata"]["name"]): s.inputs
                    for s in plan.of_type("kubernetes:core/v1:Service")}
        deployed = {(d.inputs["metadata"]["namespace"], name): d for name, d in deployments(plan).items()}
        for route in by_name(plan, INGRESS_ROUTE).values():
            namespace = route["metadata"]["namespace"]
            for rule in route["spec"]["routes"]:
                [target] = rule["services"]
                service = services[(namespace, target["name"])]
                assert target["port"] in [p["port"] for p in service["spec"]["ports"]]
                assert service["spec"]["selector"].items() <= pod_labels(deployed[(namespace, target["name"])]).items()


def test_the_live_pods_match_every_selector_the_program_declares_for_them(prod, qa):
    """The live Deployments (tests/kube_api.py) keep their selector, which cannot change without replacing
    them; their pods, before the first rollout replaces them, stay behind their Service and inside their
    network policy, and the new pods match the old selector too."""
    live = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in live_estate() if o["kind"] == "Deployment"}
    for plan in (prod, qa):
        services = {s.inputs["metadata"]["name"]: s.inputs for s in plan.of_type("kubernetes:core/v1:Service")}
        for name, deployment in deployments(plan).items():
            namespace = deployment.inputs["metadata"]["namespace"]
            old = live[(namespace, name)]
            old_pods = old["spec"]["template"]["metadata"]["labels"]
            assert deployment.inputs["spec"]["selector"] == old["spec"]["selector"], name
            assert old["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items(), name
            assert services[name]["spec"]["selector"].items() <= old_pods.items(), name
            assert policies(plan, namespace)[name]["podSelector"]["matchLabels"].items() <= old_pods.items(), name


# --- network policies --------------------------------------------------------------------------

def policies(plan, namespace) -> dict:
    return {r.inputs["metadata"]["name"]: r.inputs["spec"] for r in plan.of_type(POLICY)
            if r.inputs["metadata"]["namespace"] == namespace}


@pytest.mark.parametrize("stack, namespace", [("prod", "default"), ("qa", "qa")])
def test_namespace_denies_by_default_and_allows_dns(stack, namespace, request):
    found = policies(request.getfixturevalue(stack), namespace)
    assert found["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    [dns] = found["allow-dns"]["egress"]
    [peer] = dns["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}


@pytest.mark.parametrize("stack, namespace", [("prod", "default"), ("qa", "qa")])
def test_default_deny_comes_only_once_every_allowance_is_in_place(stack, namespace, request):
    """In a namespace whose pods already run, no pod is denied for a moment what its own policy allows."""
    plan = request.getfixturevalue(stack)
    found = {r.inputs["metadata"]["name"]: r for r in plan.of_type(POLICY)
             if r.inputs["metadata"]["namespace"] == namespace}
    deny = found.pop("default-deny")
    assert found and {r.urn for r in found.values()} <= set(deny.options["depends_on"])


@pytest.mark.parametrize("stack, namespace", [("prod", "default"), ("qa", "qa")])
def test_each_app_takes_traffic_only_from_traefik_and_reaches_only_what_it_needs(stack, namespace, request):
    plan = request.getfixturevalue(stack)
    found = policies(plan, namespace)
    for name, deployment in deployments(plan).items():
        spec = found[name]
        assert spec["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
        [ingress] = spec["ingress"]
        [source] = ingress["from"]
        assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "traefik"}
        assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
        [main] = pod(deployment)["containers"]
        assert [p["port"] for p in ingress["ports"]] == [main["ports"][0]["containerPort"]]
        egress = {(rule["to"][0]["ipBlock"]["cidr"], port["port"]) for rule in spec["egress"] for port in rule["ports"]}
        expected = {("172.31.14.98/32", 5432)} | ({("0.0.0.0/0", 587)} if name == "api" else set())
        assert egress == expected, name
        for rule in spec["egress"]:
            block = rule["to"][0]["ipBlock"]
            if block["cidr"] == "0.0.0.0/0":
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])


@pytest.mark.parametrize("stack, namespace", [("prod", "default"), ("qa", "qa")])
def test_the_specs_manual_snapshot_pod_may_reach_only_postgresql(stack, namespace, request):
    """The spec's ad-hoc backup (`kubectl run ... pgdump -- pg_dump -h 172.31.14.98`) stays valid
    under default-deny: a pod named pgdump (kubectl labels it run=pgdump) reaches PostgreSQL, nothing else."""
    if SPEC.exists():
        assert "kubectl run --rm -i --restart=Never" in SPEC.read_text() and "pgdump --" in SPEC.read_text()
    allowed = [spec for spec in policies(request.getfixturevalue(stack), namespace).values()
               if spec["podSelector"].get("matchLabels") == {"run": "pgdump"}]
    assert len(allowed) == 1
    assert "ingress" not in allowed[0] and allowed[0]["policyTypes"] == ["Egress"]
    [rule] = allowed[0]["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "172.31.14.98/32"}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


def digests(plan) -> dict:
    return {name: d.inputs["spec"]["template"]["metadata"]["annotations"][apps.SECRETS_DIGEST]
            for name, d in deployments(plan).items()}


def test_a_rotated_password_rolls_every_pod_that_reads_it(prod):
    """Pods read their Secrets into env only at start: the pod template carries a digest of what each
    app reads, so a new password rolls the Deployment. Only the api reads the SMTP credentials."""
    before = digests(prod)
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in before.values()), before
    assert before["api"] != before["web"] == before["lextris"] == before["stumper"]
    after = digests(evaluate("prod", config={"katforge:dbPassword": "rotated-password"}))
    assert all(after[name] != before[name] for name in before), (before, after)
