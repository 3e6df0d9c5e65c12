"""The offline plan diff: operations from hand-made plans, the force-new table against the providers' own
schemas, the k3sPrivateIp replacement end to end, and two real revisions in a scratch repo."""
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pulumi_aws
import pulumi_command
import pulumi_kubernetes
import pytest
from pulumi import _types

from tools import force_new, offline, stackfile
from tools.offline import evaluate, evaluate_cached
from tools.plan_diff import ABSENT, MARKER, Change, PlanDiffError, compare, diff_plans, render

ROOT = Path(__file__).resolve().parent.parent
RECORD = "aws:route53/record:Record"
INSTANCE = "aws:ec2/instance:Instance"


def resource(name, inputs, type_=RECORD, protect=False, parent=None, **options):
    return {"urn": f"urn:pulumi:prod::katforge::{type_}::{name}", "type": type_, "name": name, "parent": parent,
            "custom": True, "inputs": inputs, "options": {"protect": protect, "depends_on": [], **options}}


def plan(*resources, outputs=None):
    return {"stack": "prod", "resources": list(resources), "outputs": outputs or {}, "knownAfterDeploy": []}


def only_step(old, new):
    (step,) = diff_plans(old, new).steps
    return step


def test_identical_plans_differ_in_nothing():
    same = plan(resource("a", {"name": "a.katforge.com", "records": ["1.2.3.4"]}), outputs={"ip": "1.2.3.4"})
    diff = diff_plans(same, same)
    assert diff.empty
    assert "### prod: no changes" in render([diff], "main")


def test_each_resource_is_created_updated_or_deleted_by_urn_with_each_changed_property():
    old = plan(resource("gone", {"ttl": 300}),
               resource("kept", {"ttl": 300, "tags": {"Name": "old", "Team": "ops"}}))
    new = plan(resource("kept", {"ttl": 300, "tags": {"Name": "new", "Team": "ops"}}, protect=True),
               resource("fresh", {"ttl": 60}))
    diff = diff_plans(old, new)
    assert [(s.op, s.resource["name"]) for s in diff.steps] == [("update", "kept"), ("create", "fresh"),
                                                                 ("delete", "gone")]
    assert diff.step("kept").changes == [Change("inputs.tags.Name", "old", "new"),
                                         Change("options.protect", False, True)]
    assert "1 to update, 1 to create, 1 to delete" in render([diff], "main")


def test_a_list_of_values_is_one_property_and_a_list_of_objects_is_compared_item_by_item():
    old = plan(resource("r", {"records": ["a", "b"], "rules": [{"port": 80}, {"port": 443}]}))
    new = plan(resource("r", {"records": ["a", "c"], "rules": [{"port": 80}, {"port": 8443}, {"port": 22}]}))
    assert only_step(old, new).changes == [Change("inputs.records", ["a", "b"], ["a", "c"]),
                                           Change("inputs.rules[1].port", 443, 8443),
                                           Change("inputs.rules[2].port", ABSENT, 22)]


def test_a_force_new_property_replaces_and_says_which_others_update():
    old = plan(resource("www", {"name": "www.katforge.com", "zoneId": "Z1", "ttl": 300}))
    assert only_step(old, plan(resource("www", {"name": "www.katforge.com", "zoneId": "Z1", "ttl": 60}))).op == "update"
    step = only_step(old, plan(resource("www", {"name": "www2.katforge.com", "zoneId": "Z1", "ttl": 60})))
    assert (step.op, step.forced_by) == ("replace", ["name"])
    assert "**www** (`aws:route53/record:Record`), replaced because `name`" in render([diff_plans(old, plan(
        step.resource))], "main")


def test_a_nested_force_new_field_replaces_and_a_nested_updatable_one_does_not():
    def instance(**root):
        return plan(resource("k3s", {"instanceType": "t3.medium",
                                     "rootBlockDevice": {"encrypted": False, "volumeSize": 30, **root}}, INSTANCE))
    step = only_step(instance(), instance(encrypted=True))
    assert (step.op, step.forced_by) == ("replace", ["rootBlockDevice.encrypted"])
    assert only_step(instance(), instance(volumeSize=40)).op == "update"


