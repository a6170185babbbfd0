"""The store on both backends -- a real SQLite file and a real database of a
throw-away PostgreSQL cluster (the ``store`` and ``database`` fixtures run
each test once per backend): records, secrets, migrations, quotas. What
only one backend has is tested on it alone (``sqlite_store``, and
test_store_postgres.py)."""

from __future__ import annotations

import asyncio
import math
import os
import re
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from helpers_smtp import wait_for
from relayd.errors import NotFound, StoreError
from relayd.policy import Verdict
from relayd.records import SmtpUser
from relayd.store import SCHEMA_VERSION, RecordStore, Store, store_for


async def test_database_files_are_private_whatever_the_umask(tmp_path: Path):
    old = os.umask(0)
    try:
        s = Store(tmp_path / "state" / "relayd.db")
        await s.open()
        owner, _, app = await s.create_owner("free")
        await s.create_user(owner.owner_id, app.idapp, 10, 10)
        for f in (tmp_path / "state").iterdir():
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode & 0o077 == 0, f"{f.name} has mode {oct(mode)}"
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) & 0o077 == 0
        await s.close()
    finally:
        os.umask(old)


async def test_wal_mode_and_schema_version(sqlite_store: Store):
    store = sqlite_store
    row = await (await store.db.execute("PRAGMA journal_mode")).fetchone()
    assert row[0] == "wal"
    row = await (await store.db.execute("PRAGMA user_version")).fetchone()
    assert row[0] == SCHEMA_VERSION
    assert await store.integrity_check() == "ok"


async def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "relayd.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    threads = threading.active_count()
    s = Store(path)
    with pytest.raises(StoreError, match="newer than this relayd"):
        await s.open()
    # Nothing left to close: the connection's thread is gone with the refusal
    # (with aiosqlite 0.20 it would otherwise keep the process from exiting).
    await wait_for(lambda: threading.active_count() == threads, timeout=5)


async def test_reopen_keeps_records_and_does_not_remigrate(database: str):
    s = store_for(database)
    await s.open()
    owner, token, app = await s.create_owner("paid")
    user, password = await s.create_user(owner.owner_id, app.idapp, 5, 3)
    await s.close()
    s2 = store_for(database)
    await s2.open()
    assert s2.check_password(user.name, password) == user
    assert (await s2.authenticate_owner(owner.owner_id, token)).plan == "paid"
    await s2.close()


async def test_only_hashes_of_secrets_are_stored(tmp_path: Path, sqlite_store: Store):
    store = sqlite_store
    owner, token, app = await store.create_owner("free")
    user, password = await store.create_user(owner.owner_id, app.idapp, 10, 10)
    await store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
    assert password.encode() not in raw
    assert token.encode() not in raw
    await store.open()


async def test_generated_credentials(store: RecordStore):
    owner, token, app = await store.create_owner("free")
    names = set()
    for _ in range(20):
        user, password = await store.create_user(owner.owner_id, app.idapp, 10, 10)
        assert re.fullmatch(r"smtp\d+", user.name)
        names.add(user.name)
        # token_urlsafe: 6 bits per character; SPEC 3.13 wants >= 128 bits.
        assert len(password) * 6 >= 128
        assert re.fullmatch(r"[A-Za-z0-9_-]+", password)
    assert len(names) == 20
    assert len(token) * math.log2(64) >= 128
    assert re.fullmatch(r"[0-9a-f]{24}", owner.owner_id)
    assert re.fullmatch(r"[0-9a-f]{24}", app.idapp)


async def test_password_checks(store: RecordStore):
    owner, token, app = await store.create_owner("free")
    user, password = await store.create_user(owner.owner_id, app.idapp, 10, 10)
    assert store.check_password(user.name, password) == user
    assert store.check_password(user.name, password + "x") is None
    assert store.check_password("smtp0", password) is None
    assert store.check_password(user.name, "") is None
    new = await store.reset_password(user.name, owner.owner_id)
    assert store.check_password(user.name, password) is None, "old password must stop at once"
    assert store.check_password(user.name, new) == user
    assert await store.authenticate_owner(owner.owner_id, token + "x") is None
    assert await store.authenticate_owner("0" * 24, token) is None


async def test_other_owner_sees_nothing(store: RecordStore):
    a, _, app_a = await store.create_owner("free")
    b, _, _ = await store.create_owner("free")
    user, _ = await store.create_user(a.owner_id, app_a.idapp, 10, 10)
    with pytest.raises(NotFound):
        await store.update_user(user.name, b.owner_id, status="Disable")
    with pytest.raises(NotFound):
        await store.reset_password(user.name, b.owner_id)
    with pytest.raises(NotFound):
        await store.get_app(app_a.idapp, owner_id=b.owner_id)
    with pytest.raises(NotFound):
        await store.create_user(b.owner_id, app_a.idapp, 10, 10)
    up = await store.create_upstream({"idapp": app_a.idapp, "host": "h", "port": 25})
    with pytest.raises(NotFound):
        await store.get_upstream(up.idsmtp, owner_id=b.owner_id)
    assert await store.list_users(b.owner_id) == []


