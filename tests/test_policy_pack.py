"""The CrossGuard pack (policy/): each invariant passes on today's offline plans and fails on a plan
changed to break it, checked twice: the pure check over `Plan.document()`, and the pack itself, its
policies run by pulumi-policy's own analyzer service from requests like the engine's."""
from __future__ import annotations

import copy
import json
from functools import lru_cache

import pytest
from google.protobuf import json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2
from pulumi_policy import EnforcementLevel
from pulumi_policy.policy import _PolicyAnalyzerServicer  # the service the CLI talks to (pulumi-policy 1.21)

from policy import rules
from policy.pack import POLICIES, keep_secrets_marked
from tools.offline import effective_config, evaluate, evaluate_cached

from tests import scaled

WIREGUARD_PORT = 51820
STACKS = ("prod", "qa")


@lru_cache(maxsize=None)
def secrets(stack: str) -> dict[str, str]:
    """The stack's secret config values as the offline plan has them (placeholders), by bare key."""
    config, secret_keys = effective_config(stack)
    return {key.partition(":")[2]: config[key] for key in secret_keys if key in config}


CHECKS = {
    "open-only-web-and-vpn": lambda r, stack: rules.open_to_the_world(r["type"], r["inputs"], WIREGUARD_PORT),
    "stateful-protected": lambda r, stack: rules.stateful_protected(r["type"], r["options"]),
    "encryption-at-rest": lambda r, stack: rules.encrypted_at_rest(r["type"], r["name"], r["inputs"]),
    "imdsv2-only": lambda r, stack: rules.imdsv2(r["type"], r["name"], r["inputs"]),
    "no-broad-iam": lambda r, stack: rules.no_broad_policies(r["type"], r["inputs"]),
    "no-plain-secrets": lambda r, stack: rules.no_plain_secrets(r["inputs"], secrets(stack)),
}


def violations(document: dict, policy: str) -> list[str]:
    if policy == "buckets-encrypted":
        return rules.buckets_encrypted(document["resources"])
    return [message for r in document["resources"] for message in CHECKS[policy](r, document["stack"])]


@pytest.fixture(scope="module")
def documents():
    return {stack: evaluate_cached(stack).document() for stack in STACKS}


def one(document, type_, name):
    (found,) = [r for r in document["resources"] if r["type"] == type_ and r["name"] == name]
    return found


INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"


def _open_ssh(d):
    one(d, INGRESS, "k3s-tcp6443-from-vpn-address")["inputs"]["cidrIpv4"] = "0.0.0.0/0"


def _wireguard_elsewhere(d):
    one(d, INGRESS, "vpn-udp51820-from-0.0.0.0-0")["inputs"].update(fromPort=51821, toPort=51821)


def _unprotect(d):
    one(d, "aws:s3/bucket:Bucket", "backups")["options"]["protect"] = False


def _unencrypted(d):
    one(d, INSTANCE, "vpn")["inputs"]["rootBlockDevice"]["encrypted"] = False


def _no_bucket_encryption(d):
    d["resources"] = [r for r in d["resources"] if r["type"] != rules.BUCKET_ENCRYPTION]


def _imdsv1(d):
    one(d, INSTANCE, "k3s")["inputs"]["metadataOptions"]["httpTokens"] = "optional"


def _administrator(d):
    attachment = copy.deepcopy(one(d, "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
                                   "katforge-github-preview-ReadOnlyAccess"))
    attachment["inputs"]["policyArn"] = "arn:aws:iam::aws:policy/AdministratorAccess"
    d["resources"].append(attachment)


def _star_inline(d):
    policy = one(d, "aws:iam/rolePolicy:RolePolicy", "katforge-github-deploy-policy")["inputs"]
    policy["policy"] = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


def _plain_password(d):
    """The prod database password handed to the host script in plain text instead of as a secret."""
    command = next(r for r in d["resources"] if r["type"] == "command:remote:Command"
                   and str(r["inputs"].get("stdin", "")).startswith(rules.SECRET))
    command["inputs"]["stdin"] = secrets("prod")["dbPassword"]


MUTATIONS = {
    "open-only-web-and-vpn": [_open_ssh, _wireguard_elsewhere],
    "stateful-protected": [_unprotect],
    "encryption-at-rest": [_unencrypted],
    "buckets-encrypted": [_no_bucket_encryption],
    "imdsv2-only": [_imdsv1],
    "no-broad-iam": [_administrator, _star_inline],
    "no-plain-secrets": [_plain_password],
}


@pytest.mark.parametrize("policy", [*CHECKS, "buckets-encrypted"])
@pytest.mark.parametrize("stack", STACKS)
def test_each_invariant_holds_in_todays_plans(documents, stack, policy):
    assert violations(documents[stack], policy) == []


@pytest.mark.parametrize("policy, mutate", [(p, m) for p, ms in MUTATIONS.items() for m in ms],
                         ids=lambda value: getattr(value, "__name__", value))
def test_each_invariant_fails_on_a_plan_that_breaks_it(documents, policy, mutate):
    document = copy.deepcopy(documents["prod"])
    mutate(document)
    assert violations(document, policy), f"{policy} let {mutate.__name__} through"


def test_an_adopted_unencrypted_root_volume_passes_only_when_named():
    inputs = {"rootBlockDevice": {"encrypted": False}}
    assert rules.encrypted_at_rest(INSTANCE, "k3s", inputs)
    assert rules.encrypted_at_rest(INSTANCE, "k3s", inputs, ["k3s"]) == []
    assert rules.encrypted_at_rest(INSTANCE, "vpn", inputs, ["k3s"])


@pytest.fixture(scope="module")
def unencrypted():
    """prod's plan with both live root volumes kept unencrypted."""
    return evaluate("prod", {"katforge:k3sRootVolumeEncrypted": "false", "katforge:vpnRootVolumeEncrypted": "false"})


