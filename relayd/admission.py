"""Admission: the slot a client connection holds from accept to close.

SPEC 9: ``Relay.sessions``, ``Relay.per_ip`` and relayd_sessions_active count
open connections, whatever they are doing. RelaySMTP.connection_made takes
the slot for the raw connection at accept time (``open_slot``), before a
byte is exchanged, and admission is decided there (max_sessions,
max_sessions_per_ip, lockout, drain); RelaySMTP.release gives it back
(``close_slot``) exactly once, from whichever end comes first:
connection_lost, a failed or timed-out TLS handshake, a refusal.

TLS handshakes are where a connection can sit without being a session yet:

* Implicit TLS (RFC 8314 3.3) is set up here rather than by passing ``ssl=``
  to loop.create_server: with ``ssl=`` the loop tells the protocol nothing
  until the handshake is done, so a client that never sent a ClientHello
  was not counted at all and was held for the loop's 60 s default. Now the
  handshake runs under the slot taken at accept and is bounded by
  ``timeouts.tls_handshake``.
* STARTTLS (RFC 3207) keeps aiosmtpd's handshake; RelaySMTP.smtp_STARTTLS
  bounds it with the same timeout.

A handshake that fails is the client's doing (wrong port, a scanner, an
HTTP request, a certificate the client rejects): one ``tls_failed`` line at
info with a short reason, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from typing import TYPE_CHECKING

from . import metrics, replies
from .maillog import event

if TYPE_CHECKING:
    from .smtp import RelaySMTP

log = logging.getLogger("relayd.smtp")


def open_slot(smtp: RelaySMTP) -> str | None:
    """Take ``smtp``'s slot at accept; return the reply refusing it (drain,
    lockout, too many connections) or None to let it in."""
    hold_slot(smtp)
    return admit(smtp)


def hold_slot(smtp: RelaySMTP) -> bool:
    """Count ``smtp`` at accept, its client not known yet (a proxy_protocol
    listener: the PROXY header names it); False once max_sessions is full."""
    relay = smtp.relay
    relay.sessions.add(smtp)
    metrics.SESSIONS_ACTIVE.inc()
    return len(relay.sessions) <= relay.config.limits.max_sessions


def admit(smtp: RelaySMTP) -> str | None:
    """Count a held slot under its client's address (``smtp.client_ip``,
    now known) and decide as open_slot does."""
    relay, ip = smtp.relay, smtp.client_ip
    assert ip is not None
    relay.per_ip[ip] += 1
    limits = relay.config.limits
    if relay.draining:
        return replies.SHUTTING_DOWN
    if relay.throttle.locked(ip, time.monotonic()):
        metrics.AUTH_ATTEMPTS.labels("locked_out").inc()
        return replies.AUTH_LOCKED_OUT
    if len(relay.sessions) > limits.max_sessions or relay.per_ip[ip] > limits.max_sessions_per_ip:
        return replies.TOO_MANY_SESSIONS
    return None


def close_slot(smtp: RelaySMTP) -> None:
    """Give ``smtp``'s slot back (callers make sure it happens once)."""
    relay, ip = smtp.relay, smtp.client_ip
    if smtp in relay.sessions:
        relay.sessions.discard(smtp)
        metrics.SESSIONS_ACTIVE.dec()
        if ip is not None:                  # counted per IP (admit)
            relay.per_ip[ip] -= 1
            if relay.per_ip[ip] <= 0:
                del relay.per_ip[ip]


def tls_failed(smtp: RelaySMTP, mode: str, error: BaseException | None, timed_out: bool) -> None:
    """Log a client's failed TLS handshake: why, in a few fixed words."""
    if timed_out:
        reason = "timed out"
    elif isinstance(error, ssl.SSLError):
        # OpenSSL's reason name (WRONG_VERSION_NUMBER, HTTP_REQUEST,
        # TLSV1_ALERT_UNKNOWN_CA...): fixed words, no client bytes.
        reason = error.reason or "tls error"
    else:
        reason = "connection closed"
    session = smtp.session.id if smtp.session is not None else "-"
    event(log, logging.INFO, "tls_failed", session=session, client=smtp.client_ip,
          tls=mode, reason=reason)


def start_implicit_tls(smtp: RelaySMTP, raw: asyncio.Transport, early: bytes = b"") -> None:
    """Put the TLS layer between ``raw`` and ``smtp``, from connection_made.

    It must be in place before the first read: uvloop starts reading a new
    connection right after connection_made, whatever pause_reading said
    there, so loop.start_tls (a coroutine, hence a loop iteration later)
    would hand the ClientHello to the SMTP protocol. asyncio's SSLProtocol,
    the one aiosmtpd's STARTTLS uses, calls smtp.connection_made with the
    TLS transport when the handshake is done; its waiter reports the rest.
    ``early``: bytes already read off ``raw`` (behind a PROXY header).
    """
    relay, loop = smtp.relay, smtp.loop
    limit = relay.config.timeouts.tls_handshake
    started = loop.time()
    waiter = loop.create_future()
    tls = sslproto.SSLProtocol(loop, smtp, relay.server_tls, waiter, server_side=True,
                               ssl_handshake_timeout=limit)
    raw.set_protocol(tls)
    tls.connection_made(raw)
    if early:               # what followed a PROXY header: the ClientHello's start
        buffer = tls.get_buffer(len(early))
        buffer[:len(early)] = early
        tls.buffer_updated(len(early))

    def done(waiter: asyncio.Future[None]) -> None:
        if smtp.session is not None:   # handshake done: the SMTP session has begun
            return
        # Failed (ssl.SSLError, a reset, the handshake timeout), or the
        # connection closed mid-handshake (no error: a client gone, a drain).
        error = None if waiter.cancelled() else waiter.exception()
        tls_failed(smtp, "implicit", error, loop.time() - started >= limit)
        raw.abort()
        smtp.release()

    waiter.add_done_callback(done)
