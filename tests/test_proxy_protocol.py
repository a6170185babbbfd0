"""``proxy_protocol: true`` listeners (SPEC 8, 9): the PROXY header's client
address drives every per-IP rule, the mail log and the trace field; only
trusted proxies may send one; a missing, malformed, late or cut header
closes the connection without a banner and frees its slot; v2 LOCAL (a
health check) is a session from the proxy itself. Real relayd, real
sockets, headers as HAProxy writes them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import struct
import threading
from typing import Any

import pytest

from admin_client import delta, scrape
from conftest import simple_message, sink_upstream
from helpers_smtp import RawSMTP, mail_lines, plain_blob, wait_for
from helpers_ports import free_port
from relayd import metrics

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 587) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 587) -> bytes:
    """A v2 PROXY (src given) or LOCAL (src None) header, TCP over IPv4."""
    if src is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    body = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def through_proxy(port: int, header: bytes, *, tls: ssl.SSLContext | None = None,
                        split: bool = False) -> RawSMTP:
    """A client behind a proxy: the header first (before TLS), then SMTP."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if split:                           # the header in two segments
        writer.write(header[:7])
        await writer.drain()
        await asyncio.sleep(0.05)
        header = header[7:]
    writer.write(header)
    await writer.drain()
    if tls is not None:
        await writer.start_tls(tls, server_hostname="localhost")
    client = RawSMTP(reader, writer)
    client.banner = await client.reply()
    return client


def sessions_active() -> float:
    return metrics.REGISTRY.get_sample_value("relayd_sessions_active") or 0.0


@pytest.fixture
async def proxied(relay_factory: Any, tls_files: tuple[str, str]) -> Any:
    cert, key = tls_files

    async def make(**overrides: Any) -> Any:
        return await relay_factory(
            listen=[{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False,
                     "proxy_protocol": True},
                    {"address": "127.0.0.1:0", "tls": "implicit", "proxy_protocol": True}],
            tls={"cert": cert, "key": key}, **overrides)
    return make


async def send(client: RawSMTP, tenant: Any) -> int:
    await client.ehlo()
    await client.login(tenant.user, tenant.password)
    return (await client.send_message("app@example.com", ["to@example.net"],
                                      simple_message())).code


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
async def test_the_headers_client_is_the_sessions_client(proxied, provision, sink_factory,
                                                         caplog, client_ssl, header):
    caplog.set_level(logging.INFO, logger="relayd.mail")
    relay = await proxied()
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    plain = await through_proxy(relay.smtp_ports[0], header("198.51.100.7"), split=True)
    assert plain.banner is not None and plain.banner.code == 220
    assert await send(plain, tenant) == 250
    tls = await through_proxy(relay.smtp_ports[1], header("203.0.113.9"), tls=client_ssl)
    assert await send(tls, tenant) == 250
    for c in (plain, tls):
        await c.close()
    assert [line["client"] for line in mail_lines(caplog.records)] == [
        "198.51.100.7", "203.0.113.9"]
    assert b"[198.51.100.7]" in sink.messages[0].data.split(b"\r\n\r\n")[0]


async def test_per_ip_limits_count_the_headers_client(proxied, provision):
    relay = await proxied(limits={"max_sessions_per_ip": 1})
    port = relay.smtp_ports[0]
    a = await through_proxy(port, v1("198.51.100.1"))
    b = await through_proxy(port, v1("198.51.100.2"))        # another client: admitted
    assert (a.banner.code, b.banner.code) == (220, 220)
    again = await through_proxy(port, v1("198.51.100.1"))    # the same one again: refused
    assert again.banner.code == 421, again.banner
    assert relay.per_ip == {"198.51.100.1": 1, "198.51.100.2": 1}
    for c in (a, b, again):
        await c.close()
    await wait_for(lambda: not relay.sessions and not relay.per_ip)


async def test_a_lockout_locks_out_the_headers_client_only(proxied, provision):
    relay = await proxied(auth_failures={"max": 2, "window": 600})
    tenant = await provision(relay)
    port = relay.smtp_ports[0]
    for _ in range(2):
        c = await through_proxy(port, v1("198.51.100.66"))
        await c.ehlo()
        assert (await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))).code == 535
        await c.close()
    locked = await through_proxy(port, v1("198.51.100.66"))
    assert locked.banner.code == 421, locked.banner
    other = await through_proxy(port, v1("198.51.100.67"))
    assert other.banner.code == 220
    await other.ehlo()
    await other.login(tenant.user, tenant.password)
    for c in (locked, other):
        await c.close()


