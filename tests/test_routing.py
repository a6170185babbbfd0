"""SPEC 3.5 and 3.7: which upstreams a message may use and in which order
(sans-IO, with a seeded random.Random), then failover end to end against
real recording upstreams: error counting in the store, cooldown, the
attempt cap and the deadline, and recipient refusals.
"""

from __future__ import annotations

import collections
import random

import pytest

from conftest import simple_message, sink_upstream, smtp_client
from helpers_smtp import authed, upstream_by_port, without_trace
from relayd import routing
from relayd.records import DomainSettings, Upstream
from relayd.routing import ErrorBook, FailoverRules, order, plan_attempts, pool, route
from helpers_records import sent_total

SENDER = "app@example.com"
MSG = simple_message()
NOW = 1_000_000.0
RULES = FailoverRules(max_errors=5, cooldown=300, max_attempts=3)
BIG = FailoverRules(max_errors=5, cooldown=300, max_attempts=100)


def up(name: str, priority: int = 10, **kw) -> Upstream:
    return Upstream(idsmtp=name, host=f"{name}.test", port=25, priority=priority, **kw)


def ids(us) -> list[str]:
    return [u.idsmtp for u in us]


# ------------------------------------------------------------------ ordering

def test_priority_order_lowest_first_ties_shuffled():
    own = [up("c", 5), up("a", 0), up("d", 5), up("b", 1), up("e", 9)]
    seen_ties = set()
    for seed in range(200):
        got = route(plan="paid", strategy="priority", domain_route=None, own=own, system=[],
                    now=NOW, rules=BIG, rng=random.Random(seed))
        assert [u.priority for u in got] == [0, 1, 5, 5, 9]
        assert ids(got)[:2] == ["a", "b"] and ids(got)[4] == "e"
        seen_ties.add(tuple(ids(got)[2:4]))
    assert seen_ties == {("c", "d"), ("d", "c")}, "ties must be shuffled"


def test_random_strategy_is_uniform_ish():
    own = [up("a", 0), up("b", 1), up("c", 2)]
    rng = random.Random(1234)
    firsts = collections.Counter()
    trials = 3000
    for _ in range(trials):
        got = route(plan="paid", strategy="random", domain_route=None, own=own, system=[],
                    now=NOW, rules=RULES, rng=rng)
        assert sorted(ids(got)) == ["a", "b", "c"]
        firsts[got[0].idsmtp] += 1
    # Each upstream first about a third of the time, priority ignored
    # (binomial sd ~26 for 3000 trials: +-150 is > 5 sd).
    for name in "abc":
        assert abs(firsts[name] - trials / 3) < 150, firsts


def test_free_plan_forces_random_order():
    own = [up("a", 0), up("b", 1), up("c", 2)]
    firsts = collections.Counter(
        route(plan="free", strategy="priority", domain_route=None, own=own, system=[],
              now=NOW, rules=RULES, rng=random.Random(seed))[0].idsmtp
        for seed in range(300))
    assert set(firsts) == {"a", "b", "c"}, firsts
    assert routing.effective_strategy("free", "priority") == "random"
    assert routing.effective_strategy("paid", "priority") == "priority"


def test_order_is_a_permutation():
    us = [up(str(i), i % 3) for i in range(10)]
    for strategy in ("random", "priority"):
        got = order(us, strategy, random.Random(7))
        assert sorted(ids(got)) == sorted(ids(us))


# ------------------------------------------------------------------ pools

def test_free_plan_never_uses_system_smtps():
    system = [up("system:0")]
    assert pool("free", [], system) == []
    assert route(plan="free", strategy="random", domain_route=None, own=[], system=system,
                 now=NOW, rules=RULES, rng=random.Random(0)) == []


def test_paid_plan_without_own_uses_system():
    system = [up("system:0"), up("system:1")]
    got = route(plan="paid", strategy="random", domain_route=None, own=[], system=system,
                now=NOW, rules=RULES, rng=random.Random(0))
    assert sorted(ids(got)) == ["system:0", "system:1"]


