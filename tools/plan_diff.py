"""`make plan-diff BASE=<git ref>`: what a change does to the offline plans, as `pulumi preview` would
say it, in markdown for review.

The base revision is checked out into a temporary git worktree; it and the working tree are each
evaluated by their own `tools/plan.py` (Pulumi mocks, no cloud), and the JSON plans are compared by
URN. Each resource gets an operation: create, update (which properties), replace (which property
forces it, from the table in tools/force_new.py, or which replaced resource it depends on), delete.
Replacements and deletions of protected resources and updates that stop a host come first, with a
warning. A secret's change shows as "secret changed" (the plans hold keyed hashes, never values);
values only a deployment knows read `(known after deploy)`.
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
from typing import Any, Iterable, Optional

from infra.settings import STAGES
from tools.force_new import ABSENT, SECRET_MARK, covers, host_stops, parse, replaced_if_unknown, \
    replacement_reasons, same, with_ignored
from tools.offline import KNOWN_AFTER_DEPLOY, ROOT

STACKS = tuple(STAGES)
MARKER = "<!-- katforge-plan-diff -->"  # lets the preview workflow find and edit its own PR comment
COMMENT_LIMIT = 60_000  # GitHub refuses a comment over 65,536 characters
# Bookkeeping the engine records without an operation on the resource.
UNCOMPARED_OPTIONS = {"depends_on", "property_dependencies"}
OPERATIONS = ("replace", "update", "create", "delete")  # the order steps are listed in
PROTECTED = {"replace": "protected: `pulumi up` stops with an error instead of replacing it",
             "delete": "protected: `pulumi up` stops with an error instead of deleting it"}


class PlanDiffError(Exception):
    """A revision could not be evaluated; the message says which and why."""


@dataclass
class Change:
    path: str
    old: Any
    new: Any
    because: str = ""  # a value known only after deploy that changes with a replaced resource


@dataclass
class Step:
    op: str  # create | update | replace | delete
    resource: dict
    changes: list[Change] = field(default_factory=list)
    forced_by: list[str] = field(default_factory=list)  # what makes it a replacement
    warnings: list[str] = field(default_factory=list)
    knock_on: bool = False  # it changes (or is replaced) because a resource it depends on is replaced


@dataclass
class StackDiff:
    stack: str
    steps: list[Step] = field(default_factory=list)
    outputs: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.steps or self.outputs)

    def of(self, op: str) -> list[Step]:
        return [step for step in self.steps if step.op == op]

    def step(self, name: str, type_: Optional[str] = None) -> Step:
        found = [s for s in self.steps if s.resource["name"] == name and type_ in (None, s.resource["type"])]
        if len(found) != 1:
            raise KeyError(f"{len(found)} steps for {name!r}")
        return found[0]


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


def changes(old: Any, new: Any, prefix: str = "") -> list[Change]:
    before, after = leaves(old, prefix), leaves(new, prefix)
    return [Change(path, before.get(path, ABSENT), after.get(path, ABSENT))
            for path in sorted(before.keys() | after.keys())
            if not same(before.get(path, ABSENT), after.get(path, ABSENT))]


def _options(resource: dict, keys: Iterable[str]) -> dict:
    return {k: resource["options"][k] for k in keys}


def _update_or_replace(old: dict, new: dict, providers: dict[str, dict]) -> Optional[Step]:
    """How a resource in both plans changes: ignoreChanges applied, then the force-new table."""
    options = new["options"]
    inputs = with_ignored(old["inputs"], new["inputs"], options.get("ignore_changes", ()))
    # An option only one plan records is one the older tools/offline.py did not know, not a change.
    compared = (old["options"].keys() & options.keys()) - UNCOMPARED_OPTIONS
    found = (changes(old["inputs"], inputs, "inputs") + changes(old.get("parent"), new.get("parent"), "parent")
             + changes(_options(old, compared), _options(new, compared), "options"))
    if not found:
        return None
    reasons = replacement_reasons(new["type"], old["inputs"], inputs, provider=providers.get(options.get("provider")),
                                  replace_on_changes=options.get("replace_on_changes", ()))
    step = Step("replace" if reasons else "update", new, found, reasons)
    if step.op == "update" and (stops := host_stops(new["type"], old["inputs"], inputs)):
        step.warnings.append(f"stops and starts the instance to change {', '.join(f'`{p}`' for p in stops)}")
    return step


def _cascade(steps: dict[str, Step], after: dict[str, dict], providers: dict[str, dict]) -> None:
    """What depends on a replaced resource sees its outputs change: those inputs become unknown, and
    where they are force-new (or the replaced resource is their provider) the dependent is replaced too."""
    provider_urns = {r["name"]: urn for urn, r in after.items() if r["type"].startswith("pulumi:providers:")}
    queue = [urn for urn, step in steps.items() if step.op == "replace"]
    while queue:
        replaced = queue.pop(0)
        name = after[replaced]["name"]
        for urn, resource in after.items():
            step = steps.get(urn)
            if step is not None and step.op in ("create", "replace"):
                continue
            options = resource["options"]
            # An ignored input keeps its old value whatever its source becomes (a host's keyName).
            ignored = [parse(p) for p in options.get("ignore_changes", ())]
            properties = [p for p, urns in options.get("property_dependencies", {}).items()
                          if replaced in urns and not any(covers(i, parse(p)) for i in ignored)]
            via_provider = provider_urns.get(options.get("provider")) == replaced
            if not properties and not via_provider:
                continue
            step = steps.setdefault(urn, Step("update", resource, knock_on=True))
            known = {c.path for c in step.changes}
            step.changes += [Change(f"inputs.{p}", resource["inputs"].get(p, ABSENT), KNOWN_AFTER_DEPLOY,
                                    because=f"**{name}** is replaced")
                             for p in properties if f"inputs.{p}" not in known]
            forced = replaced_if_unknown(resource["type"], properties, resource["inputs"],
                                         provider=providers.get(options.get("provider")),
                                         replace_on_changes=options.get("replace_on_changes", ()))
            forced = [f"`{p}` comes from **{name}**, which is replaced" for p in forced]
            if via_provider:
                forced.append(f"its provider **{name}** is replaced")
            if forced:
                step.op, step.forced_by, step.warnings, step.knock_on = "replace", step.forced_by + forced, [], True
                queue.append(urn)


def _as_legacy(new: Any, old: Any) -> Any:
    """`new` as a plan written before stand-ins were marked would show it: where new says
    `(known after deploy)` and old has a value in that place, old's value (it was a stand-in)."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _as_legacy(v, old.get(k)) for k, v in new.items()}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [_as_legacy(n, o) for n, o in zip(new, old)]
    if isinstance(new, str) and isinstance(old, str) and KNOWN_AFTER_DEPLOY in new:
        pattern = ".+?".join(re.escape(part) for part in new.split(KNOWN_AFTER_DEPLOY))
        return old if re.fullmatch(pattern, old, re.DOTALL) else new
    return new


