"""PostgreSQL fixtures, loaded by conftest.py (``pytest_plugins``); the
clusters are tests/pgcluster.py's.

* ``pg_cluster``: one cluster for the whole run, started the first time a
  test asks for it (about 1.3 s), closed at the end of the session. Never
  stop it: tests that stop or restart the server use the next one.
* ``private_pg_cluster``: a cluster of the test's own (about 0.3 s once
  the run's template exists), closed after the test.
* ``pg_dsn``: a fresh, empty database ``t_<hex>`` in the session cluster,
  its DSN; dropped (WITH (FORCE): open connections are cut) after the test.

Without PostgreSQL on the machine these fixtures fail, never skip: CI
installs it (.ci/run), and a skip there would hide a missing install.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from pgcluster import PgCluster, PgStartError, PgUnavailable


def _started() -> PgCluster:
    """A started cluster, or the test fails with why (no traceback: the
    message says what to install or quotes the server log)."""
    cluster = None
    try:
        cluster = PgCluster()
        cluster.start()
        return cluster
    except (PgUnavailable, PgStartError) as e:
        why = str(e)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    if cluster is not None:
        cluster.close()
    pytest.fail(why, pytrace=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster (see the module docstring)."""
    cluster = _started()
    yield cluster
    cluster.close()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """postgresql://postgres@127.0.0.1:PORT/t_<hex>: an empty database of
    this test's own, dropped afterwards."""
    name = f"t_{secrets.token_hex(8)}"
    dsn = pg_cluster.create_database(name)
    yield dsn
    stopped = not pg_cluster.running
    if stopped:
        pg_cluster.start()                  # for the tests after this one
    pg_cluster.drop_database(name)
    if stopped:
        pytest.fail("the session's pg_cluster was stopped during the test: a test "
                    "that stops or restarts PostgreSQL uses private_pg_cluster")


@pytest.fixture
def private_pg_cluster() -> Iterator[PgCluster]:
    """A cluster for this test alone, free to stop(), kill() and restart()."""
    cluster = _started()
    yield cluster
    cluster.close()
