"""Delivery to upstream SMTP servers with aiosmtplib.

Failures are classified here, at the boundary (STYLE 3, chasquid's courier):

* transient: connect error, timeout, disconnect, TLS failure, AUTH failure,
  any 4xx, and a refused EHLO/greeting -> the next candidate is tried;
* permanent: a 5xx reply to MAIL, RCPT or DATA -> no failover, the next
  upstream would refuse the message too (SPEC 3.7-3.8).

Recipients are all-or-nothing: if an upstream refuses any recipient, the
transaction is abandoned before DATA (the connection is RSET before its next
use, or closed) and the attempt fails with that reply, so a 250 to our
client always means every recipient was accepted upstream.

No failover after the final dot (SPEC 3.8): once an upstream has the whole
message, a dropped connection or a missing reply leaves it unknown whether
the message was delivered; sending it elsewhere would make a duplicate
certain. Such an attempt is *unconfirmed*: its error is counted and the
delivery stops there.
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
from .pool import Pool, quit_politely
from .records import Upstream
from .wire import wire_data

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


@dataclass
class Progress:
    """How far one attempt got: ``dot`` once the whole message, final dot
    included, has been written to the upstream."""

    dot: bool = False


async def _data(client: aiosmtplib.SMTP, chunks: tuple[bytes, ...],
                progress: Progress) -> aiosmtplib.SMTPResponse:
    """DATA with a payload already in wire form (see wire.wire_data), written
    as is: aiosmtplib's data() would normalise and stuff it again, line by
    line with regexes, the largest CPU cost of relaying a big message. Its
    public calls only: the DATA command, then the protocol's write and
    read_response (which expects the reply it is called for; nothing else
    runs on a connection the pool has lent to one transaction)."""
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    for chunk in chunks:
        protocol.write(chunk)
    progress.dot = True
    response = await protocol.read_response(timeout=client.timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _open(u: Upstream, local_hostname: str, connect_timeout: float,
                command_timeout: float) -> aiosmtplib.SMTP:
    """A connected, greeted, TLS-ed and authenticated client, or UpstreamError."""
    client = aiosmtplib.SMTP(
        hostname=u.host, port=u.port, local_hostname=local_hostname,
        use_tls=u.ssltls, start_tls=False if u.ssltls else u.startstls,
        validate_certs=u.verify_tls, tls_context=client_tls_context(u.verify_tls),
        timeout=command_timeout)
    try:
        await client.connect(timeout=connect_timeout)
        if u.auth:
            await client.login(u.username or "", u.password or "")
        return client
    except BaseException as exc:
        client.close()
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            raise UpstreamError(f"AUTH failed: {_reply(exc.code, exc.message)}",
                                code=exc.code) from None
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            raise UpstreamError(_reply(exc.code, exc.message), code=exc.code) from None
        if isinstance(exc, (aiosmtplib.SMTPException, OSError, ssl.SSLError)):
            raise _connection_error(exc) from None
        raise


def _in_step(client: aiosmtplib.SMTP) -> bool:
    """Whether the connection's replies are still in step with our commands.
    An upstream that sent more reply lines than asked for (an unsolicited
    line in the same segment as a real reply) leaves them buffered in the
    protocol, and every later command on that connection would read the
    previous one's reply ("451 ... 250 ok"). aiosmtplib drops unsolicited
    data that arrives between commands but offers no public view of what
    is left over, hence the look at its buffer; without one, the connection
    is treated as out of step and never reused."""
    return not getattr(client.protocol, "_buffer", b"?")


def _unconfirmed(exc: BaseException, command_timeout: float) -> UpstreamError:
    """The upstream had the whole message and then went away or silent."""
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        what = f"no reply within {command_timeout:g} s after the message was sent"
    else:
        what = "connection lost after the message was sent"
    return UpstreamError(what, unconfirmed=True)


def _classify(exc: BaseException, progress: Progress, command_timeout: float
              ) -> UpstreamError:
    """An attempt's failure as relayd reports it: an SMTP reply (permanent
    when 5xx), unconfirmed after the final dot, else a connection error."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = _reply(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
            reply += f" (recipient {exc.recipient})"
        return UpstreamError(reply, permanent=is_permanent(exc.code), code=exc.code)
    if progress.dot:
        return _unconfirmed(exc, command_timeout)
    return _connection_error(exc)


