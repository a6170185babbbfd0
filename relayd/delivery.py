"""One message's way from the end of DATA to its reply: the journal-first
quota protocol, the upstream attempts and the mail-log line.

Quota protocol (SPEC 3.4, 3.8), each step exactly once whatever happens:

1. *reserve* -- done by the RCPTs, in the Ledger (policy.py);
2. *journal* -- the units are written to the store before any upstream sees
   the message, so that a crash from here on over-counts, never under-counts;
3. *commit* when an upstream accepted, else *undo*: the reservation is
   released and, if it was journalled, the journal row is cancelled -- for a
   refusal, a failure, an unconfirmed attempt and an unexpected error alike
   (``Settlement.undo`` runs in a ``finally``).

The SMTP front-end ends the mail transaction after whatever reply comes back
from here (RFC 5321 4.1.4): nothing of this envelope can be delivered twice.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from . import metrics, replies, rewrite
from .errors import HeaderTooLarge, NotFound, StoreError
from .maillog import message_line
from .policy import Hold, rewrite_verdict
from .records import Upstream
from .upstream import Attempt, deliver as try_upstreams

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope

    from .daemon import Relay
    from .smtp import Session

log = logging.getLogger("relayd.delivery")


class Settlement:
    """The quota units one message holds, from its journal row to its
    commit or undo."""

    def __init__(self, relay: Relay, user: str, units: int, ts: float):
        self.hold = Hold(relay.ledger, user, units)
        self.store = relay.store
        self.ts = ts
        self.journaled = False

    async def journal(self) -> None:
        await self.store.journal_send(self.hold.user, self.ts, self.hold.units)
        self.journaled = True

    def commit(self) -> None:
        self.hold.commit(self.ts)

    async def undo(self, msg_id: str) -> None:
        """Release the units and cancel the journal row; after a commit, or
        a second time, nothing."""
        if self.hold.settled:
            return
        self.hold.release()
        if self.journaled:
            self.journaled = False
            try:
                await self.store.journal_send(self.hold.user, self.ts, -self.hold.units)
            except StoreError:
                # Counted but not sent: errs on the side of the limit, never below it.
                log.exception("session=%s cannot undo quota usage of a failed message", msg_id)


async def deliver(relay: Relay, session: Session, envelope: Envelope, wire: bytes,
                  units: int) -> str:
    """Decide and send one message (``wire``: as received after DATA, still
    dot-stuffed) whose RCPTs reserved ``units``; return the reply to DATA."""
    started = time.monotonic()
    sender = envelope.mail_from or ""
    rcpts = list(envelope.rcpt_tos)
    msg_id = session.message_id()
    settlement = Settlement(relay, session.user or "", units, time.time())
    try:
        result, reply, last = await _send(relay, session.user or "", sender, rcpts, wire,
                                          settlement, msg_id, started)
    except Exception:
        # STYLE 5: logged with the session id, never shown to the client.
        log.exception("session=%s unexpected error during delivery", msg_id)
        result, reply, last = "error", replies.INTERNAL_ERROR, None
    finally:
        await settlement.undo(msg_id)
    metrics.MESSAGES.labels(result).inc()
    fields: dict[str, Any] = {"from": sender}
    message_line(session=msg_id, user=session.user, client=session.ip, **fields,
                 rcpts=len(rcpts), size=len(wire),
                 upstream=last.upstream.idsmtp if last else "",
                 upstream_host=last.upstream.host if last else "",
                 rewrite="yes" if last and last.rewritten else "no", result=result,
                 reply=last.reply if last and last.reply else reply,
                 duration=round(time.monotonic() - started, 3))
    return reply


async def _send(relay: Relay, user_name: str, sender: str, rcpts: list[str], wire: bytes,
                settlement: Settlement, msg_id: str, started: float
                ) -> tuple[str, str, Attempt | None]:
    """(result, reply, last attempt) for one message."""
    user = relay.store.get_user(user_name)
    if user is None or not user.enabled:
        return "rejected", replies.AUTH_DISABLED, None
    try:
        candidates = relay.candidates(user, sender)
    except NotFound:
        candidates = []
    if not candidates:
        return "deferred", replies.NO_UPSTREAM, None
    try:
        header_domain = rewrite.from_domain(wire)
    except HeaderTooLarge:
        return "rejected", replies.HEADER_TOO_BIG, None
    try:
        await settlement.journal()
    except StoreError:
        log.exception("session=%s cannot journal quota usage", msg_id)
        return "error", replies.INTERNAL_ERROR, None

    def prepare(u: Upstream) -> tuple[str, bytes, bool]:
        verdict = rewrite_verdict(u, sender, header_domain)
        if not verdict.rewrite:
            return sender, wire, False
        assert verdict.from_header is not None
        return verdict.envelope_sender, rewrite.rewrite_from(wire, verdict.from_header), True

    cfg = relay.config
    outcome = await try_upstreams(
        candidates, rcpts, prepare, relay.record_result, local_hostname=relay.hostname,
        connect_timeout=cfg.timeouts.connect, command_timeout=cfg.timeouts.command,
        deadline=cfg.failover.deadline, pool=relay.pool)
    metrics.DELIVERY_DURATION.observe(time.monotonic() - started)
    last = outcome.last
    assert last is not None
    if outcome.delivered:
        settlement.commit()
        if last.rewritten:
            metrics.FROM_REWRITES.inc()
        return "delivered", replies.QUEUED.format(id=msg_id), last
    text = replies.one_line(last.reply)
    if outcome.unconfirmed:
        return "unconfirmed", replies.DELIVERY_UNCONFIRMED.format(reply=text), last
    if outcome.permanent:
        return "bounced", replies.DELIVERY_REFUSED.format(reply=text), last
    return "deferred", replies.DELIVERY_DEFERRED.format(reply=text), last
