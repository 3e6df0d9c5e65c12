"""Before CI runs Pulumi: does the committed stack file hold everything the program requires?

    python -m tools.check_stack_config --stack prod [--backend-url "$PULUMI_BACKEND_URL"]

With the DIY (S3) backend the committed Pulumi.<stack>.yaml is the stack's only config, so a key that
Pulumi.yaml declares without a default must be in it (secrets as `secure:` values), and a file with
encrypted values must carry the `encryptionsalt:` of the passphrase provider, or nothing can decrypt
them. Each problem is one line with the command that fixes it; the exit status is 1 when there is any.
With --backend-url it also checks that the backend's bucket is the one the CI roles may use
(katforge:stateBucket of the prod stack): otherwise every Pulumi call would be denied.

It reads what the CLI reads (tools/stackfile.py: types, plain-text secrets); values are checked by the
program itself (infra/settings.py), which the offline plan runs. The committed stack files hold no
secret yet (they are set once by an operator, README "First deployment"), so this is a CI step, not a
test of today's repository: tests/test_workflows.py runs it on stack files of its own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from tools import stackfile
from tools.lock import bucket_of

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "katforge"


def _secure(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"secure"} and isinstance(value["secure"], str)


def _fix(key: str, declaration: dict, stack: str) -> str:
    if declaration.get("secret"):
        return f"pulumi config set --secret {PROJECT}:{key} --stack {stack}   (it prompts)"
    if declaration.get("type") == "array":
        return f"pulumi config set --path '{PROJECT}:{key}[0]' <value> --stack {stack}"
    return f"pulumi config set {PROJECT}:{key} <value> --stack {stack}"


def problems(stack: str, root: Path = ROOT, backend_url: Optional[str] = None) -> list[str]:
    schema = yaml.safe_load((root / "Pulumi.yaml").read_text())["config"]
    path = root / f"Pulumi.{stack}.yaml"
    if not path.exists():
        return [f"{path.name}: missing: commit the stack file CI deploys from (README, \"First deployment\")"]
    try:
        plain = stackfile.read(path, schema)  # what the CLI would refuse, refused here first
    except stackfile.StackFileError as error:
        return [str(error)]
    document = yaml.safe_load(path.read_text()) or {}
    config = document.get("config") or {}
    found = []
    for key, declaration in schema.items():
        if "default" in declaration or f"{PROJECT}:{key}" in config:
            continue
        kind = "secret" if declaration.get("secret") else "value"
        found.append(f"{path.name}: {PROJECT}:{key} is not set and has no default: set the {kind} with: "
                     f"{_fix(key, declaration, stack)}, then commit {path.name}")
    if any(_secure(value) for value in config.values()) and not document.get("encryptionsalt"):
        found.append(f"{path.name}: encrypted values but no encryptionsalt: commit the file as "
                     f"`pulumi stack init {stack} --secrets-provider=passphrase` and `pulumi config set --secret` "
                     "wrote it")
    if backend_url is not None:
        prod = plain if stack == "prod" else stackfile.read(root / "Pulumi.prod.yaml", schema)
        expected = prod.get(f"{PROJECT}:stateBucket", schema["stateBucket"]["default"])
        if bucket_of(backend_url) != expected:
            found.append(f"PULUMI_BACKEND_URL {backend_url}: its bucket is not {expected}, the state bucket the CI "
                         f"roles may use (katforge:stateBucket): fix the variable or set katforge:stateBucket")
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.check_stack_config",
                                     description="Does the committed stack file hold what the program requires?")
    parser.add_argument("--stack", required=True, choices=("prod", "qa"))
    parser.add_argument("--backend-url", help="PULUMI_BACKEND_URL, checked against katforge:stateBucket")
    args = parser.parse_args(argv)
    found = problems(args.stack, backend_url=args.backend_url)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"Pulumi.{args.stack}.yaml: every required key is set")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
