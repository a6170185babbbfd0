"""Hostile SMTP input (issue 5, STYLE 12): what the internet sends to 587/465.

``HOSTILE`` is a table of byte sequences, each sent raw at a given stage of a
session against a real relayd with a recording upstream (sink) on loopback.
For every case the runner asserts

* the reply codes (and, where given, enhanced codes) of the key step, in order,
  and that every reply line is printable US-ASCII (RFC 5321 4.2: nothing of the
  hostile input is echoed raw);
* how the session ends: still usable (NOOP 250, QUIT 221), closed by relayd
  with nothing after the expected replies, or dropped by the client;
* that no quota unit stays reserved, that the ledger counts exactly what the
  upstream received, and what the upstream received: nothing, or exactly one
  message with the exact bytes, sender and recipient count of the case;
* that relayd still answers a fresh EHLO on a new connection.

test_smtp_replies.py and test_smtp_data.py already cover every SPEC-3 reply
code and the basic smuggling (the seven classic fake end markers in one
write), bare-LF DATA, NUL/8-bit body, HTTP GET and TLS-prefix cases; the
table holds new cases only (the classic markers appear here cut across two
reads, and in new variants). The cases that need more than one connection, a memory
measurement or a paced client are in test_hostile_limits.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from conftest import simple_message, sink_upstream
from helpers_records import sent_total
from helpers_smtp import (
    TEN_THOUSAND, SMUGGLED, RawSMTP, Reply, b64, normalised, plain_blob, printable, rest,
    still_answers, wait_for, without_trace)

SENDER = "app@example.com"
RCPT = "to@example.net"
MSG = simple_message()
ENVELOPE = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode()

# Placeholders filled in with the tenant's credentials when a case runs.
PLAIN = b"@PLAIN@"          # base64 of \0user\0password
USER64 = b"@USER64@"        # base64 of the user name


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]          # a TLS handshake record
    return hello


HELLO = client_hello()


def line(n: int, prefix: bytes = b"NOOP ") -> bytes:
    """A command line of exactly ``n`` bytes before its CRLF."""
    return prefix + b"x" * (n - len(prefix)) + b"\r\n"


def body_with(fake_end: bytes, at_start: bool = False) -> bytes:
    """A DATA body that hides an SMTP transaction behind a fake end marker."""
    head = b"" if at_start else MSG + b"first part"
    return head + fake_end + SMUGGLED + b"last line\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    stage: str                   # banner | ehlo | auth | mail | rcpt | data: reached first
    send: bytes | tuple[bytes, ...]   # one write, or separate writes (placeholders filled in)
    expect: tuple[str, ...]      # one pattern per reply: "250", "5xx", "553 5.1.7"
    end: str = "open"            # open | closed (by relayd) | abort (RST) | fin (client close)
    upstream: bytes | None = None   # exact data of the one message upstream, or None
    rcpts: int = 1               # recipients of that message
    refused: bool = False        # upstream None: relayd tried once and the upstream refused
    config: dict[str, Any] = field(default_factory=dict)


def data_case(id: str, data: bytes, expect: tuple[str, ...] = ("250",), **kw: Any) -> Case:
    """After 354: ``data`` and the end marker; by default relayed once, as
    aiosmtplib puts it on the wire (line endings normalised, dot-stuffed)."""
    kw.setdefault("upstream", normalised(data))
    return Case(id, "data", data + b".\r\n", expect, **kw)


def smuggle_case(id: str, fake_end: bytes, at_start: bool = False, split: int = 0) -> Case:
    """The fake marker is message content: exactly one message, intact; the
    hidden MAIL/RCPT/DATA never run (one 250 only, then NOOP answers 250).
    ``split``: send the body in two writes, cut after that many bytes of the
    fake marker, so that relayd's marker search spans two reads."""
    case = data_case(id, body_with(fake_end, at_start))
    if split:
        assert isinstance(case.send, bytes)
        cut = case.send.index(fake_end) + split
        case = replace(case, send=(case.send[:cut], case.send[cut:]))
    return case


IDLE = {"timeouts": {"session": 0.5}}


