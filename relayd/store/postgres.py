"""The shared backend: PostgreSQL through asyncpg, for a cluster of relayd
processes on one database (SPEC 8).

* The records' SQL is sqlbase.py's, its ``?`` placeholders numbered for
  PostgreSQL; every write runs in one transaction with a ``NOTIFY`` naming
  what changed, and the other instances reload that part of their view
  (pgwatch.py) -- within a second, with a periodic full reload behind it.
* Quotas are kept in the database, not in memory: ``reserve`` is one call
  of ``relayd_reserve`` (pgschema.py), which checks the user's status and
  limits and holds a unit under the user's row lock, so no interleaving of
  sessions on any instances can exceed a limit. ``count`` (one call of
  ``relayd_count``) turns a hold into a journal row (``sends``) before an
  upstream sees the message; ``uncount`` adds the negative row. Both are
  idempotent by hold, so the background retry of a lost one (pgwatch.py)
  is safe. A message makes three calls: MAIL (``current_user``), RCPT,
  end of DATA; concurrent calls of one kind share one statement
  (batching.py), so under load a round trip serves many messages.
  Batches lock users' rows in the users' order (pgschema.py, migration 2).
* An instance that dies leaves its holds (units of transactions not yet
  counted, so never sent): the others delete them once its heartbeat is
  older than pgwatch.DEAD_AFTER. Counted units stay counted: a kill -9
  over-counts by its in-flight messages at most, never under-counts.
* When the database cannot be reached, every call raises StoreError: MAIL
  and RCPT answer 451 4.3.0, and the store watch (storewatch.py) turns
  /healthz to 503 until a probe succeeds again. The pool reconnects by
  itself; nothing has to be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import asyncpg

from ..dsn import masked
from ..errors import StoreError
from ..policy import Verdict
from ..records import SmtpUser
from . import pgwatch
from .batching import Batcher
from .instances import this_instance
from .pgwatch import CHANNEL, DB_ERRORS, TIMEOUT
from .pgschema import migrate
from .sqlbase import Row, SqlStore, Statement
from .view import user_from

log = logging.getLogger("relayd.store")

HOUR = 3600.0
POOL_SIZE = 10
Item = TypeVar("Item")
Result = TypeVar("Result")
_PLACEHOLDER = re.compile(r"\?")


async def _keep_session(con: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own (an open
    transaction rolled back). Its default reset query is one more round trip
    per use, and relayd leaves no session state behind: no SET, LISTEN
    (pgwatch has a connection of its own) or session-level advisory lock."""


