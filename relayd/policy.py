"""Sans-IO send-time decisions: may this user send, the quota ledger, and the
From-rewrite verdict. Plain functions and classes over data; the SMTP handler
feeds them and carries out the answer (STYLE 1).

Quota model (SPEC 3.4)
----------------------
Quotas count accepted recipients. Each RCPT *reserves* one unit; the check
and the reservation happen in one synchronous call, so with one event loop no
interleaving of sessions can exceed a limit. A reservation becomes *sent*
(commit) when the message is journalled, just before an upstream sees it,
is released on RSET or disconnect, and a failed delivery undoes its commit
(uncount). Reserved units count against both limits while pending. This is
the embedded store's quota state (store/sqlite.py); the PostgreSQL backend
keeps the same in the shared database.

The hourly window is rolling: the last 3600 s of sent units, kept as a deque
of (timestamp, count) per user and trimmed lazily.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from . import replies
from .records import SmtpUser, Upstream, domain_of

HOUR = 3600.0


class Verdict(enum.Enum):
    OK = "ok"
    DISABLED = "disabled"
    HOURLY = "hourly"
    TOTAL = "total"
    GONE = "gone"           # the user was removed (a shared store's answer)

    @property
    def reply(self) -> str:
        return _VERDICT_REPLY[self]


_VERDICT_REPLY = {
    Verdict.OK: replies.RCPT_OK,
    Verdict.DISABLED: replies.AUTH_DISABLED,
    Verdict.HOURLY: replies.HOURLY_LIMIT,
    Verdict.TOTAL: replies.TOTAL_LIMIT,
    Verdict.GONE: replies.AUTH_INVALID,
}


@dataclass
class Usage:
    sent_total: int = 0
    window: deque[tuple[float, int]] = field(default_factory=deque)
    window_sum: int = 0
    reserved: int = 0

    def trim(self, now: float) -> None:
        cutoff = now - HOUR
        while self.window and self.window[0][0] <= cutoff:
            self.window_sum -= self.window.popleft()[1]


class Ledger:
    """In-memory quota state for every user; the store journals it."""

    def __init__(self) -> None:
        self._usage: dict[str, Usage] = {}

    def load(self, usage: dict[str, tuple[int, list[tuple[float, int]]]]) -> None:
        self._usage = {}
        for name, (total, window) in usage.items():
            u = Usage(sent_total=total, window=deque(window), window_sum=sum(n for _, n in window))
            self._usage[name] = u

    def _get(self, user: str) -> Usage:
        u = self._usage.get(user)
        if u is None:
            u = self._usage[user] = Usage()
        return u

    def reserve(self, user: SmtpUser, now: float, n: int = 1) -> Verdict:
        """Check the limits and, if they allow it, reserve ``n`` units."""
        if not user.enabled:
            return Verdict.DISABLED
        u = self._get(user.name)
        u.trim(now)
        if u.sent_total + u.reserved + n > user.total_limit:
            return Verdict.TOTAL
        if u.window_sum + u.reserved + n > user.hourly_limit:
            return Verdict.HOURLY
        u.reserved += n
        return Verdict.OK

    def release(self, user: str, n: int) -> None:
        u = self._get(user)
        if n > u.reserved:
            raise ValueError(f"releasing {n} units but only {u.reserved} reserved for {user}")
        u.reserved -= n

    def commit(self, user: str, n: int, ts: float) -> None:
        """Turn ``n`` reserved units into sent ones at ``ts``."""
        self.release(user, n)
        u = self._usage[user]
        u.sent_total += n
        u.window.append((ts, n))
        u.window_sum += n

    def uncount(self, user: str, n: int, ts: float) -> None:
        """Undo ``commit(user, n, ts)``: the message was not delivered after all."""
        u = self._get(user)
        u.sent_total -= n
        for i in range(len(u.window) - 1, -1, -1):     # recent: near the right end
            if u.window[i][0] == ts:
                u.window[i] = (ts, u.window[i][1] - n)
                u.window_sum -= n
                return

    def forget(self, user: str) -> None:
        self._usage.pop(user, None)

    def sent_total(self, user: str) -> int:
        u = self._usage.get(user)
        return u.sent_total if u else 0

    def sent_last_hour(self, user: str, now: float) -> int:
        u = self._usage.get(user)
        if u is None:
            return 0
        u.trim(now)
        return u.window_sum

    def reserved(self, user: str) -> int:
        u = self._usage.get(user)
        return u.reserved if u else 0


# --------------------------------------------------------------------------
# From rewrite verdict (SPEC 3.6)


@dataclass(frozen=True)
class RewriteVerdict:
    rewrite: bool
    envelope_sender: str
    from_header: str | None = None     # the new From: value when rewriting


def rewrite_verdict(upstream: Upstream, envelope_sender: str,
                    header_from_domain: str | None) -> RewriteVerdict:
    """Rewrite when the envelope sender's or the From: header's domain is not
    in the upstream's allowed domains and the upstream has a default sender.

    ``header_from_domain`` is None when the message has no From: header and
    "" when it has one whose domain cannot be read (treated as not allowed).
    """
    allowed = upstream.effective_allowed_domains
    sender_ok = domain_of(envelope_sender) in allowed
    header_ok = header_from_domain is None or header_from_domain in allowed
    if not upstream.defaultfromemail or (sender_ok and header_ok):
        return RewriteVerdict(False, envelope_sender)
    return RewriteVerdict(True, upstream.defaultfromemail,
                          format_from(upstream.defaultfromname, upstream.defaultfromemail))


# C0 controls and DEL. A From: value is one line: a CR or LF taken from a
# stored name or address would inject header fields (e.g. "Bcc:"). The admin
# API refuses them (SPEC 4.5), but domain settings and direct store writes
# reach here too, so the header is made safe where it is built.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def format_from(name: str | None, address: str) -> str:
    """``name <address>`` on one line; the name is quoted when it holds
    RFC 5322 specials, RFC 2047-encoded when it is not ASCII."""
    address = _CONTROLS.sub("", address)
    name = _CONTROLS.sub(" ", name).strip() if name else name
    if not name:
        return address
    if any(c in name for c in '()<>[]:;@\\,."'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif not name.isascii():
        from email.header import Header
        # Header.encode() folds long names with a bare "\n ": inside a CRLF
        # message that is a bare LF. Adjacent encoded-words separated by a
        # space decode to the same text (RFC 2047 6.2), so keep one line.
        name = " ".join(Header(name, "utf-8").encode().split())
    return f"{name} <{address}>"


# --------------------------------------------------------------------------
# Failed-AUTH throttling (SPEC 3.2, 3.11)


@dataclass(frozen=True)
class Lockout:
    """One locked-out client address: its failures in the window and the
    ``time.monotonic()`` instant the window frees it (callers convert it to
    wall-clock time for display)."""

    ip: str
    failures: int
    until: float


class AuthThrottle:
    """Failed AUTHs per client IP in a sliding window. ``max_ips`` bounds
    memory against address-hopping attackers: beyond it the oldest entries
    are forgotten first."""

    def __init__(self, max_failures: int, window: float, max_ips: int = 100_000):
        self.max_failures = max_failures
        self.window = window
        self.max_ips = max_ips
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str, now: float) -> deque[float] | None:
        q = self._failures.get(ip)
        if q is not None:
            while q and q[0] <= now - self.window:
                q.popleft()
            if not q:
                del self._failures[ip]
                return None
        return q

    def locked(self, ip: str, now: float) -> bool:
        q = self._recent(ip, now)
        return q is not None and len(q) >= self.max_failures

    def failure(self, ip: str, now: float) -> bool:
        """Record a failure; return True if the IP is now locked out."""
        q = self._recent(ip, now)
        if q is None:
            if len(self._failures) >= self.max_ips:
                self._failures.pop(next(iter(self._failures)))
            q = self._failures[ip] = deque(maxlen=self.max_failures)
        q.append(now)
        return len(q) >= self.max_failures

    def lockouts(self, now: float) -> list[Lockout]:
        """The IPs locked out at ``now`` (SPEC 4.6), oldest lock first. An IP
        is freed when its ``max_failures``-th newest failure leaves the window."""
        out = []
        for ip in list(self._failures):
            q = self._recent(ip, now)
            if q is not None and len(q) >= self.max_failures:
                out.append(Lockout(ip, len(q), q[-self.max_failures] + self.window))
        out.sort(key=lambda lo: (lo.until, lo.ip))
        return out

    def clear(self, ip: str, now: float) -> bool:
        """Lift ``ip``'s lockout, forgetting its failures; False (and nothing
        changed) if it was not locked at ``now``."""
        if not self.locked(ip, now):
            return False
        del self._failures[ip]
        return True

    def reconfigure(self, max_failures: int, window: float) -> None:
        self.max_failures, self.window = max_failures, window
        for ip, q in list(self._failures.items()):
            self._failures[ip] = deque(q, maxlen=max_failures)