async def test_journal_keeps_sent_total_and_window(sqlite_store: Store):
    store = sqlite_store
    owner, _, app = await store.create_owner("free")
    user, _ = await store.create_user(owner.owner_id, app.idapp, 100, 100)
    await store.journal_send(user.name, 1000.0, 3)
    await store.journal_send(user.name, 2000.0, 2)
    await store.journal_send(user.name, 2000.0, -2)      # the 2000.0 message failed
    usage = await store.load_usage(now=2500.0)
    assert usage[user.name] == (3, [(1000.0, 3)])
    # The window is the last hour: at t=4700 the t=1000 entry has aged out,
    # but sent_total keeps it.
    assert await store.prune_sends(now=4700.0) == 1     # only the t=1000 row
    assert await store.load_usage(now=4700.0) == {user.name: (3, [])}


async def test_upstream_error_counting(store: RecordStore):
    owner, _, app = await store.create_owner("free")
    up = await store.create_upstream({"idapp": app.idapp, "host": "h", "port": 25})
    await store.record_upstream_result(up.idsmtp, False, 10.0)
    await store.record_upstream_result(up.idsmtp, False, 11.0)
    got = await store.get_upstream(up.idsmtp)
    assert (got.numerrors, got.last_error) == (2, 11.0)
    await store.record_upstream_result(up.idsmtp, True, 12.0)
    assert (await store.get_upstream(up.idsmtp)).numerrors == 0


async def test_upstream_error_reason_is_persisted_and_reloaded(database: str):
    """SPEC 4.6: an own upstream's last error's reason survives a restart."""
    s = store_for(database)
    await s.open()
    owner, _, app = await s.create_owner("free")
    up = await s.create_upstream({"idapp": app.idapp, "host": "h", "port": 25})
    await s.record_upstream_result(up.idsmtp, False, 10.0, "connection refused")
    assert s.view.health.reason(up.idsmtp) == "connection refused"
    await s.close()
    s2 = store_for(database)
    await s2.open()
    assert s2.view.health.get(up.idsmtp) == (1, 10.0)
    assert s2.view.health.reason(up.idsmtp) == "connection refused"
    await s2.close()


async def test_migration_1_to_2_upgrades_an_old_database_in_place(tmp_path: Path):
    from relayd.store.schema import MIGRATIONS
    path = tmp_path / "relayd.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0])
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO owners VALUES ('o1', 'x', 'paid', '2026-01-01T00:00:00.000')")
    con.execute("INSERT INTO apps VALUES ('a1', 'o1', 'App', 'random', NULL, "
                "'2026-01-01T00:00:00.000')")
    con.execute("INSERT INTO upstreams (idsmtp, idapp, host, port, numerrors, last_error, "
                "created, modified) VALUES ('u1', 'a1', 'h', 25, 3, 42.0, "
                "'2026-01-01T00:00:00.000', '2026-01-01T00:00:00.000')")
    con.commit()
    con.close()
    s = Store(path)
    await s.open()
    row = await (await s.db.execute("PRAGMA user_version")).fetchone()
    assert row[0] == SCHEMA_VERSION >= 2
    got = await s.get_upstream("u1")                     # the old row is still there
    assert (got.numerrors, got.last_error, got.host) == (3, 42.0, "h")
    assert s.view.health.reason("u1") is None           # the new column, NULL
    await s.record_upstream_result("u1", False, 50.0, "timed out after 10 s")
    row = await (await s.db.execute(
        "SELECT last_error_reason FROM upstreams WHERE idsmtp = 'u1'")).fetchone()
    assert row[0] == "timed out after 10 s"
    await s.close()


async def test_removing_owner_cascades(store: RecordStore):
    owner, _, app = await store.create_owner("free")
    user, password = await store.create_user(owner.owner_id, app.idapp, 10, 10)
    await store.create_upstream({"idapp": app.idapp, "host": "h", "port": 25})
    await store.remove_owner(owner.owner_id)
    assert store.get_user(user.name) is None
    assert await store.list_upstreams(app.idapp) == []
    with pytest.raises(NotFound):
        await store.remove_owner(owner.owner_id)