def test_replacing_a_protected_resource_comes_first_with_its_warning():
    old = plan(resource("a-record", {"name": "a.katforge.com", "ttl": 300}),
               resource("k3s", {"privateIp": "172.31.14.98"}, INSTANCE, protect=True),
               resource("old-host", {}, INSTANCE, protect=True))
    new = plan(resource("a-record", {"name": "a.katforge.com", "ttl": 60}),
               resource("k3s", {"privateIp": "172.31.14.99"}, INSTANCE, protect=True))
    diff = diff_plans(old, new)
    assert [(s.op, s.resource["name"]) for s in diff.steps] == [("replace", "k3s"), ("delete", "old-host"),
                                                                ("update", "a-record")]
    assert "stops with an error instead of replacing it" in diff.steps[0].warnings[0]
    assert "stops with an error instead of deleting it" in diff.steps[1].warnings[0]
    text = render([diff], "main")
    assert text.index("#### ⚠️ Needs attention") < text.index("**k3s**") < text.index("**old-host**") \
        < text.index("#### Update") < text.index("**a-record**")


def test_a_change_that_stops_the_host_is_listed_first_unless_ignored():
    old = plan(resource("k3s", {"instanceType": "t3.medium", "userData": "#!/bin/sh\n"}, INSTANCE))
    resized = only_step(old, plan(resource("k3s", {"instanceType": "t3.large", "userData": "#!/bin/sh\n"}, INSTANCE)))
    assert resized.op == "update" and resized.warnings == ["stops and starts the instance to change `instanceType`"]
    new_user_data = {"instanceType": "t3.medium", "userData": "#!/bin/sh\necho\n"}
    assert only_step(old, plan(resource("k3s", new_user_data, INSTANCE))).warnings  # stop, start, new user data
    # In ignore_changes, the field is no change at all.
    assert diff_plans(old, plan(resource("k3s", new_user_data, INSTANCE, ignore_changes=["userData"]))).empty
    # With userDataReplaceOnChange, a new user data is a new host.
    replaced = only_step(plan(resource("k3s", {**old["resources"][0]["inputs"], "userDataReplaceOnChange": True},
                                       INSTANCE)),
                         plan(resource("k3s", {**new_user_data, "userDataReplaceOnChange": True}, INSTANCE)))
    assert (replaced.op, replaced.forced_by) == ("replace", ["userData"])


def test_switching_a_security_group_rule_from_a_cidr_to_a_group_replaces_it():
    rule = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
    old = plan(resource("ssh", {"securityGroupId": "sg-1", "cidrIpv4": "10.0.0.0/8", "fromPort": 22}, rule))
    step = only_step(old, plan(resource("ssh", {"securityGroupId": "sg-1", "referencedSecurityGroupId": "sg-2",
                                                "fromPort": 22}, rule)))
    assert (step.op, step.forced_by) == ("replace", ["cidrIpv4 → referencedSecurityGroupId"])
    assert only_step(old, plan(resource("ssh", {"securityGroupId": "sg-1", "cidrIpv4": "10.1.0.0/16",
                                                "fromPort": 22}, rule))).op == "update"


def test_secrets_compare_by_hash_and_show_only_that_they_changed():
    old = plan(resource("key", {"user": "u", "secret": "[secret 0a1b2c3d]"}),
               outputs={"dns": {"a.katforge.com": "1.1.1.1"}, "token": "[secret 0a1b2c3d]"})
    new = plan(resource("key", {"user": "v", "secret": "[secret 0a1b2c3d]"}),
               outputs={"dns": {"a.katforge.com": "2.2.2.2"}, "token": "[secret 9f8e7d6c]", "password": "[secret 11]"})
    diff = diff_plans(old, new)
    assert only_step(old, new).changes == [Change("inputs.user", "u", "v")]  # an unchanged secret is no change
    text = render([diff], "main")
    assert '`dns["a.katforge.com"]`: `"1.1.1.1"` → `"2.2.2.2"`' in text
    assert "`token`: secret changed" in text and "`password`: (none) → [secret]" in text
    assert "9f8e7d6c" not in text and "0a1b2c3d" not in text
    # A base written before hashes holds a bare [secret]: that cannot be compared, so it is no change.
    assert diff_plans(plan(outputs={"token": "[secret]"}), plan(outputs={"token": "[secret 9f8e7d6c]"})).empty