HOSTILE: list[Case] = [
    # ---- overlong command lines (aiosmtpd: 512 bytes per command, 1001 per line)
    Case("cmd-512-bytes-is-still-a-command", "ehlo", line(512), ("250",)),
    Case("cmd-513-bytes", "ehlo", line(513), ("500",)),
    Case("cmd-1000-bytes", "ehlo", line(1000), ("500",)),
    Case("cmd-1001-bytes", "ehlo", line(1001), ("500",)),
    Case("cmd-100000-bytes-then-noop", "ehlo", line(100_000) + b"NOOP\r\n", ("500", "250")),
    Case("cmd-100000-bytes-no-crlf-idle", "ehlo", b"x" * 100_000, ("421 4.4.2",), "closed",
         config=IDLE),
    Case("cmd-100000-bytes-no-crlf-then-hangup", "ehlo", b"x" * 100_000, (), "abort"),
    Case("mail-600-byte-address", "auth", b"MAIL FROM:<" + b"a" * 600 + b"@example.com>\r\n",
         ("500",)),
    # ---- overlong lines inside DATA: relayed as they are; this upstream (aiosmtpd)
    # refuses lines over 1000 bytes, and its permanent refusal is passed on.
    data_case("data-998-byte-line", MSG + b"y" * 998 + b"\r\n"),
    data_case("data-5000-byte-line", MSG + b"y" * 5000 + b"\r\n", ("554",), upstream=None,
              refused=True),
    data_case("data-200000-byte-line", MSG + b"z" * 200_000 + b"\r\n", ("554",),
              upstream=None, refused=True),
    # ---- NUL, control and 8-bit bytes in commands and addresses
    Case("nul-in-command", "ehlo", b"NO\x00OP\r\n", ("500",)),
    Case("escape-sequence-command", "ehlo", b"\x1b[2J\x1b[31mRSET\r\n", ("500",)),
    Case("8bit-command-name", "ehlo", "NÖOP\r\n".encode(), ("500",)),
    Case("8bit-ehlo-argument", "banner", b"EHLO \xff\xfe\r\n", ("500",)),
    # UTF-8 in an address needs MAIL's SMTPUTF8 (RFC 6531 3.5; test_esmtp_params.py);
    # bytes that are not UTF-8 stay a 500, as in every other command.
    Case("8bit-mail-address", "auth", "MAIL FROM:<jörg@example.com>\r\n".encode(),
         ("553 5.6.7",)),
    Case("latin1-rcpt-address", "mail", b"RCPT TO:<\xe9@example.net>\r\n", ("500",)),
    Case("nul-in-mail-domain", "auth", b"MAIL FROM:<app@exam\x00ple.com>\r\n", ("553",)),
    Case("nul-in-rcpt-domain", "mail", b"RCPT TO:<to@example.net\x00.evil.test>\r\n",
         ("553",)),
    Case("nul-after-mail-address", "auth",
         b"MAIL FROM:<app@example.com>\x00RCPT TO:<x@evil.test>\r\n", ("501",)),
    Case("del-in-rcpt-address", "mail", b"RCPT TO:<to\x7f@example.net>\r\n", ("553",)),
    Case("nul-in-ehlo-name", "banner", b"EHLO client\x00.test\r\n", ("250",)),
    # aiosmtpd quotes an unparsable VRFY argument in its 502: not raw.
    Case("vrfy-echo-of-escape-bytes", "auth", b"VRFY @\x1b[2J\x07\r\n", ("502",)),
    # ---- AUTH: bad base64, overlong and empty answers, cancel, replay, unknown
    Case("auth-plain-initial-bad-padding", "ehlo", b"AUTH PLAIN AHVzZXI\r\n", ("501 5.5.2",)),
    Case("auth-plain-challenge-bad-base64", "ehlo", b"AUTH PLAIN\r\n%%%\r\n",
         ("334", "501 5.5.2")),
    Case("auth-login-initial-bad-base64", "ehlo", b"AUTH LOGIN @@@\r\n", ("501 5.5.2",)),
    Case("auth-login-challenge-bad-base64-user", "ehlo", b"AUTH LOGIN\r\n!!\r\n",
         ("334", "501 5.5.2")),
    Case("auth-login-challenge-bad-base64-password", "ehlo",
         b"AUTH LOGIN " + USER64 + b"\r\n!!\r\n", ("334", "501 5.5.2")),
    Case("auth-8bit-initial-response", "ehlo", b"AUTH PLAIN \xff\xfe\r\n", ("500",)),
    Case("auth-plain-initial-700-bytes", "ehlo", b"AUTH PLAIN " + b"A" * 700 + b"\r\n",
         ("500",)),
    Case("auth-login-initial-700-bytes", "ehlo", b"AUTH LOGIN " + b"A" * 700 + b"\r\n",
         ("500",)),
    Case("auth-login-user-challenge-2000-bytes", "ehlo",
         b"AUTH LOGIN\r\n" + b"A" * 2000 + b"\r\n", ("334", "500 5.5.6")),
    Case("auth-plain-challenge-3000-bytes-then-noop", "ehlo",
         b"AUTH PLAIN\r\n" + b"A" * 3000 + b"\r\nNOOP\r\n", ("334", "500 5.5.6", "250")),
    Case("auth-plain-challenge-100000-bytes-then-noop", "ehlo",
         b"AUTH PLAIN\r\n" + b"QUFB" * 25_000 + b"\r\nNOOP\r\n", ("334", "500 5.5.6", "250")),
    Case("auth-login-password-5000-bytes-then-right-auth", "ehlo",
         b"AUTH LOGIN " + USER64 + b"\r\n" + b"A" * 5000 + b"\r\nAUTH PLAIN " + PLAIN + b"\r\n",
         ("334", "500 5.5.6", "235")),
    Case("auth-plain-challenge-no-crlf-idle", "ehlo", b"AUTH PLAIN\r\n" + b"A" * 50_000,
         ("334", "421 4.4.2"), "closed", config=IDLE),
    Case("auth-plain-equals-sign", "ehlo", b"AUTH PLAIN =\r\n", ("501",)),
    Case("auth-plain-empty-answer", "ehlo", b"AUTH PLAIN\r\n\r\n", ("334", "501 5.5.2")),
    Case("auth-login-empty-answers", "ehlo", b"AUTH LOGIN\r\n\r\n\r\n",
         ("334", "334", "535 5.7.8")),
    Case("auth-plain-extra-nul", "ehlo",
         b"AUTH PLAIN " + base64.b64encode(b"\0u\0p\0extra") + b"\r\n", ("501 5.5.2",)),
    Case("auth-plain-invalid-utf8", "ehlo",
         b"AUTH PLAIN " + base64.b64encode(b"\0\xff\xfe\0\xc3") + b"\r\n", ("535 5.7.8",)),
    Case("auth-plain-cancel-initial", "ehlo", b"AUTH PLAIN *\r\n", ("501",)),
    Case("auth-plain-cancel-challenge", "ehlo", b"AUTH PLAIN\r\n*\r\n", ("334", "501 5.7.0")),
    Case("auth-login-cancel-user", "ehlo", b"AUTH LOGIN\r\n*\r\n", ("334", "501 5.7.0")),
    Case("auth-login-cancel-password-then-right-auth", "ehlo",
         b"AUTH LOGIN " + USER64 + b"\r\n*\r\nMAIL FROM:<app@example.com>\r\n"
         b"AUTH PLAIN " + PLAIN + b"\r\n",
         ("334", "501 5.7.0", "530 5.7.0", "235 2.7.0")),
    Case("auth-replay-plain-after-success", "auth", b"AUTH PLAIN " + PLAIN + b"\r\n",
         ("503 5.5.1",)),
    Case("auth-replay-login-after-success", "auth", b"AUTH LOGIN\r\n", ("503 5.5.1",)),
    Case("auth-unknown-mechanism", "ehlo", b"AUTH CRAM-MD5\r\n", ("504 5.5.4",)),
    Case("auth-xoauth2-initial-response", "ehlo",
         b"AUTH XOAUTH2 " + b64("user=x\x01auth=Bearer y\x01\x01") + b"\r\n", ("504 5.5.4",)),
    Case("auth-no-mechanism", "ehlo", b"AUTH\r\n", ("501",)),
    Case("auth-three-arguments", "ehlo", b"AUTH PLAIN a b\r\n", ("501",)),
    Case("auth-before-ehlo", "banner", b"AUTH PLAIN " + PLAIN + b"\r\n", ("503",)),
    Case("auth-after-helo", "banner", b"HELO client.test\r\nAUTH PLAIN " + PLAIN + b"\r\n",
         ("250", "500")),
    # ---- pipelining abuse
    Case("whole-session-in-one-write", "banner",
         b"EHLO client.test\r\nAUTH PLAIN " + PLAIN + b"\r\n" + ENVELOPE + b"DATA\r\n" + MSG
         + b".\r\nQUIT\r\n", ("250", "235", "250", "250", "354", "250", "221"), "closed",
         upstream=MSG),
    Case("commands-after-data-in-same-write", "rcpt",
         b"DATA\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n"
         b"QUIT\r\n.\r\nNOOP\r\n", ("354", "250", "250"),
         upstream=b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\nQUIT\r\n"),
    Case("mail-twice", "mail", b"MAIL FROM:<other@example.com>\r\n", ("503",)),
    Case("mail-twice-pipelined-first-wins", "auth",
         b"MAIL FROM:<app@example.com>\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<"
         + RCPT.encode() + b">\r\nDATA\r\n" + MSG + b".\r\n",
         ("250", "503", "250", "354", "250"), upstream=MSG),
    Case("two-transactions-in-one-write", "auth",
         ENVELOPE + b"DATA\r\n" + MSG + b".\r\n" + b"RSET\r\n" + b"MAIL FROM:<app@example.com>\r\n"
         b"QUIT\r\n", ("250", "250", "354", "250", "250", "250", "221"), "closed", upstream=MSG),
    # ---- commands out of order
    Case("rcpt-before-mail", "auth", b"RCPT TO:<to@example.net>\r\n", ("503",)),
    Case("data-before-rcpt", "mail", b"DATA\r\n", ("503 5.5.1",)),
    Case("data-before-mail", "auth", b"DATA\r\n", ("503 5.5.1",)),
    Case("mail-before-ehlo", "banner", b"MAIL FROM:<app@example.com>\r\n", ("503",)),
    Case("rcpt-after-rset", "rcpt", b"RSET\r\nRCPT TO:<to@example.net>\r\n", ("250", "503")),
    Case("data-after-refused-rcpt", "mail", b"RCPT TO:<bad\x00@example.net>\r\nDATA\r\n",
         ("553", "503")),
    Case("starttls-on-plain-listener", "ehlo", b"STARTTLS\r\n", ("454",)),
    # ---- bare CR and bare LF line endings in commands
    Case("bare-cr-never-splits-a-command", "ehlo", b"NOOP\rRSET\r\n", ("500",)),
    # "RSET<CR>DATA" is one unknown command; the body's header lines that
    # follow are unknown commands too, and the fifth ends the session.
    Case("bare-cr-hides-data", "rcpt", b"RSET\rDATA\r\n" + MSG + b".\r\n",
         ("500",) * 4 + ("502 5.5.1",), "closed"),
    Case("bare-lf-commands-accepted", "banner", b"EHLO client.test\nNOOP\n", ("250", "250")),
    Case("bare-lf-data-with-space", "rcpt", b"DATA \n" + MSG + b".\r\n", ("500 5.5.2",),
         "closed"),
    # ---- SMTP smuggling inside DATA: never a second message upstream
    # test_smtp_data.py::test_only_crlf_dot_crlf_ends_data sends the seven
    # classic fake markers in one write; here each is cut across two reads.
    smuggle_case("smuggle-lf-dot-lf-split", b"\n.\n", split=1),
    smuggle_case("smuggle-crlf-dot-cr-split", b"\r\n.\r", split=3),
    smuggle_case("smuggle-lf-dot-crlf-split", b"\n.\r\n", split=2),
    smuggle_case("smuggle-cr-dot-crlf-split", b"\r.\r\n", split=1),
    smuggle_case("smuggle-crlf-dot-lf-split", b"\r\n.\n", split=2),
    smuggle_case("smuggle-lone-cr-then-dot-crlf-split", b"\r.\r\n", split=1, at_start=True),
    smuggle_case("smuggle-crlf-dot-cr-crlf", b"\r\n.\r\r\n"),
    smuggle_case("smuggle-crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    smuggle_case("smuggle-crlf-space-dot-crlf", b"\r\n .\r\n"),
    smuggle_case("smuggle-lone-cr-dot-crlf-at-start", b"\r.\r\n", at_start=True),
    smuggle_case("smuggle-dot-lf-at-start", b".\n", at_start=True),
    smuggle_case("smuggle-lf-dot-crlf-at-start", b"\n.\r\n", at_start=True),
    # A real end marker at the very start is an empty message; what follows
    # are commands of the same client (its own next transaction).
    Case("dot-crlf-at-start-is-an-empty-message", "data", b".\r\nNOOP\r\n", ("250", "250"),
         upstream=b""),
    # ---- header/command injection through addresses
    # aiosmtpd's parser takes "<app@example.com" without its ">" (a clean
    # address all the same); the line after it is a separate, refused command.
    Case("crlf-splits-mail-address", "auth",
         b"MAIL FROM:<app@example.com\r\nRCPT TO:<victim@example.org>>\r\n", ("250", "501")),
    # A bare CR does not end the line, so the address is followed by junk
    # that is no ESMTP parameter: aiosmtpd's argument parser refuses the line
    # (501 syntax) before relayd's address check (553) ever sees an address.
    Case("cr-inside-mail-address", "auth",
         b"MAIL FROM:<app@example.com\rRCPT TO:<victim@example.org>>\r\n", ("501",)),
    Case("cr-bcc-inside-rcpt-address-then-send", "mail",
         b"RCPT TO:<to@example.net>\r\nRCPT TO:<to@example.net\rBcc: x@evil.test>\r\n"
         b"DATA\r\n" + MSG + b".\r\n", ("250", "501", "354", "250"), upstream=MSG),
    Case("lf-bcc-after-rcpt-then-send", "mail",
         b"RCPT TO:<to@example.net>\nBcc: x@evil.test\r\nDATA\r\n" + MSG + b".\r\n",
         ("250", "500", "354", "250"), upstream=MSG),
    Case("quoted-local-part-hides-rcpt", "auth",
         b'MAIL FROM:<"x> RCPT TO:<victim@example.org"@example.com>\r\n', ("553",)),
    Case("quoted-angle-in-rcpt", "mail", b'RCPT TO:<"a>b"@example.net>\r\n', ("553",)),
    Case("params-hidden-after-cr", "auth",
         b"MAIL FROM:<app@example.com> BODY=8BITMIME\rRCPT TO:<x@evil.test>\r\n", ("501",)),
    # ---- other protocols on the plain port
    Case("http-post-with-json-body", "banner",
         b"POST /admin/owners HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json\r\n"
         b"Content-Length: 16\r\n\r\n{\"plan\": \"paid\"}\r\n",
         ("500",) * 5 + ("502",), "closed"),
    Case("http-proxy-request", "banner",
         b"GET http://example.org/ HTTP/1.0\r\nUser-Agent: x\r\n\r\n", ("500", "500", "500")),
    Case("http-connect", "banner",
         b"CONNECT smtp.example.org:25 HTTP/1.1\r\nHost: smtp.example.org:25\r\n\r\n",
         ("500", "500", "500")),
    Case("tls-client-hello-as-one-line", "banner", HELLO.replace(b"\n", b"") + b"\r\n",
         ("500",)),
    Case("tls-client-hello-then-hangup", "banner", HELLO, (), "abort"),
    Case("proxy-protocol-header-is-not-trusted", "banner",
         b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n", ("500",)),
    # ---- abrupt disconnects at each stage (the reservation is released)
    Case("hangup-after-banner", "banner", b"", (), "abort"),
    Case("hangup-after-ehlo", "ehlo", b"", (), "fin"),
    Case("hangup-mid-auth-login", "ehlo", b"AUTH LOGIN\r\n", ("334",), "abort"),
    Case("hangup-mid-auth-plain", "ehlo", b"AUTH PLAIN\r\n", ("334",), "fin"),
    Case("hangup-after-mail", "mail", b"", (), "abort"),
    Case("hangup-after-rcpts", "mail", b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\n",
         ("250", "250"), "abort"),
    Case("hangup-mid-data", "data", MSG, (), "abort"),
    Case("fin-mid-data", "data", MSG, (), "fin"),
    Case("hangup-mid-data-after-fake-end", "data", MSG + b"\n.\n" + SMUGGLED, (), "abort"),
    # TCP hands relayd the whole message before the hangup, and relayd starts
    # the delivery in the step that finds the end marker, shielded from the
    # client (smtp.py): the message goes out once, as for a client that
    # merely never read its 250.
    Case("hangup-right-after-end-marker", "data", MSG + b".\r\n", (), "abort", upstream=MSG),
    # ---- limits
    Case("max-errors-then-421", "ehlo", b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n",
         ("500", "500", "500", "421 4.7.0"), "closed", config={"limits": {"max_errors": 3}}),
    Case("max-errors-counts-every-kind", "auth",
         b"RCPT TO:<x@example.net>\r\nDATA\r\nMAIL FROM:<a\x00@example.com>\r\n"
         b"AUTH PLAIN " + PLAIN + b"\r\n" + ENVELOPE,
         ("503", "503", "553", "503", "421 4.7.0"), "closed",
         config={"limits": {"max_errors": 4}}),
    Case("10000-rcpts-pipelined", "mail", TEN_THOUSAND + b"DATA\r\n" + MSG + b".\r\n",
         ("250",) * 5 + ("452 4.5.3",) * 9995 + ("354", "250"), upstream=MSG, rcpts=5,
         config={"limits": {"max_recipients": 5, "max_errors": 100_000}}),
    Case("oversize-then-pipelined-commands", "data",
         MSG + b"o" * 8000 + b"\r\n.\r\nMAIL FROM:<app@example.com>\r\nQUIT\r\n",
         ("552 5.3.4", "250", "221"), "closed", config={"limits": {"max_message_size": 5000}}),
    Case("oversize-hides-a-smuggled-transaction", "data",
         MSG + b"o" * 8000 + b"\r\n\n.\n" + SMUGGLED + b".\r\n", ("552 5.3.4",),
         config={"limits": {"max_message_size": 5000}}),
    # ---- idle timeout (timeouts.session), at each stage
    Case("idle-after-banner", "banner", b"", ("421 4.4.2",), "closed", config=IDLE),
    Case("idle-after-rcpt", "rcpt", b"", ("421 4.4.2",), "closed", config=IDLE),
    Case("idle-mid-data", "data", MSG, ("421 4.4.2",), "closed", config=IDLE),
]


# ---------------------------------------------------------------- the runner

def fill(data: bytes, tenant: Any) -> bytes:
    return (data.replace(PLAIN, plain_blob(tenant.user, tenant.password))
                .replace(USER64, b64(tenant.user)))


def matches(reply: Reply, pattern: str) -> bool:
    code, _, enhanced = pattern.partition(" ")
    return bool(re.fullmatch(code.replace("x", r"\d"), str(reply.code))) and (
        not enhanced or reply.enhanced == enhanced)


async def reach(c: RawSMTP, stage: str, tenant: Any) -> None:
    """Drive an ordinary session up to ``stage``."""
    steps = ["banner", "ehlo", "auth", "mail", "rcpt", "data"]
    for step in steps[1:steps.index(stage) + 1]:
        if step == "ehlo":
            await c.ehlo()
        elif step == "auth":
            await c.login(tenant.user, tenant.password)
        elif step == "mail":
            assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        elif step == "rcpt":
            assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
        elif step == "data":
            assert (await c.cmd("DATA")).code == 354


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
async def test_hostile_input(case: Case, relay_factory, sink_factory, provision, caplog):
    relay = await relay_factory(**case.config)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner is not None and c.banner.code == 220
    await reach(c, case.stage, tenant)

    if isinstance(case.send, tuple):
        for chunk in case.send:             # separate reads on relayd's side
            c.write(fill(chunk, tenant))
            await c.writer.drain()
            await asyncio.sleep(0.02)
    elif case.send:
        c.write(fill(case.send, tenant))    # replies are read while it is written
    for i, pattern in enumerate(case.expect):
        r = await c.reply()
        assert matches(r, pattern), f"reply {i}: {r} (expected {pattern})"
        assert printable(r), f"reply {i} is not printable ASCII: {r.lines!r}"

    if case.end == "open":
        assert (await c.cmd("NOOP")).code == 250
        assert (await c.cmd("QUIT")).code == 221
        assert await rest(c) == b""
    elif case.end == "closed":
        assert await rest(c) == b"", "nothing may follow the expected replies"
    elif case.end == "abort":
        c.writer.transport.abort()
    else:
        assert case.end == "fin"
        c.writer.close()
    await c.close()

    # The session is gone, and with it every reservation; a delivery the
    # client left behind has finished.
    await wait_for(lambda: not relay.sessions and not relay.inflight)
    assert relay.store.held(tenant.user) == 0
    got = sink.messages
    if case.upstream is None:
        assert got == [] and sink.transactions == int(case.refused), got
    else:
        assert len(got) == 1 and sink.transactions == 1, got
        assert without_trace(got[0].data) == case.upstream
        assert got[0].mail_from == SENDER
        assert len(got[0].rcpt_tos) == case.rcpts
    assert await sent_total(relay, tenant.user) == sum(len(m.rcpt_tos) for m in got)
    await still_answers(relay)
    # Hostile input is refused, never an internal error (451 4.3.0 + traceback).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
