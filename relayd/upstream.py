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

What a failure says (SPEC 3.18) is decided once, here (``describe``), for
the SMTP client's 451/554 and the admin API's ``smtps/check`` alike: the
upstream's reply when it gave one, else plain words ("connection refused",
"timed out after 10 s", "TLS certificate not trusted", "not an SMTP
server"...), never an exception name, an errno, a foreign service's banner
or a system SMTP's address. The technical account goes to the log
(``UpstreamError.detail``).

MAIL/RCPT parameters (SPEC 3.15, esmtp.py) go to an upstream as far as the
EHLO keywords of the connection at hand allow; a message that needs an
extension the upstream lacks is not sent there (*skipped*: no error of the
upstream's, the next candidate is tried, and the connection stays pooled).
The loop over the candidates is failover.py's.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from . import esmtp, protolog
from .errors import UpstreamError
from .esmtp import MailParams, RcptParams
from .pool import Pool, quit_politely
from .records import Upstream
from .replies import one_line
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
        if client.is_ehlo_or_helo_needed:
            # The upstream's extensions come from EHLO (SPEC 3.15): known per
            # connection before its first MAIL (aiosmtplib would send EHLO
            # with that MAIL). An old server that refuses EHLO gets HELO.
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()
        if u.auth:
            await client.login(u.username or "", u.password or "")
        return client
    except BaseException as exc:
        client.close()
        if isinstance(exc, (aiosmtplib.SMTPException, OSError, ssl.SSLError)):
            # A refusal at the greeting, EHLO, STARTTLS or AUTH is about this
            # upstream's setup, never permanent for the message.
            reply = _is_reply(exc)
            raise UpstreamError(describe(exc, connect_timeout, command_timeout),
                                code=getattr(exc, "code", None) if reply else None,
                                detail=None if reply else _technical(exc)) from None
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
    """The upstream had the whole message and then went away, went silent or
    answered something that is no SMTP reply."""
    if isinstance(exc, TimeoutError):
        what = f"no reply within {command_timeout:g} s after the message was sent"
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        what = "no SMTP reply after the message was sent"
    else:
        what = "connection lost after the message was sent"
    return UpstreamError(what, unconfirmed=True, detail=f"{what}: {_technical(exc)}")


def _classify(exc: BaseException, progress: Progress, connect_timeout: float,
              command_timeout: float) -> UpstreamError:
    """An attempt's failure as relayd reports it: an SMTP reply (permanent
    when 5xx), unconfirmed after the final dot, else what happened."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and _is_reply(exc):
        reply = _reply(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
            reply += f" (recipient {exc.recipient})"
        return UpstreamError(reply, permanent=is_permanent(exc.code), code=exc.code)
    if progress.dot:
        return _unconfirmed(exc, command_timeout)
    return UpstreamError(describe(exc, connect_timeout, command_timeout),
                         detail=_technical(exc))


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


# ---------------------------------------------------------------- what a failure says

NOT_SMTP = "not an SMTP server (its answer is not an SMTP reply)"
CHAIN_DEPTH = 8               # errors behind one failure worth looking at


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors behind it, nearest first: aiosmtplib raises its
    own exception from the OSError or ssl.SSLError that caused it."""
    found: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in found and len(found) < CHAIN_DEPTH:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


def _is_reply(exc: BaseException) -> bool:
    """An SMTP reply of the upstream's: aiosmtplib's -1 (and any code outside
    200-599) is a line that is no reply at all, a foreign service's banner."""
    return isinstance(exc, aiosmtplib.SMTPResponseException) and 200 <= exc.code <= 599


def describe(exc: BaseException, connect_timeout: float, command_timeout: float) -> str:
    """What a failed attempt says to an SMTP or API client (SPEC 3.18). The
    upstream's own words only when they are an SMTP reply (code and text);
    any other answer is NOT_SMTP, without a byte of it, so that neither
    DATA's reply nor smtps/check can be pointed at another service to read
    its banner. Everything else in plain words: no exception names, no
    errno text, no address."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, aiosmtplib.SMTPResponseException):
            if not _is_reply(e):
                return NOT_SMTP
            auth = isinstance(e, aiosmtplib.SMTPAuthenticationError)
            return ("AUTH refused: " if auth else "") + one_line(_reply(e.code, e.message))
        if isinstance(e, ssl.SSLCertVerificationError):
            return "TLS certificate not trusted"
        if isinstance(e, ssl.SSLError):
            return "TLS negotiation failed"
        if isinstance(e, aiosmtplib.SMTPConnectTimeoutError):    # connect and greeting
            return f"timed out after {connect_timeout:g} s"
        if isinstance(e, TimeoutError):
            return f"timed out after {command_timeout:g} s"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name does not resolve"
        if type(e) in (aiosmtplib.SMTPException, aiosmtplib.SMTPNotSupported):
            # aiosmtplib's own complaint about what the server offers (its
            # words, not the server's): STARTTLS or AUTH missing.
            missing = next((x for x in ("STARTTLS", "AUTH") if x in str(e)), "an extension")
            return f"the server does not offer {missing}"
        if isinstance(e, (aiosmtplib.SMTPServerDisconnected, ConnectionResetError,
                          BrokenPipeError)):
            return "connection lost"
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()           # "no route to host"
    return "connection failed"


def _technical(exc: BaseException) -> str:
    """The log's account of a failure: each error of the chain with its type."""
    return "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in _chain(exc)))


def for_client(u: Upstream, text: str) -> str:
    """``text`` as a client may read it: a system SMTP serves every paid
    tenant and its address is the operator's business (SPEC 3.18), so its
    host (and port) in its own reply text become "[system SMTP]"."""
    if not u.idsmtp.startswith("system:") or not u.host:
        return text
    return re.sub(re.escape(u.host) + rf"(?::{u.port}\b)?", "[system SMTP]", text,
                  flags=re.IGNORECASE)


async def _envelope(u: Upstream, client: aiosmtplib.SMTP, sender: str,
                    recipients: Sequence[str], mail_params: MailParams,
                    rcpt_params: Sequence[RcptParams]) -> None:
    """MAIL and RCPTs with the parameters this upstream takes. Addresses go
    as UTF-8 only with SMTPUTF8 relayed (RFC 6531 3.4); without it they are
    ASCII (missing_extension held the message back otherwise)."""
    supports = client.supports_extension
    utf8 = mail_params.smtputf8 and supports("SMTPUTF8")
    encoding = "utf-8" if utf8 else "ascii"
    options = esmtp.mail_options(mail_params, supports)
    reply = await client.mail(sender, options=options, encoding=encoding)
    protolog.upstream_step(u.idsmtp, " ".join([f"MAIL FROM:<{sender}>", *options]), reply)
    for i, rcpt in enumerate(recipients):
        params = rcpt_params[i] if i < len(rcpt_params) else RcptParams()
        options = esmtp.rcpt_options(params, supports)
        reply = await client.rcpt(rcpt, options=options, encoding=encoding)
        protolog.upstream_step(u.idsmtp, " ".join([f"RCPT TO:<{rcpt}>", *options]), reply)


async def send_once(u: Upstream, sender: str, recipients: Sequence[str], message: bytes, *,
                    local_hostname: str, connect_timeout: float, command_timeout: float,
                    pool: Pool | None = None, stuffed: bool = False,
                    progress: Progress | None = None, mail_params: MailParams = MailParams(),
                    rcpt_params: Sequence[RcptParams] = ()) -> str:
    """One attempt through one upstream; return its final reply text or raise
    UpstreamError (classified). ``stuffed``: see wire_data. With a pool the
    connection is reused and kept; a pooled connection that turns out dead
    before DATA is replaced once by a new one (never another idle one: they
    went stale together, and all of the key's idle ones are dropped) without
    counting as an upstream error. ``progress`` tells the caller whether the
    final dot went out. ``mail_params``/``rcpt_params`` (one per recipient):
    the client's ESMTP parameters, passed on as the connection's EHLO
    keywords allow (esmtp.py)."""
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
        missing = esmtp.missing_extension(mail_params, [sender, *recipients], message,
                                          client.supports_extension)
        if missing:      # from its EHLO, no command sent: the connection stays pooled
            await _hand_back(pool, u, client, True)
            raise UpstreamError(f"the server does not offer {missing}", skipped=missing)
        # Keep the connection only if the dialogue ended in step: after a
        # timeout or a cancellation (the failover deadline) the server may
        # still be busy with our last command.
        keep = False
        before_data = True
        try:
            if reused:
                await client.rset()             # clean state, and proof of life
            await _envelope(u, client, sender, recipients, mail_params, rcpt_params)
            before_data = False
            response = await _data(client, payload, progress)
            protolog.upstream_step(u.idsmtp, f"DATA ({sum(map(len, payload))} bytes)", response)
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
                keep = exc.code != 421 and _is_reply(exc) and _in_step(client)
            raise _classify(exc, progress, connect_timeout, command_timeout) from None
        finally:
            await _hand_back(pool, u, client, keep)
    raise AssertionError("unreachable")  # pragma: no cover


# 5xx replies that speak of the upstream's setup, not of the message: TLS or
# AUTH required (530, 538), credentials refused (535). The next upstream may
# well take the message, so these fail over like a 4xx.
SETUP_REFUSALS = frozenset({530, 535, 538})


def is_permanent(code: int) -> bool:
    return 500 <= code < 600 and code not in SETUP_REFUSALS