def _dropped(exc: BaseException) -> bool:
    """The server closed the connection: a disconnect, or its 421."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421
    return isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError))


async def _hand_back(pool: Pool | None, u: Upstream, client: aiosmtplib.SMTP,
                     keep: bool) -> None:
    if pool is not None:
        (pool.release if keep else pool.discard)(u, client)
    elif keep:
        await quit_politely(client)
    else:
        client.close()


def _connection_error(exc: BaseException) -> UpstreamError:
    """Classify a failure that is not an SMTP reply: always transient."""
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return UpstreamError(f"timeout: {exc}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return UpstreamError(f"disconnected: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException):        # STARTTLS not offered, TLS failure...
        return UpstreamError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.strerror:
        return UpstreamError(f"connection failed: {exc.strerror}")
    return UpstreamError(f"connection failed: {exc}")


async def send_once(u: Upstream, sender: str, recipients: Sequence[str], message: bytes, *,
                    local_hostname: str, connect_timeout: float, command_timeout: float,
                    pool: Pool | None = None, stuffed: bool = False,
                    progress: Progress | None = None) -> str:
    """One attempt through one upstream; return its final reply text or raise
    UpstreamError (classified). ``stuffed``: see wire_data. With a pool the
    connection is reused and kept; a pooled connection that turns out dead
    before DATA is replaced once by a new one (never another idle one: they
    went stale together, and all of the key's idle ones are dropped) without
    counting as an upstream error. ``progress`` tells the caller whether the
    final dot went out."""
    payload = wire_data(message, stuffed=stuffed)
    progress = progress if progress is not None else Progress()

    async def open_new() -> aiosmtplib.SMTP:
        return await _open(u, local_hostname, connect_timeout, command_timeout)

    for retry in (False, True):
        if pool is not None:
            if retry:
                pool.drop_idle(u)
            client, reused = await pool.acquire(u, open_new, fresh=retry)
        else:
            client, reused = await open_new(), False
        # Keep the connection only if the dialogue ended in step: after a
        # timeout or a cancellation (the failover deadline) the server may
        # still be busy with our last command.
        keep = False
        before_data = True
        try:
            if reused:
                await client.rset()             # clean state, and proof of life
            await client.mail(sender)
            for rcpt in recipients:
                await client.rcpt(rcpt)
            before_data = False
            response = await _data(client, payload, progress)
            keep = _in_step(client)
            return _reply(response.code, response.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # A reused connection dead before DATA (a 421 or a disconnect:
            # the server dropped it while idle) is retried once, fresh.
            if reused and before_data and not retry and _dropped(exc):
                continue
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                # SMTPRecipientRefused / SMTPSenderRefused / SMTPDataError:
                # the dialogue is in step; the next use starts with RSET.
                keep = exc.code != 421 and _in_step(client)
            raise _classify(exc, progress, command_timeout) from None
        finally:
            await _hand_back(pool, u, client, keep)
    raise AssertionError("unreachable")  # pragma: no cover


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
    unconfirmed: bool = False      # the upstream had the message, then no reply


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

    @property
    def unconfirmed(self) -> bool:
        return self.last is not None and self.last.unconfirmed


# prepare(upstream) -> (envelope sender, message bytes, rewritten?)
Prepare = Callable[[Upstream], tuple[str, bytes, bool]]
# record(upstream, "ok" | "error" | "refused", reply): count errors, reset on success
Record = Callable[[Upstream, str, str], Awaitable[None]]


async def deliver(candidates: Sequence[Upstream], recipients: Sequence[str], prepare: Prepare,
                  record: Record, *, local_hostname: str, connect_timeout: float,
                  command_timeout: float, deadline: float, pool: Pool | None = None,
                  send: Callable[..., Awaitable[str]] | None = None) -> Outcome:
    """Try ``candidates`` in order until one accepts, a permanent refusal, an
    unconfirmed attempt, or ``deadline`` seconds pass (SPEC 3.7, 3.8).
    ``prepare`` returns each upstream's message in DATA wire form
    (dot-stuffed, as received). ``send`` is one attempt (send_once; tests
    pass their own)."""
    send = send or send_once
    outcome = Outcome()
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    for u in candidates:
        remaining = end - loop.time()
        if remaining <= 0:
            break
        sender, message, rewritten = prepare(u)
        started = time.monotonic()
        progress = Progress()
        try:
            async with asyncio.timeout(remaining):
                reply = await send(u, sender, recipients, message,
                                   local_hostname=local_hostname,
                                   connect_timeout=min(connect_timeout, remaining),
                                   command_timeout=command_timeout, pool=pool,
                                   stuffed=True, progress=progress)
        except TimeoutError:
            err = UpstreamError(f"failover deadline of {deadline:g} s reached"
                                + (" after the message was sent" if progress.dot else ""),
                                unconfirmed=progress.dot)
        except UpstreamError as exc:
            err = exc
        else:
            outcome.attempts.append(Attempt(u, True, reply, time.monotonic() - started, rewritten))
            await record(u, "ok", reply)
            return outcome
        outcome.attempts.append(Attempt(u, False, err.reply, time.monotonic() - started,
                                        rewritten, err.permanent, err.unconfirmed))
        # A 5xx is about the message, not the server: no error counted, and
        # no failover (the next upstream would refuse it too). Unconfirmed:
        # the server's fault, counted, and no failover (a duplicate).
        await record(u, "refused" if err.permanent else "error", err.reply)
        if err.permanent or err.unconfirmed:
            break
    return outcome
