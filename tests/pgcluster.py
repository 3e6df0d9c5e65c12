"""A throwaway PostgreSQL 16 cluster laid out like Ubuntu's, for tests that run the real host scripts.

The binaries come from `pgserver` (PyPI), which bundles PostgreSQL 16; Debian's packages are the
fallback. Like Ubuntu, the configuration lives apart from the data (`/etc/postgresql/16/main` with a
`conf.d/` include directory), so the host scripts can be pointed at it through environment variables.
PostgreSQL refuses to run as root, so under root the server runs as an unprivileged user, and the host
scripts run psql as the postgres OS user: both must reach the binaries. When the clone sits in a directory
other users cannot enter (anything under /root, any `mktemp -d`), pgserver's install tree is copied once
per process to a world-readable temporary directory, and that copy serves everything.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SERVER_USER = "pgtest"
SUPERUSER = "postgres"


def find_bin_dir() -> Path | None:
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        return Path(found[-1]).parent if found else None
    bin_dir = Path(POSTGRES_BIN_PATH)
    if os.geteuid() == 0 and not reachable_by_others(bin_dir / "pg_ctl"):
        return _world_readable_copy(bin_dir)
    return bin_dir


def reachable_by_others(program: Path) -> bool:
    """Whether a user who owns none of the path (and is in none of its groups) may run `program`:
    every directory above it searchable by others, the program executable by others."""
    program = program.resolve()
    return all(d.stat().st_mode & 0o001 for d in program.parents) and program.stat().st_mode & 0o005 == 0o005


_copies: dict[Path, Path] = {}


def _world_readable_copy(bin_dir: Path) -> Path:
    """pgserver's pginstall tree copied under a new 0755 temporary directory, once per process, with the
    shared libraries its programs find through RPATH $ORIGIN/../../../pgserver.libs; removed at exit."""
    if bin_dir not in _copies:
        install = bin_dir.parent  # .../site-packages/pgserver/pginstall
        root = Path(tempfile.mkdtemp(prefix="katforge-pginstall-", dir=scratch_parent()))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        root.chmod(0o755)
        shutil.copytree(install, root / "pgserver" / install.name, ignore=shutil.ignore_patterns("include"))
        libs = install.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / libs.name)
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
        _copies[bin_dir] = root / "pgserver" / install.name / bin_dir.name
    return _copies[bin_dir]


# Throwaway clusters live in memory where there is room: on a disk (ext4 mounted with `discard`, say) the
# files that CREATE DATABASE, the WAL and the dumps write cost as much again to delete, seconds per session.
MEMORY_FS = Path("/dev/shm")
MEMORY_FS_NEEDED = 2 * 1024**3


def scratch_parent() -> str | None:
    """Where a throwaway cluster's directory goes: /dev/shm with 2 GiB free (containers often give it
    64 MiB), otherwise the system's temporary directory."""
    try:
        stat = os.statvfs(MEMORY_FS)
    except OSError:
        return None
    room = stat.f_bavail * stat.f_frsize >= MEMORY_FS_NEEDED and os.access(MEMORY_FS, os.W_OK | os.X_OK)
    return str(MEMORY_FS) if room else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        # Another test process (a pytest-xdist worker) may add it at the same moment: then useradd fails
        # and the user exists all the same.
        made = subprocess.run(["useradd", "--system", "--no-create-home", name], capture_output=True, text=True)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"useradd {name} failed: {made.stderr.strip()}") from None


def _server_account() -> pwd.struct_passwd | None:
    return ensure_os_user(SERVER_USER) if os.geteuid() == 0 else None


@dataclass
class PgCluster:
    root: Path
    bin_dir: Path
    port: int

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for clients and for the host scripts: where the cluster and its tools are."""
        env = dict(os.environ)
        env.update(
            PATH=f"{self.bin_dir}:{env['PATH']}",
            PGHOST=str(self.socket_dir),
            PGPORT=str(self.port),
            PGUSER=SUPERUSER,
            PGDATABASE="postgres",
            PG_CONF_DIR=str(self.conf_dir),
            PG_BIN_DIR=str(self.bin_dir),
        )
        env.update(extra)
        return env

    def _as_server(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        account = _server_account()
        if account is not None:
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        result = subprocess.run(args, capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr}{result.stdout}")
        return result

    def start(self) -> None:
        for d in (self.conf_dir / "conf.d", self.data_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        account = _server_account()
        if account is not None:
            os.chmod(self.root, 0o755)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, account.pw_uid, account.pw_gid)
            os.chmod(self.socket_dir, 0o777)
        self._as_server([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                         "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions",
                         "--no-sync"])
        # Move the configuration out of the data directory, as Ubuntu's pg_createcluster does.
        for name in ("pg_hba.conf", "pg_ident.conf"):
            shutil.move(self.data_dir / name, self.conf_dir / name)
        (self.conf_dir / "postgresql.conf").write_text(
            f"data_directory = '{self.data_dir}'\n"
            f"hba_file = '{self.conf_dir / 'pg_hba.conf'}'\n"
            f"ident_file = '{self.conf_dir / 'pg_ident.conf'}'\n"
            f"port = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            # A throwaway cluster need not survive a crash: no waiting for the disk (PostgreSQL's
            # "Non-Durable Settings"). Before conf.d, so what a host script writes there still wins.
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "include_dir = 'conf.d'\n"
        )
        (self.data_dir / "postgresql.conf").unlink()
        if account is not None:
            for path in self.conf_dir.rglob("*"):
                os.chown(path, account.pw_uid, account.pw_gid)
        self.pg_ctl("start", "-w", "-l", str(self.root / "server.log"))

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self._as_server([str(self.bin_dir / "pg_ctl"), "-D", str(self.conf_dir), *args])

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "fast", "-w")

    def psql(self, sql: str, *, database: str = "postgres", **env: str) -> str:
        """Run SQL as the superuser over the local socket; return unaligned, tuples-only output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", database, "-c", sql],
            check=True, capture_output=True, text=True, env=self.env(**env),
        )
        return result.stdout.strip()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin_dir / "pg_isready"), "-h", str(self.socket_dir), "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("PostgreSQL did not become ready")
            time.sleep(0.1)


@contextmanager
def running_cluster(prefix: str) -> Iterator[PgCluster]:
    """A started cluster of its own, stopped and removed afterwards; the test is skipped without binaries.
    Not under pytest's tmp dir: that is private to root, and the server may run as another user."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries: install pgserver (requirements-test.txt) or Debian's postgresql")
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_parent()))
    cluster = PgCluster(root=root, bin_dir=bin_dir, port=free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
