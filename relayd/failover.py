"""The failover loop (SPEC 3.7, 3.8): one message tried through its
candidate upstreams in order, one attempt each (upstream.send_once), until
one accepts it, one refuses it permanently, one leaves its delivery
unconfirmed (no failover after the final dot), or the failover deadline
passes. Each attempt is recorded: "ok" resets the upstream's numerrors,
"error" counts one, "refused" (a 5xx about the message) and "skipped" (the
upstream lacks an extension this message needs, SPEC 3.15) count nothing.
What an attempt's reply says to the client is upstream.py's (``describe``,
``for_client``); its technical detail goes to the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from .errors import UpstreamError
from .esmtp import MailParams, RcptParams
from .pool import Pool
from .records import Upstream
from .upstream import Progress, for_client, send_once


@dataclass
class Attempt:
    upstream: Upstream
    ok: bool
    reply: str
    duration: float
    rewritten: bool = False
    permanent: bool = False
    unconfirmed: bool = False      # the upstream had the message, then no reply
    skipped: str | None = None     # not tried: lacks this extension (SPEC 3.15)
    detail: str = ""               # the log's account of a failure (SPEC 3.18)


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

    @property
    def tried(self) -> Attempt | None:
        """The last attempt that reached an upstream's dialogue (a skipped
        candidate says nothing about whether the message could go later),
        else the last one."""
        return next((a for a in reversed(self.attempts) if not a.skipped), self.last)

    @property
    def unsendable(self) -> str | None:
        """Every candidate was skipped: the extension to report ("SMTPUTF8"
        when any lacked it, else "8BITMIME"); None otherwise."""
        if not self.attempts or not all(a.skipped for a in self.attempts):
            return None
        return "SMTPUTF8" if any(a.skipped == "SMTPUTF8" for a in self.attempts) else "8BITMIME"


# prepare(upstream) -> (envelope sender, message bytes, rewritten?)
Prepare = Callable[[Upstream], tuple[str, bytes, bool]]
# record(upstream, "ok" | "error" | "refused" | "skipped", reply): count
# errors (the reply, as a client may read it, is the error's reason), reset
# on success
Record = Callable[[Upstream, str, str], Awaitable[None]]


async def deliver(candidates: Sequence[Upstream], recipients: Sequence[str], prepare: Prepare,
                  record: Record, *, local_hostname: str, connect_timeout: float,
                  command_timeout: float, deadline: float, pool: Pool | None = None,
                  send: Callable[..., Awaitable[str]] | None = None,
                  mail_params: MailParams = MailParams(),
                  rcpt_params: Sequence[RcptParams] = ()) -> Outcome:
    """Try ``candidates`` in order until one accepts, a permanent refusal, an
    unconfirmed attempt, or ``deadline`` seconds pass (SPEC 3.7, 3.8).
    ``prepare`` returns each upstream's message in DATA wire form
    (dot-stuffed, as received). ``send`` is one attempt (send_once; tests
    pass their own). A failed attempt's reply is what a client may read of
    it (``for_client``) and goes to ``record``; its detail to the mail log."""
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
                                   stuffed=True, progress=progress,
                                   mail_params=mail_params, rcpt_params=rcpt_params)
        except TimeoutError:
            err = UpstreamError(f"failover deadline of {deadline:g} s reached"
                                + (" after the message was sent" if progress.dot else ""),
                                unconfirmed=progress.dot)
        except UpstreamError as exc:
            err = exc
        else:
            outcome.attempts.append(Attempt(u, True, reply, time.monotonic() - started,
                                            rewritten, detail=reply))
            await record(u, "ok", reply)
            return outcome
        outcome.attempts.append(Attempt(u, False, for_client(u, err.reply),
                                        time.monotonic() - started, rewritten, err.permanent,
                                        err.unconfirmed, err.skipped, err.detail))
        # A 5xx is about the message, not the server: no error counted, and
        # no failover (the next upstream would refuse it too). Unconfirmed:
        # the server's fault, counted, and no failover (a duplicate).
        # Skipped: this message's need, not the server's fault (SPEC 3.15).
        result = "skipped" if err.skipped else "refused" if err.permanent else "error"
        await record(u, result, outcome.attempts[-1].reply)
        if err.permanent or err.unconfirmed:
            break
    return outcome
