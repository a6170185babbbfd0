"""SPEC 3.14: relayd's ESMTP server side as a modern submission server speaks
it, in real sessions against an in-process relayd and a recording upstream.

* EHLO offers exactly PIPELINING, SIZE, STARTTLS (before TLS only), AUTH
  (once TLS, or on a loopback listener without auth_require_tls),
  ENHANCEDSTATUSCODES, 8BITMIME, DSN and SMTPUTF8, each once, in that
  order (relayd/ehlo.py), on every kind of listener.
* A multi-line reply leaves relayd in one write (one TCP segment).
* Pipelining (RFC 2920): a group of commands sent in one write gets its
  replies in order, one per command, nothing lost or merged, including the
  commands a client sends right behind the end-of-data dot; nothing a
  client pipelined behind a 421 (max_errors, AUTH lockout, drain) runs.
* ENHANCEDSTATUSCODES (RFC 2034) holds for the replies aiosmtpd writes
  itself too; HELP, no longer offered in EHLO, still answers in one line
  and lists every command.
* Python's smtplib, which decides what to send from has_extn, sees the
  extensions and gets an 8-bit message with BODY=8BITMIME accepted.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import struct
from typing import Any

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import ConnectionClosed, RawSMTP, Reply, authed, plain_blob, wait_for

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

SENDER = "app@example.com"
MAX_SIZE = 123456
PLAIN, STARTTLS, IMPLICIT = 0, 1, 2      # listener indexes in three_listeners()

BEFORE_AUTH = ["PIPELINING", f"SIZE {MAX_SIZE}"]
AFTER_AUTH = ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
WITH_AUTH = [*BEFORE_AUTH, "AUTH PLAIN LOGIN", *AFTER_AUTH]
WITH_STARTTLS = [*BEFORE_AUTH, "STARTTLS", *AFTER_AUTH]


async def three_listeners(relay_factory: Any, tls_files: tuple[str, str], *,
                          limits: dict[str, int] | None = None, **config: Any) -> Any:
    """A plain loopback listener with AUTH (0), a STARTTLS listener that
    requires TLS for AUTH (1) and an implicit-TLS listener (2)."""
    cert, key = tls_files
    return await relay_factory(
        listen=[{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False},
                {"address": "127.0.0.1:0", "tls": "starttls", "auth_require_tls": True},
                {"address": "127.0.0.1:0", "tls": "implicit"}],
        tls={"cert": cert, "key": key},
        limits={"max_message_size": MAX_SIZE, **(limits or {})}, **config)


async def connect(relay: Any, kind: str, client_ssl: ssl.SSLContext) -> RawSMTP:
    """A session on listener ``kind`` (plain | starttls | starttls-after-tls |
    implicit), banner read; after STARTTLS when the kind says so."""
    if kind == "implicit":
        return await RawSMTP.open(relay.smtp_ports[IMPLICIT], ssl_ctx=client_ssl)
    c = await RawSMTP.open(relay.smtp_ports[PLAIN if kind == "plain" else STARTTLS])
    if kind == "starttls-after-tls":
        await c.ehlo()
        await c.starttls(client_ssl)
    return c


EXPECTED = {"plain": WITH_AUTH, "starttls": WITH_STARTTLS,
            "starttls-after-tls": WITH_AUTH, "implicit": WITH_AUTH}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_ehlo_offers_exactly_the_documented_keywords_in_order(
        relay_factory, tls_files, client_ssl, kind):
    relay = await three_listeners(relay_factory, tls_files)
    c = await connect(relay, kind, client_ssl)
    r = await c.ehlo()
    assert r.lines[0] == "relay.test"
    # The whole list, in order: each keyword once (aiosmtpd's own SMTPUTF8
    # line, its HELP line and its unsorted AUTH line do not get through).
    assert r.lines[1:] == EXPECTED[kind]
    await c.close()


async def test_helo_offers_no_keywords(relay_factory, tls_files, client_ssl):
    """HELO is plain SMTP (RFC 5321 4.1.1.1): one line, no extensions."""
    relay = await three_listeners(relay_factory, tls_files)
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    r = await c.cmd("HELO client.test")
    assert (r.code, r.lines) == (250, ["relay.test"])
    # EHLO after HELO is again the full list.
    assert (await c.ehlo()).lines[1:] == WITH_AUTH
    await c.close()


# ------------------------------------------------------------------ one write per reply

def _data_segments_in(sock: socket.socket) -> int:
    """Linux's tcp_info.tcpi_data_segs_in (RFC 4898 tcpEStatsPerfDataSegsIn,
    Linux 4.6+): TCP segments that carried data, received on ``sock``."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]


