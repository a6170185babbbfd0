"""Hostile SMTP input beyond test_hostile_smtp.py's table (issue 5, STYLE
12): the cases that need more than one connection, a memory measurement, a
paced client or a relay of their own: oversize DATA discarded while read,
10 000 RCPTs, session limits, slow and trickling clients, a hang-up while
the upstream decides, STARTTLS command injection, hostile upstream replies,
bounded auth-failure bookkeeping, max_line_length. Against a real relayd
with recording upstreams on loopback.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import simple_message, sink_upstream
from helpers_records import sent_total
from helpers_smtp import (
    TEN_THOUSAND, ConnectionClosed, RawSMTP, authed, open_data, printable, rest, still_answers,
    wait_for, without_trace)

SENDER = "app@example.com"
RCPT = "to@example.net"
MSG = simple_message()


def vm_rss() -> int:
    """This process's resident set size in bytes (relayd runs in-process)."""
    with open("/proc/self/status") as f:
        for entry in f:
            if entry.startswith("VmRSS:"):
                return int(entry.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_oversize_data_is_discarded_while_reading(relay_factory, sink_factory,
                                                        provision):
    """50 MB against a 1 MiB limit: 552 5.3.4 after the end marker, nothing
    upstream, and relayd's memory does not grow by the payload."""
    relay = await relay_factory(limits={"max_message_size": 1 << 20})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c, SENDER, RCPT)
    chunk = (b"x" * 76 + b"\r\n") * 840          # 64 KiB-ish, one object reused
    total = 50 << 20
    baseline = peak = vm_rss()
    sent = 0
    while sent < total:
        c.write(chunk)
        await c.writer.drain()
        sent += len(chunk)
        peak = max(peak, vm_rss())
    c.write(b".\r\n")
    r = await c.reply()
    peak = max(peak, vm_rss())
    assert (r.code, r.enhanced) == (552, "5.3.4"), r
    growth = peak - baseline
    assert growth < 16 << 20, f"RSS grew by {growth >> 20} MiB for a {total >> 20} MiB payload"
    assert sink.messages == [] and sink.connections == 0
    assert relay.store.held(tenant.user) == 0 and await sent_total(relay, tenant.user) == 0
    # The session is in step: the next message goes through.
    r = await c.send_message(SENDER, [RCPT], MSG)
    assert r.code == 250, r
    assert [without_trace(m.data) for m in sink.messages] == [MSG]
    await c.close()


def rcpt_count(result: str) -> float:
    from relayd import metrics
    return metrics.REGISTRY.get_sample_value("relayd_recipients_total", {"result": result}) or 0


async def test_10000_rcpts_with_the_default_error_limit(relay_factory, sink_factory,
                                                        provision):
    """With limits.max_errors at its default (20) the 452s are errors too:
    relayd accepts max_recipients, refuses 20 more, says 421 and closes; no
    command pipelined behind the 421 runs (a 21st RCPT used to)."""
    relay = await relay_factory(limits={"max_recipients": 5})
    assert relay.config.limits.max_errors == 20
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    before = {r: rcpt_count(r) for r in ("accepted", "too_many")}
    c.write(TEN_THOUSAND + b"DATA\r\n" + MSG + b".\r\n")
    codes = []
    try:
        for _ in range(10_002):
            codes.append((await c.reply()).code)
    except (ConnectionClosed, ConnectionError):
        pass
    # relayd closes with the rest of the 10 000 lines unread, so the kernel
    # may answer with a reset that overtakes the last replies: the client
    # sees a prefix of them. relayd's own count says where it stopped.
    expected = [250] * 5 + [452] * 20 + [421]
    assert codes == expected[:len(codes)], codes
    assert {r: rcpt_count(r) - before[r] for r in before} == {"accepted": 5, "too_many": 20}
    await c.close()
    await wait_for(lambda: not relay.sessions)
    assert relay.store.held(tenant.user) == 0
    assert sink.messages == [] and sink.transactions == 0
    await still_answers(relay)


