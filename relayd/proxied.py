"""The PROXY protocol on a ``proxy_protocol`` listener (SPEC 8): behind a
load balancer, the client's address is the one the balancer's header
names, not the TCP peer's.

The header is parsed by aiosmtpd's own implementation
(``aiosmtpd.proxy_protocol.get_proxy``, v1 and v2). aiosmtpd reads it from
the SMTP stream, after TLS; relayd needs it before anything else -- before
the implicit-TLS handshake, and before the per-IP admission that the
address decides. So a ``HeaderReader`` protocol takes the fresh TCP
connection first and hands the transport, with whatever bytes followed the
header, to the SMTP protocol once the header is read:

* the source must be in ``trusted_proxies``, else the connection is closed
  at once;
* a header that is missing, malformed, or later than ``timeouts.proxy``
  closes the connection without a banner;
* a v2 ``LOCAL`` header (a load balancer's health check) or v1 ``UNKNOWN``
  is served as a session from the proxy's own address.

Each refusal is one ``proxy_refused`` log line with its reason and a count
in ``relayd_proxy_refusals_total{reason}``. The connection holds its
admission slot throughout (admission.py): a check or a scanner that closes
mid-header frees it at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiosmtpd.proxy_protocol import V2_CMD, get_proxy

from . import admission, metrics
from .maillog import event

if TYPE_CHECKING:
    from .smtp import RelaySMTP

log = logging.getLogger("relayd.smtp")

V1_MAX = 107            # the longest v1 header, CRLF included (the spec's bound)


def accept(smtp: RelaySMTP, transport: asyncio.Transport) -> None:
    """A new connection of a proxy_protocol listener, from smtp.peer_ip: a
    trusted proxy's gets a slot and a HeaderReader; any other is closed."""
    peer = smtp.peer_ip or ""
    if not trusted(peer, smtp.relay.config.trusted_proxies):
        refuse(smtp, peer, "untrusted peer")
        transport.abort()
    elif not admission.hold_slot(smtp):
        refuse(smtp, peer, "too many sessions")
        transport.abort()
    else:
        transport.set_protocol(HeaderReader(smtp, transport))


def trusted(ip: str, networks: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


class HeaderBuffer:
    """The reader get_proxy expects (readexactly, readuntil, read) over the
    bytes received so far; what is left after the header is ``rest``."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self._more = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self._more.set()

    def feed_eof(self) -> None:
        self.eof = True
        self._more.set()

    async def _want(self, n: int) -> None:
        while len(self.buffer) < n and not self.eof:
            self._more.clear()
            await self._more.wait()
        if len(self.buffer) < n:
            raise ConnectionError("connection closed in the PROXY header")

    async def readexactly(self, n: int) -> bytes:
        await self._want(n)
        return self._take(n)

    async def read(self, n: int = -1) -> bytes:
        await self._want(1)
        return self._take(min(n, len(self.buffer)) if n >= 0 else len(self.buffer))

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        while (end := self.buffer.find(separator)) < 0:
            if len(self.buffer) > V1_MAX:
                raise ValueError("PROXY v1 header too long")
            await self._want(len(self.buffer) + 1)
        return self._take(end + len(separator))

    def _take(self, n: int) -> bytes:
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


class HeaderReader(asyncio.Protocol):
    """Owns a new connection of a proxy_protocol listener until its header
    is read, then gives it to ``smtp`` (RelaySMTP.proxied)."""

    def __init__(self, smtp: RelaySMTP, transport: asyncio.Transport):
        self.smtp = smtp
        self.transport = transport
        self.proxy_ip = smtp.peer_ip or ""
        self.header = HeaderBuffer()
        self.task = asyncio.ensure_future(self._read())

    def data_received(self, data: bytes) -> None:
        self.header.feed(data)

    def eof_received(self) -> bool:
        self.header.feed_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.task.done():
            self.task.cancel()
            refuse(self.smtp, self.proxy_ip, "connection closed")

    async def _read(self) -> None:
        timeout = self.smtp.relay.config.timeouts.proxy
        try:
            data = await asyncio.wait_for(get_proxy(self.header), timeout)
        except asyncio.TimeoutError:
            return self.refuse("timed out")
        except ConnectionError:
            return self.refuse("connection closed")
        if not data.valid:
            return self.refuse("connection closed" if self.header.eof else _reason(data.error))
        local = data.command == V2_CMD.LOCAL or data.src_addr is None
        client = self.proxy_ip if local else str(data.src_addr)
        self.smtp.proxied(self.transport, client, bytes(self.header.buffer))

    def refuse(self, reason: str) -> None:
        refuse(self.smtp, self.proxy_ip, reason)
        self.transport.abort()


def refuse(smtp: RelaySMTP, proxy_ip: str, reason: str) -> None:
    """Log and count one refused connection of a proxy_protocol listener,
    and give its slot back. A peer that is not a trusted proxy, or a header
    that does not parse, is a warning; a peer that went away or said
    nothing in time (a TCP check, a scanner) is information."""
    metrics.PROXY_REFUSALS.labels(reason.replace(" ", "_")).inc()
    level = logging.INFO if reason in ("connection closed", "timed out") else logging.WARNING
    event(log, level, "proxy_refused", peer=proxy_ip, reason=reason)
    smtp.release()


def _reason(error: str) -> str:
    """aiosmtpd's parse error in a few fixed words (no client bytes)."""
    if "signature" in error:
        return "no proxy header"
    return "malformed header"
