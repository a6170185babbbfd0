"""What keeps one PostgreSQL-backed instance in step with the cluster
(SPEC 8): change notices, heartbeats, and the retries of writes that must
not be lost.

* **Change notices.** Every write notifies ``postgres.CHANNEL`` with the
  writer's instance id and what changed (sqlbase.ROUTING, USER + name,
  HEALTH). A dedicated connection LISTENs; the notices of other instances
  mark parts of the view stale and one worker reloads them, coalesced, in
  milliseconds. After a lost listening connection (a database restart)
  everything is reloaded once it is back, and every ``FULL_RELOAD``
  seconds regardless: the safety net for a notice that never came.
* **Heartbeats.** Every ``HEARTBEAT`` seconds the instance stamps its row in
  ``instances``; rows older than ``DEAD_AFTER`` are removed, with the holds
  of those instances (units of transactions that never reached DATA's end,
  so never sent). ``members`` lists the live ones for /admin/status.
* **Retries.** Releasing a hold and uncounting a failed message must reach
  the database eventually; when it is down they wait here and go out at
  each heartbeat until taken. Both are idempotent by hold (pgschema.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import asyncpg

from ..errors import StoreError
from ..timefmt import iso_z
from .sqlbase import HEALTH, ROUTING, USER

if TYPE_CHECKING:
    from .postgres import PostgresStore

log = logging.getLogger("relayd.store")

CHANNEL = "relayd_changes"  # the NOTIFY channel of change notices
TIMEOUT = 5.0               # seconds: connect, and every statement
# What asyncpg raises when the database is gone, restarting or refusing (a
# connection cut by a server stop may surface as InternalClientError).
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
             OSError, asyncio.TimeoutError)
HEARTBEAT = 2.0             # seconds between heartbeats (and retries)
DEAD_AFTER = 10.0           # a heartbeat older than this: the instance is gone
FULL_RELOAD = 15.0          # seconds between full reloads of the view
FULL = "full"

Statement = tuple[str, tuple[Any, ...]]


class ClusterWatch:
    def __init__(self, store: PostgresStore):
        self.store = store
        self._listener: asyncpg.Connection | None = None
        self._stale: set[str] = set()
        self._wake = asyncio.Event()
        self._retries: list[Statement] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._beat()
        await self._listen()
        self._tasks = [asyncio.create_task(self._heartbeats()),
                       asyncio.create_task(self._reloads())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)
        try:
            await self._flush_retries()
        except StoreError as exc:
            log.warning("%d writes not taken by the database before the stop: %s",
                        len(self._retries), exc)
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.terminate()
        if self.store._pool is not None:
            await self._leave()

    async def _leave(self) -> None:
        """A clean stop: no longer a member, holding nothing."""
        me = self.store.instance.id
        try:
            await self.store.execute("DELETE FROM holds WHERE instance = $1", (me,))
            await self.store.execute("DELETE FROM instances WHERE id = $1", (me,))
        except StoreError as exc:           # the database is gone: the others reap us
            log.warning("cannot leave the cluster cleanly: %s", exc)

    # ------------------------------------------------------------ change notices

    async def _listen(self) -> None:
        try:
            con = await asyncpg.connect(self.store.dsn, timeout=TIMEOUT)
            await con.add_listener(CHANNEL, self._notice)
        except DB_ERRORS as exc:
            log.warning("cannot listen for changes (retrying): %s", exc)
            return
        self._listener = con
        self.stale(FULL)            # whatever was missed while not listening

    def _notice(self, con: Any, pid: int, channel: str, payload: str) -> None:
        writer, _, what = payload.partition(" ")
        if writer != self.store.instance.id:
            self.stale(what)

    def stale(self, what: str) -> None:
        self._stale.add(what)
        self._wake.set()

    async def _reloads(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            stale, self._stale = self._stale, set()
            try:
                await self._reload(stale)
            except StoreError as exc:
                log.warning("cannot reload the view (next heartbeat retries): %s", exc)
                self._stale |= {FULL}

    async def _reload(self, stale: set[str]) -> None:
        """Under the store's lock, as its own writes reload: a reload that
        read the tables before a write could otherwise land after the
        write's own, and put back what the write changed."""
        async with self.store._lock:
            await self._reload_locked(stale)

    async def _reload_locked(self, stale: set[str]) -> None:
        store = self.store
        if FULL in stale or ROUTING in stale:
            await store._load_routing()
            await store._load_users()
            await store.load_health()
            return
        for what in stale:
            if what.startswith(USER):
                await store._reload_user(what[len(USER):])
        if HEALTH in stale:
            await store.reload_health()

    # ------------------------------------------------------------ heartbeats

    async def _heartbeats(self) -> None:
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._beat()
                await self._flush_retries()
            except StoreError as exc:
                log.warning("cluster heartbeat failed: %s", exc)
                continue
            if self._listener is None or self._listener.is_closed():
                self._listener = None
                await self._listen()
            if time.monotonic() - last_full >= FULL_RELOAD:
                last_full = time.monotonic()
                self.stale(FULL)

    async def _beat(self) -> None:
        me = self.store.instance
        await self.store.execute(
            "INSERT INTO instances (id, hostname, pid, started, last_seen) "
            "VALUES ($1, $2, $3, $4, now()) ON CONFLICT (id) DO UPDATE SET last_seen = now()",
            (me.id, me.hostname, me.pid, me.started))
        dead = f"now() - interval '{DEAD_AFTER} seconds'"
        await self.store.execute(
            f"DELETE FROM holds WHERE instance NOT IN "
            f"(SELECT id FROM instances WHERE last_seen > {dead})", ())
        await self.store.execute(f"DELETE FROM instances WHERE last_seen <= {dead}", ())

    async def members(self) -> list[dict[str, Any]]:
        rows = await self.store._fetchall(
            "SELECT id, hostname, pid, started, last_seen FROM instances "
            f"WHERE last_seen > now() - interval '{DEAD_AFTER} seconds' ORDER BY started, id")
        return [{"id": r["id"], "hostname": r["hostname"], "pid": r["pid"],
                 "started": iso_z(r["started"]), "last_seen": iso_z(r["last_seen"].timestamp())}
                for r in rows]

    # ------------------------------------------------------------ writes that must land

    def soon(self, statement: Statement) -> None:
        """Run ``statement`` now, in the background; retried until it lands."""
        self.soon_do(self._try(statement))

    def soon_do(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background; stop() waits a moment for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def flush(self) -> None:
        """Until the background writes started so far are done (or queued for retry)."""
        while self._background:
            await asyncio.wait(list(self._background))

    def retry(self, statement: Statement) -> None:
        self._retries.append(statement)

    async def _try(self, statement: Statement) -> None:
        try:
            await self.store.execute(*statement)
        except StoreError:
            self.retry(statement)

    async def _flush_retries(self) -> None:
        while self._retries:
            await self.store.execute(*self._retries[0])
            self._retries.pop(0)
