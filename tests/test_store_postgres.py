"""What only the shared backend has (SPEC 8), on a real throw-away
PostgreSQL cluster: several stores on one database as several instances
would hold them -- exact quotas across them, change notices, heartbeats,
migrations raced by instances starting together, the DSN's password kept
out of sight."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from relayd.errors import StoreError
from relayd.policy import Verdict
from relayd.store import store_for
from relayd.store import pgschema
from relayd.store.pgschema import SCHEMA_VERSION
from relayd.store.postgres import PostgresStore, numbered

Opener = Callable[[], Any]


@pytest.fixture
async def instances(pg_dsn: str) -> AsyncIterator[Opener]:
    """open() -> another open PostgresStore on the test's database."""
    opened: list[PostgresStore] = []

    async def open_one() -> PostgresStore:
        s = store_for(pg_dsn)
        assert isinstance(s, PostgresStore)
        await s.open()
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        await s.close()


async def eventually(check: Callable[[], bool], timeout: float = 1.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_placeholders_are_numbered():
    assert numbered("UPDATE t SET a = ?, b = ? WHERE c = ?") == \
        "UPDATE t SET a = $1, b = $2 WHERE c = $3"


async def test_instances_starting_together_migrate_once(instances: Opener, pg_dsn: str):
    await asyncio.gather(*(instances() for _ in range(3)))
    con = await asyncpg.connect(pg_dsn)
    try:
        assert await con.fetch("SELECT version FROM relayd_schema ORDER BY version") == [
            (n,) for n in range(1, SCHEMA_VERSION + 1)]
    finally:
        await con.close()


async def test_a_newer_schema_is_refused(pg_dsn: str, instances: Opener):
    await instances()
    con = await asyncpg.connect(pg_dsn)
    await con.execute("INSERT INTO relayd_schema VALUES ($1)", SCHEMA_VERSION + 1)
    await con.close()
    s = store_for(pg_dsn)
    with pytest.raises(StoreError, match="newer than this relayd"):
        await s.open()
    await s.close()


async def test_a_database_of_schema_1_is_upgraded_in_place(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    """Schema 2 (the batched hot path) reaches a database made by a relayd
    that knew only schema 1: its records stay and serve mail."""
    monkeypatch.setattr(pgschema, "SCHEMA_VERSION", 1)
    old = store_for(pg_dsn)
    await old.open()
    owner, _, app = await old.create_owner("free")
    user, password = await old.create_user(owner.owner_id, app.idapp, 10, 10)
    await old.close()
    monkeypatch.undo()
    new = store_for(pg_dsn)
    await new.open()
    try:
        assert new.check_password(user.name, password) is not None
        assert await new.reserve(user, "h", 100.0) is Verdict.OK
        await new.count(user.name, "h", 100.0, 1)
        assert await new.usage(user.name, 100.0) == (1, 1)
    finally:
        await new.close()
    con = await asyncpg.connect(pg_dsn)
    try:
        assert [r[0] for r in await con.fetch(
            "SELECT version FROM relayd_schema ORDER BY version")] == [1, 2]
    finally:
        await con.close()


async def test_the_password_of_the_dsn_is_masked(pg_dsn: str):
    with_password = pg_dsn.replace("postgres@", "postgres:s3cret@")
    s = store_for(with_password)
    assert "s3cret" not in str(s.path) and "********" in str(s.path)
    # The server trusts every local connection here, so the password is
    # sent and ignored: what matters is that no message repeats it.
    await s.open()
    await s.close()
    bad = store_for(with_password.rsplit(":", 1)[0] + ":1/nodb")    # nothing listens on 1
    with pytest.raises(StoreError) as refused:
        await bad.open()
    assert "s3cret" not in str(refused.value) and "cannot open the database" in str(refused.value)


async def test_reservations_on_two_instances_never_exceed_the_limit(instances: Opener):
    a, b = await instances(), await instances()
    owner, _, app = await a.create_owner("free")
    for round_ in range(3):
        user, _ = await a.create_user(owner.owner_id, app.idapp, 1000, 17)
        verdicts = await asyncio.gather(*(
            (a if i % 2 else b).reserve(user, f"r{round_}-{i}", 100.0) for i in range(60)))
        assert verdicts.count(Verdict.OK) == 17, round_
        assert a.held(user.name) + b.held(user.name) == 17


async def test_a_count_on_one_instance_binds_the_other(instances: Opener):
    a, b = await instances(), await instances()
    owner, _, app = await a.create_owner("free")
    user, _ = await a.create_user(owner.owner_id, app.idapp, 2, 100)
    assert await a.reserve(user, "h1", 100.0) is Verdict.OK
    await a.count(user.name, "h1", 100.0, 1)
    assert await b.reserve(user, "h2", 100.0) is Verdict.OK
    assert await a.reserve(user, "h3", 100.0) is Verdict.TOTAL
    assert await b.usage(user.name, 100.0) == (1, 1)
    await a.count(user.name, "h1", 100.0, 1)           # a retry of the same count: no-op
    assert await b.usage(user.name, 100.0) == (1, 1)


async def test_batches_of_many_users_on_two_instances_stay_exact(
        instances: Opener, caplog: pytest.LogCaptureFixture):
    """Concurrent RCPTs and ends of DATA of eight users on two instances go
    out in batches (batching.py) of several users each; every user's limit
    holds, every count lands, and no batch was refused and retried."""
    a, b = await instances(), await instances()
    owner, _, app = await a.create_owner("free")
    users = [(await a.create_user(owner.owner_id, app.idapp, 1000, 6))[0] for _ in range(8)]

    async def send(store: PostgresStore, user: Any, hold: str) -> int:
        if await store.reserve(user, hold, 100.0) is not Verdict.OK:
            return 0
        await store.count(user.name, hold, 100.0, 1)
        return 1

    calls = [((a, b)[i % 2], users[i % 8], f"h{i}") for i in range(160)]
    random.Random(7).shuffle(calls)
    with caplog.at_level(logging.WARNING, logger="relayd.store"):
        sent = await asyncio.gather(*(send(*call) for call in calls))
    per_user = Counter[str]()
    for (_, user, _), n in zip(calls, sent):
        per_user[user.name] += n
    assert per_user == {u.name: 6 for u in users}
    assert [await b.usage(u.name, 100.0) for u in users] == [(6, 6)] * 8
    assert a.held(users[0].name) == b.held(users[0].name) == 0
    assert not [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]


@pytest.mark.parametrize("kind", ["reserve", "count"])
async def test_a_batch_takes_users_rows_in_their_order(instances: Opener, pg_dsn: str,
                                                         kind: str):
    """Batches hold several users' row locks till their commit; taken in
    the users' order by every batch of every instance, no two can wait on
    each other in a cycle (PostgreSQL would break one after its
    deadlock_timeout). Shown directly: while another transaction holds the
    first user's row, a batch ``[second, first]`` waits on the first
    without having taken the second, so the second stays free for others."""
    a, b = await instances(), await instances()
    owner, _, app = await a.create_owner("free")
    first, second = sorted([(await a.create_user(owner.owner_id, app.idapp, 10, 10))[0]
                            for _ in range(2)], key=lambda u: u.name)
    for user in (second, first):
        assert await a.reserve(user, user.name, 100.0) is Verdict.OK
    other = await asyncpg.connect(pg_dsn)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM smtp_users WHERE name = $1 FOR NO KEY UPDATE",
                                first.name)
            if kind == "reserve":
                batch = asyncio.gather(*(a.reserve(u, u.name, 100.0) for u in (second, first)))
            else:
                batch = asyncio.gather(*(a.count(u.name, u.name, 100.0, 1)
                                         for u in (second, first)))
            await asyncio.sleep(0.2)                  # the batch is waiting on `first`
            assert not batch.done()
            assert await asyncio.wait_for(b.reserve(second, "free", 100.0), 2) is Verdict.OK
        await asyncio.wait_for(batch, 5)
    finally:
        await other.close()


async def test_a_count_for_a_removed_user_fails_alone_in_its_batch(instances: Opener):
    a = await instances()
    owner, _, app = await a.create_owner("free")
    kept, _ = await a.create_user(owner.owner_id, app.idapp, 10, 10)
    gone, _ = await a.create_user(owner.owner_id, app.idapp, 10, 10)
    for user, hold in ((kept, "k"), (gone, "g")):
        assert await a.reserve(user, hold, 100.0) is Verdict.OK
    await a.remove_user(gone.name, owner.owner_id)
    results = await asyncio.gather(a.count(kept.name, "k", 100.0, 1),
                                   a.count(gone.name, "g", 100.0, 1), return_exceptions=True)
    assert results[0] is None and isinstance(results[1], StoreError)
    assert await a.usage(kept.name, 100.0) == (1, 1)


async def test_changes_reach_the_other_instance_within_a_second(instances: Opener):
    a, b = await instances(), await instances()
    owner, token, app = await a.create_owner("free")
    await eventually(lambda: b.view.owners.get(owner.owner_id) is not None)
    user, password = await a.create_user(owner.owner_id, app.idapp, 10, 10)
    await eventually(lambda: b.check_password(user.name, password) is not None)
    new = await a.reset_password(user.name, owner.owner_id)
    await eventually(lambda: b.check_password(user.name, password) is None)
    assert b.check_password(user.name, new) is not None
    up = await a.create_upstream({"idapp": app.idapp, "host": "h", "port": 25})
    await eventually(lambda: [u.idsmtp for u in b.view.upstreams_of(app.idapp)] == [up.idsmtp])
    await a.put_domain(owner.owner_id, "example.com", provider="smtp", description="",
                       from_=None, options={"host": "smtp.example.com"})
    await eventually(lambda: b.view.domain(owner.owner_id, "example.com") is not None)
    await a.remove_user(user.name, owner.owner_id)
    await eventually(lambda: b.get_user(user.name) is None)
    await a.set_plan(owner.owner_id, "paid")
    await eventually(lambda: b.view.owner(owner.owner_id).plan == "paid")


async def test_upstream_health_is_shared(instances: Opener):
    a, b = await instances(), await instances()
    owner, _, app = await a.create_owner("free")
    up = await a.create_upstream({"idapp": app.idapp, "host": "h", "port": 25})
    await a.record_upstream_result(up.idsmtp, False, 10.0, "connection refused")
    await b.record_upstream_result("system:0", False, 11.0, "timed out")
    await eventually(lambda: b.view.health.get(up.idsmtp) == (1, 10.0))
    await eventually(lambda: a.view.health.get("system:0") == (1, 11.0))
    assert b.view.health.reason(up.idsmtp) == "connection refused"
    await b.record_upstream_result(up.idsmtp, True, 12.0)        # the reset is shared too
    await eventually(lambda: a.view.health.get(up.idsmtp)[0] == 0)


async def test_members_are_listed_and_a_stopped_one_leaves(instances: Opener):
    a, b = await instances(), await instances()
    ids = {m["id"] for m in await a.instances()}
    assert ids == {a.instance.id, b.instance.id}
    owner, _, app = await a.create_owner("free")
    user, _ = await a.create_user(owner.owner_id, app.idapp, 10, 1)
    assert await b.reserve(user, "held-by-b", 100.0) is Verdict.OK
    await b.close()                                       # a clean stop gives its holds back
    assert [m["id"] for m in await a.instances()] == [a.instance.id]
    assert await a.reserve(user, "h", 100.0) is Verdict.OK


async def test_libpq_password_sources_work_and_never_show(private_pg_cluster: Any,
                                                          tmp_path: Any, monkeypatch: Any):
    """SPEC 8: a password in the DSN, PGPASSWORD and PGPASSFILE all work
    against a server that asks for one; no error message repeats it."""
    cluster = private_pg_cluster
    dsn = cluster.create_database("relayd")
    cluster.fetchval("ALTER ROLE postgres PASSWORD 'pw-Zq81'")
    (cluster.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    cluster.fetchval("SELECT pg_reload_conf()")          # the last trusted connection
    with_password = dsn.replace("postgres@", "postgres:pw-Zq81@")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{cluster.port}:*:postgres:pw-Zq81\n")
    passfile.chmod(0o600)

    async def opens(target: str) -> None:
        s = store_for(target)
        await s.open()
        await s.close()

    await opens(with_password)
    monkeypatch.setenv("PGPASSWORD", "pw-Zq81")
    await opens(dsn)
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    await opens(dsn)
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.pgpass either
    wrong = dsn.replace("postgres@", "postgres:pw-Wrong7@")
    with pytest.raises(StoreError) as refused:
        await opens(wrong)
    assert "pw-Wrong7" not in str(refused.value) and "password" in str(refused.value).lower()
