"""The schema: numbered migrations keyed by SQLite's ``PRAGMA user_version``.
Opening an older database upgrades it in place, one migration per step in a
transaction of its own; a newer one is refused.
"""

from __future__ import annotations

import aiosqlite

from ..errors import StoreError

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
    # 2: the last error's reason of an own upstream (SPEC 4.6), kept across restarts
    """
    ALTER TABLE upstreams ADD COLUMN last_error_reason TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection, path: object) -> None:
    (version,) = await (await db.execute("PRAGMA user_version")).fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this relayd "
            f"({SCHEMA_VERSION}); refusing to touch it"
        )
    for n in range(version, SCHEMA_VERSION):
        await db.executescript(
            "BEGIN IMMEDIATE;\n" + MIGRATIONS[n] + f"\nPRAGMA user_version = {n + 1};\nCOMMIT;"
        )
