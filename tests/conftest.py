import shutil
import tempfile
from pathlib import Path

import pytest

from tests.pgcluster import PgCluster, find_bin_dir, free_port
from tools.offline import evaluate_cached


@pytest.fixture(scope="session")
def pg() -> PgCluster:
    """One real PostgreSQL 16 per test session, shared by every test that needs a server."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries: install pgserver (requirements-test.txt) or Debian's postgresql")
    # Not under pytest's tmp dir: that is private to root, and the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="katforge-pg-"))
    cluster = PgCluster(root=root, bin_dir=bin_dir, port=free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def prod():
    """The prod stack's offline plan with its committed config, shared by the tests that only read it."""
    return evaluate_cached("prod")


@pytest.fixture(scope="session")
def qa():
    return evaluate_cached("qa")
