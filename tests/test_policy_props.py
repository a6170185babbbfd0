"""Property tests (hypothesis) of the sans-IO decisions:

* the quota Ledger, driven by random interleavings of reserve / release /
  commit and clock steps, agrees with a naive model, never lets sent +
  reserved exceed a limit and never goes negative;
* the From rewrite keeps every byte after the header block and every other
  header field identical;
* routing respects priority, cooldown, the attempt cap and the plan rules.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relayd import rewrite
from relayd.policy import HOUR, Ledger, Verdict
from relayd.records import SmtpUser, Upstream
from relayd.routing import FailoverRules, cooling_down, pool, route

# ------------------------------------------------------------------ Ledger

SESSIONS = 3


class LedgerMachine(RuleBasedStateMachine):
    """Several sessions of one user share a Ledger; a model recomputes every
    answer from the list of commits."""

    @initialize(total=st.integers(1, 12), hourly=st.integers(1, 8))
    def setup(self, total: int, hourly: int) -> None:
        self.ledger = Ledger()
        self.user = SmtpUser("smtp1", "o", "a", total, hourly, "Enable", "")
        self.now = 1_000_000.0
        self.held = [0] * SESSIONS          # units reserved per session
        self.commits: list[tuple[float, int]] = []

    def window(self) -> int:
        return sum(n for ts, n in self.commits if ts > self.now - HOUR)

    def sent(self) -> int:
        return sum(n for _, n in self.commits)

    @rule(dt=st.sampled_from([0, 1, 600, 1799, 1800, 3599, 3600, 3601]) | st.integers(0, 9000))
    def tick(self, dt: int) -> None:
        self.now += dt

    @rule(i=st.integers(0, SESSIONS - 1), n=st.integers(1, 3))
    def reserve(self, i: int, n: int) -> None:
        held = sum(self.held)
        if self.sent() + held + n > self.user.total_limit:
            expected = Verdict.TOTAL
        elif self.window() + held + n > self.user.hourly_limit:
            expected = Verdict.HOURLY
        else:
            expected = Verdict.OK
        assert self.ledger.reserve(self.user, self.now, n) is expected
        if expected is Verdict.OK:
            self.held[i] += n

    @rule(i=st.integers(0, SESSIONS - 1), data=st.data())
    def release(self, i: int, data: st.DataObject) -> None:
        k = data.draw(st.integers(0, self.held[i]))
        self.ledger.release("smtp1", k)
        self.held[i] -= k

    @rule(i=st.integers(0, SESSIONS - 1))
    def commit(self, i: int) -> None:
        self.ledger.commit("smtp1", self.held[i], self.now)
        if self.held[i]:
            self.commits.append((self.now, self.held[i]))
        self.held[i] = 0

    @precondition(lambda self: sum(self.held) > 0)
    @rule()
    def over_release_is_refused(self) -> None:
        try:
            self.ledger.release("smtp1", sum(self.held) + 1)
        except ValueError:
            pass
        else:
            raise AssertionError("released more than was reserved")

    @invariant()
    def agrees_with_model_and_limits(self) -> None:
        if not hasattr(self, "ledger"):
            return
        reserved = self.ledger.reserved("smtp1")
        sent = self.ledger.sent_total("smtp1")
        last_hour = self.ledger.sent_last_hour("smtp1", self.now)
        assert reserved == sum(self.held) >= 0
        assert sent == self.sent() >= 0
        assert last_hour == self.window() >= 0
        assert sent + reserved <= self.user.total_limit
        assert last_hour + reserved <= self.user.hourly_limit


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------ rewrite

HEADER_NAMES = ["Subject", "To", "Cc", "Date", "Message-ID", "X-Mailer", "Received",
                "Reply-To", "From", "from", "REPLY-TO"]
text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                             blacklist_categories=("Cs",), blacklist_characters="\x7f"),
               max_size=30)


@st.composite
def messages(draw):
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields = []
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.sampled_from(HEADER_NAMES)).encode()
        field = name + b": " + draw(text).encode()
        for _ in range(draw(st.integers(0, 2))):      # folding
            field += newline + draw(st.sampled_from([b" ", b"\t"])) + draw(text).encode()
        fields.append(field + newline)
    body = draw(st.binary(max_size=300))
    return b"".join(fields) + newline + body, newline


def split(msg: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """([(lower name, field bytes)], bytes from the end of the header block)."""
    return ([(n, msg[s:e]) for s, e, n in rewrite.fields(msg)], msg[rewrite.header_end(msg):])


NEW_FROM = "Relay Sender <noreply@allowed.test>"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example((b"\n\r\n", b"\n"))       # regression: no header fields, CRLF in the body
def test_rewrite_changes_only_from_and_reply_to(case):
    msg, newline = case
    out = rewrite.rewrite_from(msg, NEW_FROM)
    before, rest_before = split(msg)
    after, rest_after = split(out)
    assert rest_after == rest_before                      # body and separator, byte for byte
    others = [f for n, f in before if n not in (b"from", b"reply-to")]
    assert [f for n, f in after if n not in (b"from", b"reply-to")] == others
    assert [f for n, f in after if n == b"from"] == [b"From: " + NEW_FROM.encode() + newline]
    old_froms = [f for n, f in before if n == b"from"]
    old_reply_to = [f for n, f in before if n == b"reply-to"]
    new_reply_to = [f for n, f in after if n == b"reply-to"]
    if old_reply_to or not old_froms:
        assert new_reply_to == old_reply_to
    else:
        assert new_reply_to == [b"Reply-To:" + old_froms[0].split(b":", 1)[1]]
    assert rewrite.from_domain(out) == "allowed.test"


@settings(max_examples=200, deadline=None)
@given(messages())
def test_rewrite_is_idempotent_on_the_body(case):
    msg, _ = case
    once = rewrite.rewrite_from(msg, NEW_FROM)
    twice = rewrite.rewrite_from(once, NEW_FROM)
    assert split(twice)[1] == split(msg)[1]


# ------------------------------------------------------------------ routing

NOW = 1_000_000.0


@st.composite
def upstreams(draw, prefix: str, max_size: int = 6):
    out = []
    for i in range(draw(st.integers(0, max_size))):
        failed = draw(st.booleans())
        out.append(Upstream(
            idsmtp=f"{prefix}{i}", host="h", port=25,
            priority=draw(st.integers(0, 3)),
            numerrors=draw(st.integers(0, 7)) if failed else 0,
            last_error=NOW - draw(st.integers(0, 700)) if failed else None,
            status=draw(st.sampled_from(["A", "A", "D"])) if prefix != "system:" else "A"))
    return out


@settings(max_examples=400, deadline=None)
@given(own=upstreams("own"), system=upstreams("system:"),
       plan=st.sampled_from(["free", "paid"]), strategy=st.sampled_from(["random", "priority"]),
       max_errors=st.integers(1, 6), cooldown=st.integers(0, 600),
       max_attempts=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_route_respects_priority_cooldown_and_cap(own, system, plan, strategy, max_errors,
                                                  cooldown, max_attempts, seed):
    rules = FailoverRules(max_errors, cooldown, max_attempts)
    got = route(plan=plan, strategy=strategy, domain_route=None, own=own, system=system,
                now=NOW, rules=rules, rng=random.Random(seed))
    candidates = pool(plan, own, system)
    got_ids = [u.idsmtp for u in got]
    assert len(set(got_ids)) == len(got_ids)
    assert set(got_ids) <= {u.idsmtp for u in candidates}
    assert all(u.status == "A" for u in got)
    assert len(got) <= max_attempts
    assert bool(got) == bool(candidates)
    if plan == "free":
        assert not any(i.startswith("system:") for i in got_ids)
    if any(u.status == "A" for u in own):
        assert not any(i.startswith("system:") for i in got_ids)
    usable = [u for u in candidates if not cooling_down(u, NOW, rules)]
    if usable:
        assert not any(cooling_down(u, NOW, rules) for u in got)
        assert len(got) == min(max_attempts, len(usable))
        if plan == "paid" and strategy == "priority":
            prios = [u.priority for u in got]
            assert prios == sorted(prios)
            # The lowest priorities win the limited attempts.
            assert prios == sorted(u.priority for u in usable)[:len(got)]
    elif candidates:
        oldest = min((u.last_error or 0.0) for u in candidates)
        assert len(got) == 1 and (got[0].last_error or 0.0) == oldest


# -------------------------------------------------------------- DATA wire form
# relayd keeps a message in the dot-stuffed form it was received in and
# sends it upstream as is (wire.wire_data(..., stuffed=True)); these
# properties pin that this equals stuffing the plain message afresh.

LINES = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"text", b"\x00", b"\xc3\xa9",
                                  b"a\nb", b"a\rb", b"\n.\n", b"\r.\r"]), max_size=12)


@given(st.binary(max_size=200))
@example(b"..\r\n..\r\n.")
def test_unstuff_inverts_stuff(message):
    from relayd.wire import stuff, unstuff
    assert unstuff(stuff(message)) == message


@given(LINES)
@example([b".", b""])
@example([b"a\nb", b".x"])
def test_sending_the_received_wire_form_equals_stuffing_the_message(lines):
    from relayd.wire import stuff, wire_data
    message = b"".join(line + b"\r\n" for line in lines)
    # What a client sends after DATA for this message (RFC 5321 4.5.2), and
    # what relayd's reader keeps of it.
    received = stuff(message)
    assert wire_data(received, stuffed=True) == wire_data(message)
    payload = b"".join(wire_data(received, stuffed=True))
    # Whatever the bytes, the payload is CRLF-clean and ends DATA exactly once.
    assert payload.count(b"\r\n") == payload.count(b"\n") == payload.count(b"\r")
    assert payload.endswith(b"\r\n.\r\n") and payload.count(b"\r\n.\r\n") == 1 or payload == b".\r\n"
