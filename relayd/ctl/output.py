"""What relayctl prints: a command's ``Out``, as a table or ``key  value``
lines for people, or its ``data`` as JSON with --json (``main`` chooses)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..timefmt import iso_z

# Keys that hold a time; relayctl shows them as ISO 8601 UTC ending in Z
# (SPEC 4.6), whichever dialect's answer they come from.
TIME_KEYS = ("created", "modified", "started", "last_error_at", "locked_until")


def zoned(data: Any) -> Any:
    """``data`` (a record, a list of them, or anything else) with its times
    as ISO 8601 UTC ending in ``Z``; for --json and the tables alike."""
    if isinstance(data, list):
        return [zoned(x) for x in data]
    if isinstance(data, dict):
        return {k: iso_z(v) if k in TIME_KEYS and isinstance(v, (str, int, float))
                and not isinstance(v, bool) else zoned(v) for k, v in data.items()}
    return data


@dataclass
class Out:
    """What a command prints: ``data`` with --json, else ``text``."""

    data: Any
    text: str


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(record: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    keys = list(keys or record)
    width = max(len(k) for k in keys)
    return "\n".join(f"{k.ljust(width)}  {_cell(record.get(k))}" for k in keys)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
