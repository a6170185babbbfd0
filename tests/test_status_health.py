"""Upstream health in GET /admin/status and `relayctl status` (SPEC 4.6):
numerrors, last_error_at (ISO 8601 UTC ending in Z), last_error (the reason
in plain words, SPEC 3.18) and cooling_down, for own upstreams, system
SMTPs and domain routes; and ISO Z timestamps in every operator answer."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

from admin_client import unix_client
from conftest import sink_upstream
from helpers_smtp import authed
from test_relayctl import relayctl

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
MSG = (b"From: app@example.com\r\nTo: to@example.net\r\nSubject: hi\r\n"
       b"Message-ID: <h1@example.com>\r\n\r\nHello.\r\n")


async def send(relay, tenant, sender: str = "app@example.com") -> int:
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    r = await c.reply()
    await c.close()
    return r.code


async def status(relay) -> dict[str, Any]:
    async with unix_client(relay) as admin:
        r = await admin.request("GET", "/admin/status")
    assert r.status == 200, r.body
    return r.json()


def by_id(items: list[dict[str, Any]], idsmtp: str) -> dict[str, Any]:
    (found,) = [u for u in items if u["idsmtp"] == idsmtp]
    return found


def assert_recent_iso(value: Any) -> None:
    assert isinstance(value, str) and ISO_Z.fullmatch(value), value
    at = datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=timezone.utc)
    assert abs(at.timestamp() - time.time()) < 60, value


def assert_failed_once(h: dict[str, Any], *, cooling: bool) -> None:
    assert h["numerrors"] == 1
    assert h["last_error"] == "connection refused"
    assert_recent_iso(h["last_error_at"])
    assert h["cooling_down"] is cooling


async def own_failing(relay, provision, sink_factory, closed_port):
    """A paid tenant whose own upstream on a closed port fails the first
    attempt; the second (priority 1) delivers."""
    good = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        {**sink_upstream(good), "priority": 1}])
    (dead,) = [u for u in await relay.store.list_upstreams(tenant.idapp)
               if u.port == closed_port]
    return tenant, dead.idsmtp, good


async def test_own_upstream_health_fields(relay, provision, sink_factory, closed_port):
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    before = by_id((await status(relay))["upstreams"], dead)
    assert (before["numerrors"], before["last_error_at"], before["last_error"],
            before["cooling_down"]) == (0, None, None, False)
    assert await send(relay, tenant) == 250
    h = by_id((await status(relay))["upstreams"], dead)
    assert_failed_once(h, cooling=False)                 # max_errors is 5 by default


async def test_cooling_down_and_a_success_resets_it(relay_factory, provision, sink_factory,
                                                   closed_port):
    relay = await relay_factory(failover={"max_errors": 1})
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    assert_failed_once(by_id((await status(relay))["upstreams"], dead), cooling=True)
    # The port now answers: a success resets numerrors and cooling_down, and
    # the last error is still the last error.
    sink = await sink_factory()
    await relay.store.update_upstream(dead, {"port": sink.port})
    await relay.store.record_upstream_result(dead, True, time.time())
    h = by_id((await status(relay))["upstreams"], dead)
    assert (h["numerrors"], h["cooling_down"]) == (0, False)
    assert h["last_error"] == "connection refused"
    assert_recent_iso(h["last_error_at"])


async def test_a_delivered_message_resets_numerrors(relay, provision, sink_factory,
                                                    closed_port):
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    sink = await sink_factory()
    await relay.store.update_upstream(dead, {"port": sink.port})
    assert await send(relay, tenant) == 250               # priority 0 goes first
    assert len(sink.messages) == 1
    h = by_id((await status(relay))["upstreams"], dead)
    assert (h["numerrors"], h["cooling_down"]) == (0, False)


async def test_system_smtp_health(relay_factory, provision, sink_factory, closed_port):
    good = await sink_factory()
    relay = await relay_factory(failover={"max_errors": 1}, system_smtps=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        {"host": "127.0.0.1", "port": good.port, "priority": 1}])
    tenant = await provision(relay, plan="paid", strategy="priority")
    assert await send(relay, tenant) == 250
    d = await status(relay)
    dead = by_id(d["system_smtps"], relay.system[0].idsmtp)
    assert_failed_once(dead, cooling=True)
    alive = by_id(d["system_smtps"], relay.system[1].idsmtp)
    assert (alive["numerrors"], alive["last_error_at"], alive["last_error"],
            alive["cooling_down"]) == (0, None, None, False)


async def test_domain_route_health(relay_factory, provision, sink_factory, closed_port):
    relay = await relay_factory(failover={"max_errors": 1})
    good = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(good)])
    await relay.store.put_domain(tenant.owner_id, "example.com", provider="smtp",
                                 description="", from_=None,
                                 options={"host": "127.0.0.1", "port": closed_port})
    assert await send(relay, tenant) == 250              # fell over to the app's upstream
    (route,) = (await status(relay))["domain_routes"]
    assert (route["domain"], route["owner_id"]) == ("example.com", tenant.owner_id)
    assert_failed_once(route, cooling=True)


async def test_own_upstream_reason_and_time_survive_a_restart(relay_factory, provision,
                                                             sink_factory, closed_port):
    relay = await relay_factory()
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    first = by_id((await status(relay))["upstreams"], dead)
    await relay.close()
    again = await relay_factory()                        # the same state dir
    h = by_id((await status(again))["upstreams"], dead)
    assert_failed_once(h, cooling=False)
    assert h["last_error_at"] == first["last_error_at"]


async def test_every_operator_timestamp_ends_in_z(relay, provision, sink_factory,
                                                  closed_port):
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    seen: list[str] = []

    def times(d: Any) -> None:
        if isinstance(d, list):
            for x in d:
                times(x)
        elif isinstance(d, dict):
            for k, v in d.items():
                if k in ("created", "modified", "started", "last_error_at") and v is not None:
                    assert isinstance(v, str) and ISO_Z.fullmatch(v), (k, v)
                    seen.append(k)
                times(v)

    async with unix_client(relay) as admin:
        for path in ("/admin/owners", f"/admin/owners/{tenant.owner_id}", "/admin/apps",
                     f"/admin/apps/{tenant.idapp}", f"/admin/users/{tenant.user}",
                     f"/admin/smtps/{dead}", "/admin/status"):
            r = await admin.request("GET", path)
            assert r.status == 200, (path, r.body)
            times(r.json())
    assert {"created", "modified", "started", "last_error_at"} <= set(seen)


async def test_relayctl_status_shows_the_reason_and_an_iso_time(relay, provision,
                                                                 sink_factory, closed_port):
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    run = await relayctl(relay, "status")
    assert run.rc == 0, run.err
    (line,) = [ln for ln in run.out.splitlines() if ln.startswith(dead)]
    assert "connection refused" in line
    assert ISO_Z.search(line), line
    assert not re.search(r"\b1\d{9}(\.\d+)?\b", run.out), run.out   # no bare Unix time
    js = await relayctl(relay, "--json", "status")
    assert js.rc == 0, js.err
    h = by_id(js.json["upstreams"], dead)
    assert_failed_once(h, cooling=False)


async def test_relayctl_status_says_cooling_down(relay_factory, provision, sink_factory,
                                                 closed_port):
    relay = await relay_factory(failover={"max_errors": 1})
    tenant, dead, _ = await own_failing(relay, provision, sink_factory, closed_port)
    assert await send(relay, tenant) == 250
    run = await relayctl(relay, "status")
    assert run.rc == 0, run.err
    (line,) = [ln for ln in run.out.splitlines() if ln.startswith(dead)]
    assert "cooling down" in line


async def test_relayctl_owner_and_app_times_end_in_z(relay, provision):
    tenant = await provision(relay)
    for args in (("owner", "list"), ("app", "list", "--owner", tenant.owner_id)):
        run = await relayctl(relay, "--json", *args)
        assert run.rc == 0, run.err
        (rec,) = run.json
        assert ISO_Z.fullmatch(rec["created"]), rec
        run = await relayctl(relay, *args)
        assert run.rc == 0 and ISO_Z.search(run.out), run.out
