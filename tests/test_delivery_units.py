"""The delivery services without sockets: the failover loop with fake
upstream callables (failover.deliver), the exactly-once quota settlement
over a real SQLite store (delivery.Settlement), and the upstream-health book
the store keeps (routing.ErrorBook through store.view)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from relayd.delivery import Settlement
from relayd.errors import UpstreamError
from relayd.policy import Verdict
from relayd.records import Upstream
from relayd.store import RecordStore, Store
from relayd.store.view import View
from relayd.failover import deliver

U = [Upstream(idsmtp=f"u{i}", host="h", port=25) for i in range(3)]


def script(*results):
    """A fake send_once: each call takes the next result; an exception is
    raised, a str returned; ``"dot:<text>"`` first marks the final dot sent."""
    calls: list[str] = []
    todo = list(results)

    async def send(u, sender, rcpts, message, *, progress, **kw):
        calls.append(u.idsmtp)
        result = todo.pop(0)
        if isinstance(result, BaseException):
            raise result
        if result == "hang":
            progress.dot = True
            await asyncio.sleep(10)
        return result

    return send, calls


async def run(send, candidates=U, deadline=5.0):
    recorded: list[tuple[str, str]] = []

    async def record(u, result, reply):
        recorded.append((u.idsmtp, result))

    outcome = await deliver(candidates, ["r@x"], lambda u: ("s@x", b"m", False), record,
                            local_hostname="h", connect_timeout=1, command_timeout=1,
                            deadline=deadline, send=send)
    return outcome, recorded


async def test_fails_over_on_a_transient_error_and_counts_it():
    send, calls = script(UpstreamError("451 busy", code=451), "250 ok")
    outcome, recorded = await run(send)
    assert outcome.delivered and calls == ["u0", "u1"]
    assert recorded == [("u0", "error"), ("u1", "ok")]


async def test_a_permanent_refusal_stops_without_counting_an_error():
    send, calls = script(UpstreamError("550 no", permanent=True, code=550))
    outcome, recorded = await run(send)
    assert outcome.permanent and not outcome.delivered and calls == ["u0"]
    assert recorded == [("u0", "refused")]


async def test_an_unconfirmed_attempt_stops_and_counts_an_error():
    send, calls = script(UpstreamError("connection lost after the message was sent",
                                       unconfirmed=True), "250 ok")
    outcome, recorded = await run(send)
    assert outcome.unconfirmed and calls == ["u0"]
    assert recorded == [("u0", "error")]


async def test_the_deadline_after_the_dot_is_unconfirmed():
    send, calls = script("hang", "250 ok")
    outcome, recorded = await run(send, deadline=0.2)
    assert outcome.unconfirmed and "deadline" in outcome.last.reply and calls == ["u0"]


async def test_every_candidate_failing_is_not_delivered():
    send, calls = script(*(UpstreamError("451 x", code=451) for _ in U))
    outcome, recorded = await run(send)
    assert not outcome.delivered and not outcome.permanent and calls == ["u0", "u1", "u2"]


# ------------------------------------------------------------------ settlement

@dataclass
class StoreRelay:
    store: RecordStore


async def reserved(store: RecordStore, units: int) -> tuple[StoreRelay, str]:
    """A relay around the real ``store`` whose user holds ``units`` under hold "h"."""
    owner, _, app = await store.create_owner("free")
    user, _ = await store.create_user(owner.owner_id, app.idapp, 10, 10)
    for _ in range(units):
        assert await store.reserve(user, "h", 100.0) is Verdict.OK
    return StoreRelay(store), user.name


async def test_kept_after_the_count_counts_once(store: RecordStore):
    relay, name = await reserved(store, 2)
    s = Settlement(relay, name, "h", 2, 100.0)        # type: ignore[arg-type]
    await s.count()
    s.keep()
    await s.undo("m")                                  # the finally: a no-op now
    assert store.held(name) == 0 and await store.usage(name, 100.0) == (2, 2)


@pytest.mark.parametrize("counted", [True, False])
async def test_undo_releases_or_uncounts_exactly_once(store: RecordStore, counted: bool):
    relay, name = await reserved(store, 3)
    s = Settlement(relay, name, "h", 3, 100.0)        # type: ignore[arg-type]
    if counted:
        await s.count()
        assert await store.usage(name, 100.0) == (3, 3)
    await s.undo("m")
    await s.undo("m")
    assert store.held(name) == 0 and await store.usage(name, 100.0) == (0, 0)
    # Every unit is free again (a shared store releases in the background).
    await store.flush()
    user = store.get_user(name)
    assert user is not None
    assert [await store.reserve(user, "next", 100.0) for _ in range(11)].count(Verdict.OK) == 10


async def test_an_uncount_the_store_refuses_leaves_the_units_counted(sqlite_store: Store):
    store = sqlite_store
    relay, name = await reserved(store, 1)
    s = Settlement(relay, name, "h", 1, 100.0)        # type: ignore[arg-type]
    await s.count()
    await store.db.execute("PRAGMA query_only = ON")   # every write now fails
    await s.undo("m")                                  # logged, errs on the side of the limit
    await store.db.execute("PRAGMA query_only = OFF")
    assert store.held(name) == 0 and await store.usage(name, 100.0) == (1, 1)
    rows = await store.db.execute_fetchall("SELECT ts, rcpts FROM sends WHERE user = ?", (name,))
    assert [tuple(r) for r in rows] == [(100.0, 1)]


# ------------------------------------------------------------------ health

def test_the_view_keeps_one_health_book_for_every_upstream():
    view = View()
    own = {"idsmtp": "own1", "idapp": "a", "priority": 0, "host": "h", "port": 25,
           "username": None, "password": None, "auth": 0, "startstls": 0, "ssltls": 0,
           "verify_tls": 1, "debug": 0, "defaultfromemail": None, "defaultfromname": None,
           "allowed_domains": None, "numerrors": 2, "last_error": 5.0, "status": "A",
           "created": "", "modified": ""}
    view.load_routing([], [], [own], [])
    assert view.health.get("own1") == (2, 5.0)                # loaded from its row
    assert view.note_upstream_result("system:0", False, 7.0)  # no row: memory only
    assert not view.note_upstream_result("system:1", True, 8.0)   # nothing to reset
    system = view.with_health(Upstream(idsmtp="system:0", host="h", port=25))
    assert (system.numerrors, system.last_error) == (1, 7.0)
    view.load_routing([], [], [{**own, "numerrors": 0}], [])      # an admin write reloads
    assert view.health.get("own1") == (0, 5.0) and view.health.get("system:0") == (1, 7.0)
    assert dict(view.upstream_error_counts()) == {"own1": 0, "system:0": 1}
