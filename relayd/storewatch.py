"""The store watch (SPEC 9): relayd never goes on accepting mail into a
database file nobody will read.

SQLite keeps writing happily into a file that has been unlinked or renamed
away: relayd would answer 250, count quotas into it, and after a restart every
record would be gone. So a task (started by Relay.start) looks every
``WATCH_INTERVAL`` seconds at two things:

* whether the configured path still names the file the store has open
  (Store.lost: st_dev/st_ino recorded at open). A removed or replaced file is
  final: the records are no longer at the path, and whatever is there now is
  not what this process has loaded, so relayd refuses until it is restarted
  (and opens whatever the path then holds). The watch stops there;
* whether a write transaction can start (Store.unwritable: a read-only file
  or file system, ``query_only``). That may pass: once a probe succeeds again
  the problem is cleared. One refused probe may be a moment's lock held by
  another process; ``UNWRITABLE_AFTER`` in a row make it a problem.

While ``relay.store_problem`` is set, MAIL answers ``451 4.3.0``
(replies.STORE_UNAVAILABLE, smtp.py) and ``/healthz`` answers 503 (admin).
Each change is logged once: ``store_unavailable`` at error level with the
reason, ``store_recovered`` at info.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .maillog import event

if TYPE_CHECKING:
    from .daemon import Relay

log = logging.getLogger("relayd.store")

# SPEC 9 wants detection within 5 s: a removed file is seen within one
# interval, an unwritable one within UNWRITABLE_AFTER of them.
WATCH_INTERVAL = 1.0
UNWRITABLE_AFTER = 2


async def watch(relay: Relay) -> None:
    """Run until cancelled (Relay.close), or until the file is lost."""
    store = relay.store
    refused = 0
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        lost = store.lost()
        if lost is not None:
            _unavailable(relay, lost + "; refusing mail until relayd is restarted")
            return
        reason = await store.unwritable()
        if reason is None:
            refused = 0
            if relay.store_problem is not None:
                relay.store_problem = None
                event(log, logging.INFO, "store_recovered", database=str(store.path))
        else:
            refused += 1
            if refused == UNWRITABLE_AFTER:
                _unavailable(relay, reason)


def _unavailable(relay: Relay, reason: str) -> None:
    relay.store_problem = reason
    event(log, logging.ERROR, "store_unavailable", database=str(relay.store.path),
          reason=reason)
