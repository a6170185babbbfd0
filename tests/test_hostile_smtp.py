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

test_smtp_replies.py already covers every SPEC-3 reply code and the basic
smuggling (the seven classic fake end markers in one write), bare-LF DATA,
NUL/8-bit body, HTTP GET and TLS-prefix cases; the table holds new cases only
(the classic markers appear here cut across two reads, and in new variants). The cases that need more than one connection, a
memory measurement or a paced client are the separate tests at the end.
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
from helpers_smtp import (SMUGGLED, ConnectionClosed, RawSMTP, Reply, authed, b64, normalised,
                          open_data, plain_blob, wait_for, without_trace)

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


TEN_THOUSAND = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(10_000))
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
    # test_smtp_replies.py::test_only_crlf_dot_crlf_ends_data sends the seven
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


def printable(reply: Reply) -> bool:
    return all(text.isascii() and text.isprintable() for text in reply.lines if text)


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


async def rest(c: RawSMTP) -> bytes:
    """Everything relayd still sends until it closes the connection."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(c.reader.read(65536), 15):
            out += chunk
    except ConnectionError:
        pass
    return out


async def still_answers(relay: Any) -> None:
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner is not None and c.banner.code == 220, c.banner
    await c.ehlo()
    assert (await c.cmd("QUIT")).code == 221
    await c.close()


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


# ---------------------------------------------------------------- beyond the table

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
