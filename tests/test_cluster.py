"""Every Kubernetes object the program declares, and the cluster-wide ones prod owns."""
from __future__ import annotations

import base64

import kubernetes_validate
import pytest
import yaml

from infra import apps, cluster, traefik_values
from infra.settings import SettingsError
from tests.kube_api import live_estate
from tools.offline import evaluate, unwrap

# Custom resources: not in the Kubernetes schema. The HelmChartConfig's values are checked against
# the chart's schema in test_traefik_values.py; IngressRoute and Middleware in test_apps.py.
CRD_KINDS = {("helm.cattle.io/v1", "HelmChartConfig"), ("traefik.io/v1alpha1", "IngressRoute"),
             ("traefik.io/v1alpha1", "Middleware")}
STACKS = ["prod", "qa"]


def kubernetes_objects(plan):
    return [r for r in plan.resources if r.type.startswith("kubernetes:")]


def manifest(resource) -> dict:
    """The object as the API server receives it: inputs carry apiVersion and kind, and secret
    values are checked too (offline placeholders stand in for them)."""
    return unwrap(resource.raw_inputs)


def of_kind(plan, kind):
    return [r for r in kubernetes_objects(plan) if r.inputs["kind"] == kind]


@pytest.mark.parametrize("stack", STACKS)
def test_every_built_in_object_is_valid_kubernetes_1_34(stack, request):
    plan = request.getfixturevalue(stack)
    checked = set()
    for resource in kubernetes_objects(plan):
        obj = manifest(resource)
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, "1.34.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{resource.name} ({obj['kind']}): {error.message} at {list(error.path)}")
        checked.add(obj["kind"])
    assert checked >= {"Namespace", "Secret", "Deployment", "Service", "NetworkPolicy", "Role", "RoleBinding"}


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_object_goes_through_the_k3s_provider_inside_a_component(stack, request):
    plan = request.getfixturevalue(stack)
    components = {r.urn for r in plan.resources if r.type.startswith("katforge:cluster:")}
    for resource in kubernetes_objects(plan):
        deployment = resource.type == "kubernetes:apps/v1:Deployment"
        assert resource.options["provider"] == ("k3s-deployments" if deployment else "k3s"), resource.name
        assert resource.parent in components, resource.name


@pytest.mark.parametrize("stack", STACKS)
def test_nothing_cluster_wide_is_granted(stack, request):
    kinds = {r.inputs["kind"] for r in kubernetes_objects(request.getfixturevalue(stack))}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


# --- who owns what -----------------------------------------------------------------------------

def test_prod_owns_traefik_ci_and_default(prod):
    [config] = of_kind(prod, "HelmChartConfig")
    assert config.inputs["metadata"] == {"name": "traefik", "namespace": "kube-system"}
    [ci] = prod.of_type("kubernetes:core/v1:Namespace")
    assert ci.inputs["metadata"]["name"] == "ci"
    # default exists in every cluster: only its labels are patched, it is never created or deleted.
    [default] = [r for r in kubernetes_objects(prod) if r.type == "kubernetes:core/v1:NamespacePatch"]
    assert default.inputs["metadata"]["name"] == "default"


def test_qa_declares_only_namespace_qa(qa):
    namespaces = [r for r in kubernetes_objects(qa) if r.inputs["kind"] == "Namespace"]
    assert [n.inputs["metadata"]["name"] for n in namespaces] == ["qa"]
    assert namespaces[0].type == "kubernetes:core/v1:Namespace"
    for resource in kubernetes_objects(qa):
        if resource.inputs["kind"] != "Namespace":
            assert resource.inputs["metadata"]["namespace"] == "qa", resource.name
    assert not of_kind(qa, "HelmChartConfig") and not of_kind(qa, "ServiceAccount")


@pytest.mark.parametrize("stack", STACKS)
def test_namespaces_carry_pod_security_labels(stack, request):
    for namespace in of_kind(request.getfixturevalue(stack), "Namespace"):
        labels = namespace.inputs["metadata"]["labels"]
        expected = "restricted" if namespace.inputs["metadata"]["name"] == "ci" else "baseline"
        assert labels["pod-security.kubernetes.io/enforce"] == expected
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
        assert labels["pod-security.kubernetes.io/enforce-version"] == "v1.34"


# --- Traefik -----------------------------------------------------------------------------------

def test_traefik_values_reach_the_helm_chart_config_without_credentials(prod):
    [config] = of_kind(prod, "HelmChartConfig")
    text = config.raw_inputs["spec"]["valuesContent"]
    assert isinstance(text, str), "the values are readable in a preview: only a hash of the key ID is in them"
    key = unwrap(prod.raw_outputs["dnsChallengeSecretAccessKey"])
    key_id = unwrap(prod.raw_outputs["dnsChallengeAccessKeyId"])
    assert yaml.safe_load(text) == traefik_values.values(
        acme_email="ops@katforge.com", aws_region="us-east-2", node_ip="172.31.14.98",
        credentials_hash=traefik_values.credentials_hash(key_id))
    assert key not in text and key_id not in text


