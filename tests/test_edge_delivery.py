"""Reliability at the edges of delivery (issue "Reliability at the edges"):
the transaction ends with every reply to DATA, quota units are settled
exactly once, pathological headers are bounded work, no failover after the
final dot, no idle timeout while a delivery runs, a password reset ends live
sessions, and pooled connections that went stale or out of step are never
reused.

Each test here failed on the code before its fix (see the commit message).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import RawSMTP, authed, dot_stuff, mail_lines, open_data, upstream_by_port
from helpers_records import sent_last_hour, sent_total

SENDER = "app@example.com"


async def finish(c: RawSMTP, data: bytes = simple_message()):
    c.write(dot_stuff(data) + b".\r\n")
    await c.writer.drain()
    return await c.reply()


# ------------------------------------------------------------- a scripted upstream

@dataclass
class Script:
    """What a ScriptedUpstream does once it has a whole message: ``after_dot``
    is one of ok | extra | drop | rst | silent | partial | partial_drop |
    multiline_drop. ``messages`` counts the messages that reached it."""

    after_dot: str = "ok"
    messages: int = 0
    connections: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list)


class ScriptedUpstream(asyncio.Protocol):
    def __init__(self, script: Script):
        self.script = script
        self.buf = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.script.connections += 1
        self.script.transports.append(transport)
        transport.write(b"220 scripted.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.in_data:
                end = (b"\r\n" + self.buf).find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buf = self.buf[max(end + 3, 0):]
                self.in_data = False
                self.script.messages += 1
                self.after_dot()
                continue
            if b"\r\n" not in self.buf:
                return
            line, self.buf = self.buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-scripted.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.t.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 ok\r\n")

    def after_dot(self) -> None:
        what = self.script.after_dot
        if what == "ok":
            self.t.write(b"250 2.0.0 queued\r\n")
        elif what == "extra":      # one reply line too many, in the same segment
            self.t.write(b"250 2.0.0 queued\r\n250 2.0.0 and an extra line\r\n")
        elif what == "drop":
            self.t.close()
        elif what == "rst":
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.t.abort()
        elif what == "partial":
            self.t.write(b"250 2.0")
        elif what == "partial_drop":
            self.t.write(b"250 2.0")
            self.t.close()
        elif what == "multiline_drop":
            self.t.write(b"250-2.0.0 queued\r\n")
            self.t.close()
        # "silent": nothing at all


@pytest.fixture
async def scripted():
    servers = []

    async def make(after_dot: str = "ok") -> tuple[Script, int]:
        script = Script(after_dot)
        server = await asyncio.get_running_loop().create_server(
            lambda: ScriptedUpstream(script), "127.0.0.1", 0)
        servers.append((server, script))
        return script, server.sockets[0].getsockname()[1]

    yield make
    for server, script in servers:
        for t in script.transports:
            t.close()
        server.close()


# ------------------------------------------------------------- 1: the transaction ends

async def test_an_internal_error_after_the_journal_ends_the_transaction_and_settles_it(
        relay_factory, sink_factory, provision, monkeypatch, caplog):
    # The journal row is written, then the rewrite blows up (simulated bug).
    # Before the fix the envelope survived: a second DATA delivered the
    # message with units=0, and the journal row charged it after a restart.
    sink = await sink_factory()
    relay = await relay_factory()
    tenant = await provision(relay, total=5, hourly=5, upstreams=[sink_upstream(
        sink, defaultfromemail="noreply@allowed.test", allowed_domains=["allowed.test"])])

    def broken(msg: bytes, new_from: str) -> bytes:
        raise RuntimeError("simulated bug: secret detail")

    monkeypatch.setattr("relayd.rewrite.rewrite_from", broken)
    c = await authed(relay, tenant)
    await open_data(c, SENDER, "a@example.net")
    r = await finish(c)
    assert (r.code, r.enhanced) == (451, "4.3.0") and "secret" not in r.text
    r = await c.cmd("DATA")                          # the envelope is gone
    assert (r.code, r.enhanced) == (503, "5.5.1"), r
    assert relay.store.held(tenant.user) == 0
    assert await sent_total(relay, tenant.user) == 0
    assert sink.messages == []
    assert [m["result"] for m in mail_lines(caplog.records)] == ["error"]
    await c.close()
    await relay.close()
    relay2 = await relay_factory()                   # the journal row was undone
    assert await sent_total(relay2, tenant.user) == 0
    assert await sent_last_hour(relay2, tenant.user) == 0


async def test_a_refused_message_ends_the_transaction(relay, sink_factory, provision):
    sink = await sink_factory("permfail")
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c)
    assert (await finish(c)).code == 554
    assert (await c.cmd("DATA")).code == 503
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 503      # needs MAIL first
    await c.close()


# ------------------------------------------------------------- 1, 4: pathological headers

# 13 500 nested "(", folded into lines an upstream accepts (RFC 5321 4.5.3.1.6)
DEEP = (b"(" * 900 + b"\r\n ") * 15
PATHOLOGICAL = {
    # email.utils recursed once per "(": RecursionError -> 451 before the fix
    "deep_comments": (b"From: " + DEEP + b"\r\n\r\nbody\r\n", 250),
    "deep_balanced": (b"From: " + b"(" * 400 + b"x" + b")" * 400 + b" a@other.test\r\n\r\nb\r\n",
                      250),
    "deep_in_quotes": (b'From: "' + DEEP + b'" <a@other.test>\r\n\r\nb\r\n', 250),
    "unbalanced_quote": (b'From: "a <a@other.test>\r\n\r\nb\r\n', 250),
    "many_from_fields": (b"From: a@other.test\r\n" * 5000 + b"\r\nb\r\n", 250),
    "huge_from": (b"From: " + b"a" * 3_000_000 + b"@other.test\r\n\r\nb\r\n", 552),
    "folded_forever": (b"From: a@other.test\r\n" + b" x\r\n" * 500_000 + b"\r\nb\r\n", 552),
    # every line looks like a header field, no separator
    "all_header_lines": (b"X-Line: y\r\n" * 500_000, 552),
    # no separator but body lines: the first one ends the header (Postfix's rule)
    "no_separator": (b"From: a@other.test\r\n" + b"just text\r\n" * 500_000, 250),
    "body_only": (b"text without any header\r\n" * 1000, 250),
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
async def test_pathological_headers_are_bounded_and_settled(relay_factory, sink_factory,
                                                            provision, name):
    data, code = PATHOLOGICAL[name]
    sink = await sink_factory()
    relay = await relay_factory(limits={"max_message_size": 30_000_000})
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail="noreply@allowed.test", allowed_domains=["allowed.test"])])
    other = await authed(relay, tenant)              # another session, pinged throughout
    c = await authed(relay, tenant)
    await open_data(c)
    c.write(dot_stuff(data) + b".\r\n")
    gaps: list[float] = []
    reply_task = asyncio.ensure_future(c.reply())
    while not reply_task.done():
        t0 = time.monotonic()
        assert (await other.cmd("NOOP")).code == 250
        gaps.append(time.monotonic() - t0)
    r = reply_task.result()
    assert r.code == code, (name, r)
    assert len(sink.messages) == (1 if code == 250 else 0)
    if code == 250:
        assert sink.messages[0].mail_from == "noreply@allowed.test"   # not allowed: rewritten
    assert relay.store.held(tenant.user) == 0
    assert await sent_total(relay, tenant.user) == (1 if code == 250 else 0)
    assert (await c.cmd("DATA")).code == 503                         # transaction over
    # Other sessions keep being answered (SPEC 9). Before the fix one such
    # message blocked the loop for 6-13 s; the bound is loose on purpose.
    assert max(gaps, default=0) < 2.0, (name, max(gaps))
    await c.close()
    await other.close()


# ------------------------------------------------------------- 5: no failover after the dot

@pytest.mark.parametrize("after_dot", ["drop", "rst", "silent", "partial", "partial_drop",
                                       "multiline_drop"])
async def test_no_failover_once_the_upstream_has_the_message(relay_factory, sink_factory,
                                                             provision, scripted, caplog,
                                                             after_dot):
    script, port = await scripted(after_dot)
    spare = await sink_factory()
    relay = await relay_factory(timeouts={"command": 0.5})
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        {"host": "127.0.0.1", "port": port, "priority": 0}, sink_upstream(spare, priority=5)])
    c = await authed(relay, tenant)
    await open_data(c)
    r = await finish(c)
    assert (r.code, r.enhanced) == (451, "4.4.2"), r
    assert "unconfirmed" in r.text.lower()
    assert script.messages == 1
    assert spare.transactions == 0 and spare.messages == []          # no duplicate
    assert (await upstream_by_port(relay, tenant.idapp, port)).numerrors == 1
    assert relay.store.held(tenant.user) == 0
    assert await sent_total(relay, tenant.user) == 0
    assert [m["result"] for m in mail_lines(caplog.records)] == ["unconfirmed"]
    assert (await c.cmd("NOOP")).code == 250                         # session goes on
    await c.close()


async def test_a_refusal_after_the_dot_still_fails_over(relay, sink_factory, provision):
    # A 4xx reply to the dot is a confirmed refusal: the next upstream is tried.
    first = await sink_factory("tempfail")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(first, priority=0), sink_upstream(spare, priority=5)])
    c = await authed(relay, tenant)
    await open_data(c)
    assert (await finish(c)).code == 250
    assert len(spare.messages) == 1
    await c.close()


# ------------------------------------------------------------- 6: not idle while delivering

async def test_no_idle_timeout_while_the_upstream_decides(relay_factory, sink_factory,
                                                          provision):
    sink = await sink_factory("hang")
    relay = await relay_factory(timeouts={"session": 0.5, "command": 10})
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c)
    c.write(dot_stuff(simple_message()) + b".\r\n")
    await asyncio.sleep(1.5)                     # three idle timeouts' worth
    sink.mode = "accept"
    sink.hang_event.set()
    r = await c.reply()
    assert (r.code, r.enhanced) == (250, "2.0.0"), r   # not "421 4.4.2 Idle timeout"
    assert len(sink.messages) == 1
    assert (await c.cmd("NOOP")).code == 250
    r = await c.reply()                          # idle again: the timer runs again
    assert (r.code, r.enhanced) == (421, "4.4.2"), r


# ------------------------------------------------------------- 7: credentials change

@pytest.mark.parametrize("change", ["reset", "remove"])
async def test_a_password_reset_or_removal_ends_live_sessions(relay, sink_factory, provision,
                                                              change):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    idle = await authed(relay, tenant)
    busy = await authed(relay, tenant)
    assert (await busy.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    if change == "reset":
        new_password = await relay.store.reset_password(tenant.user, tenant.owner_id)
    else:
        await relay.store.remove_user(tenant.user, tenant.owner_id)
    r = await idle.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (535, "5.7.8"), r
    r = await busy.cmd("RCPT TO:<a@example.net>")
    assert (r.code, r.enhanced) == (535, "5.7.8"), r
    assert relay.store.held(tenant.user) == 0
    if change == "reset":
        fresh = await RawSMTP.open(relay.smtp_ports[0])
        await fresh.ehlo()
        assert (await fresh.cmd(b"AUTH PLAIN " + _plain(tenant.user, tenant.password))).code == 535
        await fresh.login(tenant.user, new_password)
        assert (await fresh.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        await fresh.close()
    await idle.close()
    await busy.close()


def _plain(user: str, password: str) -> bytes:
    from helpers_smtp import plain_blob
    return plain_blob(user, password)


# ------------------------------------------------------------- 8: stale and out-of-step pools

async def test_stale_pooled_connections_are_replaced_by_a_new_one(relay, sink_factory,
                                                                  provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])

    async def one() -> int:
        c = await authed(relay, tenant)
        await open_data(c)
        r = await finish(c)
        await c.close()
        return r.code

    assert await asyncio.gather(one(), one(), one()) == [250, 250, 250]
    assert relay.pool.idle_count() == 3
    sink.make_stale()                        # as after a restart of the upstream
    before = sink.connections
    assert await one() == 250
    assert (await upstream_by_port(relay, tenant.idapp, sink.port)).numerrors == 0
    # One stale connection found, all idle ones dropped, one new one opened.
    assert sink.connections == before + 1
    assert relay.pool.idle_count() == 1
    assert await one() == 250 and sink.connections == before + 1      # reused


async def test_a_connection_out_of_step_is_never_reused(relay, provision, scripted):
    script, port = await scripted("extra")
    tenant = await provision(relay, upstreams=[{"host": "127.0.0.1", "port": port}])
    for n in range(3):
        c = await authed(relay, tenant)
        await open_data(c)
        r = await finish(c)
        assert (r.code, r.enhanced) == (250, "2.0.0"), (n, r)
        await c.close()
    assert script.messages == 3
    assert script.connections == 3          # each out-of-step connection was dropped
    assert (await upstream_by_port(relay, tenant.idapp, port)).numerrors == 0
