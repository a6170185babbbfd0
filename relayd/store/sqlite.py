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
* Journal writes are group-committed (journal.py). Reads are served by the
  view (view.py), refreshed by every write here.
* ``lost()``/``unwritable()`` are the store watch's probes (storewatch.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import NotFound, StoreError
from ..records import App, DomainSettings, Owner, SmtpUser, Upstream
from . import files
from .credentials import digest, new_id, new_secret, new_user_name, now_iso
from .journal import GroupCommit
from .schema import migrate
from .view import UPSTREAM_FIELDS, View, upstream_columns

HOUR = 3600.0


class SqliteStore:
    """The embedded backend (see the package docstring for the rules)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._identity: tuple[int, int] | None = None     # (st_dev, st_ino) of the open file
        self._lock = asyncio.Lock()
        self.view = View()
        self._journal = GroupCommit(self._insert_sends)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        files.create_private_file(self.path)
        # SQLite gives -wal/-shm the database file's mode (0600).
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._identity = files.identity(self.path)
        self._db.row_factory = sqlite3.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: durable across process crashes (kill -9); a power
        # loss may drop the last transactions, never corrupt the file.
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await migrate(self.db, self.path)
        await self._load_users()
        await self._load_routing()

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

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self.db.execute(sql, tuple(args)) as cur:
            return list(await cur.fetchall())

    async def _fetchone(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self.db.execute(sql, tuple(args)) as cur:
            return await cur.fetchone()

    async def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
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

    async def _write_routing(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """_write for the tables of the routing view, then refresh the view.
        Admin writes are rare; a full reload keeps the view simply exact."""
        n = await self._write(statements)
        await self._load_routing()
        return n

    async def _load_routing(self) -> None:
        self.view.load_routing(
            await self._fetchall("SELECT * FROM owners"),
            await self._fetchall("SELECT * FROM apps ORDER BY rowid"),
            await self._fetchall("SELECT * FROM upstreams ORDER BY priority, created, idsmtp"),
            await self._fetchall("SELECT * FROM domains"))

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

    # ------------------------------------------------------------ owners

    async def create_owner(self, plan: str) -> tuple[Owner, str, App]:
        """Create an owner and its default app; return (owner, token, app).
        The token is returned only here."""
        owner = Owner(owner_id=new_id(), plan=plan, created=now_iso())
        token = new_secret()
        app = App(idapp=new_id(), owner_id=owner.owner_id, name="default",
                  strategy="random", test_email=None, created=owner.created)
        async with self._lock:
            await self._write_routing([
                ("INSERT INTO owners (owner_id, token_hash, plan, created) VALUES (?,?,?,?)",
                 (owner.owner_id, digest(token), plan, owner.created)),
                ("INSERT INTO apps (idapp, owner_id, name, strategy, test_email, created) "
                 "VALUES (?,?,?,?,?,?)",
                 (app.idapp, app.owner_id, app.name, app.strategy, app.test_email, app.created)),
            ])
        return owner, token, app

    async def authenticate_owner(self, owner_id: str, token: str) -> Owner | None:
        return self.view.check_token(owner_id, token)

    async def get_owner(self, owner_id: str) -> Owner:
        return self.view.owner(owner_id)

    async def list_owners(self) -> list[Owner]:
        return self.view.all_owners()

    async def set_plan(self, owner_id: str, plan: str) -> Owner:
        async with self._lock:
            n = await self._write_routing([("UPDATE owners SET plan = ? WHERE owner_id = ?", (plan, owner_id))])
        if not n:
            raise NotFound("owner", owner_id)
        return await self.get_owner(owner_id)

    async def remove_owner(self, owner_id: str) -> None:
        async with self._lock:
            n = await self._write_routing([("DELETE FROM owners WHERE owner_id = ?", (owner_id,))])
            if not n:
                raise NotFound("owner", owner_id)
            await self._load_users()       # the delete cascaded to its SMTP users

    # ------------------------------------------------------------ apps

    async def create_app(self, owner_id: str, name: str, strategy: str,
                         test_email: str | None = None) -> App:
        app = App(new_id(), owner_id, name, strategy, test_email, now_iso())
        async with self._lock:
            self.view.owner(owner_id)                       # NotFound
            await self._write_routing([(
                "INSERT INTO apps (idapp, owner_id, name, strategy, test_email, created) "
                "VALUES (?,?,?,?,?,?)",
                (app.idapp, owner_id, name, strategy, test_email, app.created))])
        return app

    async def get_app(self, idapp: str, owner_id: str | None = None) -> App:
        """The app; NotFound also when it belongs to another owner."""
        return self.view.app(idapp, owner_id)

    async def list_apps(self, owner_id: str | None = None) -> list[App]:
        return self.view.apps_of(owner_id)

    async def default_app(self, owner_id: str) -> App:
        return self.view.default_app(owner_id)

    async def remove_app(self, idapp: str) -> None:
        """Delete an app with its SMTP users and upstreams (ON DELETE CASCADE)."""
        async with self._lock:
            n = await self._write_routing([("DELETE FROM apps WHERE idapp = ?", (idapp,))])
            if not n:
                raise NotFound("app", idapp)
            await self._load_users()       # the delete cascaded to its SMTP users

    async def update_app(self, idapp: str, *, strategy: str | None = None,
                         test_email: str | None = None, name: str | None = None) -> App:
        sets = {k: v for k, v in (("strategy", strategy), ("test_email", test_email), ("name", name))
                if v is not None}
        if sets:
            async with self._lock:
                n = await self._write_routing([_update("apps", sets, "idapp", idapp)])
            if not n:
                raise NotFound("app", idapp)
        return await self.get_app(idapp)

    # ------------------------------------------------------------ SMTP users

    async def _load_users(self) -> None:
        self.view.load_users(await self._fetchall("SELECT * FROM smtp_users"))

    async def _reload_user(self, name: str) -> None:
        self.view.put_user(name, await self._fetchone(
            "SELECT * FROM smtp_users WHERE name = ?", (name,)))

    async def create_user(self, owner_id: str, idapp: str, total_limit: int,
                          hourly_limit: int) -> tuple[SmtpUser, str]:
        """Create an SMTP user with a generated name and password; return both.
        The password is returned only here (and by reset_password)."""
        password = new_secret()
        async with self._lock:
            self.view.app(idapp, owner_id)                  # NotFound
            name = new_user_name(self.view.users)
            await self._write([(
                "INSERT INTO smtp_users (name, password_hash, owner_id, idapp, total_limit, "
                "hourly_limit, status, created) VALUES (?,?,?,?,?,?,'Enable',?)",
                (name, digest(password), owner_id, idapp, total_limit, hourly_limit, now_iso()))])
            await self._reload_user(name)
        return self.view.users[name][0], password

    def get_user(self, name: str) -> SmtpUser | None:
        """Hot path (every MAIL and RCPT): served from the view."""
        return self.view.get_user(name)

    def check_password(self, name: str, password: str) -> SmtpUser | None:
        return self.view.check_password(name, password)

    def credential_stamp(self, name: str) -> str | None:
        """What identifies the user's current password (its digest): a
        session authenticated under another one is stale (SPEC 3.3)."""
        return self.view.credential_stamp(name)

    async def list_users(self, owner_id: str) -> list[SmtpUser]:
        return self.view.users_of(owner_id)

    async def update_user(self, name: str, owner_id: str, *, total_limit: int | None = None,
                          hourly_limit: int | None = None, status: str | None = None,
                          idapp: str | None = None) -> SmtpUser:
        user = self.get_user(name)
        if user is None or user.owner_id != owner_id:
            raise NotFound("smtp user", name)
        sets = {k: v for k, v in (("total_limit", total_limit), ("hourly_limit", hourly_limit),
                                  ("status", status), ("idapp", idapp)) if v is not None}
        if sets:
            async with self._lock:
                if idapp is not None:
                    self.view.app(idapp, owner_id)          # NotFound
                await self._write([_update("smtp_users", sets, "name", name)])
                await self._reload_user(name)
        return self.view.users[name][0]

    async def reset_password(self, name: str, owner_id: str) -> str:
        user = self.get_user(name)
        if user is None or user.owner_id != owner_id:
            raise NotFound("smtp user", name)
        password = new_secret()
        async with self._lock:
            await self._write([("UPDATE smtp_users SET password_hash = ? WHERE name = ?",
                                (digest(password), name))])
            await self._reload_user(name)
        return password

    async def remove_user(self, name: str, owner_id: str) -> None:
        user = self.get_user(name)
        if user is None or user.owner_id != owner_id:
            raise NotFound("smtp user", name)
        async with self._lock:
            await self._write([("DELETE FROM smtp_users WHERE name = ?", (name,))])
            self.view.put_user(name, None)

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
        raises StoreError if it could not be (group commit: journal.py)."""
        await self._journal.add(user, ts, rcpts)

    async def _insert_sends(self, rows: list[tuple[str, float, int]]) -> None:
        values = ",".join(["(?,?,?)"] * len(rows))
        params = tuple(v for row in rows for v in row)
        async with self._lock:
            await self._write([(f"INSERT INTO sends (user, ts, rcpts) VALUES {values}", params)])

    async def prune_sends(self, now: float) -> int:
        async with self._lock:
            return await self._write([("DELETE FROM sends WHERE ts <= ?", (now - HOUR,))])

    async def sent_totals(self) -> dict[str, int]:
        async with self._lock:
            rows = await self._fetchall("SELECT name, sent_total FROM smtp_users")
        return {r["name"]: r["sent_total"] for r in rows}

    # ------------------------------------------------------------ upstreams

    UPSTREAM_FIELDS = UPSTREAM_FIELDS

    async def create_upstream(self, fields: dict[str, Any]) -> Upstream:
        """``fields``: UPSTREAM_FIELDS (idapp, host and port required)."""
        idsmtp, ts = new_id(), now_iso()
        values = upstream_columns(fields)
        cols = ["idsmtp", "created", "modified", *values]
        async with self._lock:
            await self._write_routing([(
                f"INSERT INTO upstreams ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (idsmtp, ts, ts, *values.values()))])
        return await self.get_upstream(idsmtp)

    async def update_upstream(self, idsmtp: str, fields: dict[str, Any]) -> Upstream:
        values = upstream_columns(fields)
        values["modified"] = now_iso()
        async with self._lock:
            n = await self._write_routing([_update("upstreams", values, "idsmtp", idsmtp)])
        if not n:
            raise NotFound("smtp", idsmtp)
        return await self.get_upstream(idsmtp)

    async def get_upstream(self, idsmtp: str, owner_id: str | None = None) -> Upstream:
        """The upstream; NotFound also when its app belongs to another owner."""
        return self.view.upstream(idsmtp, owner_id)

    async def list_upstreams(self, idapp: str, *, active_only: bool = False) -> list[Upstream]:
        return self.view.upstreams_of(idapp, active_only=active_only)

    async def remove_upstream(self, idsmtp: str) -> None:
        async with self._lock:
            n = await self._write_routing([("DELETE FROM upstreams WHERE idsmtp = ?", (idsmtp,))])
        if not n:
            raise NotFound("smtp", idsmtp)

    async def record_upstream_result(self, idsmtp: str, ok: bool, ts: float,
                                     reason: str | None = None) -> None:
        """SPEC 3.7: an error increments numerrors, a success resets it, for
        any upstream (view.health); an own upstream's row keeps a copy, with
        the error's reason (SPEC 4.6). The row and the view change under the
        lock, so a reload cannot come between them."""
        if ok and not self.view.health.get(idsmtp)[0]:
            return                  # nothing to reset: no write on the hot path
        async with self._lock:
            if idsmtp in self.view.upstreams:
                if ok:
                    sql = ("UPDATE upstreams SET numerrors = 0 WHERE idsmtp = ?", (idsmtp,))
                else:
                    sql = ("UPDATE upstreams SET numerrors = numerrors + 1, last_error = ?, "
                           "last_error_reason = ? WHERE idsmtp = ?", (ts, reason or None, idsmtp))
                await self._write([sql])
            self.view.note_upstream_result(idsmtp, ok, ts, reason)

    def with_health(self, u: Upstream) -> Upstream:
        """``u`` with its current numerrors and last error (hot path)."""
        return self.view.with_health(u)

    # ------------------------------------------------------------ domain settings

    async def get_domain(self, owner_id: str, domain: str) -> DomainSettings | None:
        return self.view.domain(owner_id, domain)

    async def list_domains(self, owner_id: str) -> list[DomainSettings]:
        return self.view.domains_of(owner_id)

    async def put_domain(self, owner_id: str, domain: str, *, provider: str, description: str,
                         from_: str | None, options: dict[str, Any]) -> DomainSettings:
        """Create or replace the settings of ``domain`` for ``owner_id``."""
        domain = domain.lower()
        async with self._lock:
            await self._write_routing([(
                "INSERT INTO domains (id, owner_id, domain, provider, description, from_addr, options) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (owner_id, domain) DO UPDATE SET "
                "provider = excluded.provider, description = excluded.description, "
                "from_addr = excluded.from_addr, options = excluded.options",
                (new_id(), owner_id, domain, provider, description, from_, json.dumps(options)))])
        result = await self.get_domain(owner_id, domain)
        assert result is not None
        return result

    async def delete_domain(self, owner_id: str, domain: str) -> int:
        async with self._lock:
            return await self._write_routing([("DELETE FROM domains WHERE owner_id = ? AND domain = ?",
                                       (owner_id, domain.lower()))])

    # ------------------------------------------------------------ routing view

    def upstream_error_counts(self) -> list[tuple[str, int]]:
        return self.view.upstream_error_counts()

    def route_view(self, user: SmtpUser, sender_domain: str | None
                   ) -> tuple[Owner, App, DomainSettings | None, list[Upstream]]:
        """Everything routing needs for one message, from the view: no
        database round trip on the hot path."""
        return self.view.route_view(user, sender_domain)


def _update(table: str, sets: dict[str, Any], key: str, value: Any) -> tuple[str, tuple[Any, ...]]:
    """UPDATE ``table`` SET the columns of ``sets`` WHERE ``key`` = ``value``
    (column names come from this module, never from a request)."""
    return (f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in sets)} WHERE {key} = ?",
            (*sets.values(), value))
