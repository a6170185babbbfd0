"""The shared database stopped while relayd runs (SPEC 8, 9): MAIL and RCPT
answer 451 4.3.0, no message is answered 250 (or reaches an upstream)
without a counted reservation, /healthz says 503, and everything recovers
by itself once PostgreSQL is back -- a real cluster, really stopped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from admin_client import http_get
from conftest import simple_message, sink_upstream
from helpers_smtp import authed
from relayd.policy import Verdict


async def healthz(relay: Any) -> int:
    return (await http_get(relay.metrics_port, "/healthz"))[0]


async def test_database_down_refuses_with_451_and_recovers(
        relay_factory: Any, private_pg_cluster: Any, provision: Any, sink_factory: Any):
    relay = await relay_factory(database=private_pg_cluster.create_database("relayd"))
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    mailed = await authed(relay, tenant)
    assert (await mailed.cmd("MAIL FROM:<app@example.com>")).code == 250
    reserved = await authed(relay, tenant)
    assert (await reserved.cmd("MAIL FROM:<app@example.com>")).code == 250
    assert (await reserved.cmd("RCPT TO:<to@example.net>")).code == 250

    await asyncio.to_thread(private_pg_cluster.stop)
    r = await mailed.cmd("RCPT TO:<to@example.net>")
    assert (r.code, r.enhanced) == (451, "4.3.0"), r
    fresh = await authed(relay, tenant)                # AUTH is served from the view
    r = await fresh.cmd("MAIL FROM:<app@example.com>")
    assert (r.code, r.enhanced) == (451, "4.3.0"), r
    assert (await reserved.cmd("DATA")).code == 354
    reserved.writer.write(simple_message() + b".\r\n")
    r = await reserved.reply()
    assert r.code == 451, r                            # the units could not be counted
    assert sink.messages == []
    for _ in range(100):
        if await healthz(relay) == 503:
            break
        await asyncio.sleep(0.1)
    assert await healthz(relay) == 503

    await asyncio.to_thread(private_pg_cluster.start)
    end = time.monotonic() + 15
    while (await fresh.cmd("MAIL FROM:<app@example.com>")).code != 250:
        assert time.monotonic() < end, "relayd did not recover"
        await asyncio.sleep(0.2)
    assert (await fresh.cmd("RCPT TO:<to@example.net>")).code == 250
    assert (await fresh.cmd("DATA")).code == 354
    fresh.writer.write(simple_message() + b".\r\n")
    assert (await fresh.reply()).code == 250
    for client in (mailed, reserved, fresh):
        await client.close()
    assert len(sink.messages) == 1
    # Exactly the delivered message is counted, and the released hold of the
    # refused one went out once the database was back.
    user = relay.store.get_user(tenant.user)
    assert await relay.store.usage(tenant.user, time.time()) == (1, 1)
    end = time.monotonic() + 10
    while relay.store.held(tenant.user) or await _db_holds(relay) or await healthz(relay) != 200:
        assert time.monotonic() < end, "holds or health did not recover"
        await asyncio.sleep(0.2)
    assert await relay.store.reserve(user, "after", time.time()) is Verdict.OK


async def _db_holds(relay: Any) -> int:
    return int(await relay.store._fetchval("SELECT count(*) FROM holds"))
