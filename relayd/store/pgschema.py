"""The PostgreSQL schema: numbered migrations kept in ``relayd_schema``,
applied at start under an advisory lock, so that instances starting
together migrate once. Opening an older database upgrades it in place, one
migration per transaction; a newer one is refused.

The records' tables are SQLite's (schema.py) with PostgreSQL's types. What
a cluster adds (SPEC 8):

* ``holds`` -- the quota units reserved by mail transactions in progress,
  one row per transaction (``hold``), tagged with the instance holding it;
* ``sends`` -- the quota journal, as in SQLite, plus the ``hold`` that
  makes counting and uncounting idempotent (a retry after a lost reply
  changes nothing);
* ``relayd_reserve`` -- the check-and-reserve of one RCPT as one statement:
  it locks the user's row, so reservations of one user serialise across the
  whole cluster and no interleaving can exceed a limit; the rolling hour is
  a running sum per user (``hour_sum``), so its cost does not grow with
  the user's traffic; ``relayd_count`` the end of DATA as one statement;
  ``relayd_reserve_many`` and ``relayd_count_many`` a batch of either;
* ``route_health`` -- numerrors of upstreams that have no row of their own
  (domain routes, system SMTPs), shared like the rest;
* ``instances`` -- the heartbeats of the live members.
"""

from __future__ import annotations

from typing import Any

from ..errors import StoreError

LOCK_ID = 0x72656C6179          # "relay": pg_advisory_xact_lock key for migrations

