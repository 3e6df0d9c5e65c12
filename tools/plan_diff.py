"""`make plan-diff BASE=<git ref>`: what a change does to the offline plans, as markdown for review.

The base revision is checked out into a temporary git worktree; it and the working tree are each
evaluated by their own `tools/plan.py` (Pulumi mocks, no cloud), and the JSON plans are compared:
resources added, removed and changed (by URN) with every changed property, old -> new, and the stack
outputs. Secrets show as [secret]: the plans never hold them.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from infra.settings import STAGES
from tools.offline import ROOT

STACKS = tuple(STAGES)
MARKER = "<!-- katforge-plan-diff -->"  # lets the preview workflow find and edit its own PR comment
ABSENT = object()  # a property that one side does not have
COMPARED = ("parent", "inputs", "options")  # the URN already names the type and the name
COMMENT_LIMIT = 60_000  # GitHub refuses a comment over 65,536 characters


class PlanDiffError(Exception):
    """A revision could not be evaluated; the message says which and why."""


@dataclass
class Change:
    path: str
    old: Any
    new: Any


@dataclass
class StackDiff:
    stack: str
    added: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)
    changed: list[tuple[dict, list[Change]]] = field(default_factory=list)
    outputs: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.outputs)


def _join(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a property tree by its path. A list of plain values is one leaf: a changed DNS
    value reads better as ["a"] -> ["b"] than as an index."""
    if isinstance(value, dict) and (value or not path):
        return {p: v for key, item in value.items() for p, v in leaves(item, _join(path, key)).items()}
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return {p: v for i, item in enumerate(value) for p, v in leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def changes(old: dict, new: dict) -> list[Change]:
    before, after = leaves(old), leaves(new)
    return [Change(path, before.get(path, ABSENT), after.get(path, ABSENT))
            for path in sorted(before.keys() | after.keys()) if before.get(path, ABSENT) != after.get(path, ABSENT)]


def diff_plans(old: dict, new: dict) -> StackDiff:
    """Compare two plans in the `make plan` JSON format."""
    before = {r["urn"]: r for r in old["resources"]}
    after = {r["urn"]: r for r in new["resources"]}
    diff = StackDiff(stack=new["stack"])
    diff.added = [after[urn] for urn in sorted(after.keys() - before.keys())]
    diff.removed = [before[urn] for urn in sorted(before.keys() - after.keys())]
    for urn in sorted(before.keys() & after.keys()):
        found = changes({k: before[urn].get(k) for k in COMPARED}, {k: after[urn].get(k) for k in COMPARED})
        if found:
            diff.changed.append((after[urn], found))
    diff.outputs = changes(old["outputs"], new["outputs"])
    return diff


# --- markdown -------------------------------------------------------------------------------------

def code(text: str) -> str:
    """Inline code that survives backticks inside it."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def show(value: Any) -> str:
    return "(none)" if value is ABSENT else code(json.dumps(value, sort_keys=True))


def render_change(change: Change) -> list[str]:
    if isinstance(change.old, str) and isinstance(change.new, str) and "\n" in change.old + change.new:
        lines = difflib.unified_diff(change.old.splitlines(), change.new.splitlines(), "before", "after", lineterm="")
        return [f"- {code(change.path)}:", "", "  ```diff", *(f"  {line}" for line in lines), "  ```"]
    return [f"- {code(change.path)}: {show(change.old)} → {show(change.new)}"]


def resource_line(resource: dict) -> str:
    return f"**{resource['name']}** ({code(resource['type'])})"


def counts(diff: StackDiff) -> str:
    if diff.empty:
        return "no changes"
    parts = [(len(diff.added), "added"), (len(diff.removed), "removed"), (len(diff.changed), "changed"),
             (len(diff.outputs), "outputs changed" if len(diff.outputs) > 1 else "output changed")]
    return ", ".join(f"{n} {label}" for n, label in parts if n)


def render_stack(diff: StackDiff, with_inputs: bool) -> list[str]:
    lines = [f"### {diff.stack}: {counts(diff)}"]
    if diff.added:
        lines += ["", "#### Added"]
        for resource in diff.added:
            lines.append(f"- {resource_line(resource)}")
            if with_inputs:
                inputs = json.dumps(resource["inputs"], indent=2, sort_keys=True).splitlines()
                lines += ["  <details><summary>inputs</summary>", "", "  ```json", *(f"  {line}" for line in inputs),
                          "  ```", "  </details>"]
    if diff.removed:
        lines += ["", "#### Removed", *(f"- {resource_line(r)}" for r in diff.removed)]
    if diff.changed:
        lines += ["", "#### Changed"]
        for resource, found in diff.changed:
            lines.append(f"- {resource_line(resource)}")
            lines += [f"  {line}" if line else "" for change in found for line in render_change(change)]
    if diff.outputs:
        lines += ["", "#### Stack outputs", *(line for change in diff.outputs for line in render_change(change))]
    return lines


def render(diffs: Iterable[StackDiff], base: str, limit: int = COMMENT_LIMIT) -> str:
    """The diff as one PR comment. Too long, it drops the added resources' inputs, then the tail."""
    diffs = list(diffs)
    header = [MARKER, "## Offline plan diff", "",
              f"{code(base)} → this change, each evaluated by its own code under the Pulumi mocks (no cloud). "
              "Secrets show as `[secret]`. " + " · ".join(f"**{d.stack}**: {counts(d)}" for d in diffs)]
    for with_inputs in (True, False):
        lines = header + [line for diff in diffs for line in ["", *render_stack(diff, with_inputs)]]
        if len("\n".join(lines)) < limit:
            return "\n".join(lines) + "\n"
    # Cut between two top-level items, never inside a code block.
    kept, size = [], 0
    for index, line in enumerate(lines):
        size += len(line) + 1
        if size > limit - 200:
            break
        if index + 1 == len(lines) or not lines[index + 1].startswith("  "):  # what follows is not inside
            kept = lines[:index + 1]
    return "\n".join(kept + ["", "… cut to fit a PR comment: run `make plan-diff` for the whole diff."]) + "\n"


# --- evaluating revisions -------------------------------------------------------------------------

def git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise PlanDiffError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def evaluate_trees(trees: dict[str, Path], stacks: Iterable[str]) -> dict[tuple[str, str], dict]:
    """Run each tree's own `python -m tools.plan` for each stack, all at once, and read the JSON."""
    runs = {(label, stack): subprocess.Popen([sys.executable, "-m", "tools.plan", "--stack", stack, "--json-only"],
                                             cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for label, tree in trees.items() for stack in stacks}
    failures = []
    for (label, stack), process in runs.items():
        _, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(f"the {label} revision's {stack} plan failed:\n{stderr.strip()}")
    if failures:
        raise PlanDiffError("\n\n".join(failures))
    return {(label, stack): json.loads((trees[label] / "build" / f"plan-{stack}.json").read_text())
            for label, stack in runs}


def compare(root: Path, base: str, stacks: Iterable[str] = STACKS) -> list[StackDiff]:
    """Diff the plans of revision `base` against the working tree at `root`."""
    stacks = list(stacks)
    try:
        commit = git(root, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    except PlanDiffError:
        raise PlanDiffError(f"{base!r} is not a commit of this repository (a shallow clone may lack it: "
                            "fetch the full history)") from None
    with tempfile.TemporaryDirectory(prefix="plan-diff-") as scratch:
        tree = Path(scratch) / "base"
        git(root, "worktree", "add", "--detach", str(tree), commit)
        try:
            if not (tree / "tools" / "plan.py").exists():
                raise PlanDiffError(f"{base} ({commit[:12]}) predates tools/plan.py, so it cannot be evaluated "
                                    "offline: choose a later base revision.")
            plans = evaluate_trees({"base": tree, "current": root}, stacks)
        finally:
            git(root, "worktree", "remove", "--force", str(tree))
    return [diff_plans(plans["base", stack], plans["current", stack]) for stack in stacks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--stack", action="append", choices=STACKS, help="only this stack (repeatable)")
    args = parser.parse_args(argv)
    if not args.base:
        parser.error("BASE is empty: run make plan-diff BASE=<git ref>, e.g. BASE=origin/main")
    try:
        diffs = compare(ROOT, args.base, args.stack or STACKS)
    except PlanDiffError as error:
        print(f"plan-diff: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(render(diffs, args.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