def test_kubernetes_secret_data_replaces_the_secret_unless_the_provider_makes_it_mutable():
    secret = "kubernetes:core/v1:Secret"
    def secrets(value, provider_inputs):
        return plan(resource("k3s", provider_inputs, "pulumi:providers:kubernetes"),
                    resource("smtp", {"type": "Opaque", "stringData": value}, secret, provider="k3s"))
    step = only_step(secrets("[secret 00000001]", {}), secrets("[secret 00000002]", {}))
    assert (step.op, step.forced_by) == ("replace", ["stringData"])
    mutable = {"enableSecretMutable": True}
    assert only_step(secrets("[secret 00000001]", mutable), secrets("[secret 00000002]", mutable)).op == "update"


def test_what_depends_on_a_replaced_resource_changes_with_it():
    command = "command:remote:Command"
    instance_urn = resource("k3s", {}, INSTANCE)["urn"]
    def estate(ip):
        return plan(resource("k3s", {"privateIp": ip}, INSTANCE),
                    resource("eip", {"instance": "(known after deploy)"}, "aws:ec2/eip:Eip",
                             property_dependencies={"instance": [instance_urn]}),
                    resource("install", {"triggers": ["(known after deploy)"]}, command,
                             property_dependencies={"triggers": [instance_urn]}, replace_on_changes=["triggers[*]"]))
    diff = diff_plans(estate("172.31.14.98"), estate("172.31.14.99"))
    eip, install = diff.step("eip"), diff.step("install")
    assert eip.op == "update" and eip.changes[0].because == "**k3s** is replaced"
    assert install.op == "replace" and install.forced_by == ["`triggers` comes from **k3s**, which is replaced"]
    # Unchanged, nothing moves.
    assert diff_plans(estate("172.31.14.98"), estate("172.31.14.98")).empty


def test_among_the_warnings_a_replacement_comes_before_what_it_forces():
    instance_urn = resource("k3s", {}, INSTANCE)["urn"]
    def estate(ip):  # the dependent's URN sorts first
        return plan(resource("k3s", {"privateIp": ip}, INSTANCE, protect=True),
                    resource("address", {"address": "(known after deploy)"}, "aws:ec2/eip:Eip", protect=True,
                             property_dependencies={"address": [instance_urn]}))
    diff = diff_plans(estate("172.31.14.98"), estate("172.31.14.99"))
    assert [(s.resource["name"], s.knock_on, bool(s.warnings)) for s in diff.steps] == [("k3s", False, True),
                                                                                       ("address", True, True)]


def test_a_replaced_kubernetes_provider_replaces_every_object_it_manages():
    provider = "pulumi:providers:kubernetes"
    def cluster(kubeconfig, **provider_inputs):
        return plan(resource("k3s", {"kubeconfig": kubeconfig, **provider_inputs}, provider),
                    resource("web", {"metadata": {"name": "web"}}, "kubernetes:core/v1:Namespace", provider="k3s"))
    diff = diff_plans(cluster("[secret 00000001]"), cluster("[secret 00000002]"))
    assert diff.step("k3s").forced_by == ["kubeconfig"]
    assert diff.step("web").forced_by == ["its provider **k3s** is replaced"]
    # With a clusterIdentifier, a new kubeconfig is an update of the provider only.
    pinned = diff_plans(cluster("[secret 00000001]", clusterIdentifier="katforge"),
                        cluster("[secret 00000002]", clusterIdentifier="katforge"))
    assert [(s.op, s.resource["name"]) for s in pinned.steps] == [("update", "k3s")]


