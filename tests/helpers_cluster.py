"""Several real relayd processes on one PostgreSQL database, for the
cluster tests (test_cluster.py, test_haproxy.py): the ``cluster`` fixture
and what those tests do with an instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from admin_client import AdminClient
from conftest import base_config, simple_message
from helpers_records import Tenant, create_tenant
from helpers_smtp import authed
from relayd.store import store_for
from relayd_proc import RelaydProcess

class Cluster:
    """cluster(n, configure=None, **config overrides) -> n more relayd
    processes on the test's database, each with its own state_dir, admin
    socket (``proc.admin``) and metrics port; ``configure(i, cfg)`` may
    adjust the config of instance ``i``. ``restart(proc)`` starts a stopped
    or killed one again with the same config."""

    def __init__(self, tmp_path: Path, dsn: str):
        self.tmp_path, self.dsn = tmp_path, dsn
        self.procs: list[RelaydProcess] = []

    async def __call__(self, n: int, configure: Callable[[int, dict[str, Any]], None] | None = None,
                       **overrides: Any) -> list[RelaydProcess]:
        started = []
        for _ in range(n):
            i = len(self.procs)
            home = self.tmp_path / f"i{i}"
            home.mkdir()
            cfg = base_config(home, database=self.dsn, **overrides)
            if configure is not None:
                configure(i, cfg)
            started.append(await self._start(cfg, home / "relayd.yaml"))
        return started

    async def restart(self, proc: RelaydProcess) -> RelaydProcess:
        await proc.stop()
        return await self._start(yaml.safe_load(proc.config_path.read_text()), proc.config_path)

    async def _start(self, cfg: dict[str, Any], path: Path) -> RelaydProcess:
        proc = await RelaydProcess.start(cfg, path)
        proc.admin = AdminClient(cfg["admin"]["socket"])  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        for p in self.procs:
            await p.admin.close()  # type: ignore[attr-defined]
            await p.stop()


@pytest.fixture
async def cluster(tmp_path: Path, pg_dsn: str) -> AsyncIterator[Cluster]:
    """Relayd processes on the test's database (Cluster), all stopped at the end."""
    procs = Cluster(tmp_path, pg_dsn)
    yield procs
    await procs.stop()


async def tenant_in(dsn: str, **kwargs: Any) -> Tenant:
    store = store_for(dsn)
    await store.open()
    try:
        return await create_tenant(store, **kwargs)
    finally:
        await store.close()


async def send_one(proc: RelaydProcess, tenant: Tenant, subject: str = "hello") -> int:
    """One session, one message, one recipient: the first refusal's code or
    the reply to DATA."""
    client = await authed(proc, tenant)
    try:
        r = await client.cmd("MAIL FROM:<app@example.com>")
        if r.code != 250:
            return r.code
        r = await client.cmd("RCPT TO:<to@example.net>")
        if r.code != 250:
            return r.code
        assert (await client.cmd("DATA")).code == 354
        client.writer.write(simple_message(subject=subject) + b".\r\n")
        return (await client.reply()).code
    finally:
        await client.close()


async def until(check: Callable[[], Any], timeout: float = 5.0, step: float = 0.05) -> float:
    """Await ``check()`` (sync or async) until it is truthy; the seconds it took."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "condition not reached"
        await asyncio.sleep(step)


async def delivers(proc: RelaydProcess, tenant: Tenant) -> bool:
    return await send_one(proc, tenant) == 250


async def assert_counted_within(dsn: str, tenant: Tenant, sink: Any, accepted: list[str],
                                in_flight: int) -> None:
    """After an instance died under load: every message answered 250 reached
    the upstream, and the user's sent_total exceeds what the upstream got by
    at most ``in_flight`` (the killed instance's messages), never falls short."""
    got = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in sink.messages}
    assert set(accepted) <= got                      # no 250 without the upstream's 250
    con = await asyncpg.connect(dsn)
    try:
        sent = await con.fetchval("SELECT sent_total FROM smtp_users WHERE name = $1", tenant.user)
    finally:
        await con.close()
    assert len(sink.messages) <= sent <= len(sink.messages) + in_flight
