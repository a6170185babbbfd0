"""Connections per client address on a TCP listener (http.py's
``MAX_PER_ADDRESS``): one address may not take a listener for itself.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress


def address_key(writer: asyncio.StreamWriter) -> str:
    """What the bound counts for a TCP peer: its IP address, or for IPv6 its
    /64 (one host commonly holds a whole /64). "" when there is no address
    (a Unix socket)."""
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return ""
    ip = ipaddress.ip_address(peer[0].partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ip.ipv4_mapped) if ip.ipv4_mapped else ip.exploded[:19]
    return str(ip)


class PerAddress:
    """Open connections by ``address_key``; the key "" is counted, never bounded."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    def admit(self, key: str) -> bool:
        """Count one more connection from ``key``, unless it has ``limit``."""
        if key and self._open[key] >= self.limit:
            return False
        self._open[key] += 1
        return True

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if not self._open[key]:
            del self._open[key]
