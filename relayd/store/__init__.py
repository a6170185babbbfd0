"""The store: every record relayd keeps, behind one interface.

* ``interface.py`` -- ``RecordStore``, what the services (delivery, tenants,
  the SMTP front-end) may ask of a backend;
* ``sqlite.py`` -- the embedded backend (aiosqlite, WAL); with schema.py
  the only modules with SQL in them;
* ``schema.py`` -- the numbered migrations;
* ``view.py`` -- the in-memory view every read is served from, refreshed by
  every write;
* ``journal.py`` -- group commit of the quota journal;
* ``credentials.py`` -- generated ids and secrets, stored as digests;
* ``files.py`` -- the database file: private, and watched.
"""

from .credentials import digest, secret_matches
from .interface import RecordStore
from .schema import SCHEMA_VERSION
from .sqlite import SqliteStore

# The backend relayd opens for a ``database`` path (SPEC 6, 8).
Store = SqliteStore

__all__ = ["RecordStore", "SCHEMA_VERSION", "SqliteStore", "Store", "digest", "secret_matches"]