@pytest.mark.parametrize("limit", ["max_sessions_per_ip", "max_sessions"])
async def test_session_limits_421_on_the_banner(relay_factory, limit):
    limits = {"max_sessions_per_ip": 100, "max_sessions": 100, limit: 3}
    relay = await relay_factory(limits=limits)
    port = relay.smtp_ports[0]
    admitted = [await RawSMTP.open(port) for _ in range(3)]
    assert [c.banner.code for c in admitted] == [220] * 3
    refused = await RawSMTP.open(port)
    assert (refused.banner.code, refused.banner.enhanced) == (421, "4.7.0"), refused.banner
    assert await rest(refused) == b""
    await refused.close()
    await wait_for(lambda: len(relay.sessions) == 3)
    for c in admitted:                       # the admitted ones are unharmed
        await c.ehlo()
    await admitted[0].close()
    await wait_for(lambda: len(relay.sessions) == 2)
    again = await RawSMTP.open(port)         # a freed slot is usable again
    assert again.banner.code == 220
    await again.ehlo()
    for c in [*admitted[1:], again]:
        await c.close()
    await wait_for(lambda: not relay.sessions and not relay.per_ip)


async def test_slow_data_client_is_not_cut_off(relay_factory, sink_factory, provision):
    """timeouts.session bounds idleness, not a transfer: each chunk of DATA
    resets it. 20 chunks 0.1 s apart outlast a 1 s timeout twice over."""
    relay = await relay_factory(timeouts={"session": 1.0})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c, SENDER, RCPT)
    body = MSG
    c.write(MSG)
    for i in range(20):
        await asyncio.sleep(0.1)
        piece = b"slow line %d\r\n" % i
        c.write(piece)
        await c.writer.drain()
        body += piece
    c.write(b".\r\n")
    r = await c.reply()
    assert r.code == 250, r
    assert [without_trace(m.data) for m in sink.messages] == [body]
    await c.close()


@pytest.mark.parametrize("outcome", ["accept", "tempfail"])
async def test_hangup_while_the_upstream_decides(relay_factory, sink_factory, provision,
                                                 outcome):
    """A client that leaves after the end marker, while the upstream holds the
    message: the delivery finishes; accepted means counted once, refused
    means the reservation comes back. Never a duplicate."""
    relay = await relay_factory()
    sink = await sink_factory("hang")
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c, SENDER, RCPT)
    c.write(MSG + b".\r\n")
    await wait_for(lambda: sink.transactions == 1)
    c.writer.transport.abort()
    await c.close()
    await wait_for(lambda: not relay.sessions)
    assert relay.inflight, "the delivery outlives the session"
    sink.mode = "hang" if outcome == "accept" else "tempfail"
    sink.hang_event.set()
    await wait_for(lambda: not relay.inflight)
    assert relay.store.held(tenant.user) == 0
    if outcome == "accept":
        assert [without_trace(m.data) for m in sink.messages] == [MSG]
        assert await sent_total(relay, tenant.user) == 1
        assert (await relay.store.sent_totals())[tenant.user] == 1
    else:
        assert sink.messages == []
        assert await sent_total(relay, tenant.user) == 0
        assert (await relay.store.sent_totals()).get(tenant.user, 0) == 0
    assert sink.transactions == 1
    await still_answers(relay)


