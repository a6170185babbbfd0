"""The ``database`` key (SPEC 6, 8): an SQLite file path, or a PostgreSQL
DSN -- and the DSN as logs and ``--print-config`` show it, password masked.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

SCHEMES = ("postgresql", "postgres")
MASK = "********"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_KEYWORDS = re.compile(r"^\s*\w+\s*=")


def is_dsn(value: str) -> bool:
    return bool(_SCHEME.match(value)) and value.split(":", 1)[0].lower() in SCHEMES


def check_database(value: str) -> str:
    """``value`` if it is a file path or a DSN relayd can use; ValueError
    saying what is wrong otherwise (a DSN must never be taken for a file)."""
    if not value.strip():
        raise ValueError("is empty: give a file path or a postgresql:// DSN, or leave it out")
    scheme = _SCHEME.match(value)
    if scheme and len(scheme.group(1)) > 1:         # C:\... is a path
        if scheme.group(1).lower() not in SCHEMES:
            raise ValueError(f"unsupported scheme {scheme.group(1)!r}: give a file path or "
                             "a postgresql://user@host:port/dbname DSN")
        _check_url(value)
    elif _KEYWORDS.match(value) and " " in value.strip():
        raise ValueError("keyword/value connection strings are not supported: "
                         "write postgresql://user@host:port/dbname")
    return value


def _check_url(value: str) -> None:
    """libpq's URI form; without a host it is the local Unix socket, as libpq has it."""
    if not value.split(":", 1)[1].startswith("//"):
        raise ValueError("a PostgreSQL DSN starts postgresql:// (user@host:port/dbname)")
    try:
        url = urlsplit(value)
        url.port                                    # noqa: B018 -- raises for a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid PostgreSQL DSN: {exc}") from None
    if not url.path.strip("/"):
        raise ValueError("a PostgreSQL DSN needs a database name: postgresql://user@host:port/dbname")


def masked(value: str | None) -> str | None:
    """``value`` with a DSN's password replaced by ``********``."""
    if value is None or not is_dsn(value):
        return value
    url = urlsplit(value)
    if url.password is None:
        return value
    user = url.username or ""
    host = url.netloc.rsplit("@", 1)[1]
    return urlunsplit(SplitResult(url.scheme, f"{user}:{MASK}@{host}", url.path, url.query,
                                  url.fragment))
