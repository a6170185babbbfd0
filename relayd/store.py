"""The embedded store: SQLite in WAL mode through aiosqlite. The only module
with SQL in it.

Theory of operation
-------------------
* One connection, in autocommit mode. Every public method holds ``_lock`` so
  that a multi-statement transaction (BEGIN IMMEDIATE ... COMMIT) never has
  another coroutine's statement slip into it on the shared connection.
* Schema changes are numbered migrations keyed by ``PRAGMA user_version``;
  opening an older database upgrades it in place, a newer one is refused.
* Secrets: SMTP-user passwords and owner tokens are generated here with
  ``secrets`` (>= 128 bits) and only their SHA-256 digests are stored. A fast
  hash is right for random secrets of that size (no dictionary to attack, as
  with API tokens); comparison is constant time. Upstream passwords must be
  usable, so they are stored as given; the file is mode 0600.
* Quota usage is a journal, ``sends(user, ts, rcpts)``: one row per message
  about to be delivered, written *before* the upstream transaction, and a
  negative row with the same ``ts`` if delivery fails. A trigger keeps
  ``smtp_users.sent_total`` in step inside the same statement, so each
  journal write is one atomic statement. A kill -9 mid-delivery therefore
  leaves the message counted: counters may exceed what upstreams received by
  in-flight messages, never fall short. Rows older than the hourly window
  are pruned; sent_total keeps the running total.
* Journal writes are group-committed: entries queued while one batch is
  being written go out together as one multi-row INSERT (one statement, so
  still atomic with its trigger), and each caller resumes only once its
  entry is on disk. Under load that is one database round trip for many
  messages instead of one each.
* ``lost()`` and ``unwritable()`` are the store watch's probes
  (storewatch.py, SPEC 9): the open file's (st_dev, st_ino) is recorded at
  open, so a path that names another file, or none, is noticed.
* Everything read on the hot path (SMTP users on every MAIL/RCPT; owners,
  apps, upstreams and domain settings for routing) is served from memory.
  This process is the only writer, and every write here refreshes the
  in-memory view before it returns, so the view is exact, never stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import sqlite3

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiosqlite

from .errors import NotFound, StoreError
from .records import App, DomainSettings, Owner, SmtpUser, Upstream

HOUR = 3600.0

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE owners (
        owner_id   TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        plan       TEXT NOT NULL CHECK (plan IN ('free', 'paid')),
        created    TEXT NOT NULL
    );
    CREATE TABLE apps (
        idapp      TEXT PRIMARY KEY,
        owner_id   TEXT NOT NULL REFERENCES owners ON DELETE CASCADE,
        name       TEXT NOT NULL,
        strategy   TEXT NOT NULL CHECK (strategy IN ('random', 'priority')),
        test_email TEXT,
        created    TEXT NOT NULL
    );
    CREATE INDEX apps_owner ON apps(owner_id);
    CREATE TABLE smtp_users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        owner_id      TEXT NOT NULL REFERENCES owners ON DELETE CASCADE,
        idapp         TEXT NOT NULL REFERENCES apps ON DELETE CASCADE,
        total_limit   INTEGER NOT NULL CHECK (total_limit > 0),
        hourly_limit  INTEGER NOT NULL CHECK (hourly_limit > 0),
        status        TEXT NOT NULL CHECK (status IN ('Enable', 'Disable')),
        sent_total    INTEGER NOT NULL DEFAULT 0,
        created       TEXT NOT NULL
    );
    CREATE INDEX smtp_users_owner ON smtp_users(owner_id);
    CREATE TABLE sends (
        id    INTEGER PRIMARY KEY,
        user  TEXT NOT NULL REFERENCES smtp_users(name) ON DELETE CASCADE,
        ts    REAL NOT NULL,
        rcpts INTEGER NOT NULL
    );
    CREATE INDEX sends_ts ON sends(ts);
    CREATE TRIGGER sends_count AFTER INSERT ON sends BEGIN
        UPDATE smtp_users SET sent_total = sent_total + NEW.rcpts WHERE name = NEW.user;
    END;
    CREATE TABLE upstreams (
        idsmtp           TEXT PRIMARY KEY,
        idapp            TEXT NOT NULL REFERENCES apps ON DELETE CASCADE,
        priority         INTEGER NOT NULL DEFAULT 10,
        host             TEXT NOT NULL,
        port             INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        username         TEXT,
        password         TEXT,
        auth             INTEGER NOT NULL DEFAULT 0,
        startstls        INTEGER NOT NULL DEFAULT 0,
        ssltls           INTEGER NOT NULL DEFAULT 0,
        verify_tls       INTEGER NOT NULL DEFAULT 1,
        debug            INTEGER NOT NULL DEFAULT 0,
        defaultfromemail TEXT,
        defaultfromname  TEXT,
        allowed_domains  TEXT,              -- JSON list, NULL = the default
        numerrors        INTEGER NOT NULL DEFAULT 0,
        last_error       REAL,
        status           TEXT NOT NULL DEFAULT 'A' CHECK (status IN ('A', 'D')),
        created          TEXT NOT NULL,
        modified         TEXT NOT NULL
    );
    CREATE INDEX upstreams_app ON upstreams(idapp);
    CREATE TABLE domains (
        id          TEXT NOT NULL UNIQUE,
        owner_id    TEXT NOT NULL REFERENCES owners ON DELETE CASCADE,
        domain      TEXT NOT NULL,
        provider    TEXT NOT NULL DEFAULT 'smtp',
        description TEXT NOT NULL DEFAULT '',
        from_addr   TEXT,
        options     TEXT NOT NULL,          -- JSON object, as seed 004
        PRIMARY KEY (owner_id, domain)
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def new_id() -> str:
    """24 hex digits, the shape of the seed's ``_id``/``idapp``/``idsmtp``."""
    return secrets.token_hex(12)