MIGRATIONS: list[str] = [
    # 1: the records of SQLite's schema version 2, and the cluster's tables
    """
    CREATE TABLE owners (
        owner_id   TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        plan       TEXT NOT NULL CHECK (plan IN ('free', 'paid')),
        created    TEXT NOT NULL
    );
    CREATE TABLE apps (
        seq        BIGSERIAL UNIQUE,
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
        total_limit   BIGINT NOT NULL CHECK (total_limit > 0),
        hourly_limit  BIGINT NOT NULL CHECK (hourly_limit > 0),
        status        TEXT NOT NULL CHECK (status IN ('Enable', 'Disable')),
        sent_total    BIGINT NOT NULL DEFAULT 0,
        created       TEXT NOT NULL,
        -- The rolling hour as a running sum: hour_sum counts the journal's
        -- rows with ts > hour_cursor; relayd_reserve subtracts what has aged
        -- out since and moves the cursor, so a reservation reads only the
        -- rows that expired since the last one, not the whole hour.
        hour_sum      BIGINT NOT NULL DEFAULT 0,
        hour_cursor   DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX smtp_users_owner ON smtp_users(owner_id);
    CREATE TABLE sends (
        id        BIGSERIAL PRIMARY KEY,
        user_name TEXT NOT NULL REFERENCES smtp_users(name) ON DELETE CASCADE,
        ts        DOUBLE PRECISION NOT NULL,
        rcpts     BIGINT NOT NULL,
        hold      TEXT
    );
    CREATE INDEX sends_ts ON sends(ts);
    CREATE INDEX sends_user_ts ON sends(user_name, ts);
    CREATE UNIQUE INDEX sends_counted ON sends(hold) WHERE rcpts > 0;
    CREATE UNIQUE INDEX sends_uncounted ON sends(hold) WHERE rcpts < 0;
    CREATE FUNCTION relayd_sends_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE smtp_users SET sent_total = sent_total + NEW.rcpts,
            hour_sum = hour_sum + CASE WHEN NEW.ts > hour_cursor THEN NEW.rcpts ELSE 0 END
            WHERE name = NEW.user_name;
        RETURN NULL;
    END $$;
    CREATE TRIGGER sends_count AFTER INSERT ON sends
        FOR EACH ROW EXECUTE FUNCTION relayd_sends_count();
    CREATE TABLE holds (
        hold      TEXT PRIMARY KEY,
        instance  TEXT NOT NULL,
        user_name TEXT NOT NULL REFERENCES smtp_users(name) ON DELETE CASCADE,
        n         BIGINT NOT NULL
    );
    CREATE INDEX holds_user ON holds(user_name);
    CREATE INDEX holds_instance ON holds(instance);
    CREATE TABLE upstreams (
        idsmtp            TEXT PRIMARY KEY,
        idapp             TEXT NOT NULL REFERENCES apps ON DELETE CASCADE,
        priority          BIGINT NOT NULL DEFAULT 10,
        host              TEXT NOT NULL,
        port              INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        username          TEXT,
        password          TEXT,
        auth              INTEGER NOT NULL DEFAULT 0,
        startstls         INTEGER NOT NULL DEFAULT 0,
        ssltls            INTEGER NOT NULL DEFAULT 0,
        verify_tls        INTEGER NOT NULL DEFAULT 1,
        debug             INTEGER NOT NULL DEFAULT 0,
        defaultfromemail  TEXT,
        defaultfromname   TEXT,
        allowed_domains   TEXT,
        numerrors         BIGINT NOT NULL DEFAULT 0,
        last_error        DOUBLE PRECISION,
        status            TEXT NOT NULL DEFAULT 'A' CHECK (status IN ('A', 'D')),
        created           TEXT NOT NULL,
        modified          TEXT NOT NULL,
        last_error_reason TEXT
    );
    CREATE INDEX upstreams_app ON upstreams(idapp);
    CREATE TABLE domains (
        id          TEXT NOT NULL UNIQUE,
        owner_id    TEXT NOT NULL REFERENCES owners ON DELETE CASCADE,
        domain      TEXT NOT NULL,
        provider    TEXT NOT NULL DEFAULT 'smtp',
        description TEXT NOT NULL DEFAULT '',
        from_addr   TEXT,
        options     TEXT NOT NULL,
        PRIMARY KEY (owner_id, domain)
    );
    CREATE TABLE route_health (
        idsmtp            TEXT PRIMARY KEY,
        numerrors         BIGINT NOT NULL,
        last_error        DOUBLE PRECISION,
        last_error_reason TEXT
    );
    CREATE TABLE instances (
        id        TEXT PRIMARY KEY,
        hostname  TEXT NOT NULL,
        pid       INTEGER NOT NULL,
        started   DOUBLE PRECISION NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    -- What has aged out of user p_user's hour by p_now: subtracted from
    -- hour_sum, the cursor moved past it (the row is locked by the caller).
    CREATE FUNCTION relayd_age(p_user TEXT, p_cursor DOUBLE PRECISION,
                               p_now DOUBLE PRECISION) RETURNS BIGINT
    LANGUAGE plpgsql AS $$
    DECLARE
        aged BIGINT;
        rows BIGINT;
    BEGIN
        IF p_now - 3600 <= p_cursor THEN RETURN 0; END IF;
        SELECT COALESCE(SUM(rcpts), 0), COUNT(*) INTO aged, rows FROM sends
            WHERE user_name = p_user AND ts > p_cursor AND ts <= p_now - 3600;
        IF rows > 0 THEN
            UPDATE smtp_users SET hour_sum = hour_sum - aged, hour_cursor = p_now - 3600
                WHERE name = p_user;
        END IF;
        RETURN aged;
    END $$;
    -- One RCPT: check and hold one unit, atomically for the whole cluster.
    -- NO KEY UPDATE, not UPDATE: a concurrent count's journal insert takes
    -- KEY SHARE on the row (its foreign key) and then updates it (the
    -- trigger); UPDATE would wait behind the first and deadlock with the
    -- second.
    CREATE FUNCTION relayd_reserve(p_user TEXT, p_hold TEXT, p_instance TEXT,
                                   p_now DOUBLE PRECISION) RETURNS TEXT
    LANGUAGE plpgsql AS $$
    DECLARE
        u smtp_users%ROWTYPE;
        held BIGINT;
    BEGIN
        SELECT * INTO u FROM smtp_users WHERE name = p_user FOR NO KEY UPDATE;
        IF NOT FOUND THEN RETURN 'gone'; END IF;
        IF u.status <> 'Enable' THEN RETURN 'disabled'; END IF;
        SELECT COALESCE(SUM(n), 0) INTO held FROM holds WHERE user_name = p_user;
        IF u.sent_total + held + 1 > u.total_limit THEN RETURN 'total'; END IF;
        IF u.hour_sum - relayd_age(p_user, u.hour_cursor, p_now) + held + 1 > u.hourly_limit
        THEN RETURN 'hourly'; END IF;
        INSERT INTO holds (hold, instance, user_name, n) VALUES (p_hold, p_instance, p_user, 1)
            ON CONFLICT (hold) DO UPDATE SET n = holds.n + 1;
        RETURN 'ok';
    END $$;
    -- The end of DATA: the hold's units become sent ones, in one statement;
    -- a second call for the same hold changes nothing.
    CREATE FUNCTION relayd_count(p_hold TEXT, p_user TEXT, p_ts DOUBLE PRECISION,
                                 p_n BIGINT) RETURNS VOID
    LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM holds WHERE hold = p_hold;
        INSERT INTO sends (user_name, ts, rcpts, hold) VALUES (p_user, p_ts, p_n, p_hold)
            ON CONFLICT (hold) WHERE rcpts > 0 DO NOTHING;
    END $$;
    -- The journal's old rows, once every user's hour has moved past them.
    CREATE FUNCTION relayd_prune(p_now DOUBLE PRECISION) RETURNS BIGINT
    LANGUAGE plpgsql AS $$
    DECLARE
        each RECORD;
        gone BIGINT;
    BEGIN
        FOR each IN SELECT name, hour_cursor FROM smtp_users
                    WHERE hour_cursor < p_now - 3600 FOR NO KEY UPDATE LOOP
            PERFORM relayd_age(each.name, each.hour_cursor, p_now);
        END LOOP;
        DELETE FROM sends s USING smtp_users u
            WHERE s.user_name = u.name AND s.ts <= u.hour_cursor AND s.ts <= p_now - 3600;
        GET DIAGNOSTICS gone = ROW_COUNT;
        RETURN gone;
    END $$;
    """,
    # 2: the hot path batched (batching.py): many RCPTs, or many ends of
    # DATA, in one statement. Rows are locked in the users' order, by every
    # batch of every instance (and by the prune), so that batches holding
    # several users' locks till their commit never wait on each other in a
    # cycle. A reservation's checks are relayd_reserve's, each call in turn;
    # a user's row is locked, its holds summed and its hour aged once per
    # batch (at its first call's time: a window older by the batch's few
    # milliseconds, never a laxer one).
    """
    CREATE FUNCTION relayd_reserve_many(p_users TEXT[], p_holds TEXT[], p_instance TEXT,
                                        p_nows DOUBLE PRECISION[]) RETURNS TEXT[]
    LANGUAGE plpgsql AS $$
    DECLARE
        verdicts TEXT[] := array_fill(NULL::TEXT, ARRAY[cardinality(p_users)]);
        i INTEGER;
        u smtp_users%ROWTYPE;
        held BIGINT;
        recent BIGINT;
    BEGIN
        FOR i IN SELECT s FROM generate_subscripts(p_users, 1) s ORDER BY p_users[s], s LOOP
            IF u.name IS DISTINCT FROM p_users[i] THEN       -- the user's first call
                SELECT * INTO u FROM smtp_users WHERE name = p_users[i] FOR NO KEY UPDATE;
                IF FOUND THEN
                    SELECT COALESCE(SUM(n), 0) INTO held FROM holds WHERE user_name = u.name;
                    recent := u.hour_sum - relayd_age(u.name, u.hour_cursor, p_nows[i]);
                END IF;
            END IF;
            IF u.name IS NULL THEN verdicts[i] := 'gone';
            ELSIF u.status <> 'Enable' THEN verdicts[i] := 'disabled';
            ELSIF u.sent_total + held + 1 > u.total_limit THEN verdicts[i] := 'total';
            ELSIF recent + held + 1 > u.hourly_limit THEN verdicts[i] := 'hourly';
            ELSE
                INSERT INTO holds (hold, instance, user_name, n)
                    VALUES (p_holds[i], p_instance, u.name, 1)
                    ON CONFLICT (hold) DO UPDATE SET n = holds.n + 1;
                held := held + 1;
                verdicts[i] := 'ok';
            END IF;
        END LOOP;
        RETURN verdicts;
    END $$;
    -- relayd_count of each call, as two statements for the batch (PL/pgSQL
    -- keeps their plans; an SQL function would plan them on every call);
    -- the journal's trigger updates the users' rows in the inserts' order.
    CREATE FUNCTION relayd_count_many(p_holds TEXT[], p_users TEXT[],
                                      p_ts DOUBLE PRECISION[], p_n BIGINT[]) RETURNS VOID
    LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM holds WHERE hold = ANY(p_holds);
        INSERT INTO sends (user_name, ts, rcpts, hold)
            SELECT c.u, c.t, c.n, c.h
            FROM unnest(p_users, p_ts, p_n, p_holds) WITH ORDINALITY AS c(u, t, n, h, i)
            ORDER BY c.u, c.i
            ON CONFLICT (hold) WHERE rcpts > 0 DO NOTHING;
    END $$;
    CREATE OR REPLACE FUNCTION relayd_prune(p_now DOUBLE PRECISION) RETURNS BIGINT
    LANGUAGE plpgsql AS $$
    DECLARE
        each RECORD;
        gone BIGINT;
    BEGIN
        FOR each IN SELECT name, hour_cursor FROM smtp_users
                    WHERE hour_cursor < p_now - 3600 ORDER BY name FOR NO KEY UPDATE LOOP
            PERFORM relayd_age(each.name, each.hour_cursor, p_now);
        END LOOP;
        DELETE FROM sends s USING smtp_users u
            WHERE s.user_name = u.name AND s.ts <= u.hour_cursor AND s.ts <= p_now - 3600;
        GET DIAGNOSTICS gone = ROW_COUNT;
        RETURN gone;
    END $$;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(con: Any, where: str) -> None:
    """Bring the database ``con`` is connected to up to SCHEMA_VERSION."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        await con.execute("CREATE TABLE IF NOT EXISTS relayd_schema (version INTEGER NOT NULL)")
        version = await con.fetchval("SELECT max(version) FROM relayd_schema") or 0
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where} has schema version {version}, newer than this relayd "
                         f"({SCHEMA_VERSION}); refusing to touch it")
    for n in range(version, SCHEMA_VERSION):
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
            if (await con.fetchval("SELECT max(version) FROM relayd_schema") or 0) > n:
                continue                    # another instance got here first
            await con.execute(MIGRATIONS[n])
            await con.execute("INSERT INTO relayd_schema (version) VALUES ($1)", n + 1)
