"""One message's way from the end of DATA to its reply: the journal-first
quota protocol, the upstream attempts and the mail-log line.

Quota protocol (SPEC 3.4, 3.8), each step exactly once whatever happens:

1. *reserve* -- done by the RCPTs, in the store (store.reserve: the Ledger
   of the embedded store, the shared database of a cluster);
2. *count* -- the reserved units become sent ones in the store before any
   upstream sees the message, so that a crash from here on over-counts,
   never under-counts;
3. kept when an upstream accepted, else *undo*: units still reserved are
   released, counted ones uncounted -- for a refusal, a failure, an
   unconfirmed attempt and an unexpected error alike (``Settlement.undo``
   runs in a ``finally``).

The SMTP front-end ends the mail transaction after whatever reply comes back
from here (RFC 5321 4.1.4): nothing of this envelope can be delivered twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import metrics, replies, rewrite, routing, trace
from .errors import HeaderTooLarge, NotFound, StoreError
from .maillog import message_line
from .policy import rewrite_verdict
from .records import SmtpUser, Upstream, domain_of
from .failover import Attempt, Outcome, deliver as try_upstreams
from .wire import unstuffed_size

if TYPE_CHECKING:
    from aiosmtpd.smtp import Envelope

    from .daemon import Relay
    from .smtp import Session

log = logging.getLogger("relayd.delivery")


def route(relay: Relay, user: SmtpUser, sender: str) -> list[Upstream]:
    """The upstreams to try for ``sender``'s message, in order, each with its
    current health (no I/O). Empty: no route at all."""
    owner, app, dom, own = relay.store.route_view(user, domain_of(sender))
    cfg = relay.config.failover
    health = relay.store.with_health
    return routing.route(
        plan=owner.plan, strategy=app.strategy,
        domain_route=health(dom.as_upstream()) if dom else None,
        own=own, system=[health(u) for u in relay.system], now=time.time(),
        rules=routing.FailoverRules(cfg.max_errors, cfg.cooldown, cfg.max_attempts),
        rng=relay.rng)


def route_generation(relay: Relay) -> tuple[int, int]:
    """Changes whenever a route decided before may be out of date: a config
    reload (system SMTPs) or a change to the routing records."""
    return relay.generation, relay.store.view.generation


def upstream_error_counts(relay: Relay) -> list[tuple[str, int]]:
    """(upstream id, numerrors) of every upstream, for the metrics gauge."""
    counts = {u.idsmtp: 0 for u in relay.system}
    counts.update(relay.store.upstream_error_counts())
    return list(counts.items())


def recorder(relay: Relay) -> Callable[[Upstream, str, str], Awaitable[None]]:
    """How an attempt is counted: 'ok' resets numerrors, 'error' increments
    it, 'refused' (a permanent 5xx about the message) and 'skipped' (the
    upstream lacks an extension this message needs, SPEC 3.15) leave it
    alone. ``reply`` is the attempt's reply as a client may read it (SPEC
    3.18): an error's is kept as its reason (SPEC 4.6)."""
    async def record(u: Upstream, result: str, reply: str) -> None:
        metrics.UPSTREAM_ATTEMPTS.labels(u.idsmtp, result).inc()
        if result in ("refused", "skipped"):
            return
        ok = result == "ok"
        try:
            await relay.store.record_upstream_result(
                u.idsmtp, ok, time.time(), None if ok else replies.one_line(reply) or None)
        except StoreError:
            log.exception("cannot record the result of upstream %s", u.idsmtp)
    return record


class Settlement:
    """The quota units one message holds (its RCPTs' hold ``hold``), from
    reserved through counted to kept or undone, each step once."""

    def __init__(self, relay: Relay, user: str, hold: str, units: int, ts: float):
        self.store = relay.store
        self.user, self.hold, self.units, self.ts = user, hold, units, ts
        self.state = "reserved" if units else "settled"

    async def count(self) -> None:
        await self.store.count(self.user, self.hold, self.ts, self.units)
        self.state = "counted"

    def keep(self) -> None:
        self.state = "settled"

    async def undo(self, msg_id: str) -> None:
        """Release reserved units, uncount counted ones; once settled, nothing."""
        state, self.state = self.state, "settled"
        try:
            if state == "reserved":
                self.store.release(self.user, self.hold, self.units)
            elif state == "counted":
                await self.store.uncount(self.user, self.hold, self.ts, self.units)
        except StoreError:
            # Counted but not sent: errs on the side of the limit, never below it.
            log.exception("session=%s cannot give back the quota units of a failed message",
                          msg_id)


