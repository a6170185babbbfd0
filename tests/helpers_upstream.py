"""A scripted upstream for tests of what relayd relays: it advertises the
EHLO keywords a test chooses and keeps every command line as it came over
the wire (the ``upstream`` fixture of conftest.py starts them), with the
client side of one raw transaction."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from helpers_smtp import RawSMTP, Reply, dot_stuff

# The ESMTP tests' envelope, every extension relayd relays, 8-bit content and
# a UTF-8 recipient (SPEC 3.15).
SENDER = "app@example.com"
RCPT = "to@example.net"
ALL = ["8BITMIME", "SMTPUTF8", "DSN"]
EIGHT_BIT = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: hello\r\n\r\n"
             "Grüße, 日本語\r\n").encode()
UTF8_RCPT = "jörg@bücher.example"
MAIL_FROM = f"MAIL FROM:<{SENDER}>"
RCPT_TO = f"RCPT TO:<{RCPT}>"


@dataclass
class KeywordUpstream:
    """What a scripted upstream advertises and does, and what it saw:
    ``lines`` holds every command line (CRLF stripped) byte for byte."""

    keywords: list[str]
    greeting: bytes = b"220 kw.test ESMTP\r\n"
    mail_reply: bytes = b"250 2.1.0 ok\r\n"
    lines: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def commands(self, verb: bytes) -> list[bytes]:
        return [line for line in self.lines if line[:4].upper() == verb]


class KeywordProtocol(asyncio.Protocol):
    def __init__(self, up: KeywordUpstream):
        self.up = up
        self.buf = b""
        self.data: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.up.connections += 1
        transport.write(self.up.greeting)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.data is not None:
                if line == b".":
                    self.up.messages.append(self.data)
                    self.data = None
                    self.t.write(b"250 2.0.0 queued\r\n")
                else:
                    self.data += line + b"\r\n"
                continue
            self.up.lines.append(line)
            self.command(line[:4].upper())

    def command(self, verb: bytes) -> None:
        if verb == b"EHLO":
            lines = [b"kw.test", *(k.encode() for k in self.up.keywords)]
            self.t.write(b"".join(b"250-" + k + b"\r\n" for k in lines[:-1])
                         + b"250 " + lines[-1] + b"\r\n")
        elif verb == b"MAIL":
            self.t.write(self.up.mail_reply)
        elif verb == b"DATA":
            self.data = b""
            self.t.write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            self.t.write(b"221 bye\r\n")
            self.t.close()
        else:
            self.t.write(b"250 ok\r\n")


def route(*ups: KeywordUpstream) -> dict[str, Any]:
    """provision() arguments: the upstreams tried in the order given."""
    return {"plan": "paid", "strategy": "priority", "upstreams": [
        {"host": "127.0.0.1", "port": u.port, "priority": i} for i, u in enumerate(ups)]}


async def transaction(c: RawSMTP, mail: str, rcpts: list[str], data: bytes) -> Reply:
    """MAIL, RCPTs (each must be accepted) and DATA, raw command lines."""
    r = await c.cmd(mail.encode())
    assert r.code == 250, r
    for rcpt in rcpts:
        r = await c.cmd(rcpt.encode())
        assert r.code == 250, r
    assert (await c.cmd("DATA")).code == 354
    c.write(dot_stuff(data) + b".\r\n")
    await c.writer.drain()
    return await c.reply()
