"""Pooled upstream connections.

An authenticated upstream connection costs a TCP handshake, a greeting, EHLO,
maybe TLS and AUTH: several round trips and most of a relay's CPU per small
message. The pool keeps connections open between messages and sessions.

Rules (issue 6):
* Connections are keyed by everything that makes them differ: host, port,
  TLS mode, verification, and credentials — a connection is never shared
  between different upstream credentials.
* A connection leaves the pool only for one transaction at a time and is
  reset (RSET) before reuse; the RSET doubles as the liveness check, so a
  connection the server dropped while idle is found before any mail is sent
  on it (the caller then retries once on a fresh connection).
* Idle connections are closed after ``idle_timeout`` (servers drop them
  anyway: Postfix after 300 s, many after 60 s) and at most ``max_idle`` are
  kept per key; at most ``max_per_key`` connections exist per key at once,
  idle or busy, so a burst cannot open hundreds of connections to one
  upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

from .records import Upstream

Key = tuple[object, ...]

IDLE_TIMEOUT = 30.0     # seconds an unused connection is kept
MAX_IDLE = 16           # idle connections kept per key
MAX_PER_KEY = 64        # connections per key at once (idle + in use)


def key_of(u: Upstream) -> Key:
    return (u.host, u.port, u.ssltls, u.startstls, u.verify_tls, u.auth,
            u.username if u.auth else None, u.password if u.auth else None)


@dataclass
class _Slot:
    limit: asyncio.Semaphore
    idle: deque[tuple[float, aiosmtplib.SMTP]] = field(default_factory=deque)
    busy: int = 0       # connections handed out and not yet given back


class Pool:
    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, max_idle: int = MAX_IDLE,
                 max_per_key: int = MAX_PER_KEY):
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_per_key = max_per_key
        self._slots: dict[Key, _Slot] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def _slot(self, key: Key) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(asyncio.Semaphore(self.max_per_key))
        return slot

    async def acquire(self, u: Upstream, open_new: Callable[[], Awaitable[aiosmtplib.SMTP]],
                      *, fresh: bool = False) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection for ``u`` and whether it was reused from the pool
        (``fresh``: always a new one). The caller must hand it back with
        ``release`` (or ``discard``)."""
        slot = self._slot(key_of(u))
        await slot.limit.acquire()
        slot.busy += 1
        try:
            now = time.monotonic()
            while slot.idle and not fresh:
                since, client = slot.idle.pop()          # most recently used first
                if client.is_connected and now - since < self.idle_timeout:
                    return client, True
                _close(client)
            return await open_new(), False
        except BaseException:
            self._give_back(slot)
            raise

    def _give_back(self, slot: _Slot) -> None:
        slot.busy -= 1
        slot.limit.release()

    def release(self, u: Upstream, client: aiosmtplib.SMTP) -> None:
        """Give back a connection in a clean state (transaction finished)."""
        slot = self._slot(key_of(u))
        self._give_back(slot)
        if client.is_connected and len(slot.idle) < self.max_idle:
            slot.idle.append((time.monotonic(), client))
            self._ensure_sweeper()
        else:
            _close(client)

    def discard(self, u: Upstream, client: aiosmtplib.SMTP) -> None:
        """Give back a connection that must not be reused."""
        self._give_back(self._slot(key_of(u)))
        _close(client)

    def drop_idle(self, u: Upstream) -> None:
        """Close every idle connection to ``u``: one proved stale (the
        upstream restarted or dropped its idle clients), so are the others."""
        slot = self._slots.get(key_of(u))
        while slot is not None and slot.idle:
            _close(slot.idle.pop()[1])

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while any(s.idle for s in self._slots.values()):
            await asyncio.sleep(self.idle_timeout / 2)
            cutoff = time.monotonic() - self.idle_timeout
            for key, slot in list(self._slots.items()):
                while slot.idle and slot.idle[0][0] < cutoff:
                    _, client = slot.idle.popleft()
                    await quit_politely(client)
                if not slot.idle and not slot.busy:
                    del self._slots[key]

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for slot in self._slots.values():
            while slot.idle:
                await quit_politely(slot.idle.pop()[1])
        self._slots.clear()

    def idle_count(self) -> int:
        return sum(len(s.idle) for s in self._slots.values())


def _close(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()


async def quit_politely(client: aiosmtplib.SMTP) -> None:
    """QUIT, but never wait more than a second for the goodbye."""
    try:
        await asyncio.wait_for(client.quit(), 1.0)
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        _close(client)