def test_paid_plan_with_own_does_not_mix_in_system():
    got = route(plan="paid", strategy="random", domain_route=None, own=[up("own")],
                system=[up("system:0")], now=NOW, rules=RULES, rng=random.Random(0))
    assert ids(got) == ["own"]


def test_disabled_upstreams_are_not_candidates():
    own = [up("on"), up("off", status="D")]
    assert ids(pool("free", own, [])) == ["on"]
    assert pool("free", [up("off", status="D")], [up("system:0")]) == []
    # A paid owner whose own upstreams are all disabled falls back to the system ones.
    assert ids(pool("paid", [up("off", status="D")], [up("system:0")])) == ["system:0"]


def test_domain_route_comes_first():
    dom = DomainSettings("d1", "owner", "example.com", "smtp", "", "news@example.com",
                         {"host": "mx.example.com", "port": 2525}).as_upstream()
    own = [up("a", 0), up("b", 1)]
    for seed in range(20):
        got = route(plan="paid", strategy="priority", domain_route=dom, own=own, system=[],
                    now=NOW, rules=RULES, rng=random.Random(seed))
        assert ids(got) == ["domain:example.com", "a", "b"]
    assert (dom.host, dom.port) == ("mx.example.com", 2525)
    assert dom.effective_allowed_domains == {"example.com"}


# ------------------------------------------------------------------ cooldown and cap

def test_cooldown_skips_failing_upstream_until_it_passes():
    bad = up("bad", 0, numerrors=5, last_error=NOW - 100)
    good = up("good", 1)
    kwargs = dict(plan="paid", strategy="priority", domain_route=None, own=[bad, good],
                  system=[], rules=RULES, rng=random.Random(0))
    assert ids(route(now=NOW, **kwargs)) == ["good"]
    assert ids(route(now=NOW - 100 + 299.9, **kwargs)) == ["good"]
    assert ids(route(now=NOW - 100 + 300, **kwargs)) == ["bad", "good"]


def test_below_max_errors_is_not_skipped():
    flaky = up("flaky", 0, numerrors=4, last_error=NOW)
    assert ids(plan_attempts([flaky, up("x", 1)], NOW, RULES)) == ["flaky", "x"]
    assert routing.cooling_down(up("y", numerrors=5, last_error=NOW), NOW, RULES)
    assert not routing.cooling_down(up("y", numerrors=5, last_error=NOW), NOW + 300, RULES)


def test_all_skipped_tries_the_one_that_failed_longest_ago():
    a = up("a", 0, numerrors=9, last_error=NOW - 10)
    b = up("b", 1, numerrors=9, last_error=NOW - 200)
    c = up("c", 2, numerrors=5, last_error=NOW - 50)
    assert ids(plan_attempts([a, b, c], NOW, RULES)) == ["b"]
    assert plan_attempts([], NOW, RULES) == []


def test_max_attempts_cap():
    us = [up(str(i), i) for i in range(6)]
    assert ids(plan_attempts(us, NOW, RULES)) == ["0", "1", "2"]
    one = FailoverRules(max_errors=5, cooldown=300, max_attempts=1)
    assert ids(plan_attempts(us, NOW, one)) == ["0"]
    # The cap applies after skipping: skipped ones do not use attempts.
    cooling = [up(f"c{i}", 0, numerrors=5, last_error=NOW) for i in range(3)]
    assert ids(plan_attempts(cooling + us, NOW, RULES)) == ["0", "1", "2"]


def test_error_book_counts_and_resets():
    book = ErrorBook()
    u = up("system:0")
    assert book.record("system:0", False, 10.0) == 1
    assert book.record("system:0", False, 20.0) == 2
    got = book.apply(u)
    assert (got.numerrors, got.last_error) == (2, 20.0)
    assert book.record("system:0", True, 30.0) == 0
    assert book.apply(u).numerrors == 0