def _relay_side(relay: Any, client: socket.socket) -> socket.socket:
    """relayd's socket of the connection whose client end is ``client``."""
    for s in relay.sessions:
        sock = s.transport.get_extra_info("socket")
        if sock is not None and sock.getpeername() == client.getsockname():
            return sock
    raise AssertionError("no such session")


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="tcp_info is Linux's")
@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_multi_line_ehlo_reply_is_one_write(relay_factory, tls_files, client_ssl, kind):
    """The whole EHLO reply comes in one TCP segment.

    Reading it in one recv proves nothing by itself: relayd runs in this
    process and writes all its lines before this coroutine runs again, and
    TCP delivers whatever has arrived, in one recv, however many segments
    carried it. So the test counts the segments instead (tcp_info on the
    client's socket). relayd's socket has TCP_NODELAY (asyncio and uvloop
    set it; asserted below), so Nagle never joins two writes: each
    transport.write of an idle connection is a send() and at least one
    segment, and one segment for the reply means one write. Through TLS
    too: one write is one TLS record in one send()."""
    relay = await three_listeners(relay_factory, tls_files)
    c = await connect(relay, kind, client_ssl)
    sock = c.writer.get_extra_info("socket")
    server_sock = _relay_side(relay, sock)
    assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    # A round trip first: TLS 1.3 session tickets, sent after the handshake,
    # are then in (they come before this reply in the stream).
    assert (await c.cmd("NOOP")).code == 250
    before = _data_segments_in(sock)
    c.write(b"EHLO client.test\r\n")
    await c.writer.drain()
    first = await asyncio.wait_for(c.reader.read(65536), 15)
    lines = first.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) > 3, first     # complete lines only
    assert all(x.startswith(b"250-") for x in lines[:-2]), first
    assert lines[-2].startswith(b"250 "), first           # the reply's last line
    assert _data_segments_in(sock) - before == 1
    await c.close()


# ------------------------------------------------------------------ pipelining

def _codes(replies: list[Reply]) -> list[str]:
    """"code enhanced-code" of each reply."""
    return [f"{r.code} {r.enhanced}".strip() for r in replies]


async def _replies(c: RawSMTP, n: int) -> list[Reply]:
    return [await c.reply() for _ in range(n)]


async def test_pipelined_transactions_get_every_reply_in_order(relay_factory, tls_files,
                                                              sink_factory, provision):
    """RFC 2920 groups as a pipelining client sends them: MAIL, RCPTs and
    DATA in one write; then the first body, its dot, the whole next
    transaction (RSET, NOOP, MAIL, RCPT, DATA, body, dot) and QUIT in
    another: one reply per command, in order, both messages delivered."""
    relay = await three_listeners(relay_factory, tls_files)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    assert "PIPELINING" in (await c.ehlo()).lines    # RFC 2920 3.1: only then
    await c.login(tenant.user, tenant.password)
    one, two = simple_message(subject="one"), simple_message(subject="two")

    c.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.net>\r\n"
            "RCPT TO:<b@example.net>\r\nDATA\r\n".encode())
    assert _codes(await _replies(c, 4)) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    c.write(one + b".\r\nRSET\r\nNOOP\r\n"
            + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n".encode()
            + two + b".\r\nQUIT\r\n")
    replies = await _replies(c, 8)
    assert _codes(replies) == ["250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.1.0", "250 2.1.5",
                               "354", "250 2.0.0", "221 2.0.0"]
    first, second = replies[0].text, replies[6].text
    assert first.startswith("2.0.0 Ok: queued as ") and second.startswith("2.0.0 Ok: queued as ")
    assert first != second
    assert await c.at_eof()
    # relayd may put its Received: field on top (SPEC 3.16); the rest is as sent.
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.net", "b@example.net"],
                                                   ["c@example.net"]]
    assert sink.messages[0].data.endswith(one) and sink.messages[1].data.endswith(two)
    await c.close()