def _refusal(exc: BaseException) -> bool:
    """Whether the database refused a statement (rather than could not be
    reached, or is starting or stopping)."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, asyncpg.exceptions.CannotConnectNowError)


def _refused(exc: StoreError) -> bool:
    """Whether a batch's StoreError is worth retrying call by call: one bad
    call may have refused it; an unreachable database refuses every call."""
    return exc.__cause__ is not None and _refusal(exc.__cause__)


def numbered(sql: str) -> str:
    """sqlbase's ``?`` placeholders as PostgreSQL's ``$1, $2, ...``."""
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class Lane(Generic[Item, Result]):
    """One kind of batched call (batching.py) and the pool connection it
    keeps while its calls keep coming: one acquire and release per busy
    spell instead of one per statement (the pair costs ~60 µs of CPU, as
    much as a small statement's own). ``write(connection, items)`` returns
    one result per item."""

    def __init__(self, store: PostgresStore,
                 write: Callable[[Any, list[Item]], Awaitable[list[Result]]]):
        self._store = store
        self._write = write
        self._con: Any = None
        self._batcher = Batcher(self._run, _refused, self._release)

    async def call(self, item: Item) -> Result:
        return await self._batcher.call(item)

    async def finish(self, timeout: float) -> None:
        await self._batcher.finish(timeout)

    async def _run(self, items: list[Item]) -> list[Result]:
        try:
            if self._con is None:
                self._con = await self._store.pool.acquire()
            return await self._write(self._con, items)
        except DB_ERRORS as exc:
            await self._release()       # it may be broken: the next batch takes another
            raise self._store.failure(exc) from exc

    async def _release(self) -> None:
        con, self._con = self._con, None
        pool = self._store._pool
        if con is not None and pool is not None:
            try:
                await pool.release(con)
            except DB_ERRORS:
                con.terminate()


class PostgresStore(SqlStore):
    """The backend a cluster shares (see the module docstring)."""

    APP_ORDER = "seq"

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn
        self.path = masked(dsn)         # what logs name it by: never the password
        self.instance = this_instance()
        self._pool: asyncpg.Pool | None = None
        self._held: Counter[str] = Counter()        # units this instance holds, per user
        self.watch = pgwatch.ClusterWatch(self)
        self._sql: dict[str, str] = {}
        self._lookups = Lane(self, self._lookup_many)
        self._reserves = Lane(self, self._reserve_many)
        self._counts = Lane(self, self._count_many)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=POOL_SIZE, timeout=TIMEOUT,
                command_timeout=TIMEOUT, reset=_keep_session)
            async with self._pool.acquire() as con:
                await migrate(con, self.path)
            await self._load_users()
            await self._load_routing()
            await self.load_health()
            await self.watch.start()
        except DB_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        except StoreError:
            await self.close()
            raise

    async def close(self) -> None:
        for lane in (self._lookups, self._reserves, self._counts):
            await lane.finish(timeout=TIMEOUT)
        await self.watch.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), TIMEOUT)
            except DB_ERRORS:
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    def _numbered(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = numbered(sql)
        return out

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        try:
            return list(await self.pool.fetch(self._numbered(sql), *args))
        except DB_ERRORS as exc:
            raise self.failure(exc) from exc

    async def execute(self, sql: str, args: tuple[Any, ...]) -> None:
        """One statement in PostgreSQL's own placeholders, in a transaction of its own."""
        try:
            await self.pool.execute(sql, *args)
        except DB_ERRORS as exc:
            raise self.failure(exc) from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchval(sql, *args)
        except DB_ERRORS as exc:
            raise self.failure(exc) from exc

    async def _transaction(self, statements: list[Statement], changed: str | None = None) -> int:
        """Run statements in one transaction, with the NOTIFY of what
        ``changed``; return the last statement's row count."""
        status = ""
        try:
            async with self.pool.acquire() as con, con.transaction():
                for sql, args in statements:
                    status = await con.execute(self._numbered(sql), *args)
                if changed is not None:
                    await con.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                      f"{self.instance.id} {changed}")
        except DB_ERRORS as exc:
            raise self.failure(exc) from exc
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    def failure(self, exc: BaseException) -> StoreError:
        """The StoreError for ``exc``; a lost connection expires the pool's
        others, which the same restart broke too."""
        if not _refusal(exc):
            if self._pool is not None:
                self.watch.soon_do(self._pool.expire_connections())
        return StoreError(f"database {self.path}: {type(exc).__name__}: {exc}")

    async def integrity_check(self) -> str:
        await self._fetchval("SELECT 1")
        return "ok"

    async def backup(self, dest: str) -> None:
        raise StoreError("a PostgreSQL store is backed up with pg_dump, not by relayd")

    def lost(self) -> str | None:
        return None                 # a DSN cannot be unlinked under us

    async def unwritable(self) -> str | None:
        """Why a write cannot start (the database unreachable, read-only), or
        None; the statement changes nothing."""
        try:
            await self._transaction([("UPDATE owners SET plan = plan WHERE false", ())])
        except StoreError as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------ shared health

    async def load_health(self) -> None:
        """Every instance's counts into the view (own upstreams come with
        the routing reload; this adds the others')."""
        for r in await self._fetchall("SELECT * FROM route_health"):
            self.view.health.set(r["idsmtp"], r["numerrors"], r["last_error"],
                                 r["last_error_reason"])

    async def reload_health(self) -> None:
        for r in await self._fetchall(
                "SELECT idsmtp, numerrors, last_error, last_error_reason FROM upstreams"):
            self.view.health.set(r["idsmtp"], r["numerrors"], r["last_error"],
                                 r["last_error_reason"])
        await self.load_health()

    def _health_write(self, idsmtp: str, ok: bool, ts: float,
                      reason: str | None) -> list[Statement]:
        if idsmtp in self.view.upstreams:
            return super()._health_write(idsmtp, ok, ts, reason)
        if ok:
            return [("DELETE FROM route_health WHERE idsmtp = ?", (idsmtp,))]
        return [("INSERT INTO route_health (idsmtp, numerrors, last_error, last_error_reason) "
                 "VALUES (?, 1, ?, ?) ON CONFLICT (idsmtp) DO UPDATE SET "
                 "numerrors = route_health.numerrors + 1, last_error = excluded.last_error, "
                 "last_error_reason = excluded.last_error_reason",
                 (idsmtp, ts, reason or None))]

    # ------------------------------------------------------------ quotas (RecordStore)

    async def current_user(self, name: str) -> tuple[SmtpUser, str] | None:
        """The user and its password's stamp as the database has them now.
        The view is left to the change notices: a read that raced a write
        must not put an older row back."""
        row = await self._lookups.call(name)
        return None if row is None else (user_from(row), row["password_hash"])

    @staticmethod
    async def _lookup_many(con: Any, names: list[str]) -> list[Row | None]:
        rows = await con.fetch("SELECT * FROM smtp_users WHERE name = ANY($1)",
                               list(set(names)))
        by_name = {r["name"]: r for r in rows}
        return [by_name.get(name) for name in names]

    async def reserve(self, user: SmtpUser, hold: str, now: float) -> Verdict:
        verdict = await self._reserves.call((user.name, hold, now))
        if verdict is Verdict.OK:
            self._held[user.name] += 1
        return verdict

    async def _reserve_many(self, con: Any, calls: list[tuple[str, str, float]]) -> list[Verdict]:
        users, holds, nows = zip(*calls)
        verdicts = await con.fetchval("SELECT relayd_reserve_many($1, $2, $3, $4)",
                                      users, holds, self.instance.id, nows)
        return [Verdict(v) for v in verdicts]

    def release(self, name: str, hold: str, n: int) -> None:
        """Never fails: the delete runs in the background, retried until the
        database takes it (pgwatch.py)."""
        self._unhold(name, n)
        self.watch.soon(("DELETE FROM holds WHERE hold = $1", (hold,)))

    def _unhold(self, name: str, n: int) -> None:
        self._held[name] -= n
        if self._held[name] <= 0:
            del self._held[name]

    async def count(self, name: str, hold: str, ts: float, n: int) -> None:
        await self._counts.call((hold, name, ts, n))
        self._unhold(name, n)

    @staticmethod
    async def _count_many(con: Any, calls: list[tuple[str, str, float, int]]) -> list[None]:
        await con.fetchval("SELECT relayd_count_many($1, $2, $3, $4)", *zip(*calls))
        return [None] * len(calls)

    async def uncount(self, name: str, hold: str, ts: float, n: int) -> None:
        """The negative row of ``count``; retried in the background if the
        database does not take it now (a crash before then over-counts)."""
        statement = ("INSERT INTO sends (user_name, ts, rcpts, hold) "
                     "SELECT user_name, ts, -rcpts, hold FROM sends WHERE hold = $1 AND rcpts > 0 "
                     "ON CONFLICT (hold) WHERE rcpts < 0 DO NOTHING", (hold,))
        try:
            await self.execute(*statement)
        except StoreError:
            self.watch.retry(statement)
            raise

    async def usage(self, name: str, now: float) -> tuple[int, int]:
        rows = await self._fetchall(
            "SELECT sent_total, hour_sum - (SELECT COALESCE(SUM(rcpts), 0) FROM sends "
            "WHERE user_name = ? AND ts > hour_cursor AND ts <= ?)::bigint AS recent "
            "FROM smtp_users WHERE name = ?", (name, now - HOUR, name))
        return (rows[0]["sent_total"], rows[0]["recent"]) if rows else (0, 0)

    def held(self, name: str) -> int:
        return self._held.get(name, 0)

    async def flush(self) -> None:
        """Until the releases sent so far have reached the database (or wait
        for a retry)."""
        await self.watch.flush()

    def forget_usage(self, name: str) -> None:
        """Nothing to forget: usage lives in the database, and went with the row."""

    async def prune_sends(self, now: float) -> int:
        """Journal rows every user's hour has moved past (pgschema.relayd_prune)."""
        return int(await self._fetchval("SELECT relayd_prune($1)", now))

    async def sent_totals(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT name, sent_total FROM smtp_users")
        return {r["name"]: r["sent_total"] for r in rows}

    async def instances(self) -> list[dict[str, Any]]:
        return await self.watch.members()
