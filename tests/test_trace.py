"""SPEC 3.16 and 3.17: relayd's one Received: field (RFC 5321 4.4) on top of
every relayed message, and message sizes that count the client's message
after dot-unstuffing, without that field.

Unit tests of relayd.trace (the sans-IO field builder) first, then end to
end through a real relayd and a recording sink: the exact field in each
``received_header`` mode, the RFC 3848 protocol word per listener, every
other byte unchanged, the From rewrite beside it, and the mail log's size.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import ssl
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import sink_upstream
from helpers_smtp import (RawSMTP, Trace, dot_stuff, mail_lines, rich_message, split_trace,
                          without_trace)
from relayd import trace
from relayd.wire import unstuff, unstuffed_size

WHEN = datetime(2025, 12, 2, 10, 0, tzinfo=timezone(timedelta(hours=1)))
DATE = "Tue, 02 Dec 2025 10:00:00 +0100"
SENDER = "alice@other.test"
RCPT = "bob@example.net"


def field(mode: trace.Mode = "full", **kw: object) -> bytes:
    args: dict[str, object] = dict(
        ehlo_name="client.test", client_ip="192.0.2.1", hostname="relay.example.com",
        tls=True, authenticated=True, session_id="3F2A9C01B7", when=WHEN)
    args.update(kw)
    return trace.received(mode, **args)  # type: ignore[arg-type]


def lines_of(f: bytes) -> list[bytes]:
    assert f.endswith(b"\r\n") and b"\r\n" not in f[:-2].replace(b"\r\n\t", b"")
    body = f[:-2]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n"), "bare CR or LF"
    return body.split(b"\r\n")


def parsed(f: bytes) -> Trace:
    t, rest = split_trace(f)
    assert t is not None and rest == b"", f
    return t


# ---------------------------------------------------------------- the builder

def test_full_field_exact() -> None:
    assert field() == (
        b"Received: from client.test ([192.0.2.1])\r\n"
        b"\tby relay.example.com (relayd) with ESMTPSA id 3F2A9C01B7;\r\n"
        b"\t" + DATE.encode() + b"\r\n")


def test_hide_client_field_exact() -> None:
    assert field("hide_client", tls=False) == (
        b"Received: from relayd-submission\r\n"
        b"\tby relay.example.com (relayd) with ESMTPA id 3F2A9C01B7;\r\n"
        b"\t" + DATE.encode() + b"\r\n")


def test_off_adds_nothing() -> None:
    assert field("off") == b""


@pytest.mark.parametrize("tls, authenticated, word", [
    (True, True, "ESMTPSA"), (False, True, "ESMTPA"),
    (True, False, "ESMTPS"), (False, False, "ESMTP")])
def test_protocol_word_rfc3848(tls: bool, authenticated: bool, word: str) -> None:
    assert trace.protocol(tls=tls, authenticated=authenticated) == word
    assert parsed(field(tls=tls, authenticated=authenticated)).proto == word


@pytest.mark.parametrize("ip, literal", [
    ("192.0.2.1", "[192.0.2.1]"),
    ("127.0.0.1", "[127.0.0.1]"),
    ("::1", "[IPv6:::1]"),
    ("2001:DB8:0:0::25", "[IPv6:2001:db8::25]"),
    ("::ffff:192.0.2.7", "[192.0.2.7]"),          # IPv4-mapped: the IPv4 address it is
    ("fe80::1%eth0", "[IPv6:fe80::1]"),           # a zone index is no part of a literal
])
def test_client_address_literal(ip: str, literal: str) -> None:
    assert trace.address_literal(ip) == literal
    assert parsed(field(client_ip=ip)).client == literal


def test_not_an_ip_leaves_out_the_tcp_info() -> None:
    assert trace.address_literal("/run/sock") is None
    t = parsed(field(client_ip="/run/sock"))
    assert (t.name, t.client) == ("client.test", None)


def test_dotted_session_id_is_a_quoted_string() -> None:
    """RFC 5321 4.4 ID is an Atom or msg-id: "ID.2" (a session's second
    message) is neither, so it goes between quotes, same characters."""
    assert parsed(field(session_id="3F2A9C01B7.2")).id == '"3F2A9C01B7.2"'
    assert parsed(field(session_id="3F2A9C01B7")).id == "3F2A9C01B7"


def test_date_is_rfc5322_with_offset() -> None:
    t = parsed(field(when=WHEN))
    assert t.date == DATE
    assert email.utils.parsedate_to_datetime(t.date) == WHEN


def test_folding_keeps_lines_within_78() -> None:
    long_host = "relay-" + "a" * 50 + ".example.com"
    f = field(hostname=long_host, client_ip="2001:db8:1234:5678:9abc:def0:1234:5678",
              ehlo_name="mail-" + "b" * 40 + ".example.org", session_id="3F2A9C01B7.12")
    lines = lines_of(f)
    assert all(len(line) <= trace.LINE_WIDTH for line in lines), lines
    assert all(line.startswith(b"\t") for line in lines[1:])
    t = parsed(f)
    assert (t.by, t.client) == (long_host, "[IPv6:2001:db8:1234:5678:9abc:def0:1234:5678]")


def test_a_word_longer_than_a_line_stays_whole_on_its_own_line() -> None:
    name = "x" * 200
    lines = lines_of(field(ehlo_name=name))
    assert lines[0] == b"Received: from"
    assert lines[1] == b"\t" + name.encode()
    assert [ln for ln in lines if len(ln) > trace.LINE_WIDTH] == [lines[1]]


@pytest.mark.parametrize("name, shown", [
    ("evil\r\nBcc: victim@example.org", "evil??Bcc:?victim?example.org"),
    ("a\nb\rc", "a?b?c"),
    ("nul\x00byte", "nul?byte"),
    ("naïve.example", "na?ve.example"),
    ("bad\udcffutf8", "bad?utf8"),                 # aiosmtpd's surrogateescape
    ("x ([6.6.6.6]) by mx.example.com; Mon, 1 Jan 2001", None),
    ("tab\there", "tab?here"),
    ("[IPv6:::1]", "[IPv6:::1]"),
    ("[192.0.2.9]", "[192.0.2.9]"),
    ("under_score-host.example", "under_score-host.example"),
    ("", "unknown"),
])
def test_hostile_ehlo_names_cannot_break_or_forge_the_field(name: str, shown: str | None) -> None:
    f = field(ehlo_name=name)
    f.decode("ascii")                              # 7-bit whatever the client sent
    lines_of(f)                                    # CRLF only, no bare CR/LF, no NUL
    assert b"\0" not in f
    t = parsed(f)
    assert (t.client, t.by, t.proto, t.id, t.date) == (
        "[192.0.2.1]", "relay.example.com", "ESMTPSA", "3F2A9C01B7", DATE)
    assert re.fullmatch(r"[A-Za-z0-9._:\[\]?-]+", t.name), t.name
    if shown is not None:
        assert t.name == shown
    else:                                          # no space, '(' or ';' survives
        assert t.name == "x??[6.6.6.6]??by?mx.example.com??Mon??1?Jan?2001"


def test_very_long_ehlo_name_is_cut() -> None:
    t = parsed(field(ehlo_name="a" * 600))
    assert len(t.name) == trace.MAX_NAME == 255
    assert t.name == "a" * 252 + "..."
    assert trace.safe_name("a" * 255) == "a" * 255


def test_hostile_configured_hostname_is_made_safe_too() -> None:
    assert parsed(field(hostname="relay (x); y")).by == "relay??x???y"


@given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\r", b"\n", b".\r\n"]),
                max_size=30))
def test_unstuffed_size_is_the_unstuffed_length(parts: list[bytes]) -> None:
    wire = b"".join(parts)
    assert unstuffed_size(wire) == len(unstuff(wire))
    assert unstuffed_size(bytearray(wire)) == len(unstuff(wire))


# ---------------------------------------------------------------- end to end

def dotted_message() -> bytes:
    """Headers, then many lines that start with a dot (stuffed on the wire)."""
    body = b"".join(b".line %d\r\n" % i if i % 2 else b"..%d\r\n" % i for i in range(200))
    return (b"From: Alice <alice@other.test>\r\nTo: bob@example.net\r\nSubject: dots\r\n"
            b"Message-ID: <dots.1@other.test>\r\n\r\n.first body line\r\n" + body + b".\r\n")


async def send(client: RawSMTP, tenant, msg: bytes, *, ehlo: str = "client.test") -> str:
    await client.ehlo(ehlo)
    await client.login(tenant.user, tenant.password)
    r = await client.send_message(SENDER, [RCPT], dot_stuff(msg))
    assert r.code == 250, r
    m = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", r.text)
    assert m, r
    return m.group(1)


def check_trace(data: bytes, msg: bytes, *, name: str | None, client: str | None,
                proto: str, msg_id: str) -> Trace:
    t, rest = split_trace(data)
    assert t is not None, data[:300]
    assert rest == msg                             # every other byte as sent
    assert (t.name, t.client, t.by, t.proto) == (name, client, "relay.test", proto)
    assert t.id == msg_id
    when = email.utils.parsedate_to_datetime(t.date)
    assert when.tzinfo is not None and abs(when.timestamp() - time.time()) < 60
    assert all(len(ln) <= 78 for ln in t.raw.split(b"\r\n"))
    return t


@pytest.mark.parametrize("mode", ["full", "hide_client", "off"])
async def test_received_field_in_each_mode_on_plain_loopback(relay_factory, sink_factory,
                                                             provision, mode):
    relay = await relay_factory(received_header=mode)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = rich_message(sender="Alice <alice@other.test>")
    c = await RawSMTP.open(relay.smtp_ports[0])
    msg_id = await send(c, tenant, msg)
    await c.close()
    [got] = sink.messages
    if mode == "off":
        assert got.data == msg
        return
    if mode == "full":
        t = check_trace(got.data, msg, name="client.test", client="[127.0.0.1]",
                        proto="ESMTPA", msg_id=msg_id)
        assert t.raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n"
                                b"\tby relay.test (relayd) with ESMTPA id " + msg_id.encode()
                                + b";\r\n\t")
    else:
        t = check_trace(got.data, msg, name="relayd-submission", client=None,
                        proto="ESMTPA", msg_id=msg_id)
        assert b"127.0.0.1" not in t.raw and b"client.test" not in t.raw


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
async def test_esmtpsa_over_tls(relay_factory, sink_factory, provision, tls_files,
                                client_ssl: ssl.SSLContext, listener):
    cert, key = tls_files
    relay = await relay_factory(listen=[{"address": "127.0.0.1:0", "tls": listener}],
                                tls={"cert": cert, "key": key})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = dotted_message()
    if listener == "starttls":
        c = await RawSMTP.open(relay.smtp_ports[0])
        await c.ehlo("before-tls.test")
        await c.starttls(client_ssl)
    else:
        c = await RawSMTP.open(relay.smtp_ports[0], ssl_ctx=client_ssl)
    msg_id = await send(c, tenant, msg, ehlo="tls-client.test")
    await c.close()
    check_trace(sink.messages[0].data, msg, name="tls-client.test", client="[127.0.0.1]",
                proto="ESMTPSA", msg_id=msg_id)


async def test_second_message_of_a_session_has_its_own_id(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = rich_message(sender="Alice <alice@other.test>")
    c = await RawSMTP.open(relay.smtp_ports[0])
    first = await send(c, tenant, msg)
    r = await c.send_message(SENDER, [RCPT], dot_stuff(msg))
    await c.close()
    second = r.text.rsplit(" ", 1)[1]
    assert second == f"{first}.2"
    traces = [split_trace(m.data)[0] for m in sink.messages]
    assert [t.id if t else None for t in traces] == [first, f'"{first}.2"']


async def test_hostile_ehlo_name_end_to_end(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = rich_message(sender="Alice <alice@other.test>")
    c = await RawSMTP.open(relay.smtp_ports[0])
    msg_id = await send(c, tenant, msg, ehlo="x\x00y ([6.6.6.6]) by mx.example.com;")
    await c.close()
    t = check_trace(sink.messages[0].data, msg, name="x?y??[6.6.6.6]??by?mx.example.com?",
                    client="[127.0.0.1]", proto="ESMTPA", msg_id=msg_id)
    assert t.raw.count(b"(") == 2                  # ([127.0.0.1]) and (relayd) only


async def test_ipv6_client_address(relay_factory, sink_factory, provision):
    relay = await relay_factory(
        listen=[{"address": "[::1]:0", "tls": "none", "auth_require_tls": False}])
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = rich_message(sender="Alice <alice@other.test>")
    reader, writer = await asyncio.open_connection("::1", relay.smtp_ports[0])
    c = RawSMTP(reader, writer)
    c.banner = await c.reply()
    msg_id = await send(c, tenant, msg)
    await c.close()
    check_trace(sink.messages[0].data, msg, name="client.test", client="[IPv6:::1]",
                proto="ESMTPA", msg_id=msg_id)


async def test_from_rewrite_with_the_field_on_top(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail="noreply@allowed.test", defaultfromname="Relay Sender")])
    msg = rich_message()                           # From: Alice Example <alice@other.test>
    c = await RawSMTP.open(relay.smtp_ports[0])
    msg_id = await send(c, tenant, msg)
    await c.close()
    got = sink.messages[0]
    assert got.mail_from == "noreply@allowed.test"
    rewritten = msg.replace(
        b"From: Alice Example <alice@other.test>\r\n",
        b"From: Relay Sender <noreply@allowed.test>\r\n"
        b"Reply-To: Alice Example <alice@other.test>\r\n", 1)
    assert rewritten != msg
    check_trace(got.data, rewritten, name="client.test", client="[127.0.0.1]",
                proto="ESMTPA", msg_id=msg_id)


async def test_logged_size_is_the_unstuffed_message_without_the_field(relay, sink_factory,
                                                                      provision, caplog):
    caplog.set_level(logging.INFO, logger="relayd.mail")
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = dotted_message()
    stuffed = dot_stuff(msg)
    assert len(stuffed) - len(msg) > 200           # one byte per dot-leading line
    c = await RawSMTP.open(relay.smtp_ports[0])
    msg_id = await send(c, tenant, msg)
    await c.close()
    [line] = mail_lines(caplog.records)
    assert line["session"] == msg_id
    assert line["size"] == str(len(msg))
    assert len(sink.messages[0].data) > len(msg)   # the field went upstream, uncounted
    assert without_trace(sink.messages[0].data) == msg
