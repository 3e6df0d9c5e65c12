"""checkov on every Kubernetes object the program declares, in both stacks: no finding unexplained.

A finding is fixed, or skipped in the object itself with its reason (annotation
checkov.io/skip<N>: <check>=<why>, see infra/apps.py), where a reviewer reads it beside what it excuses.
The pinned checkov CLI runs once for both stacks, offline (--skip-download); without it the tests skip.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.shared import CHECKOV_VERSION, checkov
from tools.offline import unwrap



def manifests(plan) -> list[dict]:
    """The objects as the API server would receive them (offline placeholders stand in for secrets)."""
    return [unwrap(r.raw_inputs) for r in plan.resources if r.type.startswith("kubernetes:")]


@pytest.fixture(scope="session")
def report(tmp_path_factory, prod, qa) -> dict:
    binary = checkov()
    directory = tmp_path_factory.mktemp("checkov")
    for plan in (prod, qa):
        (directory / f"{plan.stack}.yaml").write_text(yaml.safe_dump_all(manifests(plan), sort_keys=False))
    done = subprocess.run([binary, "--directory", str(directory), "--framework", "kubernetes", "--output", "json",
                           "--compact", "--skip-download"], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), done.stderr
    [found] = [r for r in (lambda d: d if isinstance(d, list) else [d])(json.loads(done.stdout))
               if r["check_type"] == "kubernetes"]
    return found


def test_the_pinned_checkov_read_every_file(report):
    ran = report["summary"]["checkov_version"]
    assert ran == CHECKOV_VERSION, f"checkov {ran} ran; .ci/run installs {CHECKOV_VERSION}, whose findings these are"
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0


def test_no_finding_is_left_unexplained(report):
    failed = [f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in report["results"]["failed_checks"]]
    assert not failed, "fix these, or skip them in the object with the reason (infra/apps.py):\n" + "\n".join(failed)


def test_every_skip_says_why(report):
    skipped = report["results"]["skipped_checks"]
    assert skipped, "the app namespaces answer some findings by design"
    for check in skipped:
        assert len(check["check_result"]["suppress_comment"].split()) >= 4, (check["check_id"], check["resource"])
