"""``relayd --copy-to DSN`` (SPEC 8): every record of one store into another,
empty one -- the way from the embedded SQLite file to a shared PostgreSQL
database (or back, or to another file).

What is copied, column for column: owners (with their token hashes), apps
(in creation order, so each owner's default app stays its first), SMTP
users (password hashes, limits, status, ``sent_total``), the quota journal
of the last hour (the rolling window), upstreams (with ``numerrors`` and
the last error), domain settings. The target's schema is created by opening
it, as relayd would; a target that holds any record is refused before
anything is written, and the copy is one transaction: all or nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import StoreError
from .sqlbase import SqlStore, Statement

HOUR = 3600.0

# Record tables and the columns both backends have, in foreign-key order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "owners": ("owner_id", "token_hash", "plan", "created"),
    "apps": ("idapp", "owner_id", "name", "strategy", "test_email", "created"),
    "smtp_users": ("name", "password_hash", "owner_id", "idapp", "total_limit",
                   "hourly_limit", "status", "sent_total", "created"),
    "upstreams": ("idsmtp", "idapp", "priority", "host", "port", "username", "password",
                  "auth", "startstls", "ssltls", "verify_tls", "debug", "defaultfromemail",
                  "defaultfromname", "allowed_domains", "numerrors", "last_error", "status",
                  "created", "modified", "last_error_reason"),
    "domains": ("id", "owner_id", "domain", "provider", "description", "from_addr", "options"),
}


async def copy_store(source: SqlStore, target: SqlStore, now: float | None = None
                     ) -> dict[str, int]:
    """Copy ``source`` into the empty ``target`` (both open); return the
    number of rows copied per record type ("sends": the window's entries)."""
    now = time.time() if now is None else now
    if await _holds_records(target):
        raise StoreError(f"{target.path} already holds records; --copy-to needs an empty "
                         "database (nothing was written)")
    rows = {t: await source._fetchall(_select(source, t, cols)) for t, cols in COLUMNS.items()}
    window = await source._fetchall(
        f"SELECT {source.SENDS_USER} AS name, ts, CAST(SUM(rcpts) AS BIGINT) AS n FROM sends "
        "WHERE ts > ? "
        f"GROUP BY {source.SENDS_USER}, ts HAVING SUM(rcpts) != 0 ORDER BY ts", (now - HOUR,))
    in_window: dict[str, int] = {}
    for w in window:
        in_window[w["name"]] = in_window.get(w["name"], 0) + w["n"]
    statements: list[Statement] = []
    for table, cols in COLUMNS.items():
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        for r in rows[table]:
            values = [r[c] for c in cols]
            if table == "smtp_users":       # the journal rows below add the window back
                values[cols.index("sent_total")] -= in_window.get(r["name"], 0)
            statements.append((sql, tuple(values)))
    journal = f"INSERT INTO sends ({target.SENDS_USER}, ts, rcpts) VALUES (?, ?, ?)"
    statements += [(journal, (w["name"], w["ts"], w["n"])) for w in window]
    if statements:
        await target._transaction(statements)
    counts = {t: len(r) for t, r in rows.items()}
    counts["sends"] = len(window)
    return counts


def _select(store: SqlStore, table: str, cols: tuple[str, ...]) -> str:
    order = {"apps": store.APP_ORDER, "owners": "created, owner_id"}.get(table, cols[0])
    return f"SELECT {', '.join(cols)} FROM {table} ORDER BY {order}"


async def _holds_records(store: SqlStore) -> bool:
    for table in COLUMNS:
        if await store._fetchall(f"SELECT 1 FROM {table} LIMIT 1"):
            return True
    return False


def report(counts: dict[str, Any]) -> str:
    names = {"owners": "owners", "apps": "apps", "smtp_users": "SMTP users",
             "upstreams": "upstreams", "domains": "domain settings",
             "sends": "hourly-window journal entries"}
    return "\n".join(f"  {names[k]:<30} {v}" for k, v in counts.items())
