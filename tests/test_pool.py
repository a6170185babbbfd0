"""Pooled upstream connections (issue 6): reuse across messages and
sessions, RSET between messages, never shared between credentials, a dead
pooled connection replaced once without counting an error, idle timeout,
per-upstream cap."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from conftest import simple_message, sink_upstream, smtp_client
from helpers_smtp import upstream_by_port
from relayd.pool import Pool
from relayd.records import Upstream
from relayd.upstream import send_once


async def send_n(relay, tenant, n: int) -> None:
    client = await smtp_client(relay, tenant)
    for i in range(n):
        await client.sendmail("app@example.com", ["r@example.net"], simple_message(subject=str(i)))
    await client.quit()


async def test_connection_reused_across_messages_and_sessions(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    await send_n(relay, tenant, 3)
    await send_n(relay, tenant, 2)
    assert (sink.connections, sink.transactions, len(sink.messages)) == (1, 5, 5)
    # RSET before each reuse: a clean transaction state and a liveness check.
    assert sink.resets == 4


async def test_never_shared_between_credentials(relay, sink_factory, provision):
    sink = await sink_factory(username="right", password="pw")
    good = await provision(relay, upstreams=[sink_upstream(sink, auth=True, username="right",
                                                            password="pw")])
    bad = await provision(relay, upstreams=[sink_upstream(sink, auth=True, username="right",
                                                           password="wrong")])
    await send_n(relay, good, 1)
    # Same host and port, other password: it must log in itself (and fail),
    # not ride on the authenticated connection of the other upstream.
    client = await smtp_client(relay, bad)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await client.sendmail("app@example.com", ["r@example.net"], simple_message())
    assert "451" in str(err.value) and "AUTH refused" in str(err.value)
    await client.quit()
    assert len(sink.messages) == 1 and sink.messages[0].auth == "right"


async def test_dead_pooled_connection_is_replaced_without_counting_an_error(
        relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    await send_n(relay, tenant, 1)
    sink.drop_connections()             # the upstream closes the idle connection
    await asyncio.sleep(0.05)
    await send_n(relay, tenant, 1)
    assert len(sink.messages) == 2 and sink.connections == 2
    assert (await upstream_by_port(relay, tenant.idapp, sink.port)).numerrors == 0


async def test_idle_connections_expire(sink_factory):
    sink = await sink_factory()
    u = Upstream(idsmtp="u", host="127.0.0.1", port=sink.port)
    pool = Pool(idle_timeout=0.2)
    kw = dict(local_hostname="relay.test", connect_timeout=5, command_timeout=5, pool=pool)
    await send_once(u, "a@example.com", ["b@example.net"], simple_message(), **kw)
    assert pool.idle_count() == 1
    for _ in range(100):                # the sweeper runs every idle_timeout / 2
        if pool.idle_count() == 0 and sink.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    assert pool.idle_count() == 0 and sink.open_connections == 0
    await send_once(u, "a@example.com", ["b@example.net"], simple_message(), **kw)
    assert sink.connections == 2
    await pool.close()


async def test_per_upstream_connection_cap(sink_factory):
    sink = await sink_factory("hang")
    u = Upstream(idsmtp="u", host="127.0.0.1", port=sink.port)
    pool = Pool(max_per_key=2)
    kw = dict(local_hostname="relay.test", connect_timeout=5, command_timeout=30, pool=pool)
    sends = [asyncio.create_task(send_once(u, "a@example.com", ["b@example.net"],
                                           simple_message(), **kw)) for _ in range(5)]
    for _ in range(100):
        if sink.connections >= 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)            # give a third connection every chance to appear
    assert sink.connections == 2, "five concurrent sends, at most two connections"
    sink.mode = "accept"
    sink.hang_event.set()
    await asyncio.gather(*sends)
    assert sink.connections == 2 and len(sink.messages) == 5
    await pool.close()
