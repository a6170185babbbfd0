"""Group commit of the quota journal (backend-neutral).

Entries queued while one batch is being written go out together as one
multi-row INSERT (one statement, so still atomic with the trigger that keeps
``sent_total`` in step), and each caller resumes only once its entry is on
disk. Under load that is one database round trip for many messages instead
of one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import StoreError

Row = tuple[str, float, int]                 # (user, ts, rcpts)
Entry = tuple[str, float, int, "asyncio.Future[None]"]

BATCH = 500     # rows per INSERT (3 parameters each, far below SQLite's limit)


class GroupCommit:
    def __init__(self, insert: Callable[[list[Row]], Awaitable[None]]):
        self._insert = insert
        self._queue: list[Entry] = []
        self._task: asyncio.Task[None] | None = None

    async def add(self, user: str, ts: float, rcpts: int) -> None:
        """Returns once the entry is committed; raises StoreError if it could
        not be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((user, ts, rcpts, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        await future

    async def finish(self, timeout: float) -> None:
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                await self._write(batch)
            except StoreError as exc:
                if len(batch) == 1:
                    _settle(batch, exc)
                    continue
                # One bad row (e.g. a user deleted mid-delivery) must not fail
                # the others: write them one by one.
                for entry in batch:
                    try:
                        await self._write([entry])
                    except StoreError as one:
                        _settle([entry], one)
                    else:
                        _settle([entry], None)
            else:
                _settle(batch, None)

    async def _write(self, batch: list[Entry]) -> None:
        await self._insert([(user, ts, n) for user, ts, n, _ in batch])


def _settle(batch: list[Entry], error: BaseException | None) -> None:
    for *_, future in batch:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
