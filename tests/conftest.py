import pytest

from tests.pgcluster import PgCluster, running_cluster
from tools.offline import evaluate_cached


@pytest.fixture(scope="session")
def pg() -> PgCluster:
    """One real PostgreSQL 16 per test session, shared by every test that needs a server."""
    with running_cluster("katforge-pg-") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def prod():
    """The prod stack's offline plan with its committed config, shared by the tests that only read it."""
    return evaluate_cached("prod")


@pytest.fixture(scope="session")
def qa():
    return evaluate_cached("qa")
