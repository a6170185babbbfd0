"""The SMTP front-end: the aiosmtpd adapter. It parses, asks ``policy`` and
``delivery``, and writes replies (every one a constant from replies.py).
What aiosmtpd gets wrong for a relay is overridden here, each with the
reason next to it; aiosmtpd offers no public extension points for these,
so the underscore hooks overridden are pinned by tests/test_library_pins.py:

* AUTH is auth.py's (mixins): async PLAIN/LOGIN with a 535 on failure.
* Command arguments are arguments.py's (a mixin): the address fast path,
  relayd's MAIL/RCPT parameters (SPEC 3.15, validated by esmtp.py), UTF-8
  in MAIL/RCPT addresses only.
* DATA is read in bulk (wire.read_data) and kept in its wire form (still
  dot-stuffed): the From rewrite only touches header lines, which never
  start with a dot, and upstream.py sends the wire form as is once its
  line endings check out. Only <CRLF>.<CRLF> ends DATA (bare LF or CR never
  do: RFC 5321 4.1.1.4, the SMTP-smuggling fix); the size limit applies
  while reading: past it the data is discarded, then 552 5.3.4.
* Delivery runs shielded from the client: a client that hangs up while its
  message is with an upstream cannot make relayd forget that it was sent;
  any reply to DATA ends the transaction; the idle timer does not run
  while the client waits for that reply.
* The envelope's hooks (EHLO, MAIL, RCPT, RSET, QUIT) are envelope.py's.
* Exceptions are logged with the session id and answered 451 4.3.0; their
  text never reaches the client.
* Every reply goes out through replywire.py: one write per reply, however
  many lines (SPEC 3.14), printable US-ASCII whatever it quotes, an enhanced
  code on every line (RFC 2034); EHLO offers ehlo.py's keywords. Once relayd
  says 421 or closes, nothing pipelined behind it runs (ClientReader.stop).
* A connection holds its admission slot from accept to close, TLS
  handshakes included and bounded; EOF closes it (aiosmtpd kept it
  half-open); a failed handshake is a log line, not an error (admission.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax
from aiosmtpd.smtp import Session as _Session

from . import admission, arguments, auth, metrics, protolog, proxied, replies, replywire, wire
from .envelope import RelayHandler
from .maillog import event
from .esmtp import MailParams, RcptParams
from .records import Upstream

if TYPE_CHECKING:
    from .daemon import Relay

log = logging.getLogger("relayd.smtp")



class Session(_Session):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.id = secrets.token_hex(5).upper()
        self.user: str | None = None      # SMTP user name once authenticated
        self.auth_stamp: str | None = None  # its password's stamp at AUTH (SPEC 3.3)
        self.reserved = 0                 # quota units held by this envelope's RCPTs,
        self.hold = ""                    # under this name in the store (store.reserve)
        self.route: list[Upstream] = []   # this transaction's candidates, decided at MAIL
        self.route_generation = (0, 0)    # (config, records) generations they were decided under
        # The transaction's ESMTP parameters (esmtp.py), one RcptParams per
        # accepted recipient, in envelope.rcpt_tos order.
        self.mail_params = MailParams()
        self.rcpt_params: list[RcptParams] = []
        self.esmtp_args: list[str] = []   # the MAIL/RCPT being handled: relayd's parameters
        self.messages = 0
        self.errors = 0
        self.client_ip: str | None = None   # set by RelaySMTP from its admission

    @property
    def ip(self) -> str:
        """The client's address: the TCP peer's, or a PROXY header's (proxied.py)."""
        if self.client_ip is not None:
            return self.client_ip
        return self.peer[0] if isinstance(self.peer, tuple) else str(self.peer)

    def message_id(self) -> str:
        return self.id if self.messages == 1 else f"{self.id}.{self.messages}"


