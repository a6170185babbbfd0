"""The envelope's rules: aiosmtpd's handler hooks for EHLO, MAIL, RCPT,
RSET and QUIT, and the hand-over of DATA to delivery.py. The quota units an
envelope's RCPTs reserve are held under a name (``Session.hold``) in the
store, given back by ``release`` whenever the envelope goes away, and owned
by the delivery once DATA is complete.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Envelope

from . import auth, delivery, ehlo, esmtp, metrics, replies
from .errors import NotFound, StoreError
from .policy import Verdict
from .records import SmtpUser

if TYPE_CHECKING:
    from .daemon import Relay
    from .smtp import RelaySMTP, Session


class RelayHandler(auth.AuthMechanisms):
    """aiosmtpd hooks; one instance per connection."""

    def __init__(self, relay: Relay):
        self.relay = relay

    # -- EHLO: ehlo.py's keywords, each once, in its order (SPEC 3.14)

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return ehlo.reply(responses, self.relay.config.limits.max_message_size)

    # -- envelope

    async def _current_user(self, session: Session, *, fresh: bool = False) -> SmtpUser | None:
        """The session's user as the store has it now (``fresh``: as the
        shared store has it, SPEC 8); None once it was removed or its
        password reset since this session's AUTH (SPEC 3.3: 535 at the next
        MAIL or RCPT). StoreError when the store cannot say."""
        store = self.relay.store
        name = session.user or ""
        if fresh:
            current = await store.current_user(name)
            user, stamp = current if current is not None else (None, None)
        else:
            user, stamp = store.get_user(name), store.credential_stamp(name)
        if user is None or stamp != session.auth_stamp:
            return None
        return user

    def release(self, session: Session | None) -> None:
        """Give back the quota units this session's RCPTs reserved -- also
        when none was confirmed: a shared store's reservation whose reply was
        lost may still hold a unit under the hold's name."""
        if session is not None and session.hold and session.user:
            self.relay.store.release(session.user, session.hold, session.reserved)
        if session is not None:
            session.reserved, session.hold = 0, ""

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        self.release(session)
        return replies.OK

    async def handle_QUIT(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        self.release(session)
        return replies.BYE

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        relay = self.relay
        if relay.draining:
            server.loop.call_soon(server.close)   # after the reply is written
            return replies.SHUTTING_DOWN
        if relay.store_problem is not None:      # SPEC 9: no mail into a lost store
            return replies.STORE_UNAVAILABLE
        try:
            params = esmtp.parse_mail(session.esmtp_args)
            esmtp.check_address(address, params.smtputf8, replies.BAD_SENDER_ADDRESS)
        except esmtp.ParamError as refusal:
            return refusal.reply
        for opt in mail_options:
            key, _, value = opt.partition("=")
            if key == "SIZE" and value.isdigit() and int(value) > relay.config.limits.max_message_size:
                return replies.MESSAGE_TOO_BIG
        try:
            user = await self._current_user(session, fresh=True)
        except StoreError:
            return replies.STORE_UNAVAILABLE
        if user is None:
            return replies.AUTH_INVALID
        if not user.enabled:
            return replies.AUTH_DISABLED
        try:
            session.route = delivery.route(relay, user, address)
        except NotFound:
            session.route = []
        session.route_generation = delivery.route_generation(relay)
        if not session.route:
            return replies.NO_UPSTREAM
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        session.mail_params = params
        return replies.SENDER_OK

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        relay = self.relay
        try:
            params = esmtp.parse_rcpt(session.esmtp_args)
            esmtp.check_address(address, session.mail_params.smtputf8, replies.BAD_RCPT_ADDRESS)
        except esmtp.ParamError as refusal:
            metrics.RECIPIENTS.labels("invalid").inc()
            return refusal.reply
        if len(envelope.rcpt_tos) >= relay.config.limits.max_recipients:
            metrics.RECIPIENTS.labels("too_many").inc()
            return replies.TOO_MANY_RCPTS
        user = await self._current_user(session)
        if user is None:
            return replies.AUTH_INVALID
        session.hold = session.hold or secrets.token_hex(8)
        try:
            verdict = await relay.store.reserve(user, session.hold, time.time())
        except StoreError:
            return replies.STORE_UNAVAILABLE
        if verdict is Verdict.GONE:          # removed since the view last heard of it
            return replies.AUTH_INVALID
        if verdict is not Verdict.OK:
            metrics.RECIPIENTS.labels(verdict.value).inc()
            if verdict in (Verdict.HOURLY, Verdict.TOTAL):
                metrics.LIMIT_REJECTIONS.labels(verdict.value).inc()
            return verdict.reply
        session.reserved += 1
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        session.rcpt_params.append(params)       # aligned with rcpt_tos
        metrics.RECIPIENTS.labels("accepted").inc()
        return replies.RCPT_OK

    # -- delivery

    async def deliver(self, server: RelaySMTP, session: Session, envelope: Envelope,
                      wire: bytes) -> str:
        # From here the delivery owns the reservation: a disconnect must not
        # release units for a message an upstream may be accepting.
        units, hold = session.reserved, session.hold
        session.reserved, session.hold = 0, ""
        task = asyncio.ensure_future(
            delivery.deliver(self.relay, session, envelope, wire, units, hold))
        self.relay.inflight.add(task)
        task.add_done_callback(self.relay.inflight.discard)
        return await asyncio.shield(task)