async def test_ehlo_helo_and_starttls_in_a_pipelined_group(relay_factory, tls_files,
                                                            client_ssl):
    """EHLO, NOOP and STARTTLS may only end a group (RFC 2920 3.1, RFC 3207),
    but a server reads on: each reply comes whole and apart from its
    neighbours' (EHLO's lines are not merged into the NOOPs'), HELO's and
    EHLO's without enhanced codes (RFC 2034 3). What was pipelined behind
    STARTTLS, in plain text, is discarded (RFC 3207 4.2; the command
    injection of CVE-2011-0411): the first reply under TLS is the EHLO's."""
    relay = await three_listeners(relay_factory, tls_files)
    c = await RawSMTP.open(relay.smtp_ports[STARTTLS])
    c.write(b"NOOP\r\nEHLO client.test\r\nNOOP\r\nHELO client.test\r\nNOOP\r\n"
            b"EHLO client.test\r\nSTARTTLS\r\nNOOP\r\n")
    noop, ehlo, noop2, helo, noop3, ehlo2, starttls = await _replies(c, 7)
    assert [(r.code, r.lines) for r in (noop, noop2, noop3)] == [(250, ["2.0.0 OK"])] * 3
    assert ehlo.lines == ehlo2.lines == ["relay.test", *WITH_STARTTLS]
    assert (helo.code, helo.lines) == (250, ["relay.test"])     # RFC 2034: no code here
    assert (starttls.code, starttls.enhanced) == (220, "2.0.0")
    await c.writer.start_tls(client_ssl, server_hostname="localhost")
    r = await c.cmd("EHLO client.test")
    assert r.lines == ["relay.test", *WITH_AUTH]
    await c.close()


async def _until_closed(c: RawSMTP) -> list[str]:
    """Every reply relayd still sends, as "code enhanced-code", until it
    closes the connection."""
    out = []
    while True:
        try:
            out.append(_codes([await c.reply()])[0])
        except (ConnectionClosed, ConnectionError):
            return out


async def test_nothing_pipelined_behind_the_421_of_max_errors_runs(relay_factory, tls_files,
                                                                  sink_factory, provision):
    relay = await three_listeners(relay_factory, tls_files, limits={"max_errors": 3})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    c.write(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n" + f"MAIL FROM:<{SENDER}>\r\n"
            "RCPT TO:<a@example.net>\r\nDATA\r\n".encode() + simple_message() + b".\r\n")
    # aiosmtpd's "500 Error: command not recognized" with its RFC 2034 code.
    assert await _until_closed(c) == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert sink.transactions == 0
    await c.close()


async def test_nothing_pipelined_behind_an_auth_lockout_421_runs(relay_factory, tls_files,
                                                                sink_factory, provision):
    relay = await three_listeners(relay_factory, tls_files, auth_failures={"max": 2})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    await c.ehlo()
    wrong = b"AUTH PLAIN " + plain_blob(tenant.user, "wrong") + b"\r\n"
    right = b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password) + b"\r\n"
    c.write(b"NOOP\r\n" + wrong * 2 + right + f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"NOOP\r\nQUIT\r\n")
    # SPEC 3.11: locked out, even the right password gets the 421, then nothing.
    assert await _until_closed(c) == ["250 2.0.0", "535 5.7.8", "535 5.7.8", "421 4.7.0"]
    await c.close()