def test_a_base_written_before_stand_ins_were_marked_does_not_turn_them_into_changes():
    rule = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
    legacy = {"resources": [resource("ssh", {"securityGroupId": "k3s-id", "description": "ssh from 3.1.1.1/32"},
                                     rule)], "outputs": {"ip": "3.1.1.1"}, "stack": "prod"}
    marked = plan(resource("ssh", {"securityGroupId": "(known after deploy)",
                                   "description": "ssh from (known after deploy)/32"}, rule),
                  outputs={"ip": "(known after deploy)"})
    assert diff_plans(legacy, marked).empty
    assert diff_plans({**legacy, "knownAfterDeploy": []}, marked).step("ssh").op == "replace"


def test_multi_line_values_show_as_a_unified_diff():
    old = plan(resource("host", {"userData": "#!/bin/sh\napt-get update\nreboot\n"}))
    new = plan(resource("host", {"userData": "#!/bin/sh\napt-get update\napt-get install -y wireguard\nreboot\n"}))
    text = render([diff_plans(old, new)], "main")
    assert "  ```diff" in text and "  +apt-get install -y wireguard" in text
    assert "-reboot" not in text  # only what changed is marked


def test_a_policy_document_shows_as_a_diff_of_its_indented_lines():
    """IAM documents are one-line JSON strings: a reviewer sees the statement that changed, not two blobs."""
    before = {"Version": "2012-10-17", "Statement": [{"Sid": "Read", "Effect": "Allow", "Action": ["ec2:Describe*"],
                                                      "Resource": "*"}]}
    after = json.loads(json.dumps(before))
    after["Statement"][0]["Action"].append("rds:Describe*")
    text = render([diff_plans(plan(resource("deploy", {"policy": json.dumps(before)})),
                              plan(resource("deploy", {"policy": json.dumps(after)})))], "main")
    block = text.split("```diff\n", 1)[1].split("```", 1)[0]
    changed = [" ".join(line.split()) for line in block.splitlines()[2:] if line.strip()[:1] in ("+", "-")]
    assert changed == ['- "ec2:Describe*"', '+ "ec2:Describe*",', '+ "rds:Describe*"'], changed


def test_the_comment_starts_with_the_marker_the_workflow_edits_it_by():
    text = render([diff_plans(plan(), plan(resource("a", {})))], "origin/main")
    assert text.startswith(MARKER + "\n")
    assert "**prod**: 1 to create" in text and "`origin/main`" in text


# --- the force-new table ---------------------------------------------------------------------------

def custom_types(*plans):
    return {r.type for p in plans for r in p.resources if r.custom}


def test_the_table_has_one_row_per_resource_type_the_program_declares_each_with_its_source():
    from tests import scaled  # k3s agents and RDS declare types the default plans do not

    declared = custom_types(evaluate_cached("prod"), evaluate_cached("qa"), scaled.scaled("prod"), scaled.scaled("qa"))
    assert set(force_new.TABLE) == declared
    assert len(force_new.RULES) == len(force_new.TABLE)
    for rule in force_new.RULES:
        assert re.search(r"@[0-9a-f]{12}|\d+\.\d+\.\d+", rule.source), f"{rule.type}: cite the version read"


def sdk_args(type_):
    """The installed SDK's input class for a resource type token (None: a CustomResource, whose spec
    is free-form)."""
    package, module, kind = type_.split(":")
    if package == "pulumi":
        return pulumi_kubernetes.ProviderArgs
    if package == "kubernetes":
        group, version = module.split("/")
        namespace = {"core": "core", "apps": "apps", "networking.k8s.io": "networking",
                     "rbac.authorization.k8s.io": "rbac"}.get(group)
        if namespace is None:
            return None
        cls = getattr(getattr(getattr(pulumi_kubernetes, namespace), version), kind)
    else:
        cls = getattr(getattr({"aws": pulumi_aws, "command": pulumi_command}[package], module.split("/")[0]), kind)
    resource_module = sys.modules[cls.__module__]  # InitArgs where a nested type took the name Args
    return getattr(resource_module, f"{kind}InitArgs", None) or getattr(resource_module, f"{kind}Args")