def diff_plans(old: dict, new: dict) -> StackDiff:
    """Compare two plans in the `make plan` JSON format."""
    if "knownAfterDeploy" not in old:  # the base predates marked stand-ins: its stand-ins are no values
        base = {r["urn"]: r for r in old["resources"]}
        new = {**new, "outputs": _as_legacy(new["outputs"], old["outputs"]),
               "resources": [{**r, "inputs": _as_legacy(r["inputs"], base.get(r["urn"], {}).get("inputs"))}
                             for r in new["resources"]]}
    before = {r["urn"]: r for r in old["resources"]}
    after = {r["urn"]: r for r in new["resources"]}
    providers = {r["name"]: r["inputs"] for r in new["resources"] if r["type"].startswith("pulumi:providers:")}
    steps: dict[str, Step] = {urn: Step("create", after[urn]) for urn in after.keys() - before.keys()}
    steps.update({urn: Step("delete", before[urn]) for urn in before.keys() - after.keys()})
    for urn in before.keys() & after.keys():
        if (step := _update_or_replace(before[urn], after[urn], providers)) is not None:
            steps[urn] = step
    _cascade(steps, after, providers)
    for step in steps.values():
        if step.op in PROTECTED and step.resource["options"].get("protect"):
            step.warnings.insert(0, PROTECTED[step.op])
    # Warnings first, and among them the causes before what follows from them.
    order = sorted(steps.values(), key=lambda s: (not s.warnings, s.knock_on, OPERATIONS.index(s.op),
                                                  s.resource["urn"]))
    return StackDiff(stack=new["stack"], steps=order, outputs=changes(old["outputs"], new["outputs"]))


