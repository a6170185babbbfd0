"""Timestamps as the operator API and relayctl show them (SPEC 4.6): ISO
8601 UTC ending in ``Z``. The seed dialects keep their seeds' formats and
do not use this.
"""

from __future__ import annotations

from datetime import datetime, timezone


def iso_z(value: float | str | None) -> str | None:
    """A Unix time, or a record's stored UTC time (``2026-12-02T03:46:45.028``,
    credentials.now_iso), as ISO 8601 UTC ending in ``Z``; None (and "")
    stay None. A stored time that already names its zone is converted to
    UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        dt = datetime.fromtimestamp(float(value), timezone.utc)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    text = str(value)
    if text.endswith("Z"):
        return text
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return text                 # not a time we know: shown as stored
    if dt.tzinfo is None:
        return text + "Z"           # stored as UTC without a zone: keep its digits
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