def resolve(args, tokens):
    """Walk a property path through the SDK's nested input classes."""
    for token in tokens:
        if token == "*":
            continue
        names = {pulumi: py for py, pulumi in _types.input_type_py_to_pulumi_names(args).items()}
        assert token in names, f"{args.__name__} has no input {token!r}"
        hint = repr(getattr(args, names[token]).fget.__annotations__.get("return", ""))
        nested = re.search(r"ForwardRef\('(\w+Args)'\)", hint)
        if nested is None:
            return
        args = getattr(importlib.import_module(args.__module__.rsplit(".", 1)[0] + "._inputs"), nested.group(1))


def test_every_path_in_the_table_is_an_input_of_that_resource_in_the_pinned_sdks():
    for rule in force_new.RULES:
        args = sdk_args(rule.type)
        paths = [*rule.force_new, *(p for p, _ in rule.force_new_when), *rule.one_of, *rule.stops_host]
        for path in paths:
            tokens = force_new.parse(path)
            if args is None:  # custom resources: only the Kubernetes object fields
                assert tokens[0] in ("apiVersion", "kind", "metadata"), (rule.type, path)
            else:
                resolve(args, tokens)


def test_the_command_row_agrees_with_what_the_sdk_registers():
    commands = [r for r in evaluate_cached("prod").resources if r.type == "command:remote:Command"]
    registered = {tuple(r.options["replace_on_changes"]) for r in commands}
    assert registered == {("triggers[*]",)}
    assert force_new.TABLE["command:remote:Command"].force_new == ("triggers",)


# --- the change that must never reach `pulumi up` unnoticed ------------------------------------------

def test_a_new_k3s_private_ip_replaces_the_protected_host_and_says_so_first():
    base = json.loads(evaluate_cached("prod").to_json())
    changed = json.loads(evaluate("prod", config={"katforge:k3sPrivateIp": "172.31.14.99"}).to_json())
    diff = diff_plans(base, changed)
    first = diff.steps[0]
    assert (first.op, first.resource["type"], first.resource["name"]) == ("replace", INSTANCE, "k3s")
    assert first.forced_by == ["privateIp"] and "protected" in first.warnings[0]
    assert Change("inputs.privateIp", "172.31.14.98", "172.31.14.99") in first.changes
    # Every script the new host needs runs again: their triggers name the instance.
    assert diff.step("bootstrap-k3s-baseline").op == "replace" and diff.step("bootstrap-k3s-baseline").knock_on
    text = render([diff], "main")
    attention = text[text.index("#### ⚠️ Needs attention"):text.index("#### Replace")]
    assert attention.splitlines()[1].startswith("- ⚠️ **replace** **k3s** (`aws:ec2/instance:Instance`): protected")
    assert "`privateIp`: `\"172.31.14.98\"` → `\"172.31.14.99\"`" in attention


def test_a_rotated_ssh_key_replaces_the_key_pair_and_no_host():
    """keyName is a launch-only input the hosts ignore: a new key pair must not read as a new host."""
    base = json.loads(evaluate_cached("prod").to_json())
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJvdGF0ZWQtb3BlcmF0b3JzLWtleS1mb3ItdGVzdHMh rotated"
    diff = diff_plans(base, json.loads(evaluate("prod", config={"katforge:sshPublicKey": key}).to_json()))
    assert diff.step("operators").op == "replace"
    assert not any(step.resource["type"] == INSTANCE for step in diff.steps), [s.resource["name"] for s in diff.steps]
    assert not any(step.warnings for step in diff.steps)


# --- real revisions -------------------------------------------------------------------------------