def test_a_failed_traefik_upgrade_is_left_for_an_operator_and_the_config_is_protected(prod):
    """helm-controller's default failure policy uninstalls Traefik and installs it again."""
    [config] = of_kind(prod, "HelmChartConfig")
    assert config.inputs["spec"]["failurePolicy"] == "abort"
    assert config.options["protect"] is True


def test_dns_challenge_key_is_a_kube_system_secret(prod):
    [secret] = [r for r in of_kind(prod, "Secret")
                if r.inputs["metadata"] == {"name": traefik_values.CREDENTIALS_SECRET, "namespace": "kube-system"}]
    assert secret.inputs["stringData"] == "[secret]"
    data = unwrap(secret.raw_inputs)["stringData"]
    assert data == {"AWS_ACCESS_KEY_ID": unwrap(prod.raw_outputs["dnsChallengeAccessKeyId"]),
                    "AWS_SECRET_ACCESS_KEY": unwrap(prod.raw_outputs["dnsChallengeSecretAccessKey"])}
    [config] = of_kind(prod, "HelmChartConfig")
    assert secret.urn in config.options["depends_on"], "Traefik must not start before its credentials exist"


# --- CI's deploy account -----------------------------------------------------------------------

def test_ci_service_account_has_a_long_lived_token(prod):
    [account] = of_kind(prod, "ServiceAccount")
    assert account.inputs["metadata"] == {"name": "deployer", "namespace": "ci"}
    assert account.inputs["automountServiceAccountToken"] is False
    [token] = [r for r in of_kind(prod, "Secret") if r.inputs["type"] == "kubernetes.io/service-account-token"]
    assert token.inputs["metadata"]["namespace"] == "ci"
    assert token.inputs["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "deployer"}
    assert account.urn in token.options["depends_on"]


def test_ci_kubeconfig_is_a_secret_output_using_the_token(prod):
    assert "ciKubeconfig" in prod.secret_outputs and prod.outputs["ciKubeconfig"] == "[secret]"
    config = yaml.safe_load(prod.raw_outputs["ciKubeconfig"])
    [entry] = config["clusters"]
    assert entry["cluster"]["server"] == "https://k3s.katforge.com:6443"
    # From the offline token controller (tools/offline.py): data is base64, the token is used decoded.
    assert base64.b64decode(entry["cluster"]["certificate-authority-data"]) == b"offline-ca"
    [user] = config["users"]
    assert user["user"] == {"token": "offline-token"}
    [context] = config["contexts"]
    assert config["current-context"] == context["name"]
    assert context["context"]["cluster"] == entry["name"] and context["context"]["user"] == user["name"]


@pytest.mark.parametrize("stack, namespace", [("prod", "default"), ("qa", "qa")])
def test_ci_may_set_images_watch_and_undo_rollouts_in_app_namespaces_only(stack, namespace, request):
    plan = request.getfixturevalue(stack)
    [role] = of_kind(plan, "Role")
    assert role.inputs["metadata"]["namespace"] == namespace
    granted = {(group, resource, verb) for rule in role.inputs["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {("apps", "deployments", v) for v in ("get", "list", "watch", "patch")} | {
        ("apps", "replicasets", "list")}
    [binding] = of_kind(plan, "RoleBinding")
    assert binding.inputs["metadata"]["namespace"] == namespace
    assert binding.inputs["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                         "name": role.inputs["metadata"]["name"]}
    assert binding.inputs["subjects"] == [{"kind": "ServiceAccount", "name": "deployer", "namespace": "ci"}]


@pytest.mark.parametrize("stack", STACKS)
def test_the_kubernetes_provider_is_replaced_only_with_the_cluster(stack, request, prod):
    """Its cluster is the k3s instance: a rewritten kubeconfig must not replace every object. Secrets
    change in place, and an existing object is never silently upserted."""
    plan = request.getfixturevalue(stack)
    providers = plan.of_type("pulumi:providers:kubernetes")
    assert len(providers) == 2
    instance = prod.named("k3s", "aws:ec2/instance:Instance")
    for provider in providers:
        assert provider.raw_inputs["clusterIdentifier"] == f"{instance.name}-id"
        assert provider.raw_inputs["enableSecretMutable"] in (True, "true")
        assert provider.raw_inputs["upsertExistingObjects"] in (False, "false")


# --- adopting the live cluster -----------------------------------------------------------------

def adoptable(plan):
    """What can take over a live object: every Kubernetes object but the patch of `default`."""
    return [r for r in kubernetes_objects(plan) if r.type != "kubernetes:core/v1:NamespacePatch"]


def live_id(resource) -> str:
    """pulumi-kubernetes' import ID: namespace/name, a Namespace by its name alone."""
    metadata = resource.inputs["metadata"]
    return f"{metadata['namespace']}/{metadata['name']}" if metadata.get("namespace") else metadata["name"]


def import_lines(resources) -> list[str]:
    return [f"{r.type.split(':')[-1]}:{r.name}={live_id(r)}" for r in resources]


def live_objects() -> set[tuple[str, str, str]]:
    """(kind, namespace/name) of what the live cluster holds (tests/kube_api.py), its HelmChartConfig as
    one applied by hand: one k3s applied from the manifest file is deleted by the handover, not imported."""
    return {(o["kind"], f"{o['metadata']['namespace']}/{o['metadata']['name']}" if o["metadata"].get("namespace")
             else o["metadata"]["name"]) for o in live_estate(traefik_owned_by_file=False)}


@pytest.fixture(scope="module")
def adopting(prod, qa):
    """Each stack planned with an import line for every object of it the live cluster already holds,
    as `make discover` writes them, and the lines given."""
    plans, found = {}, live_objects()
    for stack, plan in (("prod", prod), ("qa", qa)):
        live = [r for r in adoptable(plan) if (r.inputs["kind"], live_id(r)) in found]
        lines = import_lines(live)
        plans[stack] = (evaluate(stack, config={"katforge:imports": lines}), {r.name for r in live})
    return plans


@pytest.mark.parametrize("stack", STACKS)
def test_exactly_the_live_objects_listed_are_imported_by_namespace_and_name(stack, adopting):
    plan, listed = adopting[stack]
    imported = {r.name: r.options["import_id"] for r in kubernetes_objects(plan) if r.options["import_id"]}
    assert imported == {r.name: live_id(r) for r in kubernetes_objects(plan) if r.name in listed}
    kinds = {r.inputs["kind"] for r in kubernetes_objects(plan) if r.name in listed}
    # The objects that would stop `pulumi up` with AlreadyExists (issue 11): namespaces qa and ci, the apps'
    # Deployments and Services, the pull Secret, and a HelmChartConfig applied by hand.
    expected = {"Namespace", "Deployment", "Service", "Secret"} | ({"HelmChartConfig"} if stack == "prod" else set())
    assert kinds >= expected


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_object_can_take_over_a_live_one(stack, request):
    """The provider never upserts, so an object that exists live and is not imported stops `pulumi up`:
    each one the program declares must be able to take its import line (default excepted: patched)."""
    plan = request.getfixturevalue(stack)
    adopted = evaluate(stack, config={"katforge:imports": import_lines(adoptable(plan))})
    for resource in kubernetes_objects(adopted):
        expected = None if resource.type.endswith("NamespacePatch") else live_id(resource)
        assert (resource.options["import_id"] or None) == expected, resource.name
    assert len(adoptable(adopted)) == len(adoptable(plan)) > 15


def test_import_ids_are_namespace_slash_name_or_a_cluster_wide_name():
    assert cluster.import_id_of({"name": "api", "namespace": "default"}) == "default/api"
    assert cluster.import_id_of({"name": "ci", "labels": {}}) == "ci"


def test_an_import_line_must_name_the_object_its_resource_declares():
    """Importing another object would take it over and rewrite it into this one."""
    with pytest.raises(SettingsError, match=r"katforge:imports = Deployment:apps-api=default/web: "
                                            r"expected Deployment:apps-api=default/api"):
        evaluate("prod", config={"katforge:imports": ["Deployment:apps-api=default/web"]})


def test_the_default_namespace_is_never_adopted():
    """`default` is only patched: no line can hand it to the program, which would then delete it with the stack."""
    with pytest.raises(SettingsError, match="NamespacePatch:apps-namespace=default"):
        evaluate("prod", config={"katforge:imports": ["NamespacePatch:apps-namespace=default"]})


@pytest.mark.parametrize("stack", STACKS)
def test_deployments_never_send_an_image_back(stack, request, adopting):
    """The ship pipeline owns the images. Deployments go through the client-side-apply provider, whose
    three-way patch leaves out an ignored field (server-side apply cannot for one inside a list), and
    ignore their image fields whether adopted or created; everything else is server-side applied."""
    for plan in (request.getfixturevalue(stack), adopting[stack][0]):
        providers = {p.name: p.raw_inputs for p in plan.of_type("pulumi:providers:kubernetes")}
        assert providers["k3s-deployments"]["enableServerSideApply"] in (False, "false")
        assert "enableServerSideApply" not in providers["k3s"]
        for resource in plan.of_type("kubernetes:apps/v1:Deployment"):
            assert resource.options["ignore_changes"] == sorted(apps.IMAGE_FIELDS), resource.name