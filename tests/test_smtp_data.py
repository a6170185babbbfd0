"""SPEC 3, the session's hostile bytes (STYLE 12): addresses with control
characters, DATA framing and SMTP smuggling, dot-stuffing, bare LF, HTTP and
TLS bytes on the SMTP port, AUTH details; against a real relayd and real
recording upstreams on loopback. The reply codes of the session's commands
are in test_smtp_replies.py.

Replies are read with a raw client (helpers_smtp.RawSMTP) so that every code
and enhanced code is seen exactly as relayd wrote it.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import (
    SMUGGLED, ConnectionClosed, RawSMTP, authed, dot_stuff, normalised, wait_for,
    without_trace)

SENDER = "app@example.com"
MSG = simple_message()


# ------------------------------------------------------------------ addresses

@pytest.mark.parametrize("address", ["a\x00b@example.com", "a\tb@example.com"])
async def test_control_characters_in_addresses_are_refused(relay, sink_factory, provision,
                                                           address):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    # The command is well-formed (aiosmtpd's 501 is for syntax errors), so it
    # is relayd's own address check that refuses it: 553, with the sender's
    # or the recipient's enhanced code.
    r = await c.cmd(f"MAIL FROM:<{address}>".encode())
    assert (r.code, r.enhanced) == (553, "5.1.7"), r
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    r = await c.cmd(f"RCPT TO:<{address}>".encode())
    assert (r.code, r.enhanced) == (553, "5.1.3"), r
    assert relay.store.held(tenant.user) == 0
    await c.close()


# ------------------------------------------------------------------ DATA framing / smuggling

@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
                                      b"\n.\r", b"\r.\r"],
                         ids=repr)
async def test_only_crlf_dot_crlf_ends_data(relay, sink_factory, provision, fake_end):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    body = MSG + b"first part" + fake_end + SMUGGLED + b"last line\r\n"
    r = await c.send_message(SENDER, ["to@example.net"], body)
    # SPEC 3.10 allows refusing such a body or relaying it once, intact;
    # relayd relays it (README "DATA framing"): one message, the fake marker
    # inside it, line endings made CRLF.
    assert r.code == 250 and "queued as" in r.text, r
    assert [(m.mail_from, m.rcpt_tos, without_trace(m.data)) for m in sink.messages] == [
        (SENDER, ["to@example.net"], normalised(body))]
    # The smuggled commands were never executed; the session is in step.
    r = await c.cmd("QUIT")
    assert r.code == 221
    assert len(sink.messages) == 1
    await c.close()


async def test_bare_lf_data_command_never_opens_data(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    c.write(b"DATA\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (500, "5.5.2"), r
    # What follows is not a message, nor commands: relayd has closed the
    # connection (README: its body would run as commands), so not one more
    # reply comes.
    c.write(MSG + b".\r\n" + SMUGGLED + b".\r\n")
    with pytest.raises((ConnectionClosed, ConnectionError)):
        await c.reply()
    await c.close()
    await wait_for(lambda: not relay.sessions)
    assert sink.messages == []
    assert relay.store.held(tenant.user) == 0


async def test_nul_and_8bit_bytes_are_relayed_intact(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    body = MSG + b"nul:\x00: high:\xff\xfe\x80: utf8:" + "日本語".encode() + b"\r\n"
    r = await c.send_message(SENDER, ["to@example.net"], body)
    # SPEC 3.10 allows refusing or relaying; relayd relays (README).
    assert r.code == 250 and "queued as" in r.text, r
    assert [without_trace(m.data) for m in sink.messages] == [body]
    await c.close()


async def test_dot_stuffing_is_undone_exactly_once(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    original = (b"From: app@example.com\r\nSubject: dots\r\n\r\n"
                b".\r\n"
                b"..\r\n"
                b".leading dot\r\n"
                b"..two leading dots\r\n"
                b"...\r\n"
                b"a line with . inside\r\n"
                b".\r\n")
    r = await c.send_message(SENDER, ["to@example.net"], dot_stuff(original))
    assert r.code == 250, r
    assert without_trace(sink.messages[0].data) == original
    await c.close()


async def test_body_line_dot_dot_arrives_as_dot(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    # Raw, as a client writes it: the first DATA line itself is stuffed.
    r = await c.send_message(SENDER, ["to@example.net"],
                             b"..first\r\nSubject: x\r\n\r\n..\r\n..x\r\n")
    assert r.code == 250, r
    assert without_trace(sink.messages[0].data) == b".first\r\nSubject: x\r\n\r\n.\r\n.x\r\n"
    await c.close()


async def test_empty_message(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], b"")
    assert r.code == 250, r
    assert len(sink.messages) == 1 and without_trace(sink.messages[0].data).strip() == b""
    await c.close()


@pytest.mark.parametrize("after", [b"QUIT\r\n", b"MAIL FROM:<app@example.com>\r\nQUIT\r\n"])
async def test_commands_pipelined_after_the_end_marker_are_processed(relay, sink_factory,
                                                                     provision, after):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n" + after)        # one write
    r = await c.reply()
    assert r.code == 250 and "queued as" in r.text, r
    if after.startswith(b"MAIL"):
        assert (await c.reply()).code == 250
    r = await c.reply()
    assert r.code == 221, r
    assert await c.at_eof()
    assert [without_trace(m.data) for m in sink.messages] == [MSG]
    await c.close()


async def test_end_marker_split_across_writes(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    for cut in (1, 2, 3, 4):         # split "\r\n.\r\n" after each of its bytes
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        data = MSG[:-2] + b"\r\n.\r\n"
        c.write(data[:len(MSG) - 2 + cut])
        await c.writer.drain()
        await asyncio.sleep(0.01)    # let the first part be read on its own
        c.write(data[len(MSG) - 2 + cut:])
        r = await c.reply()
        assert r.code == 250, (cut, r)
    assert [without_trace(m.data) for m in sink.messages] == [MSG] * 4
    await c.close()


async def test_http_request_on_the_smtp_port(relay, sink_factory, provision):
    c = await RawSMTP.open(relay.smtp_ports[0])
    c.write(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    for _ in range(3):
        r = await c.reply()
        assert r.code >= 500, r
    await c.close()
    # relayd is unharmed.
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.send_message(SENDER, ["to@example.net"], MSG)).code == 250
    await c.close()


async def test_tls_client_hello_on_plain_port(relay):
    c = await RawSMTP.open(relay.smtp_ports[0])
    # The start of a TLS 1.2 ClientHello record, then a line end so that the
    # command reader gets a "line".
    c.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n")
    r = await c.reply()
    assert r.code >= 500, r
    await c.close()
    await wait_for(lambda: not relay.sessions)
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner.code == 220
    await c.close()
