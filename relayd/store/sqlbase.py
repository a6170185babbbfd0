"""What both backends share: the records' SQL, written once, and the view
kept in step with it.

``SqlStore`` holds every record operation in SQL that SQLite and
PostgreSQL both take (``?`` placeholders; the PostgreSQL backend numbers
them). A backend supplies the connection: ``_fetchall``, ``_fetchone`` and
``_transaction`` (run statements in one transaction, return the last row
count, and tell other processes what ``changed`` -- postgres.py notifies
them; SQLite has none to tell). Every write refreshes the view (view.py)
before it returns: the users one row at a time, the routing tables
wholesale (admin writes are rare).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import NotFound
from ..records import App, DomainSettings, Owner, SmtpUser, Upstream
from .credentials import digest, new_id, new_secret, new_user_name, now_iso
from .view import UPSTREAM_FIELDS, View, upstream_columns

Row = Mapping[str, Any]
Statement = tuple[str, tuple[Any, ...]]

ROUTING = "routing"         # what a write changed: the routing tables,
USER = "user:"              # the SMTP user named after the colon,
HEALTH = "health"           # or upstream health


class SqlStore:
    """The record operations over a backend's connection (module docstring)."""

    APP_ORDER = "created, idapp"        # creation order; SQLite has rowid
    SENDS_USER = "user_name"            # the quota journal's user column (SQLite: "user")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.view = View()

    # ------------------------------------------------------------ the backend's part

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def _fetchone(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        rows = await self._fetchall(sql, args)
        return rows[0] if rows else None

    async def _transaction(self, statements: list[Statement], changed: str | None = None) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------ writes and the view

    async def _write_routing(self, statements: list[Statement]) -> int:
        """Write to the tables of the routing view, then reload it."""
        n = await self._transaction(statements, ROUTING)
        await self._load_routing()
        return n

    async def _write_user(self, name: str, statements: list[Statement]) -> int:
        """Write to one SMTP user's row, then reload it into the view."""
        n = await self._transaction(statements, USER + name)
        await self._reload_user(name)
        return n

    async def _load_routing(self) -> None:
        self.view.load_routing(
            await self._fetchall("SELECT * FROM owners"),
            await self._fetchall(f"SELECT * FROM apps ORDER BY {self.APP_ORDER}"),
            await self._fetchall("SELECT * FROM upstreams ORDER BY priority, created, idsmtp"),
            await self._fetchall("SELECT * FROM domains"))

    async def _load_users(self) -> None:
        self.view.load_users(await self._fetchall("SELECT * FROM smtp_users"))

    async def _reload_user(self, name: str) -> None:
        self.view.put_user(name, await self._fetchone(
            "SELECT * FROM smtp_users WHERE name = ?", (name,)))

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
        await self._remove_cascading("owners", "owner_id", owner_id, "owner")

    async def _remove_cascading(self, table: str, key: str, value: str, kind: str) -> None:
        """Delete a row whose delete cascades to SMTP users (an owner, an app)."""
        async with self._lock:
            n = await self._write_routing([(f"DELETE FROM {table} WHERE {key} = ?", (value,))])
            if not n:
                raise NotFound(kind, value)
            await self._load_users()

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
        await self._remove_cascading("apps", "idapp", idapp, "app")

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

    async def create_user(self, owner_id: str, idapp: str, total_limit: int,
                          hourly_limit: int) -> tuple[SmtpUser, str]:
        """Create an SMTP user with a generated name and password; return both.
        The password is returned only here (and by reset_password)."""
        password = new_secret()
        async with self._lock:
            self.view.app(idapp, owner_id)                  # NotFound
            name = new_user_name(self.view.users)
            await self._write_user(name, [(
                "INSERT INTO smtp_users (name, password_hash, owner_id, idapp, total_limit, "
                "hourly_limit, status, created) VALUES (?,?,?,?,?,?,'Enable',?)",
                (name, digest(password), owner_id, idapp, total_limit, hourly_limit, now_iso()))])
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
                await self._write_user(name, [_update("smtp_users", sets, "name", name)])
        return self.view.users[name][0]

    async def reset_password(self, name: str, owner_id: str) -> str:
        user = self.get_user(name)
        if user is None or user.owner_id != owner_id:
            raise NotFound("smtp user", name)
        password = new_secret()
        async with self._lock:
            await self._write_user(name, [("UPDATE smtp_users SET password_hash = ? WHERE name = ?",
                                           (digest(password), name))])
        return password

    async def remove_user(self, name: str, owner_id: str) -> None:
        user = self.get_user(name)
        if user is None or user.owner_id != owner_id:
            raise NotFound("smtp user", name)
        async with self._lock:
            await self._write_user(name, [("DELETE FROM smtp_users WHERE name = ?", (name,))])

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
            statements = self._health_write(idsmtp, ok, ts, reason)
            if statements:
                await self._transaction(statements, HEALTH)
            self.view.note_upstream_result(idsmtp, ok, ts, reason)

    def _health_write(self, idsmtp: str, ok: bool, ts: float,
                      reason: str | None) -> list[Statement]:
        """What record_upstream_result writes: the copy in an own upstream's row."""
        if idsmtp not in self.view.upstreams:
            return []
        if ok:
            return [("UPDATE upstreams SET numerrors = 0 WHERE idsmtp = ?", (idsmtp,))]
        return [("UPDATE upstreams SET numerrors = numerrors + 1, last_error = ?, "
                 "last_error_reason = ? WHERE idsmtp = ?", (ts, reason or None, idsmtp))]

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



def _update(table: str, sets: dict[str, Any], key: str, value: Any) -> Statement:
    """UPDATE ``table`` SET the columns of ``sets`` WHERE ``key`` = ``value``
    (column names come from this module, never from a request)."""
    return (f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in sets)} WHERE {key} = ?",
            (*sets.values(), value))