async def test_online_backup(tmp_path: Path, sqlite_store: Store):
    store = sqlite_store
    owner, _, app = await store.create_owner("free")
    dest = tmp_path / "backup.db"
    await store.backup(str(dest))
    con = sqlite3.connect(dest)
    assert con.execute("SELECT owner_id FROM owners").fetchone()[0] == owner.owner_id
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# ---------------------------------------------------------------- quotas (both backends)

async def _user(store: RecordStore, total: int = 100, hourly: int = 100) -> SmtpUser:
    owner, _, app = await store.create_owner("free")
    user, _ = await store.create_user(owner.owner_id, app.idapp, total, hourly)
    return user


async def test_reserve_checks_status_and_both_limits(store: RecordStore):
    user = await _user(store, total=3, hourly=2)
    assert [await store.reserve(user, "h1", 100.0) for _ in range(3)] == [
        Verdict.OK, Verdict.OK, Verdict.HOURLY]
    assert store.held(user.name) == 2
    await store.count(user.name, "h1", 100.0, 2)
    assert store.held(user.name) == 0 and await store.usage(user.name, 100.0) == (2, 2)
    # An hour later the window is empty; the total still counts both.
    assert await store.reserve(user, "h2", 3700.1) is Verdict.OK
    assert await store.reserve(user, "h2", 3700.1) is Verdict.TOTAL
    store.release(user.name, "h2", 1)
    disabled = await store.update_user(user.name, user.owner_id, status="Disable")
    assert await store.reserve(disabled, "h3", 3700.1) is Verdict.DISABLED


async def test_uncount_gives_back_a_failed_message_once(store: RecordStore):
    user = await _user(store, hourly=2)
    for _ in range(2):
        await store.reserve(user, "h", 100.0)
    await store.count(user.name, "h", 100.0, 2)
    assert await store.reserve(user, "h2", 101.0) is Verdict.HOURLY
    await store.uncount(user.name, "h", 100.0, 2)
    assert await store.usage(user.name, 101.0) == (0, 0)
    assert await store.reserve(user, "h2", 101.0) is Verdict.OK


async def test_released_units_are_free_again(store: RecordStore):
    user = await _user(store, hourly=1)
    assert await store.reserve(user, "h", 100.0) is Verdict.OK
    assert await store.reserve(user, "h2", 100.0) is Verdict.HOURLY
    store.release(user.name, "h", 1)
    await store.flush()                  # a shared store releases in the background
    assert await store.reserve(user, "h2", 100.0) is Verdict.OK
    assert store.held(user.name) == 1 and await store.usage(user.name, 100.0) == (0, 0)


async def test_concurrent_reservations_never_exceed_the_limit(store: RecordStore):
    user = await _user(store, hourly=17)
    verdicts = await asyncio.gather(*(store.reserve(user, f"h{i}", 100.0) for i in range(40)))
    assert verdicts.count(Verdict.OK) == 17
    assert store.held(user.name) == 17


async def test_a_disable_binds_the_next_reservation_and_current_user(store: RecordStore):
    user = await _user(store)
    await store.update_user(user.name, user.owner_id, status="Disable")
    # Even through a stale copy of the user: the store's own word counts.
    assert await store.reserve(user, "h", 100.0) is Verdict.DISABLED
    current = await store.current_user(user.name)
    assert current is not None and not current[0].enabled
    assert current[1] == store.credential_stamp(user.name)
    await store.remove_user(user.name, user.owner_id)
    assert await store.current_user(user.name) is None


async def test_the_rolling_hour_ages_out_and_survives_pruning(store: RecordStore):
    """The window is the last 3600 s, exact to the second: at t=4599 the
    t=1000 message still counts, at t=4600.5 it has aged out; sent_total
    keeps it; pruning the journal changes neither."""
    user = await _user(store, total=100, hourly=5)
    for hold, ts, n in (("a", 1000.0, 3), ("b", 2000.0, 2)):
        for _ in range(n):
            await store.reserve(user, hold, ts - 1)
        await store.count(user.name, hold, ts, n)
    await store.uncount(user.name, "b", 2000.0, 2)           # the t=2000 message failed
    assert await store.usage(user.name, 2500.0) == (3, 3)
    assert [await store.reserve(user, "c", 4599.0) for _ in range(3)] == [
        Verdict.OK, Verdict.OK, Verdict.HOURLY]
    assert await store.reserve(user, "c", 4600.5) is Verdict.OK      # 3 aged out
    store.release(user.name, "c", 3)
    await store.flush()
    assert await store.prune_sends(now=4700.0) >= 1          # the t=1000 row at least
    assert await store.usage(user.name, 4700.0) == (3, 0)
    assert [await store.reserve(user, "d", 4700.0) for _ in range(6)] == [
        Verdict.OK] * 5 + [Verdict.HOURLY]