async def test_a_local_header_is_the_proxy_itself(proxied):
    """HAProxy's health checks with check-send-proxy: v2 LOCAL."""
    relay = await proxied()
    check = await through_proxy(relay.smtp_ports[0], v2(None))
    assert check.banner.code == 220
    await check.ehlo("haproxy-check")
    assert list(relay.per_ip) == ["127.0.0.1"]
    assert (await check.cmd("QUIT")).code == 221
    await check.close()
    await wait_for(lambda: not relay.sessions and sessions_active() == 0)


async def refused(relay: Any, data: bytes, *, close: bool = False,
                  wait: float = 0.0) -> bytes:
    """What a connection that sends ``data`` (then closes, or waits) gets back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
    writer.write(data)
    await writer.drain()
    if close:
        writer.close()
        return b""
    await asyncio.sleep(wait)
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return got


@pytest.mark.parametrize("data,reason", [
    (b"EHLO client.test\r\n", "no_proxy_header"),
    (b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", "malformed_header"),
    (b"PROXY TCP4 " + b"9" * 200 + b"\r\n", "malformed_header"),
    (V2_SIGNATURE + b"\x21\x11\x00\x02xx", "malformed_header"),
])
async def test_a_bad_header_closes_without_a_banner(proxied, caplog, data, reason):
    relay = await proxied()
    before = await scrape(relay.metrics_port)
    assert await refused(relay, data) == b""                 # not a byte: no banner
    after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_proxy_refusals_total", reason=reason) == 1
    assert any("event=proxy_refused" in r.getMessage() or getattr(r, "logfmt", {}).get(
        "event") == "proxy_refused" for r in caplog.records)
    await wait_for(lambda: not relay.sessions and sessions_active() == 0)


async def test_a_late_header_times_out_and_frees_the_slot(proxied):
    relay = await proxied(timeouts={"proxy": 0.5})
    before = await scrape(relay.metrics_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports[0])
    await wait_for(lambda: len(relay.sessions) == 1)        # held while it waits
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_proxy_refusals_total", reason="timed_out") == 1
    await wait_for(lambda: not relay.sessions and sessions_active() == 0)


async def test_a_connection_cut_mid_header_frees_its_slot_at_once(proxied):
    relay = await proxied()
    before = await scrape(relay.metrics_port)
    for _ in range(20):
        await refused(relay, b"PROXY TCP4 198.51", close=True)
    await wait_for(lambda: not relay.sessions and not relay.per_ip and sessions_active() == 0)
    after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_proxy_refusals_total", reason="connection_closed") == 20


async def test_an_untrusted_peer_is_closed_without_a_banner(proxied):
    relay = await proxied(trusted_proxies=["10.0.0.0/8"])
    before = await scrape(relay.metrics_port)
    assert await refused(relay, v1("198.51.100.7")) == b""
    after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_proxy_refusals_total", reason="untrusted_peer") == 1
    await wait_for(lambda: not relay.sessions and sessions_active() == 0)


async def test_reuse_port_lets_two_relays_share_one_address(relay_factory, tmp_path):
    port = free_port()
    listen = [{"address": f"127.0.0.1:{port}", "tls": "none", "auth_require_tls": False,
               "reuse_port": True}]
    first = await relay_factory(listen=listen)
    second = await relay_factory(listen=listen, state_dir=str(tmp_path / "second"),
                                 admin={"socket": str(tmp_path / "second.sock")})
    assert first.smtp_ports == second.smtp_ports == [port]
    threads = threading.active_count()
    with pytest.raises(OSError):                  # without it the address is taken
        await relay_factory(listen=[{**listen[0], "reuse_port": False}],
                            state_dir=str(tmp_path / "third"),
                            admin={"socket": str(tmp_path / "third.sock")})
    # The refused start closed its store again: no connection thread is left.
    await wait_for(lambda: threading.active_count() == threads, timeout=5)
