"""The admin socket (SPEC 4) and the metrics listener (SPEC 5)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..daemon import Relay


async def start(relay: Relay) -> list[asyncio.AbstractServer]:
    """Start the admin socket(s) and the metrics listener; return the servers."""
    return []
