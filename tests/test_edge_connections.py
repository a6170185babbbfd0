"""SPEC 9 "Connections", at the edges: a connection that ends at any moment
gives its admission slot back at once; pending TLS handshakes count against
the session limits and are dropped after ``timeouts.tls_handshake``; a failed
handshake is one info line; what a client sends after a 538 (its base64 user
name and password, read as commands) never reaches a log.

Every test runs on asyncio's loop and on uvloop, relayd's production loop
(conftest's loop factories). What used to break showed on uvloop only: it
delivers a new connection's EOF before aiosmtpd's command loop has taken its
first step, that loop was cancelled unstarted and nobody closed the
half-open connection, so each load-balancer check or port scan held a slot
for ``timeouts.session``: 50 of them locked an address out.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import base_config
from helpers_smtp import RawSMTP, authed, b64, parse_logfmt, plain_blob, wait_for
from relayd import maillog, metrics
from relayd.maillog import LogfmtFormatter
from relayd_proc import RelaydProcess

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

PLAIN, STARTTLS, IMPLICIT = 0, 1, 2      # listener indexes in tls_listeners()
# Bounds for what must happen "at once": far above the milliseconds it takes,
# far below timeouts.session (30 s in conftest) and the loops' 60 s TLS default.
PROMPT = 3.0


def tls_listeners(tls_files: tuple[str, str]) -> dict[str, Any]:
    cert, key = tls_files
    return {"listen": [{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False},
                       {"address": "127.0.0.1:0", "tls": "starttls"},
                       {"address": "127.0.0.1:0", "tls": "implicit"}],
            "tls": {"cert": cert, "key": key}}


def gauge() -> float:
    value = metrics.REGISTRY.get_sample_value("relayd_sessions_active")
    assert value is not None
    return value


def slots(relay: Any) -> tuple[int, dict[str, int], float]:
    """What a connection holds: relay.sessions, relay.per_ip, the gauge."""
    return len(relay.sessions), dict(relay.per_ip), gauge()


def plus_one(base: tuple[int, dict[str, int], float]) -> tuple[int, dict[str, int], float]:
    n, per_ip, g = base
    return n + 1, {**per_ip, "127.0.0.1": per_ip.get("127.0.0.1", 0) + 1}, g + 1


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client."""
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def tcp(port: int, local: str = "127.0.0.1") -> RawSMTP:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    return RawSMTP(reader, writer)


def hang_up(c: RawSMTP, how: str) -> None:
    """Close as a client does: FIN, or a reset (SO_LINGER 0, then close)."""
    if how == "rst":
        c.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.writer.transport.abort()
    else:
        c.writer.close()


async def closed_by_relay(c: RawSMTP) -> bool:
    """relayd closed the connection without a byte (EOF or a reset)."""
    try:
        return await asyncio.wait_for(c.reader.read(100), PROMPT) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- every stage