# ------------------------------------------------------------------ end to end

async def send(relay, tenant, rcpts=("to@example.net",), sender=SENDER, data=MSG):
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(data + b".\r\n")
    r = await c.reply()
    await c.close()
    return r


@pytest.mark.parametrize("first_mode", ["refused", "tempfail", "rcpt_tempfail"])
async def test_failover_to_the_next_upstream(relay, sink_factory, provision, closed_port,
                                            first_mode):
    second = await sink_factory()
    if first_mode == "refused":
        first_port = closed_port
    else:
        first = await sink_factory(first_mode)
        first_port = first.port
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        {"host": "127.0.0.1", "port": first_port, "priority": 0},
        sink_upstream(second, priority=1)])
    r = await send(relay, tenant)
    assert r.code == 250, r
    assert [(m.mail_from, m.rcpt_tos, without_trace(m.data)) for m in second.messages] == [
        (SENDER, ["to@example.net"], MSG)]
    u1 = await upstream_by_port(relay, tenant.idapp, first_port)
    u2 = await upstream_by_port(relay, tenant.idapp, second.port)
    assert (u1.numerrors, u2.numerrors) == (1, 0)
    assert u1.last_error is not None


async def test_success_resets_numerrors(relay, sink_factory, provision):
    flaky = await sink_factory("tempfail")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(flaky, priority=0), sink_upstream(spare, priority=1)])
    for expected in (1, 2):
        assert (await send(relay, tenant)).code == 250
        assert (await upstream_by_port(relay, tenant.idapp, flaky.port)).numerrors == expected
    flaky.mode = "accept"
    assert (await send(relay, tenant)).code == 250
    assert len(flaky.messages) == 1 and len(spare.messages) == 2
    assert (await upstream_by_port(relay, tenant.idapp, flaky.port)).numerrors == 0


async def test_free_plan_fails_over_whatever_the_random_order(relay, sink_factory, provision,
                                                              closed_port):
    sink = await sink_factory()
    tenant = await provision(relay, plan="free", upstreams=[
        {"host": "127.0.0.1", "port": closed_port}, sink_upstream(sink)])
    for _ in range(6):
        assert (await send(relay, tenant)).code == 250
    assert len(sink.messages) == 6


async def test_cooling_down_upstream_is_skipped(relay_factory, sink_factory, provision):
    relay = await relay_factory(failover={"max_errors": 2, "cooldown": 300})
    flaky = await sink_factory("tempfail")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(flaky, priority=0), sink_upstream(spare, priority=1)])
    for _ in range(2):
        assert (await send(relay, tenant)).code == 250
    assert flaky.transactions == 2
    flaky.mode = "accept"          # it would work now, but it is cooling down
    for _ in range(2):
        assert (await send(relay, tenant)).code == 250
    assert flaky.transactions == 2 and len(spare.messages) == 4


async def test_every_candidate_cooling_down_tries_the_oldest_failure(
        relay_factory, sink_factory, provision):
    relay = await relay_factory(failover={"max_errors": 1, "cooldown": 300})
    a = await sink_factory("tempfail")
    b = await sink_factory("tempfail")
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(a, priority=0), sink_upstream(b, priority=1)])
    r = await send(relay, tenant)
    assert (r.code, r.enhanced) == (451, "4.4.1")
    assert (a.transactions, b.transactions) == (1, 1)     # a failed first, b last
    a.mode = b.mode = "accept"
    assert (await send(relay, tenant)).code == 250
    assert (a.transactions, b.transactions) == (2, 1)
    assert len(a.messages) == 1


async def test_max_attempts_caps_the_upstreams_tried(relay_factory, sink_factory, provision):
    relay = await relay_factory(failover={"max_attempts": 2})
    sinks = [await sink_factory("tempfail") for _ in range(3)]
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(s, priority=i) for i, s in enumerate(sinks)])
    r = await send(relay, tenant)
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert [s.connections for s in sinks] == [1, 1, 0]


