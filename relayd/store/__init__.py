"""The store: every record relayd keeps, behind one interface.

* ``interface.py`` -- ``RecordStore``, what the services (delivery, tenants,
  the SMTP front-end) may ask of a backend;
* ``sqlbase.py`` -- the records' SQL both backends share;
* ``sqlite.py`` -- the embedded backend (aiosqlite, WAL), the default;
* ``postgres.py`` -- the backend a cluster of relayd processes shares
  (asyncpg; quotas exact across the cluster), with ``pgwatch.py`` (change
  notices, heartbeats, retries) and ``pgschema.py``;
* ``schema.py`` -- SQLite's numbered migrations;
* ``view.py`` -- the in-memory view every read is served from, refreshed by
  every write (and, shared, by every other process's);
* ``batching.py`` -- smart batching of the hot path's calls (group commit);
* ``copying.py`` -- ``relayd --copy-to``: one store into another, empty one;
* ``credentials.py`` -- generated ids and secrets, stored as digests;
* ``files.py`` -- the database file: private, and watched;
* ``instances.py`` -- this process as a member of the cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .credentials import digest, secret_matches
from .interface import RecordStore
from .schema import SCHEMA_VERSION
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from ..config import Config

# The embedded backend, for a ``database`` path (SPEC 6).
Store = SqliteStore


def open_store(cfg: Config) -> RecordStore:
    """The backend ``cfg.database`` names (not opened yet): PostgreSQL for a
    DSN (SPEC 8), else SQLite."""
    return store_for(cfg.database_dsn or cfg.database_path)


def store_for(database: object) -> RecordStore:
    """A backend for a DSN string or an SQLite path (--copy-to's target too)."""
    from ..dsn import is_dsn
    if isinstance(database, str) and is_dsn(database):
        from .postgres import PostgresStore
        return PostgresStore(database)
    return SqliteStore(str(database))


__all__ = ["RecordStore", "SCHEMA_VERSION", "SqliteStore", "Store", "digest", "open_store",
           "secret_matches", "store_for"]
