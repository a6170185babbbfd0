"""Small helpers for the SMTP-core tests: a raw SMTP client that shows every
byte and every reply line (aiosmtplib would normalise, pipeline-check and
dot-stuff for us, which is exactly what hostile-input tests must not do),
plus message builders (the smuggling payload among them) and log helpers.

Everything binds 127.0.0.1 only; ports come from the fixtures (port 0).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Generous per-read timeout: only reached when relayd fails to answer, which
# is a failure anyway; a passing test never waits for it.
READ_TIMEOUT = 15.0

# 10 000 pipelined RCPTs, each a different recipient.
TEN_THOUSAND = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(10_000))


@dataclass
class Reply:
    code: int
    lines: list[str]          # text after "NNN-" / "NNN "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        """The enhanced status code (RFC 3463) of the last line, or ''."""
        words = self.lines[-1].split() if self.lines else []
        return words[0] if words and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", words[0]) else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ConnectionClosed(Exception):
    pass


class RawSMTP:
    """A line-level SMTP client over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.banner: Reply | None = None

    @classmethod
    async def open(cls, port: int, *, ssl_ctx: ssl.SSLContext | None = None,
                   read_banner: bool = True) -> RawSMTP:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None)
        client = cls(reader, writer)
        if read_banner:
            client.banner = await client.reply()
        return client

    async def reply(self) -> Reply:
        """Read one (possibly multi-line) reply."""
        code, lines = None, []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)
            if not line:
                raise ConnectionClosed(f"connection closed after {lines!r}")
            assert line.endswith(b"\r\n"), f"reply line without CRLF: {line!r}"
            text = line[:-2].decode("utf-8", "replace")
            assert re.match(r"\d{3}[ -]", text) or re.fullmatch(r"\d{3}", text), text
            code = int(text[:3])
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(code, lines)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def cmd(self, line: str | bytes) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> Reply:
        r = await self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    async def login(self, user: str, password: str) -> Reply:
        r = await self.cmd(b"AUTH PLAIN " + plain_blob(user, password))
        assert r.code == 235, r
        return r

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        r = await self.cmd("STARTTLS")
        assert r.code == 220, r
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def send_message(self, sender: str, rcpts: list[str], data: bytes) -> Reply:
        """MAIL, RCPTs (each must be accepted), DATA; ``data`` is sent as is
        (the caller dot-stuffs) followed by the end marker."""
        r = await self.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 250, r
        for rcpt in rcpts:
            r = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r
        r = await self.cmd("DATA")
        assert r.code == 354, r
        self.writer.write(data + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (reads and drops
        anything still buffered)."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT)
        except (ConnectionError, ssl.SSLError):
            return True
        while data:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT)
            except (ConnectionError, ssl.SSLError):
                return True
        return True

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def plain_blob(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


async def authed(relay: Any, tenant: Any, *, port_index: int = 0) -> RawSMTP:
    client = await RawSMTP.open(relay.smtp_ports[port_index])
    assert client.banner is not None and client.banner.code == 220
    await client.ehlo()
    await client.login(tenant.user, tenant.password)
    return client


async def open_data(client: RawSMTP, sender: str = "app@example.com",
                    rcpt: str = "to@example.net") -> None:
    """MAIL, RCPT and DATA up to the 354: the client is now sending the body."""
    assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
    assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await client.cmd("DATA")).code == 354


def printable(reply: Reply) -> bool:
    """Every line of ``reply`` printable US-ASCII (RFC 5321 4.2: nothing raw echoed)."""
    return all(text.isascii() and text.isprintable() for text in reply.lines if text)