class RelaySMTP(auth.AuthCommands, arguments.ArgumentCommands, SMTP):
    """One client connection."""

    def __init__(self, relay: Relay, tls: str, auth_require_tls: bool,
                 proxy_protocol: bool = False):
        cfg = relay.config
        self.relay = relay
        # The reader's buffer bound (limits.max_line_length, default 1001 as
        # aiosmtpd's, RFC 5321 4.5.3.1.6): the longest command line (aiosmtpd
        # then applies its 512-byte command_size_limit) and the longest AUTH
        # answer (see challenge_auth; relayd's own credentials are under 200
        # bytes of base64). aiosmtpd reads it in its __init__.
        self.line_length_limit = cfg.limits.max_line_length
        self._counted = False                 # holds an admission slot (admission.py)
        self._tls = tls
        self.peer_ip: str | None = None       # the TCP peer, set at accept
        self.client_ip: str | None = None     # the client: the peer, or a PROXY header's
        self._proxy = proxy_protocol
        self._refusal: str | None = None      # admission's verdict at accept
        self._raw: asyncio.BaseTransport | None = None   # implicit TLS: the TCP transport
        self._tls_started: float | None = None  # loop time a STARTTLS handshake began
        self._reply = replywire.ReplyBuffer(relay.hostname)   # what push writes
        super().__init__(
            RelayHandler(relay),
            data_size_limit=None,           # SIZE advertised and enforced by us (552 5.3.4)
            hostname=relay.hostname,        # never getfqdn() per connection
            ident=replies.BANNER_IDENT,
            tls_context=relay.server_tls if tls == "starttls" else None,
            timeout=cfg.timeouts.session,
            auth_required=True,             # MAIL/RCPT/DATA before AUTH: 530 5.7.0
            # implicit TLS is TLS from the first byte, which aiosmtpd cannot see
            auth_require_tls=auth_require_tls and tls != "implicit",
            # RFC 6531: UTF-8 addresses in MAIL/RCPT (SPEC 3.15). aiosmtpd
            # then decodes every argument as UTF-8 (and would encode replies
            # so; replywire.py keeps them ASCII): guard_arguments below.
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        # The client's stream is a wire.ClientReader (bare-LF tracking, input
        # stopped at close): the StreamReaderProtocol set-up aiosmtpd's
        # __init__ just did, done again with that reader.
        self.client_reader = wire.ClientReader(limit=self.line_length_limit, loop=self.loop)
        self.client_reader.on_line = lambda line, secret: protolog.client_line(
            getattr(self.session, "id", "-"), line, secret)
        asyncio.StreamReaderProtocol.__init__(
            self, self.client_reader, client_connected_cb=self._cb_client_connected,
            loop=self.loop)
        self.guard_arguments()              # arguments.py: UTF-8 in addresses only

    def _create_session(self) -> Session:
        session = Session(self.loop)
        session.client_ip = self.client_ip
        return session

    def _set_rset_state(self) -> None:
        # aiosmtpd discards the envelope here on RSET, HELO, EHLO and the
        # restart after STARTTLS (which also replaces the session object):
        # the quota units its RCPTs reserved go back with it. Without this an
        # EHLO mid-transaction leaked the units until disconnect and charged
        # them to the next message of the session, and STARTTLS leaked them
        # for good.
        self.event_handler.release(self.session)
        super()._set_rset_state()

    # -- connection accounting, admission and lockout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client_ip is not None:     # the TLS layer's, its handshake done
            self._tls_started = None
            super().connection_made(transport)
            if self.session.ssl is None:    # implicit TLS (aiosmtpd sets it after STARTTLS)
                self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
            return
        # SPEC 9: the slot is taken and admission decided at accept, before
        # a byte is exchanged; a TLS handshake in progress holds a slot too.
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self._counted = True
        if self._proxy:                      # the client is who the PROXY header says
            self._raw = transport
            proxied.accept(self, transport)  # type: ignore[arg-type]
            return
        self.client_ip = self.peer_ip
        self._refusal = admission.open_slot(self)
        self._begin(transport)

    def proxied(self, transport: asyncio.Transport, client_ip: str, early: bytes) -> None:
        """proxied.py has read the PROXY header: the connection is ours, from
        ``client_ip``; ``early`` is what the client sent after the header."""
        transport.set_protocol(self)
        self.client_ip = client_ip
        self._refusal = admission.admit(self)
        self._begin(transport, early)

    def _begin(self, transport: asyncio.BaseTransport, early: bytes = b"") -> None:
        if self._tls != "implicit":
            super().connection_made(transport)
            if early:
                self.data_received(early)
        elif self._refusal == replies.TOO_MANY_SESSIONS:
            transport.abort()                # nothing can be said before the handshake
        else:                                # a lockout or drain 421 comes after it
            self._raw = transport
            admission.start_implicit_tls(self, transport, early)  # type: ignore[arg-type]

    def release(self) -> None:
        """Give back the admission slot and the quota units held, once."""
        if self._counted:
            self._counted = False
            self.event_handler.release(self.session)
            admission.close_slot(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.release()
        if self.session is not None:         # else refused before its TLS handshake
            super().connection_lost(error)

    def eof_received(self) -> bool:
        # aiosmtpd cancels the command loop on EOF but keeps the connection
        # half-open. On uvloop a connect-and-close delivers the EOF before
        # that loop's first step (connection_made and the first read happen
        # in one loop iteration), so the cancelled loop never ran its
        # close and the connection held its slot until timeouts.session:
        # 50 health checks locked an address out (SPEC 9). SMTP has no use
        # for a half-closed client: close now (connection_lost frees it).
        if self.session is not None:
            super().eof_received()
        return False

    async def _handle_client(self) -> None:
        if self._refusal:
            await self.push(self._refusal)
            self.close()
            return
        await super()._handle_client()

    def close(self, reply: str | None = None) -> None:
        """Close the connection; ``reply`` (a 421 said outside the command
        loop: idle timeout, drain) is written first."""
        if self.session is None and self._raw is not None:
            self._raw.abort()                # drain: implicit TLS still negotiating
        if self.transport is not None:
            if reply and not self.transport.is_closing():
                self.transport.write(reply.encode() + b"\r\n")
            self.transport.close()
        # Input read but not yet parsed is dropped: once relayd has decided to
        # close (421 after too many errors or a lockout, a bare-LF DATA), no
        # command the client pipelined behind it may run. Without this, one
        # more buffered command ran before connection_lost (e.g. a 21st
        # refused RCPT after the 421 of max_errors 20).
        self.client_reader.stop()

    def _timeout_cb(self) -> None:
        if getattr(self, "_delivering", False):
            # SPEC 3.8: a client waiting for its DATA reply is not idle; a
            # 421 now, with the message then delivered, would make it send
            # the message again. The delivery is bounded by failover.deadline.
            self._reset_timeout()
            return
        self.close(replies.TIMEOUT)          # RFC 5321 4.5.3.2: say why before closing

    async def push(self, status: str | bytes) -> None:
        reply = self._reply.add(status)      # replywire.py: None until the last line
        if reply is None:
            return
        await super().push(reply)
        protolog.client_reply(getattr(self.session, "id", "-"), reply)
        if reply.startswith(b"421"):
            # RFC 5321 3.8: 421 closes the channel. Nothing pipelined may run
            # until the close (MAIL's drain 421 closes an iteration later).
            self.client_reader.stop()
        elif reply[:1] in (b"4", b"5") and self.session is not None:
            self.session.errors += 1
            if self.session.errors >= self.relay.config.limits.max_errors:
                # Postfix's smtpd_hard_error_limit: a client that only errs is
                # a scanner or broken; stop talking to it.
                event(log, logging.INFO, "too_many_errors", session=self.session.id,
                      client=self.session.ip)
                await super().push(replies.TOO_MANY_ERRORS)
                self.close()

    @syntax("STARTTLS", when="tls_context")   # HELP lists what has aiosmtpd's @syntax
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """aiosmtpd's, bounded by timeouts.tls_handshake (SPEC 9) instead of
        the idle timer. asyncio's SSLProtocol wakes aiosmtpd's waiter without
        an error when the connection closes mid-handshake (the client, or
        that timer); the command loop then waited on a dead transport for
        good, slot held. A handshake that did not finish is a failure."""
        if arg or not self.tls_context:
            await super().smtp_STARTTLS(arg)     # 501 / 454
            return
        self._tls_started = self.loop.time()
        self._reset_timeout(self.relay.config.timeouts.tls_handshake)
        await super().smtp_STARTTLS(arg)
        if self._tls_started is not None:        # connection_made(tls) never came
            raise TLSSetupException()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client's failed handshake is cheap input, not relayd's error:
            # one line without traceback. aiosmtpd then closes (no reply).
            started = self._tls_started or self.loop.time()
            limit = self.relay.config.timeouts.tls_handshake
            admission.tls_failed(self, "starttls", error.__cause__,
                                 self.loop.time() - started >= limit)
            return replies.INTERNAL_ERROR
        # STYLE 5: the exception goes to the log with the session id (the
        # handler's hook could not name the session), never to the client.
        session = getattr(self.session, "id", "-")
        log.error("session=%s unexpected error in SMTP session", session, exc_info=error)
        return replies.INTERNAL_ERROR

    # -- DATA

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if self.client_reader.bare_lf:
            # The client is about to send a body; reading it as commands
            # would execute whatever SMTP it carries (SMTP smuggling).
            await self.push(replies.BARE_LF)
            self.close()
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        await self.push(replies.START_DATA)
        wire = await self._read_data(self.relay.config.limits.max_message_size)
        if wire is None:          # connection lost mid-DATA
            return
        handler: RelayHandler = self.event_handler
        if wire is False:
            handler.release(self.session)
            self._set_post_data_state()
            metrics.MESSAGES.labels("rejected").inc()
            await self.push(replies.MESSAGE_TOO_BIG)
            return
        self.session.messages += 1
        self._delivering = True
        try:
            status = await handler.deliver(self, self.session, self.envelope, wire)
        finally:
            # Any reply to DATA, an internal error's included, ends the mail
            # transaction (RFC 5321 4.1.4, SPEC 3.8): a second DATA on this
            # envelope would deliver it without its quota units.
            self._delivering = False
            self._reset_timeout()            # idle from the reply on, not from before it
            self._set_post_data_state()
        await self.push(status)
        if self.relay.draining:
            await self.push(replies.SHUTTING_DOWN)
            self.close()

    async def _read_data(self, limit: int) -> bytes | bool | None:
        """The DATA body in wire form (wire.read_data), False if larger than
        ``limit``, None when the client went away or took too long."""
        # The idle timer is reset per chunk, so a client trickling bytes would
        # never time out: timeouts.data bounds the whole DATA phase.
        try:
            async with asyncio.timeout(self.relay.config.timeouts.data):
                body = await wire.read_data(self.client_reader, limit, self._reset_timeout)
        except TimeoutError:
            await self.push(replies.DATA_TIMEOUT)
            self.close()
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            return None
        return False if body is None else body
