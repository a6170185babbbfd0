"""The PostgreSQL test fixtures themselves (pgcluster.py, pg_fixtures.py):
each test here fails if the cluster answers the wrong thing, leaks a
database, a process or a directory, or loses data across a restart."""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path

import asyncpg
import pytest

from pgcluster import PgCluster, PgStartError

CONNECTION_GONE = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                   OSError)
USER_TABLES = ("SELECT count(*) FROM pg_tables "
               "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")


async def fetchval(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("\nUid:")[1].split()[0])


async def test_session_cluster_answers_on_its_own_port(pg_cluster: PgCluster,
                                                       pg_dsn: str) -> None:
    name = pg_dsn.rsplit("/", 1)[1]
    assert pg_dsn == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{name}"
    assert pg_cluster.port != 5432
    assert await fetchval(pg_dsn, "SELECT 1") == 1
    assert await fetchval(pg_dsn, "SELECT current_database()") == name
    assert await fetchval(pg_dsn, "SHOW data_directory") == str(pg_cluster.data_dir)
    assert int(await fetchval(pg_dsn, "SHOW max_connections")) >= 200
    # initdb and postgres refuse root: as root, the server runs as nobody
    assert pg_cluster.pid is not None
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert uid_of(pg_cluster.pid) == expected


_dsns_seen: list[str] = []


@pytest.mark.parametrize("round_", [1, 2])
async def test_each_test_gets_a_fresh_empty_database(pg_cluster: PgCluster, pg_dsn: str,
                                                     round_: int) -> None:
    """Round 2 sees neither round 1's database nor its table."""
    assert await fetchval(pg_dsn, USER_TABLES) == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE leftover (x int)")
    finally:
        await conn.close()
    for earlier in _dsns_seen:
        assert earlier != pg_dsn
        gone = earlier.rsplit("/", 1)[1]
        assert pg_cluster.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1",
                                   gone) == 0, f"{gone} was not dropped"
    _dsns_seen.append(pg_dsn)


async def test_drop_database_cuts_open_connections(pg_cluster: PgCluster) -> None:
    dsn = pg_cluster.create_database("t_dropped_while_open")
    conn = await asyncpg.connect(dsn)
    try:
        pg_cluster.drop_database("t_dropped_while_open")
        assert pg_cluster.fetchval("SELECT count(*) FROM pg_database "
                                   "WHERE datname = 't_dropped_while_open'") == 0
        with pytest.raises(CONNECTION_GONE):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    with pytest.raises(ValueError):
        pg_cluster.create_database('x"; DROP DATABASE postgres; --')


async def test_stop_refuses_connections_and_restart_keeps_port_and_data(
        private_pg_cluster: PgCluster) -> None:
    cluster = private_pg_cluster
    dsn, port = cluster.dsn(), cluster.port
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    cluster.stop()
    assert not cluster.running and cluster.pid is None
    with pytest.raises(OSError):
        await asyncpg.connect(dsn, timeout=5)
    # The open connection was cut by the fast stop. (asyncpg may say so with an
    # InternalClientError when the loop saw the server's FATAL but not yet the EOF.)
    with pytest.raises(CONNECTION_GONE):
        await conn.fetchval("SELECT 1")
    conn.terminate()

    cluster.restart()
    assert cluster.running and cluster.port == port
    assert await fetchval(dsn, "SELECT x FROM kept") == 42

    cluster.restart("immediate")            # running: stop, then start with crash recovery
    assert await fetchval(dsn, "SELECT x FROM kept") == 42


async def test_restart_from_a_thread_keeps_the_loop_running(
        private_pg_cluster: PgCluster) -> None:
    """How a test lets relayd run while the server comes back."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.to_thread(private_pg_cluster.restart)
    finally:
        ticker.cancel()
    assert ticks >= 5
    assert await fetchval(private_pg_cluster.dsn(), "SELECT 1") == 1


async def test_kill_reaps_everything_and_recovers_committed_data() -> None:
    # synchronous_commit on: with the default off, a kill may lose the last commits
    cluster = PgCluster(settings={"synchronous_commit": "on"})
    try:
        cluster.start()
        conn = await asyncpg.connect(cluster.dsn())
        await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        pid = cluster.pid
        assert pid is not None
        backends = [int(p) for p in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert backends                     # checkpointer, walwriter, our backend...
        cluster.kill()
        conn.terminate()
        assert not cluster.running
        for p in [pid, *backends]:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] \
                if Path(f"/proc/{p}").exists() else "gone"
            assert state in ("gone", "Z"), f"pid {p} still {state}"
        cluster.start()
        assert await fetchval(cluster.dsn(), "SELECT x FROM kept") == 7
    finally:
        cluster.close()
    assert cluster.base is not None and not cluster.base.exists()
    assert not Path(f"/proc/{pid}").exists()  # the postmaster, our child, was reaped


def test_a_server_that_cannot_start_fails_with_its_log() -> None:
    cluster = PgCluster(settings={"max_connections": "lots"})
    try:
        with pytest.raises(PgStartError) as info:
            cluster.start()
    finally:
        cluster.close()
    message = str(info.value)
    assert "exited with code" in message
    assert 'invalid value for parameter "max_connections"' in message
    assert not cluster.running
