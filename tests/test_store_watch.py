"""SPEC 9, last paragraph: the store is watched. A database file removed or
replaced under a running relayd, or one that stops taking writes, is logged
at error level within 5 s; MAIL then answers 451 4.3.0 and /healthz 503.

Regression: relayd used to go on answering 250 and counting quotas into the
unlinked file; after a restart every record was gone.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from admin_client import http_get
from conftest import sink_upstream
from helpers_smtp import authed, wait_for
from relayd import storewatch

DETECTION_BOUND = 5.0         # SPEC 9


def store_events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "logfmt", {}).get("event") == name]


async def assert_refusing(relay, tenant, caplog, reason: str) -> None:
    """Within the bound: one error line naming ``reason``, MAIL 451 4.3.0,
    /healthz 503."""
    await wait_for(lambda: store_events(caplog, "store_unavailable"), DETECTION_BOUND)
    (line,) = store_events(caplog, "store_unavailable")
    assert line.levelno == logging.ERROR
    assert reason in line.logfmt["reason"] and line.logfmt["database"] == str(relay.store.path)
    client = await authed(relay, tenant)
    r = await client.cmd("MAIL FROM:<app@example.com>")
    assert (r.code, r.enhanced) == (451, "4.3.0"), r
    await client.cmd("QUIT")
    assert (await http_get(relay.metrics_port, "/healthz"))[0] == 503


async def test_removed_database_refuses_mail(relay_factory, sink_factory, provision, caplog):
    sink = await sink_factory()
    relay = await relay_factory(database=None)      # about the SQLite file itself
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    assert (await http_get(relay.metrics_port, "/healthz"))[0] == 200
    os.unlink(relay.store.path)
    await assert_refusing(relay, tenant, caplog, "removed")
    assert sink.messages == []


async def test_replaced_database_refuses_mail_until_restart(relay_factory, sink_factory,
                                                            provision, caplog, tmp_path):
    sink = await sink_factory()
    relay = await relay_factory(database=None)      # about the SQLite file itself
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    os.replace(other, relay.store.path)           # e.g. a restore copied over it
    await assert_refusing(relay, tenant, caplog, "replaced")
    # The file relayd has open is still writable, yet it stays refusing:
    # its records are no longer at the path.
    assert relay.store_problem is not None and "restart" in relay.store_problem
    assert store_events(caplog, "store_recovered") == []


async def test_unwritable_database_refuses_mail_and_recovers(relay_factory, sink_factory,
                                                             provision, caplog):
    sink = await sink_factory()
    relay = await relay_factory(database=None)      # about the SQLite file itself
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    # SQLite refuses every write, as on a read-only file or file system.
    await relay.store.db.execute("PRAGMA query_only = ON")
    await assert_refusing(relay, tenant, caplog, "not writable")

    await relay.store.db.execute("PRAGMA query_only = OFF")
    await wait_for(lambda: store_events(caplog, "store_recovered"),
                   storewatch.WATCH_INTERVAL + DETECTION_BOUND)
    assert store_events(caplog, "store_recovered")[0].levelno == logging.INFO
    assert (await http_get(relay.metrics_port, "/healthz"))[0] == 200
    client = await authed(relay, tenant)
    r = await client.send_message("app@example.com", ["r@example.net"],
                                  b"Subject: back\r\n\r\nhello\r\n")
    assert r.code == 250, r
    await client.cmd("QUIT")
    assert len(sink.messages) == 1
