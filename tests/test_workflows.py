"""The GitHub Actions workflows: triggers, job order, pinned actions, least permissions, clean shell."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

WORKFLOWS = Path(__file__).resolve().parent.parent / ".github" / "workflows"
# Workflows that other workflows call: one Pulumi command, and the test suite (the deploy's gate).
CALLABLE = {"./.github/workflows/pulumi.yml": "pulumi.yml", "./.github/workflows/test.yml": "test.yml"}
# 40 hex digits, then the release it is, for people: `owner/repo@<sha> # v1.2.3`.
PINNED = re.compile(r"^\s*-?\s*uses:\s*[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40} # v\d+\.\d+\.\d+\s*$")

# The least each job needs: checkout reads the code; only jobs that assume an AWS role get an OIDC
# token; only jobs that comment on the pull request may write to it.
EXPECTED_PERMISSIONS = {
    ("test.yml", "test"): {"contents": "read"},
    ("preview.yml", "plan-diff"): {"contents": "read", "pull-requests": "write"},
    ("preview.yml", "preview"): {"contents": "read", "id-token": "write", "pull-requests": "write"},
    ("deploy.yml", "test"): {"contents": "read"},
    ("deploy.yml", "prod"): {"contents": "read", "id-token": "write"},
    ("deploy.yml", "qa"): {"contents": "read", "id-token": "write"},
}


def load(name):
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow):
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def all_jobs():
    return [(path.name, job_id, job) for path in sorted(WORKFLOWS.glob("*.yml"))
            for job_id, job in load(path.name)["jobs"].items()]


def steps_of(job):
    """A job's steps, or those of the workflow it calls."""
    if "uses" in job:
        return [step for called in load(CALLABLE[job["uses"]])["jobs"].values() for step in called["steps"]]
    return job["steps"]


def action(step):
    return step.get("uses", "").split("@")[0]


def needs(job):
    value = job.get("needs", [])
    return [value] if isinstance(value, str) else value


def run_order(workflow):
    """Job ids in the order `needs` lets them run, ties broken by name."""
    jobs, done = workflow["jobs"], []
    while len(done) < len(jobs):
        ready = sorted(j for j, job in jobs.items() if j not in done and set(needs(job)) <= set(done))
        assert ready, f"needs form a cycle: {sorted(jobs.keys() - set(done))}"
        done.append(ready[0])
    return done


def test_there_are_exactly_the_workflows_the_repository_runs():
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) == ["deploy.yml", "preview.yml", "pulumi.yml", "test.yml"]


@pytest.mark.parametrize("name", ["test.yml", "preview.yml", "deploy.yml", "pulumi.yml"])
def test_every_workflow_has_the_required_keys(name):
    workflow = load(name)
    assert {"name", "jobs"} <= workflow.keys() and triggers(workflow)
    for job_id, job in workflow["jobs"].items():
        if "uses" in job:
            assert job["uses"] in CALLABLE, job_id
        else:
            assert {"runs-on", "steps", "timeout-minutes"} <= job.keys(), job_id


def test_tests_run_on_every_push_and_pull_request():
    workflow = load("test.yml")
    assert set(triggers(workflow)) == {"push", "pull_request", "workflow_call"}
    assert triggers(workflow)["push"] is None and triggers(workflow)["pull_request"] is None  # no filters
    (job,) = workflow["jobs"].values()
    # As root: the PostgreSQL and WireGuard tests skip otherwise, and the real proofs never run. .ci/run
    # installs the tools those tests drive, then runs `make test`, exactly as the project's own CI does.
    assert job["steps"][-1]["run"] == 'sudo -E env "PATH=$PATH" .ci/run'
    assert "make test" in (WORKFLOWS.parent.parent / ".ci" / "run").read_text()


def test_the_reusable_workflow_runs_pulumi_with_the_given_role_and_comments_only_previews():
    workflow = load("pulumi.yml")
    assert set(triggers(workflow)) == {"workflow_call"}
    steps = steps_of(next(iter(workflow["jobs"].values())))
    names = [action(s) for s in steps if "uses" in s]
    assert names.index("aws-actions/configure-aws-credentials") < names.index("pulumi/actions")
    aws = next(s for s in steps if action(s) == "aws-actions/configure-aws-credentials")["with"]
    assert aws["role-to-assume"] == "${{ inputs.role-to-assume }}"
    assert "aws-access-key-id" not in aws  # OIDC only, no stored key
    pulumi = next(s for s in steps if action(s) == "pulumi/actions")["with"]
    assert pulumi["command"] == "${{ inputs.command }}" and pulumi["stack-name"] == "${{ inputs.stack }}"
    assert pulumi["comment-on-pr"] == "${{ inputs.command == 'preview' }}"
    assert pulumi["edit-pr-comment"] is True


