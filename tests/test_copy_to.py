"""``relayd -c PATH --copy-to DSN`` (SPEC 8) as an operator runs it: a real
subprocess copying a real SQLite store into a real PostgreSQL database (and
back), after which relayd on the copy accepts the same passwords and tokens
and shows the same counters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from admin_client import AdminClient
from conftest import base_config
from helpers_records import Tenant, create_tenant
from helpers_smtp import authed
from relayd.store import RecordStore, store_for
from relayd.store.copying import COLUMNS


def copy_to(config: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayd", "-c", str(config), "--copy-to", target],
                          capture_output=True, text=True, timeout=60)


async def opened(database: str) -> RecordStore:
    store = store_for(database)
    await store.open()
    return store


async def used_store(database: str) -> Tenant:
    """A tenant with an upstream that failed twice, a domain setting, and
    five recipients sent: three an hour and a half ago, two just now."""
    store = await opened(database)
    try:
        t = await create_tenant(store, total=100, hourly=10,
                                upstreams=[{"host": "127.0.0.1", "port": 2525}])
        user = store.get_user(t.user)
        assert user is not None
        for hold, ts, n in (("old", time.time() - 5400, 3), ("new", time.time() - 60, 2)):
            for _ in range(n):
                await store.reserve(user, hold, ts)
            await store.count(user.name, hold, ts, n)
        up = (await store.list_upstreams(t.idapp))[0]
        for ts in (10.0, 11.0):
            await store.record_upstream_result(up.idsmtp, False, ts, "connection refused")
        await store.put_domain(t.owner_id, "example.com", provider="smtp", description="d",
                               from_=None, options={"host": "smtp.example.com"})
        return t
    finally:
        await store.close()


def write_config(tmp_path: Path, database: str) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, database=database)))
    return path


async def dump(database: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every record row, comparable across backends."""
    store = await opened(database)
    try:
        return {t: sorted(tuple(r[c] for c in cols) for r in await store._fetchall(
            f"SELECT {', '.join(cols)} FROM {t}")) for t, cols in COLUMNS.items()}
    finally:
        await store.close()


async def test_sqlite_to_postgresql_and_relayd_runs_on_the_copy(
        tmp_path: Path, pg_dsn: str, relay_factory: Any):
    source = str(tmp_path / "state" / "relayd.db")
    tenant = await used_store(source)
    done = copy_to(write_config(tmp_path, source), pg_dsn)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("owners", "apps", "SMTP users", "upstreams", "domain settings"):
        assert f"  {line}" in out and " 1\n" in out, out
    assert "hourly-window journal entries" in out and out.rstrip().endswith("1")
    assert await dump(pg_dsn) == await dump(source)

    relay = await relay_factory(database=pg_dsn)
    client = await authed(relay, tenant)                     # the same SMTP password
    await client.close()
    async with AdminClient(relay.config.admin.socket) as admin:
        r = await admin.request("POST", "/settings/listSmtp", json={
            "owner_id": tenant.owner_id, "token": tenant.token})       # the same token
        assert r.status == 200, r.body
        row = r.json()["smtp_list"][0]
        assert (row["sent_total"], row["sent_last_hour"]) == (5, 2)
        status = (await admin.request("GET", "/admin/status")).json()
        assert [(u["numerrors"], u["last_error"]) for u in status["upstreams"]] == [
            (2, "connection refused")]


async def test_postgresql_back_to_an_sqlite_file(tmp_path: Path, pg_dsn: str):
    await used_store(pg_dsn)
    target = str(tmp_path / "copy" / "relayd.db")
    done = copy_to(write_config(tmp_path, pg_dsn), target)
    assert done.returncode == 0, done.stderr
    assert await dump(target) == await dump(pg_dsn)
    copy = await opened(target)
    try:
        names = [u.name for o in await copy.list_owners() for u in await copy.list_users(o.owner_id)]
        assert [await copy.usage(n, time.time()) for n in names] == [(5, 2)]
    finally:
        await copy.close()


async def test_a_target_with_records_is_refused_and_left_alone(tmp_path: Path, pg_dsn: str):
    source = str(tmp_path / "state" / "relayd.db")
    await used_store(source)
    await used_store(pg_dsn)
    before = await dump(pg_dsn)
    done = copy_to(write_config(tmp_path, source), pg_dsn)
    assert done.returncode == 1
    assert "already holds records" in done.stderr and "nothing was written" in done.stderr
    assert await dump(pg_dsn) == before


async def test_a_target_that_is_no_database_is_a_usage_error(tmp_path: Path):
    done = copy_to(write_config(tmp_path, str(tmp_path / "r.db")), "mysql://x@h/db")
    assert done.returncode == 2 and "unsupported scheme 'mysql'" in done.stderr


async def test_the_password_in_a_target_dsn_is_never_printed(tmp_path: Path, pg_dsn: str):
    source = str(tmp_path / "state" / "relayd.db")
    await used_store(source)
    secret = pg_dsn.replace("postgres@", "postgres:s3cret@")
    done = await asyncio.to_thread(copy_to, write_config(tmp_path, source), secret)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr and "********" in done.stdout
    con = await asyncpg.connect(pg_dsn)
    try:
        assert await con.fetchval("SELECT count(*) FROM smtp_users") == 1
    finally:
        await con.close()
