"""Smart batching of the hot path's store calls (backend-neutral).

A call made while the previous batch of its kind is being written waits,
and goes out with the others queued meanwhile as one statement in one
transaction: under load one database round trip for many messages instead
of one each; alone, a call goes out at once and waits for nobody. A batch
starts only after each of its calls was made, so a read in it sees every
write committed before the call. Each caller resumes with its own result
once its batch is committed.

A batch the database refuses is retried call by call, so that one bad call
(e.g. a journal row for a user deleted mid-delivery) fails alone; a batch
that could not reach the database at all fails every call at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ..errors import StoreError

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger("relayd.store")

LIMIT = 500     # calls per statement (a few parameters each, far below either backend's limit)


def always(exc: StoreError) -> bool:
    return True


class Batcher(Generic[Item, Result]):
    """``await batcher.call(item)`` runs ``write([..., item, ...])`` and
    returns that item's result (``write`` returns one per item, in order)."""

    def __init__(self, write: Callable[[list[Item]], Awaitable[list[Result]]],
                 split: Callable[[StoreError], bool] = always,
                 idle: Callable[[], Awaitable[None]] | None = None):
        self._write = write
        self._split = split         # whether a refused batch is retried call by call
        self._idle = idle           # run when the queue is empty (a held connection goes back)
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._task: asyncio.Task[None] | None = None

    async def call(self, item: Item) -> Result:
        """Raises StoreError if the store could not take the item."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def finish(self, timeout: float) -> None:
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout)

    async def _drain(self) -> None:
        while self._queue:          # again after idle(): calls made meanwhile found this task busy
            try:
                await self._serve()
            finally:
                if self._idle is not None:
                    await self._idle()

    async def _serve(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:LIMIT], self._queue[LIMIT:]
            try:
                await self._run(batch)
            except StoreError as exc:
                if len(batch) == 1 or not self._split(exc):
                    _settle(batch, error=exc)
                    continue
                log.warning("a batch of %d calls was refused, retrying them one by one: %s",
                            len(batch), exc)
                for one in batch:
                    try:
                        await self._run([one])
                    except StoreError as alone:
                        _settle([one], error=alone)
            except Exception as exc:        # a bug: every caller hears of it, none hangs
                _settle(batch, error=exc)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        results = await self._write([item for item, _ in batch])
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():           # its caller may have gone (session closed)
                future.set_result(result)


def _settle(batch: list[tuple[Item, asyncio.Future[Result]]], *, error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
