import gc

import pytest

from tests.pgcluster import PgCluster, running_cluster
from tools.offline import evaluate_cached


def pytest_collection_finish(session):
    """Once every test module is imported, the garbage collector stops walking the SDKs' hundreds of
    thousands of long-lived objects (gc.freeze) and runs a tenth as often: half of an offline plan's
    evaluation, and much of the in-process servers' time, was spent in collections that found nothing."""
    gc.freeze()
    threshold, *older = gc.get_threshold()
    gc.set_threshold(threshold * 10, *older)


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
