"""The offline plan diff: the comparison on hand-made plans, and two real revisions in a scratch repo."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.plan_diff import ABSENT, MARKER, Change, PlanDiffError, compare, diff_plans, render

ROOT = Path(__file__).resolve().parent.parent
RECORD = "aws:route53/record:Record"


def resource(name, inputs, type_=RECORD, protect=False, parent=None):
    return {"urn": f"urn:pulumi:prod::katforge::{type_}::{name}", "type": type_, "name": name, "parent": parent,
            "custom": True, "inputs": inputs, "options": {"protect": protect, "depends_on": []}}


def plan(*resources, outputs=None):
    return {"stack": "prod", "resources": list(resources), "outputs": outputs or {}}


def test_identical_plans_differ_in_nothing():
    same = plan(resource("a", {"name": "a.katforge.com", "records": ["1.2.3.4"]}), outputs={"ip": "1.2.3.4"})
    diff = diff_plans(same, same)
    assert diff.empty
    assert "### prod: no changes" in render([diff], "main")


def test_resources_are_added_removed_and_changed_by_urn_with_each_changed_property():
    old = plan(resource("gone", {"ttl": 300}),
               resource("kept", {"ttl": 300, "tags": {"Name": "old", "Team": "ops"}}))
    new = plan(resource("kept", {"ttl": 300, "tags": {"Name": "new", "Team": "ops"}}, protect=True),
               resource("fresh", {"ttl": 60}))
    diff = diff_plans(old, new)
    assert [r["name"] for r in diff.added] == ["fresh"]
    assert [r["name"] for r in diff.removed] == ["gone"]
    ((changed, found),) = diff.changed
    assert changed["name"] == "kept"
    assert found == [Change("inputs.tags.Name", "old", "new"), Change("options.protect", False, True)]


def test_a_list_of_values_is_one_property_and_a_list_of_objects_is_compared_item_by_item():
    old = plan(resource("r", {"records": ["a", "b"], "rules": [{"port": 80}, {"port": 443}]}))
    new = plan(resource("r", {"records": ["a", "c"], "rules": [{"port": 80}, {"port": 8443}, {"port": 22}]}))
    ((_, found),) = diff_plans(old, new).changed
    assert found == [Change("inputs.records", ["a", "b"], ["a", "c"]),
                     Change("inputs.rules[1].port", 443, 8443),
                     Change("inputs.rules[2].port", ABSENT, 22)]


def test_secrets_stay_secret_and_output_keys_with_dots_stay_readable():
    old = plan(resource("key", {"user": "u", "secret": "[secret]"}), outputs={"dns": {"a.katforge.com": "1.1.1.1"}})
    new = plan(resource("key", {"user": "v", "secret": "[secret]"}),
               outputs={"dns": {"a.katforge.com": "2.2.2.2"}, "password": "[secret]"})
    diff = diff_plans(old, new)
    ((_, found),) = diff.changed
    assert found == [Change("inputs.user", "u", "v")]  # an unchanged secret is no change
    text = render([diff], "main")
    assert '`dns["a.katforge.com"]`: `"1.1.1.1"` → `"2.2.2.2"`' in text
    assert '`password`: (none) → `"[secret]"`' in text


def test_multi_line_values_show_as_a_unified_diff():
    old = plan(resource("host", {"userData": "#!/bin/sh\napt-get update\nreboot\n"}))
    new = plan(resource("host", {"userData": "#!/bin/sh\napt-get update\napt-get install -y wireguard\nreboot\n"}))
    text = render([diff_plans(old, new)], "main")
    assert "  ```diff" in text and "  +apt-get install -y wireguard" in text
    assert "-reboot" not in text  # only what changed is marked


def test_the_comment_starts_with_the_marker_the_workflow_edits_it_by():
    text = render([diff_plans(plan(), plan(resource("a", {})))], "origin/main")
    assert text.startswith(MARKER + "\n")
    assert "**prod**: 1 added" in text and "`origin/main`" in text


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
    assert diff.added == [] and diff.removed == []
    ((record, found),) = diff.changed
    assert (record["type"], record["inputs"]["name"]) == (RECORD, "www.katforge.com")
    assert found == [Change("inputs.records", ["katforge.com"], ["stumper.gg"])]
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
    body = cut[cut.index("#### Changed"):cut.index("… cut to fit")].strip().splitlines()[1:]
    assert body and len(body) % 4 == 0  # each resource line, then its three changes
    assert [line.startswith("- **") for line in body] == [True, False, False, False] * (len(body) // 4)
