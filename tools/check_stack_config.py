"""Before CI runs Pulumi: would the program accept the committed stack file?

    python -m tools.check_stack_config --stack prod [--backend-url "$PULUMI_BACKEND_URL"]

With the DIY (S3) backend the committed Pulumi.<stack>.yaml is the stack's only config, so a key that
Pulumi.yaml declares without a default must be in it (secrets as `secure:` values), and a file with
encrypted values must carry the `encryptionsalt:` of the passphrase provider, or nothing can decrypt
them. Then the program's own settings (infra/settings.py `load`) read the config as the CLI would hand
it (tools/offline.py `effective_config`: Pulumi.yaml's defaults under the file's values), so every
value the program refuses (prod without sshPublicKey, a database off the host without
rdsMasterPassword, a bad CIDR) stops CI with the program's own line, before any credential. Only the
CLI can decrypt: a secret stands in as a placeholder, so its presence is checked, not its text.
Each problem is one line with the command that fixes it; the exit status is 1 when there is any.
With --backend-url it also checks that the backend's bucket is the one the CI roles may use
(katforge:stateBucket of the prod stack): otherwise every Pulumi call would be denied.

It reads what the CLI reads (tools/stackfile.py: types, plain-text secrets). The committed stack files
hold no secret yet (they are set once by an operator, README "First deployment"), so this is a CI step,
not a test of today's repository: tests/test_workflows.py runs it on stack files of its own.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import yaml

from infra import settings
from tools import offline, stackfile
from tools.lock import bucket_of

PROJECT = "katforge"


def _secure(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"secure"} and isinstance(value["secure"], str)


def _fix(key: str, declaration: dict, stack: str) -> str:
    if declaration.get("secret"):
        return f"pulumi config set --secret {PROJECT}:{key} --stack {stack}   (it prompts)"
    if declaration.get("type") == "array":
        return f"pulumi config set --path '{PROJECT}:{key}[0]' <value> --stack {stack}"
    return f"pulumi config set {PROJECT}:{key} <value> --stack {stack}"


def program_problem(stack: str) -> Optional[str]:
    """The line the program's settings stop with on the stack's config, or None. Where the offline plan
    stands in for a key only an operator sets, the CLI hands the program Pulumi.yaml's default."""
    schema = offline.project_config_schema()
    committed = offline.stack_config(stack)
    as_the_cli = {f"{PROJECT}:{key}": schema[key]["default"] for key in offline.OPERATOR_PLACEHOLDERS
                  if "default" in schema[key] and f"{PROJECT}:{key}" not in committed}
    config, secret_keys = offline.effective_config(stack, as_the_cli)

    try:
        settings.from_config(stack, config, secret_keys)  # the runtime's stack and config stay as they were
    except settings.SettingsError as error:
        return str(error)
    return None


def problems(stack: str, backend_url: Optional[str] = None) -> list[str]:
    """Every problem, one line each. The project is the one tools/offline.py reads (its ROOT)."""
    root = offline.ROOT
    schema = offline.project_config_schema()
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
    refused = program_problem(stack)
    if refused:
        found.append(refused)
    if backend_url is not None:
        prod = plain if stack == "prod" else stackfile.read(root / "Pulumi.prod.yaml", schema)
        expected = prod.get(f"{PROJECT}:stateBucket", schema["stateBucket"]["default"])
        if bucket_of(backend_url) != expected:
            found.append(f"PULUMI_BACKEND_URL {backend_url}: its bucket is not {expected}, the state bucket the CI "
                         f"roles may use (katforge:stateBucket): fix the variable or set katforge:stateBucket")
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.check_stack_config",
        description="Would the program accept the committed stack file Pulumi.<stack>.yaml? Each CI job runs "
                    "this before any credential; run it before pushing a stack file. It stops on a key neither "
                    "set nor defaulted, encrypted values without an encryptionsalt, a secret in plain text, any "
                    "value the program's own settings refuse (prod without sshPublicKey, a database off the host "
                    "without rdsMasterPassword, ...), or a backend in another bucket than katforge:stateBucket.",
        epilog="Each problem is one line on stderr with the command that fixes it; the exit status is 1 when "
               "there is any. Secrets are not decrypted: a secret is checked to be set, not its text.")
    parser.add_argument("--stack", required=True, choices=("prod", "qa"), help="the stack file to check")
    parser.add_argument("--backend-url", metavar="URL",
                        help='PULUMI_BACKEND_URL (as CI passes it: --backend-url "$PULUMI_BACKEND_URL"), whose '
                             "bucket must be katforge:stateBucket, the one the CI roles may use")
    args = parser.parse_args(argv)
    found = problems(args.stack, backend_url=args.backend_url)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"Pulumi.{args.stack}.yaml: every required key is set and the program accepts the values")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
