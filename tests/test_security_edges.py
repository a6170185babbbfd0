"""Hardening at the edges (issue 5; SPEC 3.9, 3.13, 4.4): TLS 1.2 as the
floor on both sides, an admin socket fed garbage while mail flows, and no
exception text of relayd's reaching an SMTP client. The secrets, constant
time and file modes are in test_security.py."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import warnings
from typing import Any

import pytest

from admin_client import AdminClient
from conftest import simple_message, sink_upstream, smtp_client
from helpers_smtp import RawSMTP
from relayd.config import TLSFiles, server_tls_context
from relayd.upstream import client_tls_context

SENDER = "app@example.com"
RCPT = "to@example.net"


# ---------------------------------------------------------------- TLS floor

def test_tls_contexts_refuse_tls_1_0_and_1_1(tls_files):
    cert, key = tls_files
    assert server_tls_context(TLSFiles(cert=cert, key=key)).minimum_version >= \
        ssl.TLSVersion.TLSv1_2
    for verify in (True, False):
        assert client_tls_context(verify).minimum_version >= ssl.TLSVersion.TLSv1_2


def legacy_context(server: bool, tls_files: tuple[str, str]) -> ssl.SSLContext:
    """A context that speaks TLS 1.0-1.1 only (OpenSSL 3 needs SECLEVEL 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():              # deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if server:
        ctx.load_cert_chain(*tls_files)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10)
    except (ssl.SSLError, ConnectionError):
        return False
    writer.close()
    return True


async def test_tls_1_1_handshakes_fail_both_ways(relay_factory, tls_files, client_ssl):
    """A real TLS 1.1 client against relayd's implicit-TLS listener, and
    relayd's upstream client context against a TLS 1.1-only server. A control
    handshake between the two legacy ends first proves the local OpenSSL can
    speak TLS 1.1 at all; if it cannot, only the context settings are
    asserted (test_tls_contexts_refuse_tls_1_0_and_1_1) and this test skips."""
    try:
        legacy_server = legacy_context(True, tls_files)
        legacy_client = legacy_context(False, tls_files)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this OpenSSL cannot build TLS 1.1 contexts: {exc}")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=legacy_server)
    old_port = server.sockets[0].getsockname()[1]
    try:
        if not await handshake(old_port, legacy_client):
            pytest.skip("this OpenSSL refuses TLS 1.1 even between two TLS 1.1 ends")
        # relayd as the client of a TLS 1.1-only upstream: refused.
        assert not await handshake(old_port, client_tls_context(False))
    finally:
        server.close()
    cert, key = tls_files
    relay = await relay_factory(listen=[{"address": "127.0.0.1:0", "tls": "implicit"}],
                                tls={"cert": cert, "key": key})
    port = relay.smtp_ports[0]
    assert not await handshake(port, legacy_client)       # TLS 1.1 client: refused
    c = await RawSMTP.open(port, ssl_ctx=client_ssl)      # a modern client gets the banner
    assert c.banner is not None and c.banner.code == 220
    assert c.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    await c.close()


# ---------------------------------------------------------------- admin garbage

def garbage_payloads(rng: random.Random) -> list[bytes]:
    return [
        rng.randbytes(rng.randint(1, 4096)),
        b"POST /admin/owners HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pl",
        b"GET /admin/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * rng.randint(1, 9000),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
        b"POST /settings/addSmtp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffff\r\n" + rng.randbytes(512),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(100),
    ]


async def test_admin_socket_garbage_while_mail_flows(relay, sink_factory, provision, caplog):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    path = relay.config.admin.socket
    rng = random.Random(20261123)
    mail_done = asyncio.Event()
    sent_garbage = 0
    held: list[asyncio.StreamWriter] = []     # half requests left open during the burst

    async def garbage() -> None:
        nonlocal sent_garbage
        for i in range(400):                  # bounded in count...
            if mail_done.is_set() and i >= 50:
                break
            payload = rng.choice(garbage_payloads(rng))
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(payload)
                await writer.drain()
            except ConnectionError:
                continue                      # relayd may close first: that is fine
            sent_garbage += 1
            if i % 10 == 0 and len(held) < 20:
                held.append(writer)
            else:
                writer.close()
            await asyncio.sleep(0)

    async def mail(n: int) -> None:
        client = await smtp_client(relay, tenant)
        for i in range(5):
            await client.sendmail(SENDER, [RCPT], simple_message(subject=f"m{n}-{i}"))
        await client.quit()

    async def all_mail() -> None:
        try:
            await asyncio.gather(*(mail(n) for n in range(4)))
        finally:
            mail_done.set()

    async with asyncio.timeout(60):                 # ...and in time
        await asyncio.gather(garbage(), all_mail())
    assert sent_garbage >= 50
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages)
    assert subjects == sorted(f"m{n}-{i}".encode() for n in range(4) for i in range(5))
    async with AdminClient(path) as admin:
        r = await admin.request("GET", "/admin/status")
        assert r.status == 200 and r.json()["sessions"] == 0
        r = await admin.request("POST", "/admin/owners", json={"plan": "free"})
        assert r.status == 201
    for writer in held:
        writer.close()
    # Garbage is refused, never an internal error.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---------------------------------------------------------------- exception text

async def test_smtp_exception_text_never_reaches_the_client(relay, provision, monkeypatch,
                                                            caplog):
    """STYLE 5: an unexpected exception is answered 451 4.3.0 and logged with
    the session id; its text (paths, internals) stays in the log."""
    tenant = await provision(relay)
    detail = f"internal-detail-{secrets.token_urlsafe(18)}"     # found only if leaked

    def broken(*args: Any) -> Any:
        raise RuntimeError(f"{detail} at /var/lib/relayd/relayd.db")

    monkeypatch.setattr("relayd.delivery.route", broken)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    await c.login(tenant.user, tenant.password)
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (451, "4.3.0"), r
    assert detail not in r.text and "relayd.db" not in r.text and "RuntimeError" not in r.text
    assert (await c.cmd("NOOP")).code == 250            # the session goes on
    [session] = [s.session.id for s in relay.sessions]
    await c.close()
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"session={session}" in errors[0].getMessage()
    assert errors[0].exc_info is not None and detail in str(errors[0].exc_info[1])