def new_secret() -> str:
    """An SMTP password or owner token: 192 random bits, URL-safe base64."""
    return secrets.token_urlsafe(24)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def secret_matches(secret: str, stored_digest: str | None) -> bool:
    # Compare digests of equal length in constant time; an unknown name is
    # compared against a dummy so timing does not tell names apart.
    return hmac.compare_digest(digest(secret), stored_digest or "0" * 64) and stored_digest is not None


def create_private_file(path: Path) -> None:
    """Create ``path`` (if absent) with mode 0600 whatever the umask."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def _b(v: Any) -> bool:
    return bool(v)


class Store:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._identity: tuple[int, int] | None = None     # (st_dev, st_ino) of the open file
        self._lock = asyncio.Lock()
        self._users: dict[str, tuple[SmtpUser, str]] = {}   # name -> (user, password digest)
        # The routing view (see the module docstring).
        self._owners: dict[str, Owner] = {}
        self._apps: dict[str, App] = {}
        self._upstreams: dict[str, Upstream] = {}
        self._app_upstreams: dict[str, list[str]] = {}      # idapp -> idsmtp, in priority order
        self._domains: dict[tuple[str, str], DomainSettings] = {}
        self._journal: list[tuple[str, float, int, asyncio.Future[None]]] = []
        self._journal_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_private_file(self.path)
        # SQLite gives -wal/-shm the database file's mode (0600).
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._db.row_factory = sqlite3.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: durable across process crashes (kill -9); a power
        # loss may drop the last transactions, never corrupt the file.
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._migrate()
        await self._load_users()
        await self._load_routing()

    async def close(self) -> None:
        if self._journal_task is not None:
            await asyncio.wait([self._journal_task], timeout=5)
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        (version,) = await (await self.db.execute("PRAGMA user_version")).fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this relayd "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )
        for n in range(version, SCHEMA_VERSION):
            await self.db.executescript(
                "BEGIN IMMEDIATE;\n" + MIGRATIONS[n] + f"\nPRAGMA user_version = {n + 1};\nCOMMIT;"
            )

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
        owners = await self._fetchall("SELECT * FROM owners")
        apps = await self._fetchall("SELECT * FROM apps")
        ups = await self._fetchall("SELECT * FROM upstreams ORDER BY priority, created, idsmtp")
        doms = await self._fetchall("SELECT * FROM domains")
        self._owners = {r["owner_id"]: Owner(r["owner_id"], r["plan"], r["created"]) for r in owners}
        self._apps = {r["idapp"]: self._app(r) for r in apps}
        self._upstreams = {r["idsmtp"]: self._upstream(r) for r in ups}
        self._app_upstreams = {}
        for r in ups:
            self._app_upstreams.setdefault(r["idapp"], []).append(r["idsmtp"])
        self._domains = {(r["owner_id"], r["domain"]): self._domain(r) for r in doms}

    async def integrity_check(self) -> str:
        async with self._lock:
            row = await self._fetchone("PRAGMA integrity_check")
            return row[0]

    async def backup(self, dest: str) -> None:
        """Online, consistent copy (VACUUM INTO) while relayd runs."""
        async with self._lock:
            await self.db.execute("VACUUM INTO ?", (dest,))

    def lost(self) -> str | None:
        """Why the path no longer names the file this store has open, or
        None. (Another stat error, e.g. EACCES, is left to unwritable().)"""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return "database file removed"
        except OSError:
            return None
        return None if (st.st_dev, st.st_ino) == self._identity else "database file replaced"

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
        async with self._lock:
            row = await self._fetchone("SELECT * FROM owners WHERE owner_id = ?", (owner_id,))
        if not secret_matches(token, row["token_hash"] if row else None):
            return None
        return Owner(row["owner_id"], row["plan"], row["created"])

    async def get_owner(self, owner_id: str) -> Owner:
        async with self._lock:
            row = await self._fetchone("SELECT * FROM owners WHERE owner_id = ?", (owner_id,))
        if row is None:
            raise NotFound("owner", owner_id)
        return Owner(row["owner_id"], row["plan"], row["created"])

    async def list_owners(self) -> list[Owner]:
        async with self._lock:
            rows = await self._fetchall("SELECT * FROM owners ORDER BY created, owner_id")
        return [Owner(r["owner_id"], r["plan"], r["created"]) for r in rows]

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

    @staticmethod
    def _app(r: sqlite3.Row) -> App:
        return App(r["idapp"], r["owner_id"], r["name"], r["strategy"], r["test_email"], r["created"])

    async def create_app(self, owner_id: str, name: str, strategy: str,
                         test_email: str | None = None) -> App:
        app = App(new_id(), owner_id, name, strategy, test_email, now_iso())
        async with self._lock:
            if await self._fetchone("SELECT 1 FROM owners WHERE owner_id = ?", (owner_id,)) is None:
                raise NotFound("owner", owner_id)
            await self._write_routing([(
                "INSERT INTO apps (idapp, owner_id, name, strategy, test_email, created) "
                "VALUES (?,?,?,?,?,?)",
                (app.idapp, owner_id, name, strategy, test_email, app.created))])
        return app

    async def get_app(self, idapp: str, owner_id: str | None = None) -> App:
        """The app; NotFound also when it belongs to another owner."""
        async with self._lock:
            row = await self._fetchone("SELECT * FROM apps WHERE idapp = ?", (idapp,))
        if row is None or (owner_id is not None and row["owner_id"] != owner_id):
            raise NotFound("app", idapp)
        return self._app(row)

    async def list_apps(self, owner_id: str | None = None) -> list[App]:
        async with self._lock:
            if owner_id is None:
                rows = await self._fetchall("SELECT * FROM apps ORDER BY created, idapp")
            else:
                rows = await self._fetchall(
                    "SELECT * FROM apps WHERE owner_id = ? ORDER BY created, idapp", (owner_id,))
        return [self._app(r) for r in rows]

    async def default_app(self, owner_id: str) -> App:
        """The owner's default app: the first one created. ``created`` has
        millisecond resolution, so insertion order (rowid) decides."""
        async with self._lock:
            row = await self._fetchone(
                "SELECT * FROM apps WHERE owner_id = ? ORDER BY rowid LIMIT 1", (owner_id,))
        if row is None:
            raise NotFound("app of owner", owner_id)
        return self._app(row)

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
                n = await self._write_routing([(
                    f"UPDATE apps SET {', '.join(f'{k} = ?' for k in sets)} WHERE idapp = ?",
                    (*sets.values(), idapp))])
            if not n:
                raise NotFound("app", idapp)
        return await self.get_app(idapp)

    # ------------------------------------------------------------ SMTP users

    @staticmethod
    def _user(r: sqlite3.Row) -> SmtpUser:
        return SmtpUser(r["name"], r["owner_id"], r["idapp"], r["total_limit"],
                        r["hourly_limit"], r["status"], r["created"])

    async def _load_users(self) -> None:
        rows = await self._fetchall("SELECT * FROM smtp_users")
        self._users = {r["name"]: (self._user(r), r["password_hash"]) for r in rows}

    async def _reload_user(self, name: str) -> None:
        row = await self._fetchone("SELECT * FROM smtp_users WHERE name = ?", (name,))
        if row is None:
            self._users.pop(name, None)
        else:
            self._users[name] = (self._user(row), row["password_hash"])

    async def create_user(self, owner_id: str, idapp: str, total_limit: int,
                          hourly_limit: int) -> tuple[SmtpUser, str]:
        """Create an SMTP user with a generated name and password; return both.
        The password is returned only here (and by reset_password)."""
        password = new_secret()
        async with self._lock:
            app = await self._fetchone("SELECT owner_id FROM apps WHERE idapp = ?", (idapp,))
            if app is None or app["owner_id"] != owner_id:
                raise NotFound("app", idapp)
            for _ in range(20):
                # "smtp" + 10 digits: unguessable enough that names are not
                # enumerable, short enough to type.
                name = "smtp" + str(secrets.randbelow(9 * 10**9) + 10**9)
                if name not in self._users:
                    break
            else:  # pragma: no cover - 20 collisions in 9e9 names
                raise StoreError("could not generate a unique SMTP user name")
            await self._write([(
                "INSERT INTO smtp_users (name, password_hash, owner_id, idapp, total_limit, "
                "hourly_limit, status, created) VALUES (?,?,?,?,?,?,'Enable',?)",
                (name, digest(password), owner_id, idapp, total_limit, hourly_limit, now_iso()))])
            await self._reload_user(name)
        return self._users[name][0], password

    def get_user(self, name: str) -> SmtpUser | None:
        """Hot path (every MAIL and RCPT): served from memory, kept exact."""
        entry = self._users.get(name)
        return entry[0] if entry else None

    def check_password(self, name: str, password: str) -> SmtpUser | None:
        entry = self._users.get(name)
        ok = secret_matches(password, entry[1] if entry else None)
        return entry[0] if ok and entry else None

    def credential_stamp(self, name: str) -> str | None:
        """What identifies the user's current password (its digest): a
        session authenticated under another one is stale (SPEC 3.3)."""
        entry = self._users.get(name)
        return entry[1] if entry else None

    async def list_users(self, owner_id: str) -> list[SmtpUser]:
        return sorted((u for u, _ in self._users.values() if u.owner_id == owner_id),
                      key=lambda u: (u.created, u.name))

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
                    app = await self._fetchone("SELECT owner_id FROM apps WHERE idapp = ?", (idapp,))
                    if app is None or app["owner_id"] != owner_id:
                        raise NotFound("app", idapp)
                await self._write([(
                    f"UPDATE smtp_users SET {', '.join(f'{k} = ?' for k in sets)} WHERE name = ?",
                    (*sets.values(), name))])
                await self._reload_user(name)
        return self._users[name][0]

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
            self._users.pop(name, None)

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
        raises StoreError if it could not be (see group commit above)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._journal.append((user, ts, rcpts, future))
        if self._journal_task is None or self._journal_task.done():
            self._journal_task = asyncio.create_task(self._flush_journal())
        await future

    JOURNAL_BATCH = 500     # rows per INSERT (3 parameters each, far below SQLite's limit)

    async def _flush_journal(self) -> None:
        while self._journal:
            batch, self._journal = self._journal[:self.JOURNAL_BATCH], self._journal[self.JOURNAL_BATCH:]
            try:
                await self._insert_sends(batch)
            except StoreError as exc:
                if len(batch) == 1:
                    _settle(batch, exc)
                    continue
                # One bad row (e.g. a user deleted mid-delivery) must not fail
                # the others: write them one by one.
                for entry in batch:
                    try:
                        await self._insert_sends([entry])
                    except StoreError as one:
                        _settle([entry], one)
                    else:
                        _settle([entry], None)
            else:
                _settle(batch, None)

    async def _insert_sends(self, batch: list[tuple[str, float, int, asyncio.Future[None]]]) -> None:
        values = ",".join(["(?,?,?)"] * len(batch))
        params = tuple(v for user, ts, n, _ in batch for v in (user, ts, n))
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

    UPSTREAM_FIELDS = ("idapp", "priority", "host", "port", "username", "password", "auth",
                       "startstls", "ssltls", "verify_tls", "debug", "defaultfromemail",
                       "defaultfromname", "allowed_domains", "status")

    @staticmethod
    def _upstream(r: sqlite3.Row) -> Upstream:
        allowed = r["allowed_domains"]
        return Upstream(
            idsmtp=r["idsmtp"], idapp=r["idapp"], priority=r["priority"], host=r["host"],
            port=r["port"], username=r["username"], password=r["password"], auth=_b(r["auth"]),
            startstls=_b(r["startstls"]), ssltls=_b(r["ssltls"]), verify_tls=_b(r["verify_tls"]),
            debug=_b(r["debug"]), defaultfromemail=r["defaultfromemail"],
            defaultfromname=r["defaultfromname"],
            allowed_domains=tuple(json.loads(allowed)) if allowed is not None else None,
            numerrors=r["numerrors"], last_error=r["last_error"], status=r["status"],
            created=r["created"], modified=r["modified"])

    @staticmethod
    def _upstream_values(fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(fields)
        if "allowed_domains" in out and out["allowed_domains"] is not None:
            out["allowed_domains"] = json.dumps(list(out["allowed_domains"]))
        for k in ("auth", "startstls", "ssltls", "verify_tls", "debug"):
            if k in out:
                out[k] = int(bool(out[k]))
        return out

    async def create_upstream(self, fields: dict[str, Any]) -> Upstream:
        """``fields``: UPSTREAM_FIELDS (idapp, host and port required)."""
        unknown = set(fields) - set(self.UPSTREAM_FIELDS)
        if unknown:
            raise ValueError(f"unknown upstream fields: {sorted(unknown)}")
        idsmtp, ts = new_id(), now_iso()
        values = self._upstream_values(fields)
        cols = ["idsmtp", "created", "modified", *values]
        async with self._lock:
            await self._write_routing([(
                f"INSERT INTO upstreams ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (idsmtp, ts, ts, *values.values()))])
        return await self.get_upstream(idsmtp)

    async def update_upstream(self, idsmtp: str, fields: dict[str, Any]) -> Upstream:
        unknown = set(fields) - set(self.UPSTREAM_FIELDS)
        if unknown:
            raise ValueError(f"unknown upstream fields: {sorted(unknown)}")
        values = self._upstream_values(fields)
        values["modified"] = now_iso()
        async with self._lock:
            n = await self._write_routing([(
                f"UPDATE upstreams SET {', '.join(f'{k} = ?' for k in values)} WHERE idsmtp = ?",
                (*values.values(), idsmtp))])
        if not n:
            raise NotFound("smtp", idsmtp)
        return await self.get_upstream(idsmtp)

    async def get_upstream(self, idsmtp: str, owner_id: str | None = None) -> Upstream:
        """The upstream; NotFound also when its app belongs to another owner."""
        async with self._lock:
            row = await self._fetchone(
                "SELECT u.*, a.owner_id AS owner_id FROM upstreams u JOIN apps a USING (idapp) "
                "WHERE u.idsmtp = ?", (idsmtp,))
        if row is None or (owner_id is not None and row["owner_id"] != owner_id):
            raise NotFound("smtp", idsmtp)
        return self._upstream(row)

    async def list_upstreams(self, idapp: str, *, active_only: bool = False) -> list[Upstream]:
        sql = "SELECT * FROM upstreams WHERE idapp = ?"
        if active_only:
            sql += " AND status = 'A'"
        async with self._lock:
            rows = await self._fetchall(sql + " ORDER BY priority, created, idsmtp", (idapp,))
        return [self._upstream(r) for r in rows]

    async def remove_upstream(self, idsmtp: str) -> None:
        async with self._lock:
            n = await self._write_routing([("DELETE FROM upstreams WHERE idsmtp = ?", (idsmtp,))])
        if not n:
            raise NotFound("smtp", idsmtp)

    async def record_upstream_result(self, idsmtp: str, ok: bool, ts: float) -> None:
        """SPEC 3.7: an error increments numerrors, a success resets it."""
        async with self._lock:
            if ok:
                await self._write([("UPDATE upstreams SET numerrors = 0 "
                                    "WHERE idsmtp = ? AND numerrors != 0", (idsmtp,))])
            else:
                await self._write([("UPDATE upstreams SET numerrors = numerrors + 1, "
                                    "last_error = ? WHERE idsmtp = ?", (ts, idsmtp))])
            u = self._upstreams.get(idsmtp)
            if u is not None:
                self._upstreams[idsmtp] = replace(
                    u, numerrors=0 if ok else u.numerrors + 1,
                    last_error=u.last_error if ok else ts)

    async def upstream_health(self) -> list[dict[str, Any]]:
        async with self._lock:
            rows = await self._fetchall(
                "SELECT idsmtp, host, port, numerrors, last_error, status FROM upstreams "
                "ORDER BY idsmtp")
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ domain settings

    @staticmethod
    def _domain(r: sqlite3.Row) -> DomainSettings:
        return DomainSettings(r["id"], r["owner_id"], r["domain"], r["provider"],
                              r["description"], r["from_addr"], json.loads(r["options"]))

    async def get_domain(self, owner_id: str, domain: str) -> DomainSettings | None:
        async with self._lock:
            row = await self._fetchone("SELECT * FROM domains WHERE owner_id = ? AND domain = ?",
                                       (owner_id, domain.lower()))
        return self._domain(row) if row else None

    async def list_domains(self, owner_id: str) -> list[DomainSettings]:
        async with self._lock:
            rows = await self._fetchall("SELECT * FROM domains WHERE owner_id = ? ORDER BY domain",
                                        (owner_id,))
        return [self._domain(r) for r in rows]

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
        return [(u.idsmtp, u.numerrors) for u in self._upstreams.values()]

    def route_view(self, user: SmtpUser, sender_domain: str | None
                   ) -> tuple[Owner, App, DomainSettings | None, list[Upstream]]:
        """Everything routing needs for one message, from the exact
        in-memory view: no database round trip on the hot path."""
        owner = self._owners.get(user.owner_id)
        app = self._apps.get(user.idapp)
        if owner is None or app is None:
            raise NotFound("owner or app of user", user.name)
        dom = self._domains.get((user.owner_id, sender_domain)) if sender_domain else None
        ups = [self._upstreams[i] for i in self._app_upstreams.get(user.idapp, ())]
        return owner, app, dom, [u for u in ups if u.status == "A"]


def _settle(batch: list[tuple[str, float, int, asyncio.Future[None]]],
            error: BaseException | None) -> None:
    for *_, future in batch:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
