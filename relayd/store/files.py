"""The database file: created private, and watched for being removed or
replaced under a running relayd (storewatch.py, SPEC 9)."""

from __future__ import annotations

import os
from pathlib import Path

Identity = tuple[int, int]          # (st_dev, st_ino)


def create_private_file(path: Path) -> None:
    """Create ``path`` (if absent) with mode 0600 whatever the umask."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def identity(path: Path) -> Identity:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def lost(path: Path, opened: Identity | None) -> str | None:
    """Why ``path`` no longer names the file opened as ``opened``, or None.
    (Another stat error, e.g. EACCES, is left to the write probe.)"""
    try:
        now = identity(path)
    except (FileNotFoundError, NotADirectoryError):
        return "database file removed"
    except OSError:
        return None
    return None if now == opened else "database file replaced"
