"""The adoption runbook run once per session against the simulated estate, for the discovery and preflight
tests: `pytest_plugins = ["tests.discovered"]` in a test module (it brings the servers' plugins too).

`adoption` runs `make discover` against the live account (moto), the local Kubernetes API and the fake
hosts over real sshd, three times, as an operator would:
  1. without writing config (the JSON only), then preflight on the untouched stack file fails;
  2. again, writing a temporary copy of Pulumi.prod.yaml (never the committed one);
  3. after the runbook's steps for what the hosts refuse (the md5 role re-hashed, as the hazard says;
     postgresAllowRestart set; postgresDropLiveHbaRules set, since the session's server admits local users
     by trust, initdb's default, which the program's pg_hba does not keep; k3sReplaceLiveFlags set, since
     the live unit and env file give --write-kubeconfig-mode 644 and the program's config.yaml 0600),
     writing again: the stack file must not change.
The md5 role gets its original hash back at once: the other host tests expect the live-like role.

`greenfield` runs discovery of the empty account (AWS only: nothing runs there) into its own copy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tools import discover, stackfile
from tools.offline import ROOT, project_config_schema

pytest_plugins = ["tests.fake_hosts", "tests.kube_api", "tests.live_account", "tests.sshd"]


def use_account(monkeypatch, account) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in account.env().items():
        monkeypatch.setenv(key, value)


def host_args(sshd, fake_hosts) -> list[str]:
    args = ["--ssh-key", str(sshd.key), "--ssh-user", sshd.user, "--ssh-port", str(sshd.port),
            "--k3s-host", sshd.host, "--vpn-host", sshd.host]
    args += [f"--ssh-option={option}" for option in sshd.options]
    # The live sshd is the session's own (root by key), whose configuration tests/sshd.py writes beside its keys.
    host_env = {**fake_hosts.env, "SSHD_CONFIG": str(sshd.key.parent / "sshd_config")}
    return args + [f"--host-env={name}={value}" for name, value in host_env.items()]


def stack_copy(directory: Path) -> Path:
    """Copies of both committed stack files (qa's plan reads prod's beside it); prod's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for stack in ("prod", "qa"):
        shutil.copy(ROOT / f"Pulumi.{stack}.yaml", directory / f"Pulumi.{stack}.yaml")
    return directory / "Pulumi.prod.yaml"


@dataclass
class Run:
    status: int
    stdout: str
    json: bytes
    path: Path
    stack_file: Optional[Path] = None

    @property
    def document(self) -> dict:
        return json.loads(self.json)


@dataclass
class Adoption:
    stack_file: Path
    committed: bytes  # the stack file before any run
    runs: list[Run] = field(default_factory=list)
    written: bytes = b""  # the stack file after run 2
    before_last: bytes = b""  # after the runbook's own edits, before run 3
    after_last: bytes = b""  # after run 3


def discover_into(argv: list[str], out: Path) -> Run:
    stdout = io.StringIO()
    status = discover.main([*argv, "--out", str(out)], stdout)
    stack_file = Path(argv[argv.index("--stack-file") + 1]) if "--stack-file" in argv else None
    return Run(status, stdout.getvalue(), out.read_bytes(), out, stack_file)


def rehash_md5_role(pg, role: str, password: str) -> str:
    """The runbook's step for an md5 role (the same password, hashed with SCRAM); its old hash."""
    old = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
    pg.psql(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD '{password}'")
    return old


@pytest.fixture(scope="session")
def adoption(live_account, kube_api, sshd, fake_hosts, pg, tmp_path_factory) -> Adoption:
    work = tmp_path_factory.mktemp("adoption")
    stack_file = stack_copy(work / "stack")
    kubeconfig = kube_api.kubeconfig(work / "katforge-config")
    argv = ["--stack", "prod", "--kubeconfig", str(kubeconfig), "--stack-file", str(stack_file),
            *host_args(sshd, fake_hosts)]
    result = Adoption(stack_file, stack_file.read_bytes())
    monkeypatch = pytest.MonkeyPatch()
    use_account(monkeypatch, live_account)
    try:
        result.runs.append(discover_into([*argv, "--no-write-config"], work / "run1.json"))
        result.runs.append(discover_into(argv, work / "run2.json"))
        result.written = stack_file.read_bytes()
        role = fake_hosts.roles["md5"]
        password = next(p for p in fake_hosts.planted if p.startswith("PLANTED-md5-"))
        old_hash = rehash_md5_role(pg, role, password)
        try:
            stackfile.write(stack_file, {"katforge:postgresAllowRestart": True, "katforge:postgresDropLiveHbaRules": True,
                                         "katforge:k3sReplaceLiveFlags": True}, project_config_schema())
            result.before_last = stack_file.read_bytes()
            result.runs.append(discover_into(argv, work / "run3.json"))
            result.after_last = stack_file.read_bytes()
        finally:
            pg.psql(f"ALTER ROLE {role} PASSWORD '{old_hash}'")  # a stored hash is kept as it is
    finally:
        monkeypatch.undo()
    return result


@pytest.fixture(scope="session")
def greenfield(empty_account, tmp_path_factory) -> Run:
    """Discovery of the empty account: AWS only, since nothing runs to be read over SSH or kubectl."""
    work = tmp_path_factory.mktemp("greenfield")
    stack_file = stack_copy(work / "stack")
    monkeypatch = pytest.MonkeyPatch()
    use_account(monkeypatch, empty_account)
    try:
        return discover_into(["--stack", "prod", "--no-cluster", "--no-hosts", "--stack-file", str(stack_file)],
                             work / "empty.json")
    finally:
        monkeypatch.undo()
