"""The hot path's smart batching (relayd/store/batching.py): calls made while
a batch is being written go out together in the next one, each caller gets
its own result, and a refused batch fails only its bad calls. The write
here is a coroutine that really yields to the loop, as a database's does;
the stores' own tests (test_store.py, test_store_postgres.py) run it against
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from relayd.errors import StoreError
from relayd.store.batching import Batcher


class Database:
    """Writes batches of ints, answering each with its double; refuses a
    batch holding a negative one; ``gate`` holds a write until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.broken: BaseException | None = None

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        await asyncio.sleep(0)
        if self.broken is not None:
            raise self.broken
        if any(i < 0 for i in items):
            raise StoreError(f"refused {items}")
        return [2 * i for i in items]


async def test_a_lone_call_goes_out_at_once_and_the_next_ones_together():
    db = Database()
    batcher = Batcher(db.write)
    assert await batcher.call(1) == 2
    db.gate.clear()
    first = asyncio.create_task(batcher.call(10))
    await asyncio.sleep(0.01)                   # its batch is being written
    assert db.batches == [[1], [10]]
    later = [asyncio.create_task(batcher.call(i)) for i in range(20, 25)]
    await asyncio.sleep(0.01)
    assert db.batches == [[1], [10]], "a call joined a batch that began before it"
    db.gate.set()
    assert await first == 20
    assert [await t for t in later] == [40, 42, 44, 46, 48]
    assert db.batches == [[1], [10], [20, 21, 22, 23, 24]]


async def test_concurrent_callers_each_get_their_own_result():
    db = Database()
    batcher = Batcher(db.write)
    results = await asyncio.gather(*(batcher.call(i) for i in range(1200)))
    assert results == [2 * i for i in range(1200)]
    assert [len(b) for b in db.batches] == [500, 500, 200]     # batching.LIMIT per statement


async def test_a_refused_batch_fails_only_its_bad_call():
    db = Database()
    batcher = Batcher(db.write)
    results = await asyncio.gather(*(batcher.call(i) for i in (1, -1, 3)),
                                   return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], StoreError)
    assert db.batches == [[1, -1, 3], [1], [-1], [3]]


async def test_an_unreachable_store_fails_every_call_without_retrying_each():
    db = Database()
    batcher = Batcher(db.write, split=lambda exc: False)
    db.broken = StoreError("connection refused")
    results = await asyncio.gather(*(batcher.call(i) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert db.batches == [[0, 1, 2, 3, 4]]


async def test_a_bug_in_the_write_reaches_every_caller_and_none_hangs():
    db = Database()
    batcher = Batcher(db.write)
    db.broken = KeyError("bug")
    results = await asyncio.wait_for(asyncio.gather(
        *(batcher.call(i) for i in range(3)), return_exceptions=True), 1)
    assert all(isinstance(r, KeyError) for r in results)
    db.broken = None
    assert await batcher.call(4) == 8            # and the batcher still works


async def test_a_caller_that_went_away_does_not_disturb_the_others():
    db = Database()
    batcher = Batcher(db.write)
    db.gate.clear()
    gone = asyncio.create_task(batcher.call(1))
    stays = asyncio.create_task(batcher.call(2))
    await asyncio.sleep(0.01)
    gone.cancel()
    db.gate.set()
    assert await stays == 4
    with pytest.raises(asyncio.CancelledError):
        await gone
    await batcher.finish(timeout=1)


async def test_a_call_made_while_the_idle_hook_runs_is_still_served():
    """``idle`` (a shared store gives back its connection there) awaits; a
    call made meanwhile finds the batcher's task still running, so that
    task must look at the queue again before it ends."""
    db = Database()
    idling, go_on = asyncio.Event(), asyncio.Event()
    idled: list[int] = []

    async def idle() -> None:
        idled.append(len(db.batches))
        idling.set()
        await go_on.wait()

    batcher = Batcher(db.write, idle=idle)
    first = asyncio.create_task(batcher.call(1))
    await idling.wait()
    second = asyncio.create_task(batcher.call(2))
    await asyncio.sleep(0.01)
    go_on.set()
    assert await asyncio.wait_for(first, 1) == 2
    assert await asyncio.wait_for(second, 1) == 4
    assert idled == [1, 2]
