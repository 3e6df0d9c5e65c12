"""A real OpenSSH server on 127.0.0.1 for tests that reach hosts over SSH: Debian's /usr/sbin/sshd with a
throwaway host key, a throwaway client key and a configuration of its own (no PAM, key logins as root
only), in the foreground on a free port, one per test session: the fixture `sshd`, with
`pytest_plugins = ["tests.sshd"]` in a test module. It skips, saying why, without sshd, ssh-keygen or root.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pgcluster import free_port

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    host: str
    port: int
    user: str
    key: Path  # the client's private key
    known_hosts: Path

    @property
    def options(self) -> tuple[str, ...]:
        """ssh -o options that trust exactly this server's host key."""
        return (f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "sshd runs as root here (it switches to the user who logs in)"
    if not os.access(SSHD, os.X_OK):
        return f"no {SSHD} (Debian: openssh-server)"
    missing = [tool for tool in ("ssh", "ssh-keygen") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (Debian: openssh-client)" if missing else None


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)


def _wait_for(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {process.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError("sshd did not start listening")


@pytest.fixture(scope="session")
def sshd():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="katforge-sshd-"))
    process = None
    try:
        _keygen(root / "host_key")
        _keygen(root / "client_key")
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        port = free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "AuthenticationMethods publickey",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "AllowUsers root",
            # The temporary directory is not laid out as ~/.ssh would be.
            "StrictModes no", "PrintMotd no", "LogLevel ERROR", "",
        ]))
        # Debian's sshd needs its privilege separation directory, which the package's unit creates.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
        _wait_for(port, process)
        host_key = (root / "host_key.pub").read_text().split()
        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield Sshd(host="127.0.0.1", port=port, user="root", key=root / "client_key", known_hosts=known_hosts)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