async def test_starttls_does_not_carry_plaintext_commands_into_tls(
        relay_factory, tls_files, client_ssl, sink_factory, provision):
    """CVE-2011-0411 class: commands pipelined after STARTTLS in the same
    plaintext packet must be discarded, not run inside the TLS session."""
    cert, key = tls_files
    relay = await relay_factory(
        listen=[{"address": "127.0.0.1:0", "tls": "starttls", "auth_require_tls": True}],
        tls={"cert": cert, "key": key})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    c.write(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n")
    r = await c.reply()
    assert r.code == 220, r
    await c.writer.start_tls(client_ssl, server_hostname="localhost")
    # Had the injected MAIL run, its 530 would come before the EHLO reply.
    r = await c.cmd("EHLO client.test")
    assert r.code == 250 and any(x.startswith("AUTH") for x in r.lines), r
    await c.login(tenant.user, tenant.password)
    r = await c.send_message(SENDER, [RCPT], MSG)
    assert r.code == 250, r
    assert [(m.mail_from, m.rcpt_tos, without_trace(m.data))
            for m in sink.messages] == [(SENDER, [RCPT], MSG)]
    await c.close()


class RawUpstream(asyncio.Protocol):
    """An upstream that answers the end of DATA with ``final``, raw bytes."""

    final = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 raw.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                self.transport.write(self.final)
                continue
            if b"\r\n" not in self.buffer:
                return
            cmd, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = cmd[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-raw.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 go ahead\r\n")
                self.buffer, self.in_data = b"\r\n" + self.buffer, True
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
            else:
                self.transport.write(b"250 ok\r\n")


@pytest.mark.parametrize("final,code,enhanced,quoted", [
    (b"554 5.7.1 \xc3\x9cberlastet \x1b[2J\x00 refused\r\n", 554, "5.0.0", "refused"),
    (b"451 4.3.0 \xff\xfe busy\x07 \r\n", 451, "4.4.1", "busy"),
], ids=["permanent", "temporary"])
async def test_upstream_reply_with_8bit_and_control_bytes(relay, provision, final, code,
                                                          enhanced, quoted):
    """Upstreams are semi-trusted: their reply text is quoted to the client
    as printable ASCII, and its class survives. (This used to raise in
    aiosmtpd's ASCII encoder, so a permanent 554 reached the client as
    451 4.3.0 and the client retried a message no upstream would take.)"""
    RawUpstream.final = final
    server = await asyncio.get_running_loop().create_server(RawUpstream, "127.0.0.1", 0)
    try:
        tenant = await provision(relay, upstreams=[
            {"host": "127.0.0.1", "port": server.sockets[0].getsockname()[1]}])
        c = await authed(relay, tenant)
        r = await c.send_message(SENDER, [RCPT], MSG)
        assert (r.code, r.enhanced) == (code, enhanced), r
        assert printable(r), r.lines
        assert quoted in r.text, r           # this upstream's own reply is quoted
        assert (await c.cmd("NOOP")).code == 250
        await c.close()
        assert relay.store.held(tenant.user) == 0
        assert await sent_total(relay, tenant.user) == 0
    finally:
        server.close()


def test_failed_auth_bookkeeping_is_bounded_against_address_hopping():
    """Brute force from ever new addresses: the lockout table keeps at most
    max_ips entries, forgetting the oldest first (sans-IO, SPEC 3.2)."""
    from relayd.policy import AuthThrottle
    throttle = AuthThrottle(max_failures=2, window=600, max_ips=100)
    for i in range(1000):
        throttle.failure(f"198.51.100.{i}", now=float(i))
    assert len(throttle._failures) == 100
    assert not throttle.locked("198.51.100.0", 1000.0)       # forgotten
    throttle.failure("198.51.100.999", 1000.0)
    assert throttle.locked("198.51.100.999", 1000.0)         # the recent ones still count


async def test_trickling_data_is_cut_at_timeouts_data(relay_factory, sink_factory, provision):
    # Each byte resets the idle timer (timeouts.session), so only the DATA
    # deadline stops a client that sends one line every 0.1 s forever.
    relay = await relay_factory(timeouts={"session": 30, "data": 0.5})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await open_data(c)
    reply = None
    for _ in range(100):                       # at most 10 s of trickling
        try:
            c.write(b"x\r\n")
            await c.writer.drain()
            reply = await asyncio.wait_for(c.reply(), 0.1)
            break
        except asyncio.TimeoutError:
            continue
    assert reply is not None and (reply.code, reply.enhanced) == (421, "4.4.2"), reply
    assert await c.at_eof()
    await c.close()
    await wait_for(lambda: relay.store.held(tenant.user) == 0)
    assert sink.messages == []


async def test_max_line_length_is_configurable(relay_factory, provision):
    relay = await relay_factory(limits={"max_line_length": 600})
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    r = await c.cmd(b"NOOP " + b"x" * 700)
    assert r.code == 500 and "too long" in r.text
    # An AUTH answer over the limit is refused as RFC 4954 says, not an error.
    assert (await c.cmd("AUTH LOGIN")).code == 334
    r = await c.cmd(b"A" * 700)
    assert (r.code, r.enhanced) == (500, "5.5.6"), r
    await c.login(tenant.user, tenant.password)
    await c.close()
