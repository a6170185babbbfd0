"""Failed-AUTH lockouts for the operator (SPEC 4.6): AuthThrottle's listing
and clearing (sans-IO), GET/DELETE /admin/lockouts on a real relayd locked by
real failed AUTHs over SMTP, their metrics and log line, and relayctl
lockout list/clear and --version as subprocesses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from admin_client import delta, scrape, unix_client
from helpers_smtp import RawSMTP, plain_blob
from relayd import __version__
from relayd.policy import AuthThrottle, Lockout

WINDOW = 600
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


# ----------------------------------------------------------------- sans-IO


def test_lockouts_lists_only_locked_ips_with_when_the_window_frees_them():
    t = AuthThrottle(max_failures=2, window=100)
    t.failure("192.0.2.1", 10.0)
    t.failure("192.0.2.1", 20.0)
    t.failure("192.0.2.2", 15.0)                  # one failure: not locked
    t.failure("192.0.2.3", 5.0)
    t.failure("192.0.2.3", 6.0)
    assert t.lockouts(30.0) == [Lockout("192.0.2.3", 2, 105.0),
                                Lockout("192.0.2.1", 2, 110.0)]
    # 192.0.2.3's first failure left the window at 105: it is free, and gone.
    assert t.lockouts(105.0) == [Lockout("192.0.2.1", 2, 110.0)]
    assert t.lockouts(110.0) == []


def test_locked_until_is_when_the_max_failures_th_newest_failure_expires():
    t = AuthThrottle(max_failures=3, window=100)
    for ts in (1.0, 2.0, 3.0):
        t.failure("2001:db8::1", ts)
    t.reconfigure(max_failures=2, window=100)    # keeps the newest two: 2.0, 3.0
    [lo] = t.lockouts(4.0)
    assert (lo.failures, lo.until) == (2, 102.0)
    assert t.locked("2001:db8::1", 101.9) and not t.locked("2001:db8::1", lo.until)


def test_clear_lifts_a_lockout_and_forgets_its_failures():
    t = AuthThrottle(max_failures=2, window=100)
    t.failure("192.0.2.1", 1.0)
    t.failure("192.0.2.1", 2.0)
    assert t.clear("192.0.2.1", 3.0) is True
    assert not t.locked("192.0.2.1", 3.0) and t.lockouts(3.0) == []
    # Forgotten, not just unlocked: one new failure does not lock again.
    assert t.failure("192.0.2.1", 4.0) is False


def test_clear_of_an_ip_that_is_not_locked_changes_nothing():
    t = AuthThrottle(max_failures=2, window=100)
    assert t.clear("192.0.2.9", 1.0) is False
    t.failure("192.0.2.1", 1.0)
    assert t.clear("192.0.2.1", 2.0) is False    # below the maximum: kept
    assert t.failure("192.0.2.1", 3.0) is True
    t.failure("192.0.2.2", 1.0)
    t.failure("192.0.2.2", 2.0)
    assert t.clear("192.0.2.2", 102.0) is False  # the window already freed it


# ----------------------------------------------------------------- real relayd


async def lock_out(relay: Any, user: str) -> None:
    """Two wrong passwords over SMTP from 127.0.0.1 (auth_failures.max 2)."""
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    for _ in range(2):
        r = await c.cmd(b"AUTH PLAIN " + plain_blob(user, "wrong"))
        assert r.code == 535, r
    await c.close()
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner.code == 421, c.banner          # locked: refused on the banner
    await c.close()


async def can_auth(relay: Any, tenant: Any) -> None:
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner.code == 220, c.banner
    await c.ehlo()
    await c.login(tenant.user, tenant.password)
    await c.close()


def wall(iso: str) -> float:
    assert ISO_Z.match(iso), iso
    return datetime.fromisoformat(iso[:-1]).replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture
async def locked_relay(relay_factory, provision):
    relay = await relay_factory(auth_failures={"max": 2, "window": WINDOW})
    tenant = await provision(relay)
    return relay, tenant


async def test_get_lists_a_locked_ip_and_delete_lifts_it(locked_relay, caplog):
    relay, tenant = locked_relay
    async with unix_client(relay) as admin:
        r = await admin.request("GET", "/admin/lockouts")
        assert (r.status, r.json()) == (200, [])

        before = await scrape(relay.metrics_port)
        t0 = time.time()
        await lock_out(relay, tenant.user)
        r = await admin.request("GET", "/admin/lockouts")
        assert r.status == 200
        [lo] = r.json()
        assert set(lo) == {"ip", "failures", "locked_until"}
        assert (lo["ip"], lo["failures"]) == ("127.0.0.1", 2)
        # Wall-clock time (not time.monotonic()), one window after the failures.
        until = wall(lo["locked_until"])
        assert t0 + WINDOW - 2 <= until <= time.time() + WINDOW + 2

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="relayd.admin"):
            r = await admin.request("DELETE", "/admin/lockouts/127.0.0.1")
        assert (r.status, r.json()) == (200, {"ip": "127.0.0.1", "cleared": True})
        [rec] = [x for x in caplog.records if x.getMessage() == "lockout_cleared"]
        assert rec.logfmt == {"event": "lockout_cleared", "ip": "127.0.0.1"}

        await can_auth(relay, tenant)                 # at once, not after the window
        r = await admin.request("GET", "/admin/lockouts")
        assert (r.status, r.json()) == (200, [])
        after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_lockouts_total") == 1
    assert delta(before, after, "relayd_lockouts_cleared_total") == 1


async def test_delete_of_an_ip_that_is_not_locked_is_404_and_a_bad_ip_400(locked_relay):
    relay, tenant = locked_relay
    async with unix_client(relay) as admin:
        before = await scrape(relay.metrics_port)
        r = await admin.request("DELETE", "/admin/lockouts/127.0.0.1")
        assert r.status == 404
        assert r.json()["status"] == "error" and "not locked" in r.json()["message"]

        await lock_out(relay, tenant.user)
        assert (await admin.request("DELETE", "/admin/lockouts/127.0.0.1")).status == 200
        r = await admin.request("DELETE", "/admin/lockouts/127.0.0.1")
        assert r.status == 404 and r.json()["status"] == "error"

        for bad in ("not-an-ip", "999.1.1.1", "127.0.0.1%0d%0aX"):
            r = await admin.request("DELETE", f"/admin/lockouts/{bad}")
            assert r.status == 400, (bad, r)
            assert r.json()["status"] == "error"
        # Another spelling of an address finds it (the stored form is canonical).
        r = await admin.request("DELETE", "/admin/lockouts/2001:DB8::0001")
        assert r.status == 404 and r.json()["message"].startswith("2001:db8::1 ")
        after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_lockouts_total") == 1
    assert delta(before, after, "relayd_lockouts_cleared_total") == 1


# ----------------------------------------------------------------- relayctl


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def relayctl(relay: Any, *args: str) -> tuple[int, str, str]:
    return await run("-m", "relayd.ctl", "--socket", relay.config.admin.socket, *args)


async def test_relayctl_lockout_list_and_clear(locked_relay):
    relay, tenant = locked_relay
    rc, out, err = await relayctl(relay, "lockout", "list")
    assert (rc, out.strip()) == (0, "(none)"), err

    await lock_out(relay, tenant.user)
    rc, out, err = await relayctl(relay, "lockout", "list")
    assert rc == 0, err
    head, row = out.strip().splitlines()
    assert head.split() == ["IP", "FAILURES", "LOCKED_UNTIL"]
    ip, failures, until = row.split()
    assert (ip, failures) == ("127.0.0.1", "2") and wall(until) > time.time()

    rc, out, err = await relayctl(relay, "--json", "lockout", "list")
    assert rc == 0, err
    [lo] = json.loads(out)
    assert (lo["ip"], lo["failures"], lo["locked_until"]) == ("127.0.0.1", 2, until)

    rc, out, err = await relayctl(relay, "lockout", "clear", "127.0.0.1", "--json")
    assert (rc, json.loads(out)) == (0, {"ip": "127.0.0.1", "cleared": True}), err
    await can_auth(relay, tenant)

    rc, out, err = await relayctl(relay, "lockout", "clear", "127.0.0.1")
    assert (rc, out) == (1, "") and "127.0.0.1 is not locked out" in err
    rc, out, err = await relayctl(relay, "lockout", "clear", "nonsense")
    assert (rc, out) == (1, "") and "not an IPv4 or IPv6 address" in err

    await lock_out(relay, tenant.user)
    rc, out, err = await relayctl(relay, "lockout", "clear", "127.0.0.1")
    assert rc == 0 and "127.0.0.1" in out, err
    await can_auth(relay, tenant)


async def test_relayctl_and_relayd_version():
    assert await run("-m", "relayd.ctl", "--version") == (0, f"relayctl {__version__}\n", "")
    rc, out, _ = await run("-m", "relayd", "--version")
    assert (rc, out) == (0, f"relayd {__version__}\n")
