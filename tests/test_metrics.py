"""Metrics scraped over HTTP from the metrics listener after real traffic:
each counter moves by exactly what the traffic should make it move (SPEC 5).
Counters live in one process-wide registry, so every assertion is a delta
between two scrapes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiosmtplib
import pytest

from conftest import base_config, simple_message, sink_upstream, smtp_client
from admin_client import delta, http_get, scrape
from helpers_records import provision_db
from helpers_smtp import RawSMTP, authed, plain_blob, wait_for
from relayd_proc import RelaydProcess


async def test_counters_move_by_the_traffic(relay_factory, sink_factory, provision):
    relay = await relay_factory(auth_failures={"max": 50, "window": 600})
    sink = await sink_factory()
    rewriting = await sink_factory()
    tenant = await provision(relay, hourly=5, upstreams=[sink_upstream(sink)])
    other = await provision(relay, upstreams=[sink_upstream(
        rewriting, defaultfromemail="noreply@allowed.test", defaultfromname="Relay")])
    ids = {u.port: u.idsmtp for u in await relay.store.list_upstreams(tenant.idapp)}
    before = await scrape(relay.metrics_port)

    # 2 messages x 2 recipients delivered through the first upstream
    client = await smtp_client(relay, tenant)
    for _ in range(2):
        await client.sendmail("app@example.com", ["a@example.net", "b@example.net"],
                              simple_message())
    # the 5th recipient fits the hourly limit of 5, the 6th does not
    await client.mail("app@example.com")
    assert (await client.rcpt("c@example.net")).code == 250
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt("d@example.net")
    assert refused.value.code == 451
    await client.rset()
    await client.quit()
    # one message rewritten to the upstream's default sender
    client = await smtp_client(relay, other)
    await client.sendmail("app@elsewhere.test", ["x@example.net"], simple_message())
    await client.quit()
    # one failed AUTH
    raw = await RawSMTP.open(relay.smtp_ports[0])
    await raw.ehlo()
    assert (await raw.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))).code == 535
    await raw.close()

    after = await scrape(relay.metrics_port)
    assert delta(before, after, "relayd_messages_total", result="delivered") == 3
    assert delta(before, after, "relayd_recipients_total", result="accepted") == 6
    assert delta(before, after, "relayd_recipients_total", result="hourly") == 1
    assert delta(before, after, "relayd_limit_rejections_total", limit="hourly") == 1
    assert delta(before, after, "relayd_limit_rejections_total", limit="total") == 0
    assert delta(before, after, "relayd_auth_attempts_total", result="success") == 2
    assert delta(before, after, "relayd_auth_attempts_total", result="failure") == 1
    assert delta(before, after, "relayd_upstream_attempts_total",
                 upstream=ids[sink.port], result="ok") == 2
    assert delta(before, after, "relayd_from_rewrites_total") == 1
    assert delta(before, after, "relayd_delivery_duration_seconds_count") == 3
    assert after[("relayd_upstream_errors", (("upstream", ids[sink.port]),))] == 0
    # every session above has closed
    for _ in range(100):
        if (await scrape(relay.metrics_port))[("relayd_sessions_active", ())] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await scrape(relay.metrics_port))[("relayd_sessions_active", ())] == 0
    assert len(sink.messages) == 2 and len(rewriting.messages) == 1


async def test_upstream_errors_gauge_follows_numerrors(relay, sink_factory, provision,
                                                       closed_port):
    good = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0}, sink_upstream(good, priority=1)])
    dead = next(u.idsmtp for u in await relay.store.list_upstreams(tenant.idapp)
                if u.port == closed_port)
    before = await scrape(relay.metrics_port)
    client = await smtp_client(relay, tenant)
    for _ in range(2):
        await client.sendmail("app@example.com", ["a@example.net"], simple_message())
    await client.quit()
    after = await scrape(relay.metrics_port)
    assert after[("relayd_upstream_errors", (("upstream", dead),))] == 2
    assert delta(before, after, "relayd_upstream_attempts_total",
                 upstream=dead, result="error") == 2
    assert (await relay.store.get_upstream(dead)).numerrors == 2


async def test_healthz(relay, sink_factory, provision):
    assert await http_get(relay.metrics_port, "/healthz") == (200, b"ok\n")
    # An open transaction holds the drain, so /healthz can be asked during it.
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd("MAIL FROM:<app@example.com>")).code == 250
    drain = asyncio.create_task(relay.drain(timeout=30))
    await wait_for(lambda: relay.draining)
    # Not serving SMTP any more: not healthy, while the listener still answers.
    assert await http_get(relay.metrics_port, "/healthz") == (503, b"unavailable\n")
    await c.close()
    await drain
    # Drained: relayd has closed every listener, the metrics one included.
    with pytest.raises(ConnectionRefusedError):
        await http_get(relay.metrics_port, "/healthz")


@pytest.mark.slow
async def test_reload_counters(tmp_path: Path, sink_factory):
    sink = await sink_factory()
    cfg = base_config(tmp_path)
    await provision_db(Path(cfg["state_dir"]), upstreams=[sink_upstream(sink)])
    import yaml
    proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
    try:
        before = await scrape(proc.metrics_port)
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        await proc.wait_for("event=reloaded", start=mark)
        proc.config_path.write_text(yaml.safe_dump({**cfg, "bogus": 1}))
        mark = len(proc.lines)
        proc.signal(signal.SIGHUP)
        await proc.wait_for("keeping the running configuration", start=mark)
        after = await scrape(proc.metrics_port)
        assert delta(before, after, "relayd_config_reloads_total", result="ok") == 1
        assert delta(before, after, "relayd_config_reloads_total", result="error") == 1
    finally:
        await proc.stop()