async def test_deadline_ends_failover(relay_factory, sink_factory, provision):
    relay = await relay_factory(failover={"deadline": 0.3})
    slow = await sink_factory("hang")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(slow, priority=0), sink_upstream(spare, priority=1)])
    r = await send(relay, tenant)
    # The slow upstream has the whole message when the deadline strikes: it
    # may yet deliver it, so no failover and "unconfirmed" (SPEC 3.8).
    assert (r.code, r.enhanced) == (451, "4.4.2"), r
    assert "deadline" in r.text
    assert spare.connections == 0
    assert relay.store.held(tenant.user) == 0
    assert (await upstream_by_port(relay, tenant.idapp, slow.port)).numerrors == 1


async def test_upstream_refusing_a_recipient_permanently_554(relay, sink_factory, provision):
    picky = await sink_factory("rcpt_permfail")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(picky, priority=0), sink_upstream(spare, priority=1)])
    r = await send(relay, tenant, rcpts=("a@example.net", "b@example.net"))
    assert r.code == 554, r
    assert "No such user" in r.text
    assert spare.connections == 0 and picky.messages == []
    assert await sent_total(relay, tenant.user) == 0


async def test_domain_route_is_tried_first(relay, sink_factory, provision):
    app_sink = await sink_factory()
    dom_sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(app_sink)])
    await relay.store.put_domain(tenant.owner_id, "example.com", provider="smtp",
                                 description="", from_=None,
                                 options={"host": "127.0.0.1", "port": dom_sink.port})
    assert (await send(relay, tenant)).code == 250
    assert len(dom_sink.messages) == 1 and app_sink.messages == []
    # Another sender domain goes through the app's upstreams.
    assert (await send(relay, tenant, sender="app@other.example")).code == 250
    assert len(app_sink.messages) == 1
    # The domain route failing falls over to the app's upstreams.
    dom_sink.mode = "tempfail"
    assert (await send(relay, tenant)).code == 250
    assert len(app_sink.messages) == 2


async def test_system_smtp_errors_are_counted_in_memory(relay_factory, sink_factory,
                                                        provision, closed_port):
    good = await sink_factory()
    relay = await relay_factory(system_smtps=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        {"host": "127.0.0.1", "port": good.port, "priority": 1}])
    tenant = await provision(relay, plan="paid", strategy="priority")
    assert (await send(relay, tenant)).code == 250
    assert len(good.messages) == 1
    assert relay.errors.apply(relay.system[0]).numerrors == 1
    assert relay.errors.apply(relay.system[1]).numerrors == 0


async def test_upstream_command_timeout_fails_over(relay_factory, sink_factory, provision):
    # Silent before the message went out: safe to try the next one. (Silent
    # after the final dot: no failover, see test_edge_delivery.py.)
    relay = await relay_factory(timeouts={"command": 0.2})
    slow = await sink_factory("rcpt_hang")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(slow, priority=0), sink_upstream(spare, priority=1)])
    assert (await send(relay, tenant)).code == 250
    assert len(spare.messages) == 1
    assert (await upstream_by_port(relay, tenant.idapp, slow.port)).numerrors == 1


async def test_upstream_requiring_starttls_fails_over_instead_of_bouncing(
        relay, sink_factory, provision):
    # A 530 "must issue STARTTLS" to MAIL is the upstream's setup, not the
    # message: the next upstream takes it (SPEC 3.7), no 554.
    needs_tls = await sink_factory(tls="starttls")
    good = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(needs_tls, priority=0, startstls=False),
        sink_upstream(good, priority=1)])
    client = await smtp_client(relay, tenant)
    await client.sendmail("app@example.com", ["r@example.net"], simple_message())
    await client.quit()
    assert len(good.messages) == 1
    up = await upstream_by_port(relay, tenant.idapp, needs_tls.port)
    assert up.numerrors == 1