@pytest.mark.parametrize("config, flagged", [
    ({}, {"k3s", "vpn"}),  # unencrypted by nobody's decision
    ({"katforge:k3sRootVolumeEncrypted": "false"}, {"vpn"}),
    ({"katforge:k3sRootVolumeEncrypted": "false", "katforge:vpnRootVolumeEncrypted": "false"}, set()),
    ({"katforge:k3sRootVolumeEncrypted": "true", "katforge:vpnRootVolumeEncrypted": "true"}, {"k3s", "vpn"}),
], ids=["unset", "k3s-kept", "both-kept", "both-true"])
def test_the_pack_keeps_an_unencrypted_root_volume_only_where_the_stack_says_so(analyzer, unencrypted, monkeypatch,
                                                                             config, flagged):
    """What make discover writes for a live unencrypted volume (<host>RootVolumeEncrypted false) is the one
    decision the pack honours: no list of its own to keep in step with the stack."""
    live = unencrypted
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(config))
    found = {name for name in ("k3s", "vpn") if "encryption-at-rest" in analyze(analyzer, live.named(name, INSTANCE))}
    assert found == flagged


def test_the_pack_declares_each_checked_invariant():
    assert sorted(p.name for p in POLICIES) == sorted([*CHECKS, "buckets-encrypted"])
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in POLICIES)


# --- The pack as the CLI runs it -------------------------------------------------------------------

def _struct(value: dict) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


@pytest.fixture(scope="module")
def analyzer():
    keep_secrets_marked()
    return _PolicyAnalyzerServicer("katforge-estate", "1.0.0", POLICIES, EnforcementLevel.MANDATORY,
                                   None, None, None, None, None, None, None)


@pytest.fixture()
def stack_config(monkeypatch):
    """The config the engine hands the pack: the stack's, secrets in plain (PULUMI_CONFIG)."""
    def use(stack: str) -> None:
        monkeypatch.setenv("PULUMI_CONFIG", json.dumps(effective_config(stack)[0]))
    return use


def analyze(analyzer, planned, protect=None) -> list[str]:
    request = analyzer_pb2.AnalyzeRequest(
        type=planned.type, urn=planned.urn, name=planned.name, properties=_struct(planned.raw_inputs),
        options=analyzer_pb2.AnalyzerResourceOptions(
            protect=planned.options["protect"] if protect is None else protect))
    return [d.policyName for d in analyzer.Analyze(request, None).diagnostics]


@pytest.mark.parametrize("stack", STACKS)
def test_the_pack_passes_every_resource_of_todays_plans(analyzer, stack_config, stack):
    stack_config(stack)
    plan = evaluate_cached(stack)
    found = {r.name: analyze(analyzer, r) for r in plan.resources}
    assert {name: policies for name, policies in found.items() if policies} == {}
    resources = [analyzer_pb2.AnalyzerResource(
        urn=r.urn, type=r.type, name=r.name, properties=_struct(r.raw_inputs),
        propertyDependencies={prop: analyzer_pb2.AnalyzerPropertyDependencies(urns=urns)
                              for prop, urns in r.options["property_dependencies"].items()})
        for r in plan.resources]
    assert list(analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=resources), None).diagnostics) == []


def test_the_pack_sees_protect_among_the_options_and_secrets_as_secrets(analyzer, stack_config):
    stack_config("prod")
    plan = evaluate_cached("prod")
    assert analyze(analyzer, plan.named("k3s", INSTANCE), protect=False) == ["stateful-protected"]
    password = secrets("prod")["dbPassword"]
    command = next(r for r in plan.of_type("command:remote:Command")
                   if r.inputs.get("stdin") == "[secret]" and password in str(r.raw_inputs["stdin"]))
    leaked = copy.copy(command)
    leaked.raw_inputs = {**command.raw_inputs, "stdin": command.raw_inputs["stdin"]["value"]}  # unwrapped
    assert analyze(analyzer, command) == [] and analyze(analyzer, leaked) == ["no-plain-secrets"]


def test_the_pack_reads_the_wireguard_port_from_the_stack_config(analyzer, monkeypatch):
    plan = evaluate_cached("prod")
    rule = plan.named("vpn-udp51820-from-0.0.0.0-0", INGRESS)
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps({"katforge:wireguardPort": "51821"}))
    assert analyze(analyzer, rule) == ["open-only-web-and-vpn"]


@pytest.fixture()
def engine_secret_keys(analyzer):
    """Name the secret config keys to the pack as the engine does, before any resource (ConfigureStack)."""
    def use(keys: list[str]) -> None:
        analyzer.ConfigureStack(analyzer_pb2.AnalyzerStackConfigureRequest(
            stack="prod", project="katforge", config_secret_keys=keys), None)
    yield use
    use([])


def test_the_pack_refuses_in_plain_a_secret_that_pulumi_yaml_does_not_declare(analyzer, monkeypatch,
                                                                               engine_secret_keys):
    """rdsMasterPassword is not declared `secret: true` (Pulumi refuses a default on a secret key) but is
    set with --secret: the engine names it secret, and the pack looks for its value as for a declared one."""
    config, secret_keys = effective_config("prod", scaled.RDS)
    assert "katforge:rdsMasterPassword" in secret_keys
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(config))
    engine_secret_keys(secret_keys)
    instance = scaled.rds().named("rds", "aws:rds/instance:Instance")
    leaked = copy.copy(instance)
    leaked.raw_inputs = {**instance.raw_inputs, "password": instance.raw_inputs["password"]["value"]}  # unwrapped
    assert analyze(analyzer, instance) == [] and analyze(analyzer, leaked) == ["no-plain-secrets"]
