"""Delivery to upstream SMTP servers with aiosmtplib.

Failures are classified here, at the boundary (STYLE 3, chasquid's courier):

* transient: connect error, timeout, disconnect, TLS failure, AUTH failure,
  any 4xx, and a refused EHLO/greeting -> the next candidate is tried;
* permanent: a 5xx reply to MAIL, RCPT or DATA -> no failover, the next
  upstream would refuse the message too (SPEC 3.7-3.8).

Recipients are all-or-nothing: if an upstream refuses any recipient, the
transaction is reset before DATA and the attempt fails with that reply, so a
250 to our client always means every recipient was accepted upstream.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from .errors import UpstreamError
from .records import Upstream

log = logging.getLogger("relayd.upstream")

_TLS_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def client_tls_context(verify: bool) -> ssl.SSLContext:
    """One context per verification mode, built once (building costs ms)."""
    ctx = _TLS_CONTEXTS.get(verify)
    if ctx is None:
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXTS[verify] = ctx
    return ctx


def _reply(code: int | None, message: str) -> str:
    text = " ".join(message.split())
    return f"{code} {text}" if code else text


async def send_once(u: Upstream, sender: str, recipients: Sequence[str], message: bytes, *,
                    local_hostname: str, connect_timeout: float, command_timeout: float) -> str:
    """One attempt through one upstream; return its final reply text or raise
    UpstreamError (classified)."""
    client = aiosmtplib.SMTP(
        hostname=u.host, port=u.port, local_hostname=local_hostname,
        use_tls=u.ssltls, start_tls=False if u.ssltls else u.startstls,
        validate_certs=u.verify_tls, tls_context=client_tls_context(u.verify_tls),
        timeout=command_timeout)
    # After a timeout or a cancellation (the failover deadline) the dialogue
    # is out of step: the server may still be busy with our last command, so
    # a QUIT would only wait out its own grace period (which delayed the
    # client's reply past failover.deadline). Such a connection is dropped.
    in_step = True
    try:
        try:
            await client.connect(timeout=connect_timeout)
            if u.auth:
                await client.login(u.username or "", u.password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise UpstreamError(f"AUTH failed: {_reply(exc.code, exc.message)}", code=exc.code) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise UpstreamError(_reply(exc.code, exc.message), code=exc.code) from None
        try:
            await client.mail(sender)
            for rcpt in recipients:
                await client.rcpt(rcpt)
            response = await client.data(message)
        except aiosmtplib.SMTPResponseException as exc:
            # SMTPRecipientRefused / SMTPSenderRefused / SMTPDataError
            if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
                reply = f"{_reply(exc.code, exc.message)} (recipient {exc.recipient})"
                try:
                    await client.rset()
                except aiosmtplib.SMTPException:
                    pass
            else:
                reply = _reply(exc.code, exc.message)
            raise UpstreamError(reply, permanent=is_permanent(exc.code), code=exc.code) from None
        return _reply(response.code, response.message)
    except UpstreamError:
        raise
    except asyncio.CancelledError:
        in_step = False
        raise
    except aiosmtplib.SMTPTimeoutError as exc:
        in_step = False
        raise UpstreamError(f"timeout: {exc}") from None
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise UpstreamError(f"disconnected: {exc}") from None
    except aiosmtplib.SMTPException as exc:       # STARTTLS not offered, TLS failure...
        raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"connection failed: {exc.strerror or exc}") from None
    finally:
        if client.is_connected and not in_step:
            client.close()
        elif client.is_connected:
            try:
                await asyncio.wait_for(client.quit(), 1.0)
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                client.close()


# 5xx replies that speak of the upstream's setup, not of the message: TLS or
# AUTH required (530, 538), credentials refused (535). The next upstream may
# well take the message, so these fail over like a 4xx.
SETUP_REFUSALS = frozenset({530, 535, 538})


def is_permanent(code: int) -> bool:
    return 500 <= code < 600 and code not in SETUP_REFUSALS


@dataclass
class Attempt:
    upstream: Upstream
    ok: bool
    reply: str
    duration: float
    rewritten: bool = False
    permanent: bool = False


@dataclass
class Outcome:
    """What happened to one message: the attempts in order and the verdict."""

    attempts: list[Attempt] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].ok

    @property
    def last(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def permanent(self) -> bool:
        return self.last is not None and self.last.permanent


# prepare(upstream) -> (envelope sender, message bytes, rewritten?)
Prepare = Callable[[Upstream], tuple[str, bytes, bool]]
# record(upstream, "ok" | "error" | "refused", reply): count errors, reset on success
Record = Callable[[Upstream, str, str], Awaitable[None]]


async def deliver(candidates: Sequence[Upstream], recipients: Sequence[str], prepare: Prepare,
                  record: Record, *, local_hostname: str, connect_timeout: float,
                  command_timeout: float, deadline: float) -> Outcome:
    """Try ``candidates`` in order until one accepts, a permanent refusal, or
    ``deadline`` seconds pass (SPEC 3.7)."""
    outcome = Outcome()
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    for u in candidates:
        remaining = end - loop.time()
        if remaining <= 0:
            break
        sender, message, rewritten = prepare(u)
        started = time.monotonic()
        try:
            async with asyncio.timeout(remaining):
                reply = await send_once(u, sender, recipients, message,
                                        local_hostname=local_hostname,
                                        connect_timeout=min(connect_timeout, remaining),
                                        command_timeout=command_timeout)
        except TimeoutError:
            err = UpstreamError(f"failover deadline of {deadline:g}s reached")
        except UpstreamError as exc:
            err = exc
        else:
            outcome.attempts.append(Attempt(u, True, reply, time.monotonic() - started, rewritten))
            await record(u, "ok", reply)
            return outcome
        outcome.attempts.append(Attempt(u, False, err.reply, time.monotonic() - started,
                                        rewritten, err.permanent))
        # A 5xx is about the message, not the server: no error counted, and
        # no failover (the next upstream would refuse it too).
        await record(u, "refused" if err.permanent else "error", err.reply)
        if err.permanent:
            break
    return outcome
