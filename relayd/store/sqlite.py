"""The embedded backend: SQLite in WAL mode through aiosqlite.

* One connection, in autocommit mode; every method holds ``_lock``, so no
  other coroutine's statement slips into a BEGIN IMMEDIATE ... COMMIT.
* Quota usage is a journal, ``sends(user, ts, rcpts)``: one row per message
  about to be delivered, written *before* the upstream transaction, and a
  negative row with the same ``ts`` if delivery fails. A trigger keeps
  ``smtp_users.sent_total`` in step inside the same statement, so each
  journal write is one atomic statement. A kill -9 mid-delivery therefore
  leaves the message counted: counters may exceed what upstreams received by
  in-flight messages, never fall short. Rows older than the hourly window
  are pruned; sent_total keeps the running total.
* Journal writes are group-committed (batching.py). The quota state between
  them -- reservations, the totals and the hourly window -- is the
  in-memory Ledger (policy.py): this process is the database's only writer,
  so checking and reserving in one synchronous call is exact.
* The records' SQL is sqlbase.py's; reads are served by the view (view.py),
  refreshed by every write.
* ``lost()``/``unwritable()`` are the store watch's probes (storewatch.py).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import StoreError
from ..policy import Ledger, Verdict
from ..records import SmtpUser
from . import files
from .instances import this_instance
from .batching import Batcher
from .schema import migrate
from .sqlbase import Row, SqlStore, Statement

HOUR = 3600.0


class SqliteStore(SqlStore):
    """The embedded backend (see the module docstring)."""

    APP_ORDER = "rowid"
    SENDS_USER = '"user"'

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__()
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._identity: tuple[int, int] | None = None     # (st_dev, st_ino) of the open file
        self._journal = Batcher(self._insert_sends)
        self.ledger = Ledger()
        self.instance = this_instance()

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        files.create_private_file(self.path)
        # SQLite gives -wal/-shm the database file's mode (0600).
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._prepare()
        except BaseException:
            # A refused file (newer schema, not a database) must not leave the
            # connection's thread behind: it would keep the process alive.
            await self.close()
            raise

    async def _prepare(self) -> None:
        self._identity = files.identity(self.path)
        self.db.row_factory = sqlite3.Row
        await self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: durable across process crashes (kill -9); a power
        # loss may drop the last transactions, never corrupt the file.
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await migrate(self.db, self.path)
        await self._load_users()
        await self._load_routing()
        self.ledger.load(await self.load_usage(time.time()))

    async def close(self) -> None:
        await self._journal.finish(timeout=5)
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        async with self.db.execute(sql, tuple(args)) as cur:
            return list(await cur.fetchall())

    async def _fetchone(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        async with self.db.execute(sql, tuple(args)) as cur:
            return await cur.fetchone()

    async def _transaction(self, statements: list[Statement], changed: str | None = None) -> int:
        """Run statements in one transaction; return the last rowcount."""
        rowcount = 0
        try:
            if len(statements) == 1:
                cur = await self.db.execute(*statements[0])
                return cur.rowcount
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    cur = await self.db.execute(sql, args)
                    rowcount = cur.rowcount
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"database write failed: {exc}") from exc
        return rowcount

    async def integrity_check(self) -> str:
        async with self._lock:
            row = await self._fetchone("PRAGMA integrity_check")
            return row[0]

    async def backup(self, dest: str) -> None:
        """Online, consistent copy (VACUUM INTO) while relayd runs."""
        async with self._lock:
            await self.db.execute("VACUUM INTO ?", (dest,))

    def lost(self) -> str | None:
        """Why the path no longer names the file this store has open, or None."""
        return files.lost(self.path, self._identity)

    async def unwritable(self) -> str | None:
        """Why a write transaction cannot start (read-only file or file
        system, query_only), or None. The statement takes the write lock and
        changes nothing, so the WAL does not grow."""
        async with self._lock:
            try:
                await self.db.execute("UPDATE owners SET plan = plan WHERE 0")
            except (sqlite3.Error, StoreError) as exc:
                return f"database not writable: {exc}"
        return None

    # ------------------------------------------------------------ quota journal

    async def load_usage(self, now: float) -> dict[str, tuple[int, list[tuple[float, int]]]]:
        """Per user: (sent_total, [(ts, rcpts), ...] within the last hour)."""
        async with self._lock:
            totals = await self._fetchall("SELECT name, sent_total FROM smtp_users")
            recent = await self._fetchall(
                "SELECT user, ts, SUM(rcpts) AS n FROM sends WHERE ts > ? "
                "GROUP BY user, ts HAVING n != 0 ORDER BY ts", (now - HOUR,))
        out: dict[str, tuple[int, list[tuple[float, int]]]] = {
            r["name"]: (r["sent_total"], []) for r in totals}
        for r in recent:
            if r["user"] in out:
                out[r["user"]][1].append((r["ts"], r["n"]))
        return out

    async def journal_send(self, user: str, ts: float, rcpts: int) -> None:
        """Count ``rcpts`` for ``user`` at ``ts``; a negative count undoes an
        earlier entry with the same ts. Returns once the entry is committed;
        raises StoreError if it could not be (group commit: batching.py)."""
        await self._journal.call((user, ts, rcpts))

    async def _insert_sends(self, rows: list[tuple[str, float, int]]) -> list[None]:
        values = ",".join(["(?,?,?)"] * len(rows))
        params = tuple(v for row in rows for v in row)
        async with self._lock:
            await self._transaction([(f"INSERT INTO sends (user, ts, rcpts) VALUES {values}", params)])
        return [None] * len(rows)

    async def prune_sends(self, now: float) -> int:
        async with self._lock:
            return await self._transaction([("DELETE FROM sends WHERE ts <= ?", (now - HOUR,))])

    async def sent_totals(self) -> dict[str, int]:
        async with self._lock:
            rows = await self._fetchall("SELECT name, sent_total FROM smtp_users")
        return {r["name"]: r["sent_total"] for r in rows}


    # ------------------------------------------------------------ quotas (RecordStore)

    async def current_user(self, name: str) -> tuple[SmtpUser, str] | None:
        """The view is exact here: this process is the only writer."""
        return self.view.users.get(name)

    async def reserve(self, user: SmtpUser, hold: str, now: float) -> Verdict:
        """Against the user as stored now, whatever copy the caller holds."""
        current = self.view.get_user(user.name)
        return Verdict.GONE if current is None else self.ledger.reserve(current, now)

    def release(self, name: str, hold: str, n: int) -> None:
        if n:
            self.ledger.release(name, n)

    async def count(self, name: str, hold: str, ts: float, n: int) -> None:
        await self.journal_send(name, ts, n)
        self.ledger.commit(name, n, ts)

    async def uncount(self, name: str, hold: str, ts: float, n: int) -> None:
        await self.journal_send(name, ts, -n)
        self.ledger.uncount(name, n, ts)

    async def usage(self, name: str, now: float) -> tuple[int, int]:
        return self.ledger.sent_total(name), self.ledger.sent_last_hour(name, now)

    def held(self, name: str) -> int:
        return self.ledger.reserved(name)

    async def flush(self) -> None:
        """Releases are immediate here."""

    def forget_usage(self, name: str) -> None:
        """Drop a removed user's quota state -- unless a session still holds
        units for it: it releases them later, and the ledger refuses to
        release what it no longer knows."""
        if self.ledger.reserved(name) == 0:
            self.ledger.forget(name)

    async def instances(self) -> list[dict[str, Any]]:
        """The live instances: this process alone."""
        return [self.instance.as_dict(time.time())]