async def _after_banner(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    return await RawSMTP.open(relay.smtp_ports[PLAIN])


async def _mid_command(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    c.write(b"EHLO half-a-line")            # no CRLF
    return c


async def _after_ehlo(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    await c.ehlo()
    return c


async def _mid_auth(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await RawSMTP.open(relay.smtp_ports[PLAIN])
    await c.ehlo()
    assert (await c.cmd("AUTH LOGIN")).code == 334
    return c


async def _after_auth(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    return await authed(relay, tenant, port_index=PLAIN)


async def _after_mail(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await authed(relay, tenant, port_index=PLAIN)
    assert (await c.cmd("MAIL FROM:<app@example.com>")).code == 250
    return c


async def _after_rcpt(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await _after_mail(relay, tenant, ctx)
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    assert relay.store.held(tenant.user) == 1
    return c


async def _mid_data(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await _after_rcpt(relay, tenant, ctx)
    assert (await c.cmd("DATA")).code == 354
    c.write(b"Subject: cut short\r\n\r\nhalf a bo")
    await c.writer.drain()
    return c


async def _implicit_silent(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    return await tcp(relay.smtp_ports[IMPLICIT])


async def _implicit_half_hello(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await tcp(relay.smtp_ports[IMPLICIT])
    hello = client_hello(ctx)
    c.write(hello[: len(hello) // 2])
    await c.writer.drain()
    return c


async def _implicit_after_ehlo(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await RawSMTP.open(relay.smtp_ports[IMPLICIT], ssl_ctx=ctx)
    await c.ehlo()
    return c


async def _starttls_220(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await RawSMTP.open(relay.smtp_ports[STARTTLS])
    await c.ehlo()
    assert (await c.cmd("STARTTLS")).code == 220
    return c


async def _starttls_half_hello(relay: Any, tenant: Any, ctx: ssl.SSLContext) -> RawSMTP:
    c = await _starttls_220(relay, tenant, ctx)
    hello = client_hello(ctx)
    c.write(hello[: len(hello) // 2])
    await c.writer.drain()
    return c


Stage = Callable[[Any, Any, ssl.SSLContext], Awaitable[RawSMTP]]
STAGES: dict[str, Stage] = {
    "after-banner": _after_banner, "mid-command": _mid_command, "after-ehlo": _after_ehlo,
    "mid-auth": _mid_auth, "after-auth": _after_auth, "after-mail": _after_mail,
    "after-rcpt": _after_rcpt, "mid-data": _mid_data,
    "implicit-tls-silent": _implicit_silent, "implicit-tls-half-hello": _implicit_half_hello,
    "implicit-tls-after-ehlo": _implicit_after_ehlo,
    "starttls-220-silent": _starttls_220, "starttls-half-hello": _starttls_half_hello,
}


@pytest.fixture
async def edge(relay_factory, provision, tls_files, closed_port):
    relay = await relay_factory(**tls_listeners(tls_files))
    # An upstream that MAIL and RCPT can route to; nothing is ever delivered.
    tenant = await provision(relay, upstreams=[{"host": "127.0.0.1", "port": closed_port}])
    return relay, tenant


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("stage", ["before-banner", *STAGES])
async def test_connection_closed_at_any_stage_frees_its_slot(edge, client_ssl, stage, how):
    relay, tenant = edge
    base = slots(relay)
    if stage == "before-banner":            # a load-balancer TCP check, a port scan
        s = socket.create_connection(("127.0.0.1", relay.smtp_ports[PLAIN]))
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        # Accepts are in order: once a later connection has its banner,
        # relayd has accepted (and counted) this one.
        probe = await RawSMTP.open(relay.smtp_ports[PLAIN])
        hang_up(probe, how)
    else:
        c = await STAGES[stage](relay, tenant, client_ssl)
        # Counted while it is there -- a TLS handshake in progress included.
        await wait_for(lambda: slots(relay) == plus_one(base), PROMPT)
        hang_up(c, how)
    await wait_for(lambda: slots(relay) == base, PROMPT)
    assert relay.store.held(tenant.user) == 0


async def test_connect_and_close_flood_does_not_lock_the_address_out(relay_factory, provision,
                                                                     closed_port):
    relay = await relay_factory(limits={"max_sessions_per_ip": 5})
    tenant = await provision(relay, upstreams=[{"host": "127.0.0.1", "port": closed_port}])
    base = slots(relay)
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", relay.smtp_ports[0]))
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        await asyncio.sleep(0)               # let relayd accept (the backlog is finite)
    await wait_for(lambda: slots(relay) == base, PROMPT)
    c = await authed(relay, tenant)          # 220, not 421 Too many connections
    assert (await c.cmd("MAIL FROM:<app@example.com>")).code == 250
    assert (await c.cmd("QUIT")).code == 221
    await c.close()


# ---------------------------------------------------------------- TLS handshakes

@pytest.mark.parametrize("limit", ["max_sessions_per_ip", "max_sessions"])
async def test_pending_tls_handshakes_count_against_the_session_limits(
        relay_factory, tls_files, client_ssl, limit):
    limits = {"max_sessions_per_ip": 100, "max_sessions": 100, limit: 3}
    relay = await relay_factory(limits=limits, **tls_listeners(tls_files))
    port = relay.smtp_ports[IMPLICIT]
    silent = [await tcp(port) for _ in range(3)]          # no ClientHello, ever
    await wait_for(lambda: slots(relay)[:2] == (3, {"127.0.0.1": 3}), PROMPT)
    # Over the limit, before any TLS: nothing can be said, the connection is closed.
    fourth = await tcp(port)
    assert await closed_by_relay(fourth)
    await fourth.close()
    await wait_for(lambda: len(relay.sessions) == 3, PROMPT)
    from_elsewhere = asyncio.open_connection(
        "127.0.0.1", port, local_addr=("127.0.0.2", 0), ssl=client_ssl,
        server_hostname="localhost")
    if limit == "max_sessions_per_ip":       # another address still gets in
        other = RawSMTP(*await from_elsewhere)
        assert (await other.reply()).code == 220
        await other.ehlo()
        await other.close()
    else:                                    # the relay-wide limit holds for everyone
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await from_elsewhere
    for c in silent:
        hang_up(c, "fin")
    await wait_for(lambda: not relay.sessions and not relay.per_ip, PROMPT)
    again = await RawSMTP.open(port, ssl_ctx=client_ssl)  # the freed slots are usable
    assert again.banner is not None and again.banner.code == 220
    await again.close()


def tls_events(records: list[logging.LogRecord]) -> list[dict[str, str]]:
    fmt = LogfmtFormatter()
    return [parse_logfmt(fmt.format(r)) for r in records
            if getattr(r, "logfmt", {}).get("event") == "tls_failed"]


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_silent_tls_handshake_is_dropped_after_timeouts_tls_handshake(
        relay_factory, tls_files, caplog, mode):
    relay = await relay_factory(timeouts={"tls_handshake": 1}, **tls_listeners(tls_files))
    base = slots(relay)
    if mode == "implicit":
        c = await tcp(relay.smtp_ports[IMPLICIT])
    else:
        c = await RawSMTP.open(relay.smtp_ports[STARTTLS])
        assert (await c.cmd("STARTTLS")).code == 220
    # timeouts.session is 30 s and the loops' own TLS default 60 s: only
    # the 1 s tls_handshake closes it within PROMPT.
    assert await closed_by_relay(c)
    await c.close()
    await wait_for(lambda: slots(relay) == base, PROMPT)
    [line] = tls_events(caplog.records)
    assert (line["level"], line["tls"], line["reason"]) == ("info", mode, "timed out"), line


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_failed_tls_handshake_is_one_info_line_without_traceback(
        relay_factory, tls_files, caplog, mode):
    relay = await relay_factory(**tls_listeners(tls_files))
    base = slots(relay)
    if mode == "implicit":                   # plain SMTP on the SMTPS port
        c = await tcp(relay.smtp_ports[IMPLICIT])
        c.write(b"EHLO client.test\r\n")
    else:                                    # HTTP where a ClientHello belongs
        c = await RawSMTP.open(relay.smtp_ports[STARTTLS])
        assert (await c.cmd("STARTTLS")).code == 220
        c.write(b"GET / HTTP/1.0\r\n\r\n")
    assert await closed_by_relay(c)
    await c.close()
    await wait_for(lambda: slots(relay) == base, PROMPT)
    assert [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info] == []
    [line] = tls_events(caplog.records)
    assert (line["level"], line["tls"], line["client"]) == ("info", mode, "127.0.0.1"), line
    assert line["session"] and line["reason"] not in ("", "timed out"), line
    assert "\n" not in LogfmtFormatter().format(
        next(r for r in caplog.records if getattr(r, "logfmt", {}).get("event") == "tls_failed"))


# ---------------------------------------------------------------- credentials after a 538

SECRET = "Edge-Pw-7qX2vLk9Rt4mZ8"


def secret_forms(user: str) -> list[str]:
    return [SECRET, base64.b64encode(SECRET.encode()).decode(),
            plain_blob(user, SECRET).decode()]


def assert_no_secret(text: str, user: str) -> None:
    """Not the password, its base64 or the AUTH PLAIN blob, nor any 12
    characters of them, in any letter case (aiosmtpd upper-cases commands)."""
    low = text.lower()
    for form in secret_forms(user):
        for i in range(len(form) - 11):
            assert form[i:i + 12].lower() not in low, (form, form[i:i + 12])


async def credentials_after_538(port: int, user: str) -> None:
    """A client that goes on with AUTH after the 538 of a STARTTLS listener
    (auth_require_tls): its user name and password arrive as commands."""
    c = await RawSMTP.open(port)
    await c.ehlo()
    assert (await c.cmd("AUTH LOGIN")).code == 538
    for line in (b64(user), b64(SECRET), SECRET.encode(), b"auth login " + b64(SECRET),
                 b"AUTH PLAIN " + plain_blob(user, SECRET), b"auth plain " + plain_blob(user, SECRET)):
        assert (await c.cmd(line)).code >= 500
    assert (await c.cmd("QUIT")).code == 221
    await c.close()


async def test_credentials_sent_after_a_538_are_not_logged(relay_factory, provision, tls_files,
                                                          caplog):
    maillog.set_level("debug")               # what log_level: debug does
    caplog.set_level(logging.DEBUG)          # root at DEBUG: every record relayd emits
    relay = await relay_factory(log_level="debug", **tls_listeners(tls_files))
    tenant = await provision(relay)
    await credentials_after_538(relay.smtp_ports[STARTTLS], tenant.user)
    fmt = LogfmtFormatter()
    text = "\n".join(f"{fmt.format(r)} {r.getMessage()} {vars(r)!r}" for r in caplog.records)
    assert "event=listening" in text, "nothing captured: the test would prove nothing"
    assert_no_secret(text, tenant.user)


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["asyncio"])   # relayd's own loop is uvloop anyway
async def test_credentials_sent_after_a_538_are_not_in_a_relayd_process_stderr(
        tmp_path: Path, tls_files):
    cfg = base_config(tmp_path, log_level="debug", **tls_listeners(tls_files))
    proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
    try:
        await credentials_after_538(proc.smtp_ports[STARTTLS], "edge-user")
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.stop()
    assert "level=debug" in proc.log and "event=stopped" in proc.log
    assert_no_secret(proc.log, "edge-user")