async def rest(c: RawSMTP) -> bytes:
    """Everything relayd still sends until it closes the connection."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(c.reader.read(65536), READ_TIMEOUT):
            out += chunk
    except ConnectionError:
        pass
    return out


async def still_answers(relay: Any) -> None:
    """relayd still greets, answers EHLO and QUIT on a new connection."""
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner is not None and c.banner.code == 220, c.banner
    await c.ehlo()
    assert (await c.cmd("QUIT")).code == 221
    await c.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (for effects of a disconnect, which
    no reply announces). Polls the event loop; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def upstream_by_port(relay: Any, idapp: str, port: int) -> Any:
    for u in await relay.store.list_upstreams(idapp):
        if u.port == port:
            return u
    raise AssertionError(f"no upstream on port {port}")


# ---------------------------------------------------------------- logs

_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    out = {}
    for key, value in _LOGFMT_PAIR.findall(line):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key] = value
    return out


def mail_lines(records: list[logging.LogRecord]) -> list[dict[str, str]]:
    """The per-message log lines, formatted exactly as relayd writes them and
    parsed back."""
    from relayd.maillog import LogfmtFormatter
    fmt = LogfmtFormatter()
    return [parse_logfmt(fmt.format(r)) for r in records
            if r.name == "relayd.mail" and getattr(r, "logfmt", {}).get("event") == "message"]


# ---------------------------------------------------------------- trace field

# One header field with its continuation lines (RFC 5322 2.2.3), CRLF only.
_FIELD = re.compile(rb"[!-9;-~]+:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n")
# relayd's Received: field (SPEC 3.16, relayd/trace.py), unfolded and with
# white space runs made single spaces.
_RELAYD_RECEIVED = re.compile(
    r"Received: from (?P<name>\S+)(?: \((?P<client>\[[^\]\s]*\])\))? "
    r"by (?P<by>\S+) \(relayd\) with (?P<proto>ESMTPS?A?) id (?P<id>\S+); (?P<date>.+)")


@dataclass
class Trace:
    raw: bytes                # the field as received, folding and CRLFs included
    name: str                 # after "from"
    client: str | None        # the "([...])" TCP-info, brackets kept
    by: str
    proto: str
    id: str                   # as written (a quoted-string keeps its quotes)
    date: str


def split_trace(data: bytes) -> tuple[Trace | None, bytes]:
    """(relayd's Received: field on top of ``data``, parsed; the rest), or
    (None, data) when the first field is not relayd's."""
    m = _FIELD.match(data)
    if m is None:
        return None, data
    text = " ".join(m.group().decode("ascii", "replace").split())
    r = _RELAYD_RECEIVED.fullmatch(text)
    if r is None:
        return None, data
    return Trace(m.group(), **r.groupdict()), data[m.end():]


def without_trace(data: bytes) -> bytes:
    """``data`` as an upstream got it, less relayd's one Received: field:
    asserts that the message starts with it, and that there is only one."""
    trace, rest = split_trace(data)
    assert trace is not None, f"no relayd Received: field on top: {data[:300]!r}"
    assert split_trace(rest)[0] is None, "two relayd Received: fields"
    return rest


# ---------------------------------------------------------------- messages

# An SMTP transaction hidden in a DATA body behind a fake end marker (SMTP
# smuggling): it must never reach an upstream as a second message.
SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nFrom: evil@attacker.test\r\n\r\nsmuggled\r\n")


def normalised(data: bytes) -> bytes:
    """Line endings as an upstream gets them: a lone CR or LF becomes CRLF
    (relayd does this; an upstream never sees a bare LF it could take for an
    end-of-data marker)."""
    return re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", data)


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency for a CRLF message."""
    assert data.endswith(b"\r\n")
    return re.sub(rb"(?m)^\.", b"..", data)


def rich_message(sender: str = "Alice Example <alice@other.test>",
                 attachment: bytes = bytes(range(256)) * 8,
                 extra_headers: bytes = b"") -> bytes:
    """multipart/mixed with 8-bit UTF-8 text, a base64 binary attachment and
    a folded header, CRLF line endings throughout."""
    att = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        b"Return-Path: <ignored@other.test>\r\n"
        b"From: " + sender.encode() + b"\r\n"
        b"To: Bob <bob@example.net>,\r\n"
        b"\tCarol <carol@example.net>\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject that is\r\n"
        b"  folded over two lines\r\n"
        + extra_headers +
        b"Message-ID: <rich.1@other.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"BOUNDARY\"\r\n"
        b"\r\n"
        b"This is a multi-part message in MIME format.\r\n"
        b"--BOUNDARY\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        + "Grüße, 日本語\r\nFrom: not a header, body text\r\n".encode() +
        b"--BOUNDARY\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"blob.bin\"\r\n"
        b"\r\n"
        + att +
        b"--BOUNDARY--\r\n"
    )