# --- markdown -------------------------------------------------------------------------------------

def code(text: str) -> str:
    """Inline code that survives backticks inside it."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def show(value: Any) -> str:
    if value is ABSENT:
        return "(none)"
    if value == KNOWN_AFTER_DEPLOY:
        return KNOWN_AFTER_DEPLOY
    if isinstance(value, str) and SECRET_MARK.fullmatch(value):
        return "[secret]"
    return code(json.dumps(value, sort_keys=True))


def shown_path(path: str) -> str:
    return path.removeprefix("inputs.")


def _document(value: Any) -> Any:
    """A JSON object held in a string (an IAM policy, a trust policy) as indented lines, else the value."""
    if isinstance(value, str) and value.startswith("{") and "\n" not in value:
        try:
            return json.dumps(json.loads(value), indent=2, sort_keys=True)
        except ValueError:
            pass
    return value


def render_change(change: Change) -> list[str]:
    name = code(shown_path(change.path))
    if change.because:
        return [f"- {name}: {KNOWN_AFTER_DEPLOY}, as {change.because}"]
    if all(isinstance(v, str) and SECRET_MARK.fullmatch(v) for v in (change.old, change.new)):
        return [f"- {name}: secret changed"]
    old, new = _document(change.old), _document(change.new)
    if isinstance(old, str) and isinstance(new, str) and "\n" in old + new:
        lines = difflib.unified_diff(old.splitlines(), new.splitlines(), "before", "after", lineterm="")
        return [f"- {name}:", "", "  ```diff", *(f"  {line}" for line in lines), "  ```"]
    return [f"- {name}: {show(change.old)} → {show(change.new)}"]


def resource_line(resource: dict) -> str:
    return f"**{resource['name']}** ({code(resource['type'])})"


def step_lines(step: Step, with_inputs: bool, attention: bool) -> list[str]:
    head = f"- {resource_line(step.resource)}"
    if attention:
        head = f"- ⚠️ **{step.op}** {resource_line(step.resource)}: {'; '.join(step.warnings)}"
    if step.forced_by:
        head += ", replaced because " + "; ".join(r if " " in r else code(r) for r in step.forced_by)
    lines = [head, *(f"  {line}" if line else "" for change in step.changes for line in render_change(change))]
    if step.op == "create" and with_inputs:
        inputs = json.dumps(step.resource["inputs"], indent=2, sort_keys=True).splitlines()
        lines += ["  <details><summary>inputs</summary>", "", "  ```json", *(f"  {line}" for line in inputs),
                  "  ```", "  </details>"]
    return lines


def counts(diff: StackDiff) -> str:
    if diff.empty:
        return "no changes"
    parts = [(len(diff.of(op)), f"to {op}") for op in OPERATIONS]
    parts.append((len(diff.outputs), "outputs changed" if len(diff.outputs) > 1 else "output changed"))
    return ", ".join(f"{n} {label}" for n, label in parts if n)


def render_stack(diff: StackDiff, with_inputs: bool) -> list[str]:
    lines = [f"### {diff.stack}: {counts(diff)}"]
    attention = [step for step in diff.steps if step.warnings]
    if attention:
        lines += ["", "#### ⚠️ Needs attention"]
        lines += [line for step in attention for line in step_lines(step, with_inputs, attention=True)]
    for op in OPERATIONS:
        listed = [step for step in diff.of(op) if not step.warnings]
        if listed:
            lines += ["", f"#### {op.capitalize()}"]
            lines += [line for step in listed for line in step_lines(step, with_inputs, attention=False)]
    if diff.outputs:
        lines += ["", "#### Stack outputs", *(line for change in diff.outputs for line in render_change(change))]
    return lines


def render(diffs: Iterable[StackDiff], base: str, limit: int = COMMENT_LIMIT) -> str:
    """The diff as one PR comment. Too long, it drops the created resources' inputs, then the tail."""
    diffs = list(diffs)
    header = [MARKER, "## Offline plan diff", "",
              f"{code(base)} → this change, each evaluated by its own code under the Pulumi mocks (no cloud). "
              "A secret's change shows as *secret changed*, never its value; `(known after deploy)` is a value "
              "only a deployment knows. " + " · ".join(f"**{d.stack}**: {counts(d)}" for d in diffs)]
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