async def test_nothing_pipelined_behind_a_drain_421_runs(relay_factory, tls_files,
                                                        sink_factory, provision):
    """SPEC 3.12: a session in a transaction when the drain starts gets 421
    at its next MAIL (after an RSET) or after its DATA reply. Commands it
    pipelined behind either 421 never run: the one behind MAIL's used to
    (a NOOP got "250 OK" after the 421)."""
    relay = await three_listeners(relay_factory, tls_files, drain_timeout=30)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    at_mail, at_data = await authed(relay, tenant), await authed(relay, tenant)
    assert (await at_mail.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    at_data.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n".encode())
    assert _codes(await _replies(at_data, 3)) == ["250 2.1.0", "250 2.1.5", "354"]
    drain = asyncio.ensure_future(relay.drain())
    await wait_for(lambda: relay.draining)
    at_mail.write(f"RSET\r\nMAIL FROM:<{SENDER}>\r\nNOOP\r\nRSET\r\n".encode())
    assert await _until_closed(at_mail) == ["250 2.0.0", "421 4.3.2"]
    at_data.write(simple_message() + f".\r\nRSET\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert await _until_closed(at_data) == ["250 2.0.0", "421 4.3.2"]
    await asyncio.wait_for(drain, 15)
    assert len(sink.messages) == 1
    for c in (at_mail, at_data):
        await c.close()


async def test_every_reply_carries_an_enhanced_status_code(relay_factory, tls_files,
                                                          sink_factory, provision):
    """RFC 2034 4: with ENHANCEDSTATUSCODES offered, every 2xx, 4xx and 5xx
    reply but the greeting and HELO's/EHLO's starts with a code of its
    class, aiosmtpd's own replies included (they had none: "250 OK",
    "503 Error: need MAIL command", "501 Syntax: HELO hostname"...)."""
    relay = await three_listeners(relay_factory, tls_files, limits={"max_errors": 100})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    assert "ENHANCEDSTATUSCODES" in (await c.ehlo()).lines
    before_auth = ["NOOP", "HELP", "FOO", "STARTTLS", "HELO", "EHLO", "RSET x", "NOOP \x1b",
                   f"MAIL FROM:<{SENDER}>"]
    after_auth = ["HELP", "HELP MAIL", "HELP BOGUS", "VRFY someone", "VRFY", "EXPN list",
                  "RCPT TO:<a@example.net>", "DATA", f"MAIL FROM:<{SENDER}> BODY=9BIT",
                  f"MAIL FROM:<{SENDER}>", f"MAIL FROM:<{SENDER}>", "QUIT x", "AUTH PLAIN",
                  "QUIT"]
    c.write("".join(f"{cmd}\r\n" for cmd in before_auth).encode())
    replies = await _replies(c, len(before_auth))
    await c.login(tenant.user, tenant.password)
    c.write("".join(f"{cmd}\r\n" for cmd in after_auth).encode())
    replies += await _replies(c, len(after_auth))
    for cmd, r in zip(before_auth + after_auth, replies):
        assert r.code // 100 in (2, 4, 5), (cmd, str(r))
        assert r.enhanced[:1] == str(r.code)[0], (cmd, str(r))
    await c.close()


async def test_help_lists_every_command_relayd_answers(relay_factory, tls_files, provision):
    """HELP is answered (not offered in EHLO, see ehlo.py), in one line, and
    lists DATA and AUTH too: relayd's overrides of them had lost the
    @syntax mark aiosmtpd's HELP lists commands by."""
    relay = await three_listeners(relay_factory, tls_files)
    tenant = await provision(relay)
    c = await authed(relay, tenant)
    r = await c.cmd("HELP")
    assert (r.code, r.enhanced, len(r.lines)) == (250, "2.0.0", 1), r
    listed = r.text.split(":", 1)[1].split()
    assert {"AUTH", "DATA", "EHLO", "HELO", "MAIL", "NOOP", "QUIT", "RCPT", "RSET"} <= set(listed)
    assert "STARTTLS" not in listed                # not on a plain listener
    await c.close()


async def test_smtplib_sees_the_extensions_and_sends_8bit(relay_factory, tls_files,
                                                         sink_factory, provision):
    """Python's smtplib decides from has_extn (it does not pipeline): it
    finds every keyword, and an 8-bit message sent with BODY=8BITMIME is
    accepted and relayed intact (the parameter's relaying is SPEC 3.15's)."""
    relay = await three_listeners(relay_factory, tls_files)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    body = simple_message(body="Grüße, 日本語\r\n")        # UTF-8 bytes in the body
    assert not body.isascii()

    def send() -> tuple[dict[str, bool], Any]:
        with smtplib.SMTP("127.0.0.1", relay.smtp_ports[PLAIN], local_hostname="client.test",
                          timeout=15) as s:
            s.ehlo()
            seen = {k: s.has_extn(k) for k in ("pipelining", "size", "auth",
                                                "enhancedstatuscodes", "8bitmime",
                                                "dsn", "smtputf8", "help")}
            s.login(tenant.user, tenant.password)
            try:
                return seen, s.sendmail(SENDER, ["to@example.net"], body,
                                        mail_options=["BODY=8BITMIME"])
            except smtplib.SMTPException as refusal:
                return seen, refusal

    seen, refused = await asyncio.to_thread(send)
    assert seen == {"pipelining": True, "size": True, "auth": True,
                    "enhancedstatuscodes": True, "8bitmime": True, "dsn": True,
                    "smtputf8": True, "help": False}
    assert refused == {}
    assert len(sink.messages) == 1 and sink.messages[0].data.endswith(body)


# ------------------------------------------------------------------ sans-IO parts
# (async only because the module's pytestmark runs every test on both loops)

async def test_ehlo_reply_from_aiosmtpds_list():
    """ehlo.reply keeps aiosmtpd's greeting and its STARTTLS/AUTH verdicts,
    nothing else: its SMTPUTF8 (enable_SMTPUTF8), 8BITMIME, HELP lines and
    its AUTH mechanisms are replaced by relayd's list."""
    from relayd import ehlo
    offered = ["250-relay.test", "250-8BITMIME", "250-SMTPUTF8", "250-STARTTLS",
               "250-AUTH LOGIN PLAIN XOAUTH2", "250 HELP"]
    assert ehlo.reply(offered, 10) == [
        "250-relay.test", "250-PIPELINING", "250-SIZE 10", "250-STARTTLS",
        "250-AUTH PLAIN LOGIN", "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN",
        "250 SMTPUTF8"]
    assert ehlo.reply(["250-relay.test", "250 HELP"], 10)[1:4] == [
        "250-PIPELINING", "250-SIZE 10", "250-ENHANCEDSTATUSCODES"]


async def test_reply_buffer_one_write_clean_text_enhanced_codes():
    from relayd.replywire import ReplyBuffer
    buf = ReplyBuffer("relay.test")
    # A multi-line reply comes back whole on its last line, HELO/EHLO's bare.
    assert buf.add("250-relay.test") is None and buf.add("250-PIPELINING") is None
    assert buf.add("250 SMTPUTF8") == b"250-relay.test\r\n250-PIPELINING\r\n250 SMTPUTF8"
    assert buf.add("220 relay.test ESMTP relayd") == b"220 relay.test ESMTP relayd"
    # Two replies are never merged: one left without its last line is dropped.
    assert buf.add("250-relay.test") is None
    assert buf.add("451 4.3.0 Internal error") == b"451 4.3.0 Internal error"
    # aiosmtpd's lines get their RFC 3463 code; relayd's keep theirs; 3xx none.
    assert buf.add("250 OK") == b"250 2.0.0 OK"
    assert buf.add("503 Error: need MAIL command") == b"503 5.5.1 Error: need MAIL command"
    assert buf.add("599 odd") == b"599 5.0.0 odd"
    assert buf.add("250 2.1.0 Sender ok") == b"250 2.1.0 Sender ok"
    assert buf.add(b"334 VXNlcm5hbWU6") == b"334 VXNlcm5hbWU6"
    assert buf.add("354 End data with <CR><LF>.<CR><LF>") == b"354 End data with <CR><LF>.<CR><LF>"
    # Printable US-ASCII only (RFC 5321 4.2), whatever aiosmtpd echoes.
    assert buf.add('500 Error: command "N\x00\x1bÖ" not recognized') == (
        b'500 5.5.2 Error: command "N???" not recognized')
    assert buf.add(b"451 4.4.1 upstream said \xff") == b"451 4.4.1 upstream said ?"
