"""Sans-IO routing: which upstreams to try for a message, in which order
(SPEC 3.5, 3.7). No sockets, no store: callers pass the records in.

1. The sender domain's settings route (same owner) comes first.
2. Then the app's active upstreams: by ``priority`` (lowest first, ties
   shuffled) when the app's strategy is ``priority`` and the plan allows it;
   uniformly shuffled otherwise. The free plan always uses ``random``.
3. A paid owner with no active upstreams of its own uses the system SMTPs;
   a free owner never does.
4. Failover bookkeeping: an upstream with ``numerrors >= max_errors`` is
   skipped until ``cooldown`` seconds after its last error; if that skips
   every candidate, the one whose last error is oldest is tried alone.
5. At most ``max_attempts`` candidates are returned.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .records import Upstream


@dataclass(frozen=True)
class FailoverRules:
    max_errors: int = 5
    cooldown: float = 300.0
    max_attempts: int = 3


def effective_strategy(plan: str, strategy: str) -> str:
    return strategy if plan == "paid" else "random"


def pool(plan: str, own: Sequence[Upstream], system: Sequence[Upstream]) -> list[Upstream]:
    """The upstreams a message may use, before ordering (SPEC 3.5)."""
    active = [u for u in own if u.status == "A"]
    if active or plan != "paid":
        return active
    return list(system)


def order(upstreams: Sequence[Upstream], strategy: str, rng: random.Random) -> list[Upstream]:
    out = list(upstreams)
    rng.shuffle(out)
    if strategy == "priority":
        out.sort(key=lambda u: u.priority)   # stable: ties keep shuffled order
    return out


def cooling_down(u: Upstream, now: float, rules: FailoverRules) -> bool:
    return (u.numerrors >= rules.max_errors and u.last_error is not None
            and now - u.last_error < rules.cooldown)


def plan_attempts(candidates: Sequence[Upstream], now: float, rules: FailoverRules
                  ) -> list[Upstream]:
    """Apply cooldown skipping and the attempt cap to ordered candidates."""
    usable = [u for u in candidates if not cooling_down(u, now, rules)]
    if not usable and candidates:
        usable = [min(candidates, key=lambda u: u.last_error or 0.0)]
    return usable[: rules.max_attempts]


def route(*, plan: str, strategy: str, domain_route: Upstream | None,
          own: Sequence[Upstream], system: Sequence[Upstream], now: float,
          rules: FailoverRules, rng: random.Random) -> list[Upstream]:
    """The upstreams to try, in order; empty means no route at all."""
    ordered = order(pool(plan, own, system), effective_strategy(plan, strategy), rng)
    if domain_route is not None:
        ordered.insert(0, domain_route)
    return plan_attempts(ordered, now, rules)


class ErrorBook:
    """Upstream health: numerrors and the last error's time per upstream id,
    the one place routing reads them (own upstreams, domain routes and
    system SMTPs alike; the store keeps the book and a copy of own
    upstreams' counts in their rows)."""

    def __init__(self) -> None:
        self._book: dict[str, tuple[int, float | None]] = {}
        # The last error's reason (SPEC 3.18 wording, as a client may read
        # it), kept after a success as the last error's time is (SPEC 4.6).
        self._reasons: dict[str, str] = {}

    def get(self, idsmtp: str) -> tuple[int, float | None]:
        return self._book.get(idsmtp, (0, None))

    def apply(self, u: Upstream) -> Upstream:
        n, last = self.get(u.idsmtp)
        if (n, last) == (u.numerrors, u.last_error):
            return u
        return replace(u, numerrors=n, last_error=last)

    def set(self, idsmtp: str, n: int, last: float | None, reason: str | None = None) -> None:
        self._book[idsmtp] = (n, last)
        if reason is None:
            self._reasons.pop(idsmtp, None)
        else:
            self._reasons[idsmtp] = reason

    def reason(self, idsmtp: str) -> str | None:
        """The last error's reason, or None."""
        return self._reasons.get(idsmtp)

    def forget(self, idsmtps: set[str]) -> None:
        for i in idsmtps:
            self._book.pop(i, None)
            self._reasons.pop(i, None)

    def counts(self) -> list[tuple[str, int]]:
        return [(k, n) for k, (n, _) in self._book.items()]

    def domain_counts(self) -> list[tuple[str, int]]:
        return [(k, n) for k, (n, _) in self._book.items() if k.startswith("domain:")]

    def record(self, idsmtp: str, ok: bool, now: float, reason: str | None = None) -> int:
        n, last = self.get(idsmtp)
        self._book[idsmtp] = (0, last) if ok else (n + 1, now)
        if not ok:
            if reason:
                self._reasons[idsmtp] = reason
            else:
                self._reasons.pop(idsmtp, None)
        return self._book[idsmtp][0]

    def health(self, u: Upstream, now: float, rules: FailoverRules) -> dict[str, object]:
        """``u``'s health as the operator sees it (SPEC 4.6): numerrors,
        last_error_at (Unix time or None; the caller formats it), last_error
        (the reason) and cooling_down."""
        h = self.apply(u)
        return {"numerrors": h.numerrors, "last_error_at": h.last_error,
                "last_error": self.reason(u.idsmtp) if h.last_error is not None else None,
                "cooling_down": cooling_down(h, now, rules)}
