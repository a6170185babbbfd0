"""Several real relayd processes on one real PostgreSQL database (SPEC 8):
quotas exact across them, changes through one binding the others, shared
upstream health, membership, kill -9 of one under load.

Each instance is ``python -m relayd`` with its own state_dir, admin socket
and metrics port; the upstream is an in-process aiosmtpd sink.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Sink, sink_upstream
from helpers_cluster import (Cluster, assert_counted_within, cluster, delivers, send_one,
                             tenant_in, until)
from helpers_smtp import ConnectionClosed, RawSMTP, authed, plain_blob
from relayd.store import store_for
from relayd_proc import RelaydProcess

__all__ = ["cluster"]           # the fixture, used by name

pytestmark = pytest.mark.slow

async def test_thirty_sessions_on_three_instances_deliver_exactly_the_hourly_limit(
        cluster: Cluster, pg_dsn: str, sink_factory: Any):
    sink: Sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, hourly=17, upstreams=[sink_upstream(sink)])
    procs = await cluster(3)
    codes = await asyncio.gather(*(send_one(procs[i % 3], tenant, f"m{i}") for i in range(30)))
    assert codes.count(250) == 17, codes
    assert set(codes) == {250, 451}
    assert len(sink.messages) == 17
    store = store_for(pg_dsn)
    await store.open()
    try:
        assert await store.usage(tenant.user, time.time()) == (17, 17)
    finally:
        await store.close()


async def test_a_disable_on_one_instance_refuses_the_next_mail_on_another(
        cluster: Cluster, pg_dsn: str, sink_factory: Any):
    sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, upstreams=[sink_upstream(sink)])
    a, b = await cluster(2)
    client = await authed(b, tenant)                # authenticated before the change
    r = await a.admin.request("POST", "/settings/editSmtp", json={
        "owner_id": tenant.owner_id, "token": tenant.token,
        "smtp_user_name": tenant.user, "status": "Disable"})
    assert r.status == 200, r.body
    r = await client.cmd("MAIL FROM:<app@example.com>")     # at once: no propagation delay
    assert r.code == 525 and r.enhanced == "5.7.13", r
    await client.close()


async def test_a_password_reset_on_one_instance_stops_the_old_password_everywhere(
        cluster: Cluster, pg_dsn: str):
    tenant = await tenant_in(pg_dsn)
    a, b = await cluster(2)
    r = await a.admin.request("POST", "/settings/resetSmtpPassword", json={
        "owner_id": tenant.owner_id, "token": tenant.token, "smtp_user_name": tenant.user})
    assert r.status == 200, r.body
    new = r.json()["smtp_password"]

    async def old_refused() -> bool:
        client = await RawSMTP.open(b.smtp_ports[0])
        await client.ehlo()
        code = (await client.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password))).code
        await client.close()
        return code == 535

    took = await until(old_refused, timeout=1.0)
    assert took < 1.0
    client = await RawSMTP.open(b.smtp_ports[0])
    await client.ehlo()
    await client.login(tenant.user, new)
    await client.close()


async def test_an_upstream_added_on_one_instance_is_used_by_another(
        cluster: Cluster, pg_dsn: str, sink_factory: Any):
    tenant = await tenant_in(pg_dsn)
    a, b = await cluster(2)
    assert await send_one(b, tenant) == 451                     # no upstream yet
    sink = await sink_factory()
    r = await a.admin.request("POST", "/private/smtps/save", headers={
        "X-Key": tenant.owner_id, "X-Access-Token": tenant.token},
        json={"idapp": tenant.idapp, "host": "127.0.0.1", "port": sink.port})
    assert r.status == 200, r.body
    took = await until(lambda: delivers(b, tenant), timeout=1.0)
    assert took < 1.0 and len(sink.messages) == 1


async def test_errors_counted_on_one_instance_are_seen_on_another(
        cluster: Cluster, pg_dsn: str, sink_factory: Any):
    bad = await sink_factory(mode="tempfail")
    tenant = await tenant_in(pg_dsn, upstreams=[sink_upstream(bad)])
    a, b = await cluster(2)
    assert await send_one(b, tenant) == 451

    async def seen_on_a() -> bool:
        status = (await a.admin.request("GET", "/admin/status")).json()
        return [u["numerrors"] for u in status["upstreams"]] == [1]

    assert await until(seen_on_a, timeout=1.0) < 1.0


async def test_status_lists_the_live_instances_and_a_dead_one_drops_out(
        cluster: Cluster, pg_dsn: str):
    a, b = await cluster(2)

    async def members() -> list[dict[str, Any]]:
        return (await a.admin.request("GET", "/admin/status")).json()["instances"]

    listed = await members()
    assert sorted(m["pid"] for m in listed) == sorted([a.proc.pid, b.proc.pid])
    assert all(set(m) == {"id", "hostname", "pid", "started", "last_seen"} for m in listed)
    assert all(m["last_seen"].endswith("Z") for m in listed)
    b.signal(signal.SIGKILL)
    await b.wait()
    took = await until(lambda: _only(members, a.proc.pid), timeout=30.0, step=0.5)
    assert took < 30.0


async def _only(members: Callable[[], Any], pid: int) -> bool:
    return [m["pid"] for m in await members()] == [pid]


async def test_kill_9_of_one_instance_under_load(cluster: Cluster, pg_dsn: str,
                                                 sink_factory: Any):
    """The other instance keeps delivering; every 250 reached the upstream;
    the counters exceed what the upstream got by at most the messages in
    flight on the killed one, and its holds are released by the cluster."""
    sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, upstreams=[sink_upstream(sink)])
    a, b = await cluster(2)
    accepted: list[str] = []
    stop = asyncio.Event()

    async def load(proc: RelaydProcess, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            subject = f"{proc.proc.pid}-{n}-{i}"
            try:
                if await send_one(proc, tenant, subject) == 250:
                    accepted.append(subject)
            except (OSError, AssertionError, ConnectionClosed, asyncio.IncompleteReadError):
                if proc is a:
                    return                      # the killed one: its sessions end here
                raise

    workers = [asyncio.create_task(load(p, n)) for p in (a, b) for n in range(4)]
    await until(lambda: len(sink.messages) >= 20, timeout=20)
    a.signal(signal.SIGKILL)
    await a.wait()
    before = len(sink.messages)
    await until(lambda: len(sink.messages) >= before + 20, timeout=20)   # b goes on
    stop.set()
    await asyncio.gather(*workers)
    await assert_counted_within(pg_dsn, tenant, sink, accepted, in_flight=4)   # 4 sessions on a


async def test_the_holds_of_a_dead_instance_are_released_by_the_others(
        cluster: Cluster, pg_dsn: str, sink_factory: Any):
    sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, hourly=1, upstreams=[sink_upstream(sink)])
    a, b = await cluster(2)
    client = await authed(a, tenant)
    assert (await client.cmd("MAIL FROM:<app@example.com>")).code == 250
    assert (await client.cmd("RCPT TO:<to@example.net>")).code == 250   # a holds the unit
    assert await send_one(b, tenant) == 451
    a.signal(signal.SIGKILL)
    await a.wait()
    # pgwatch.DEAD_AFTER (10 s) after a's last heartbeat, b reaps its hold.
    await until(lambda: delivers(b, tenant), timeout=30, step=0.5)
    assert len(sink.messages) == 1