def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false",
                    *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A scratch repository: a commit before tools/plan.py, a copy of this tree, then one DNS edit."""
    repo = tmp_path_factory.mktemp("plan-diff") / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README.md").write_text("before the offline plan existed\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "no plan yet")
    shutil.copytree(ROOT, repo, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".git", "build", "__pycache__", ".pytest_cache", ".venv", "docs"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the estate")
    dns = repo / "infra" / "dns.py"
    before = 'DnsRecord("www.katforge.com", "CNAME", "katforge.com"'
    assert dns.read_text().count(before) == 1, "the www CNAME row of infra/dns.py moved: update this test"
    dns.write_text(dns.read_text().replace(before, 'DnsRecord("www.katforge.com", "CNAME", "stumper.gg"'))
    git(repo, "commit", "-qam", "point www at stumper.gg")
    return repo


def test_one_changed_dns_record_is_exactly_one_change(repo):
    (diff,) = compare(repo, "HEAD~1", ["prod"])
    (step,) = diff.steps
    assert (step.op, step.resource["type"], step.resource["inputs"]["name"]) == ("update", RECORD, "www.katforge.com")
    assert step.changes == [Change("inputs.records", ["katforge.com"], ["stumper.gg"])]
    # The stack output that lists the records shows the same edit, and nothing else changed.
    assert diff.outputs == [Change('dnsRecords["www.katforge.com"]', ["katforge.com"], ["stumper.gg"])]
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.splitlines()) == 1, "the base worktree was left behind"


def test_a_base_older_than_the_offline_plan_is_refused_clearly(repo):
    result = subprocess.run([sys.executable, "-m", "tools.plan_diff", "--base", "HEAD~2"], cwd=repo,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "HEAD~2" in result.stderr and "predates tools/plan.py" in result.stderr
    assert result.stdout == ""


def test_an_unknown_base_is_refused(repo):
    with pytest.raises(PlanDiffError, match="'no-such-branch' is not a commit"):
        compare(repo, "no-such-branch", ["prod"])


def test_a_diff_too_long_for_a_pr_comment_drops_inputs_then_is_cut_between_items():
    added = diff_plans(plan(), plan(*(resource(f"r{i}", {"userData": "x" * 400}) for i in range(200))))
    assert "<details>" in render([added], "main", limit=200_000)
    names_only = render([added], "main", limit=20_000)
    assert "<details>" not in names_only and "**r99**" in names_only and "cut to fit" not in names_only
    cut = render([added], "main", limit=5_000)
    assert len(cut) <= 5_000 and "**r0**" in cut and "**r99**" not in cut  # r99 sorts last
    assert cut.endswith("run `make plan-diff` for the whole diff.\n")


def test_a_cut_never_splits_a_resource_from_its_changes():
    names = [f"r{i:03}" for i in range(100)]
    old = plan(*(resource(n, {"a": 1, "b": 1, "c": 1}) for n in names))
    new = plan(*(resource(n, {"a": 2, "b": 2, "c": 2}) for n in names))
    cut = render([diff_plans(old, new)], "main", limit=3_000)
    body = cut[cut.index("#### Update"):cut.index("… cut to fit")].strip().splitlines()[1:]
    assert body and len(body) % 4 == 0  # each resource line, then its three changes
    assert [line.startswith("- **") for line in body] == [True, False, False, False] * (len(body) // 4)


def test_a_rotated_secret_in_the_stack_file_reads_secret_changed(tmp_path, monkeypatch):
    """Offline, a `secure:` value cannot be decrypted: its ciphertext's hash stands in for it, so a
    committed rotation (new ciphertext) still shows, as a secret change and nothing more."""
    def stack_file(ciphertext):
        path = tmp_path / f"{ciphertext}.yaml"
        path.write_text(f"config:\n  aws:region: us-east-2\n  katforge:dbPassword:\n    secure: {ciphertext}\n")
        return lambda stack, encrypted=None: stackfile.read(path, offline.project_config_schema(), encrypted)

    plans = []
    for ciphertext in ("v1:AAAAold", "v1:AAAAnew"):
        monkeypatch.setattr(offline, "stack_config", stack_file(ciphertext))
        plans.append(json.loads(evaluate("qa").to_json()))
    diff = diff_plans(*plans)
    assert diff.step("apps-database").op == "update"  # the Secret the apps read (mutable: in place)
    assert "secret changed" in render([diff], "main")
    assert "AAAAold" not in render([diff], "main") and "AAAAnew" not in render([diff], "main")