def test_pull_requests_preview_both_stacks_with_the_preview_role_and_post_the_plan_diff():
    workflow = load("preview.yml")
    assert set(triggers(workflow)) == {"pull_request"}
    preview = workflow["jobs"]["preview"]
    assert preview["strategy"]["matrix"]["stack"] == ["prod", "qa"]
    assert preview["with"] == {"stack": "${{ matrix.stack }}", "command": "preview",
                               "role-to-assume": "${{ vars.AWS_PREVIEW_ROLE_ARN }}"}
    runs = [s.get("run", "") for s in workflow["jobs"]["plan-diff"]["steps"]]
    assert any("make" in r and "plan-diff BASE=" in r for r in runs)
    assert any("gh api" in r and "/comments" in r for r in runs)


def test_main_is_tested_then_deploys_prod_then_qa_with_the_deploy_role_and_is_never_cancelled():
    workflow = load("deploy.yml")
    assert triggers(workflow) == {"push": {"branches": ["main"]}}
    assert run_order(workflow) == ["test", "prod", "qa"]
    assert workflow["jobs"]["test"]["uses"] == "./.github/workflows/test.yml"
    assert needs(workflow["jobs"]["prod"]) == ["test"] and needs(workflow["jobs"]["qa"]) == ["prod"]
    for stack in ("prod", "qa"):
        assert workflow["jobs"][stack]["with"] == {"stack": stack, "command": "up",
                                                   "role-to-assume": "${{ vars.AWS_DEPLOY_ROLE_ARN }}"}
    assert workflow["concurrency"]["group"]
    assert workflow["concurrency"].get("cancel-in-progress", False) is False


def test_every_action_is_pinned_to_a_commit_with_its_release_noted():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*-?\s*uses:", line) and line.split("uses:")[1].strip() not in CALLABLE:
                assert PINNED.match(line), f"{path.name}: {line.strip()}"


def test_every_job_has_the_least_permissions_it_needs():
    for name in ("test.yml", "preview.yml", "deploy.yml"):
        assert load(name)["permissions"] == {}, f"{name}: the default token must grant nothing"
    jobs = {(name, job_id): job for name, job_id, job in all_jobs() if name != "pulumi.yml"}
    assert jobs.keys() == EXPECTED_PERMISSIONS.keys()
    for key, job in jobs.items():
        assert job["permissions"] == EXPECTED_PERMISSIONS[key], key
        assumes_role = any(action(s) == "aws-actions/configure-aws-credentials" for s in steps_of(job))
        assert ("id-token" in job["permissions"]) == assumes_role, key


def test_the_reusable_workflow_asks_for_no_permissions_of_its_own():
    workflow = load("pulumi.yml")
    assert "permissions" not in workflow
    assert all("permissions" not in job for job in workflow["jobs"].values())


def shell_steps():
    return [(name, job_id, step) for name, job_id, job in all_jobs() if "steps" in job
            for step in job["steps"] if "run" in step]


def test_shell_steps_take_untrusted_values_from_the_environment_only():
    # `${{ }}` is pasted into the script before bash runs it: a crafted branch name would execute.
    for name, job_id, step in shell_steps():
        assert "${{" not in step["run"], f"{name}/{job_id}: {step['run']}"


def test_shell_steps_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    for name, job_id, step in shell_steps():
        result = subprocess.run([shellcheck, "--shell=bash", "-"], input=step["run"], text=True,
                                capture_output=True)
        assert result.returncode == 0, f"{name}/{job_id}:\n{result.stdout}"


def test_every_workflow_matches_githubs_workflow_schema():
    # The SchemaStore schema that check-jsonschema ships: misspelt keys and bad values fail here.
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                             *map(str, sorted(WORKFLOWS.glob("*.yml")))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_jobs_that_may_run_at_once_never_share_a_wireguard_peer():
    """Two runners with one WireGuard key steal each other's tunnel, mid-`pulumi up` if unlucky."""
    peers = {}
    for name, job_id, job in all_jobs():
        if job.get("uses") == "./.github/workflows/pulumi.yml":
            peers[(name, job_id)] = job["secrets"]["WIREGUARD_CONFIG"]
    preview = peers.pop(("preview.yml", "preview"))
    assert "WIREGUARD_CONFIG_PREVIEW_PROD" in preview and "WIREGUARD_CONFIG_PREVIEW_QA" in preview
    # deploy's prod and qa run one after the other, inside the deploy's own concurrency group
    assert set(peers.values()) == {"${{ secrets.WIREGUARD_CONFIG_DEPLOY }}"}
    assert load("preview.yml")["jobs"]["preview"]["concurrency"] == {
        "group": "preview-vpn-${{ matrix.stack }}", "cancel-in-progress": False}
