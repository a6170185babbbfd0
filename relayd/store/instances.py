"""Who this relayd process is, as the cluster lists it (SPEC 8.5)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..timefmt import iso_z


@dataclass(frozen=True)
class Instance:
    id: str
    hostname: str
    pid: int
    started: float = field(default_factory=time.time)

    def as_dict(self, last_seen: float) -> dict[str, Any]:
        return {"id": self.id, "hostname": self.hostname, "pid": self.pid,
                "started": iso_z(self.started), "last_seen": iso_z(last_seen)}


def this_instance() -> Instance:
    """A fresh id per process start: a restarted instance is a new member,
    and whatever the old one held is released by the cluster (postgres.py)."""
    return Instance(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid())