async def deliver(relay: Relay, session: Session, envelope: Envelope, wire: bytes,
                  units: int, hold: str) -> str:
    """Decide and send one message (``wire``: as received after DATA, still
    dot-stuffed) whose RCPTs reserved ``units`` under ``hold``; return the
    reply to DATA.
    Upstreams get it with relayd's Received: field on top (SPEC 3.16); the
    mail log's ``size=`` is the client's message without that field, after
    dot-unstuffing (SPEC 3.17)."""
    started = time.monotonic()
    sender = envelope.mail_from or ""
    rcpts = list(envelope.rcpt_tos)
    msg_id = session.message_id()
    settlement = Settlement(relay, session.user or "", hold, units, time.time())
    # What _send's prepare (the From rewrite) starts from. ``wire`` is in DATA
    # wire form, dot-stuffed (RFC 5321 4.5.2): the Received field never starts
    # with '.', so prepending it needs no stuffing, and every byte after it
    # stays as received. (The From rewrite's header bound, rewrite.MAX_HEADER,
    # counts the field, as Postfix's header_size_limit counts its own.)
    traced = trace_field(relay, session, msg_id) + wire
    try:
        result, reply, last = await _send(relay, session, sender, rcpts, traced, settlement,
                                          started)
    except Exception:
        # STYLE 5: logged with the session id, never shown to the client.
        log.exception("session=%s unexpected error during delivery", msg_id)
        result, reply, last = "error", replies.INTERNAL_ERROR, None
    finally:
        await settlement.undo(msg_id)
    metrics.MESSAGES.labels(result).inc()
    fields: dict[str, Any] = {"from": sender}
    message_line(session=msg_id, user=session.user, client=session.ip, **fields,
                 rcpts=len(rcpts), size=unstuffed_size(wire),
                 upstream=last.upstream.idsmtp if last else "",
                 upstream_host=last.upstream.host if last else "",
                 rewrite="yes" if last and last.rewritten else "no", result=result,
                 # The technical account (SPEC 3.18): the client's reply has plain words.
                 reply=last.detail if last and last.detail else reply,
                 duration=round(time.monotonic() - started, 3))
    return reply


def trace_field(relay: Relay, session: Session, msg_id: str) -> bytes:
    """relayd's Received: field for this session's message (trace.py); b""
    with ``received_header: off``. TLS means STARTTLS or implicit TLS (smtp.py
    sets ``session.ssl`` for both); authenticated, relayd's own AUTH."""
    return trace.received(
        relay.config.received_header, ehlo_name=session.host_name, client_ip=session.ip,
        hostname=relay.hostname, tls=session.ssl is not None,
        authenticated=session.user is not None, session_id=msg_id,
        when=datetime.now().astimezone())


async def _send(relay: Relay, session: Session, sender: str, rcpts: list[str], wire: bytes,
                settlement: Settlement, started: float) -> tuple[str, str, Attempt | None]:
    """(result, reply, last attempt) for one message. The candidates are
    those MAIL decided (session.route): computed once per transaction."""
    msg_id = session.message_id()
    user = relay.store.get_user(session.user or "")
    if user is None or not user.enabled:
        return "rejected", replies.AUTH_DISABLED, None
    candidates = session.route
    if session.route_generation != route_generation(relay):
        try:            # records changed since MAIL: an upstream may be gone
            candidates = route(relay, user, sender)
        except NotFound:
            candidates = []
    if not candidates:
        return "deferred", replies.NO_UPSTREAM, None
    try:
        header_domain = rewrite.from_domain(wire)
    except HeaderTooLarge:
        return "rejected", replies.HEADER_TOO_BIG, None
    try:
        await settlement.count()
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
        candidates, rcpts, prepare, recorder(relay), local_hostname=relay.hostname,
        connect_timeout=cfg.timeouts.connect, command_timeout=cfg.timeouts.command,
        deadline=cfg.failover.deadline, pool=relay.pool,
        mail_params=session.mail_params, rcpt_params=session.rcpt_params)
    metrics.DELIVERY_DURATION.observe(time.monotonic() - started)
    if outcome.delivered:
        settlement.keep()
    return _verdict(outcome, msg_id)


def _verdict(outcome: Outcome, msg_id: str) -> tuple[str, str, Attempt]:
    """(result, reply, the attempt the reply speaks of) once the attempts
    are over. A candidate skipped for want of an extension says nothing of
    the others: the reply quotes the last upstream actually tried, and is a
    refusal only when none could be tried at all (SPEC 3.15)."""
    last = outcome.tried
    assert last is not None
    if outcome.delivered:
        if last.rewritten:
            metrics.FROM_REWRITES.inc()
        return "delivered", replies.QUEUED.format(id=msg_id), last
    unsendable = outcome.unsendable
    if unsendable:
        return "rejected", (replies.NEEDS_SMTPUTF8 if unsendable == "SMTPUTF8"
                            else replies.NEEDS_8BITMIME), last
    text = replies.one_line(last.reply)
    if outcome.unconfirmed:
        return "unconfirmed", replies.DELIVERY_UNCONFIRMED.format(reply=text), last
    if outcome.permanent:
        return "bounced", replies.DELIVERY_REFUSED.format(reply=text), last
    return "deferred", replies.DELIVERY_DEFERRED.format(reply=text), last
