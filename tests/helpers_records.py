"""Records for tests, created through relayd's own store: the one way tests
provision an owner, its app, upstreams and an SMTP user.

* ``create_tenant(store, ...)`` does it on an open store; conftest's
  ``provision`` fixture calls it on an in-process relay's store.
* ``provision_db(state_dir, ...)`` does the same in the database of a relayd
  that is about to be started as a subprocess (relayd_proc.py), with the
  same keyword arguments.

Tests that are about the admin API (test_admin_*.py, the e2e tests) create
their records through the API on purpose and do not use these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.store import Store


@dataclass
class Tenant:
    owner_id: str
    token: str
    idapp: str
    user: str
    password: str


async def create_tenant(store: Store, *, plan: str = "free", strategy: str = "random",
                        total: int = 1000, hourly: int = 1000,
                        upstreams: list[dict[str, Any]] | None = None) -> Tenant:
    """An owner (``plan``) with its default app (``strategy``), one upstream
    per dict of store fields (``idapp`` is filled in) and an SMTP user with
    the given limits."""
    owner, token, app = await store.create_owner(plan)
    if strategy != app.strategy:
        await store.update_app(app.idapp, strategy=strategy)
    for fields in upstreams or []:
        await store.create_upstream({"idapp": app.idapp, **fields})
    user, password = await store.create_user(owner.owner_id, app.idapp, total, hourly)
    return Tenant(owner.owner_id, token, app.idapp, user.name, password)


async def provision_db(state_dir: Path, **kwargs: Any) -> Tenant:
    """create_tenant in ``state_dir``'s database, before relayd starts on it."""
    store = Store(state_dir / "relayd.db")
    await store.open()
    try:
        return await create_tenant(store, **kwargs)
    finally:
        await store.close()


async def sent_total(relay: Any, user: str) -> int:
    """The user's sent_total as the relay's store has it (either backend)."""
    return (await relay.store.usage(user, time.time()))[0]


async def sent_last_hour(relay: Any, user: str) -> int:
    return (await relay.store.usage(user, time.time()))[1]
