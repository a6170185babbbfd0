"""SPEC 3.18: what the client reads after DATA when an upstream cannot be
reached, is no SMTP server, or is a system SMTP, in plain words; the
mail-log line keeps the technical detail. Before SPEC 3.18 relayd quoted
aiosmtplib's words ("SMTPConnectError: ... [Errno 111]", "-1 Malformed SMTP
response line: SSH-2.0...") to the client. Against relayd in-process and
loopback servers that misbehave on purpose.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import simple_message
from helpers_smtp import Reply, authed, mail_lines
from helpers_upstream import MAIL_FROM, RCPT_TO, transaction


@pytest.fixture
async def servers():
    """servers(handler) -> port of a loopback TCP server running ``handler``."""
    started: list[asyncio.AbstractServer] = []

    async def start(handler: Any) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        started.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for s in started:
        s.close()


def banner(data: bytes) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()
    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()                      # never greets


async def hangs_up_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 x.test ESMTP\r\n")
    while line := await reader.readline():
        if line[:4].upper() == b"EHLO":
            writer.write(b"250 x.test\r\n")
        else:
            writer.close()
            return


FORBIDDEN = ["Error", "Errno", "Exception", "Malformed", "-1 ", "127.0.0.1", "SSH"]


async def failure_case(kind: str, closed_port: int, sink_factory: Any, servers: Any,
                       upstream: Any) -> tuple[dict[str, Any], str, str, int]:
    """(upstream record fields, the client's plain words, a piece of the
    log's detail, the port the client must never see) for one kind."""
    if kind == "refused":
        return {"port": closed_port}, "connection refused", "ConnectionRefusedError", closed_port
    if kind == "tls-untrusted":
        sink = await sink_factory(tls="implicit")          # a CA relayd does not trust
        return ({"port": sink.port, "ssltls": True, "verify_tls": True},
                "TLS certificate not trusted", "SSLCertVerificationError", sink.port)
    if kind == "timeout":
        port = await servers(silent)
        return {"port": port}, "timed out after 1 s", "SMTPConnectTimeoutError", port
    if kind == "not-smtp":
        port = await servers(banner(b"SSH-2.0-OpenSSH_9.2\r\n"))
        return {"port": port}, "not an SMTP server", "Malformed SMTP response line", port
    if kind == "lost":
        port = await servers(hangs_up_at_mail)
        return {"port": port}, "connection lost", "SMTPServerDisconnected", port
    raise AssertionError(kind)


def assert_plain(r: Reply, words: str, port: int) -> None:
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert f"Delivery failed temporarily: {words}" in r.text, r
    for bad in [*FORBIDDEN, str(port)]:
        assert bad not in r.text, (bad, r)


@pytest.mark.parametrize("kind", ["refused", "tls-untrusted", "timeout", "not-smtp", "lost"])
async def test_failure_texts_in_plain_words(relay_factory, provision, sink_factory, servers,
                                            upstream, closed_port, caplog, kind):
    relay = await relay_factory(timeouts={"connect": 1})
    fields, words, detail, port = await failure_case(kind, closed_port, sink_factory,
                                                     servers, upstream)
    tenant = await provision(relay, upstreams=[{"host": "127.0.0.1", **fields}])
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert_plain(r, words, port)
    # The mail log keeps what happened technically, for the operator.
    line = mail_lines(caplog.records)[-1]
    assert line["result"] == "deferred" and detail in line["reply"], line
    await c.close()


async def test_system_smtp_failures_never_show_its_address(relay_factory, provision,
                                                           upstream, closed_port, caplog):
    """A system SMTP refused, then one whose own 451 names its host and port:
    the client reads neither (SPEC 3.18); the log has both."""
    talkative = await upstream([], mail_reply=b"451 4.3.0 127.0.0.1:%d busy, try later\r\n")
    talkative.mail_reply = talkative.mail_reply % talkative.port
    relay = await relay_factory(system_smtps=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        {"host": "127.0.0.1", "port": talkative.port, "priority": 1}])
    tenant = await provision(relay, plan="paid", strategy="priority")
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert r.text.endswith("451 4.3.0 [system SMTP] busy, try later"), r
    for bad in [*FORBIDDEN, str(closed_port), str(talkative.port)]:
        assert bad not in r.text, (bad, r)
    line = mail_lines(caplog.records)[-1]
    assert line["upstream"] == "system:1" and f"127.0.0.1:{talkative.port}" in line["reply"]
    await c.close()


async def test_system_smtp_refused_in_plain_words(relay_factory, provision, closed_port,
                                                  caplog):
    relay = await relay_factory(system_smtps=[{"host": "127.0.0.1", "port": closed_port}])
    tenant = await provision(relay, plan="paid")
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert_plain(r, "connection refused", closed_port)
    assert "ConnectionRefusedError" in mail_lines(caplog.records)[-1]["reply"]
    await c.close()
