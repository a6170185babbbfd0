"""SPEC 3: every reply code of the SMTP session, each provoked by the input
that triggers it, against a real relayd and real recording upstreams on
loopback. The session's hostile bytes (DATA framing and SMTP smuggling,
bare LF, HTTP and TLS bytes on the SMTP port) are in test_smtp_data.py.

Replies are read with a raw client (helpers_smtp.RawSMTP) so that every code
and enhanced code is seen exactly as relayd wrote it.
"""

from __future__ import annotations

import re

import pytest

from conftest import simple_message, sink_upstream
from helpers_records import sent_total
from helpers_smtp import RawSMTP, authed, upstream_by_port, without_trace

SENDER = "app@example.com"
MSG = simple_message()


# ------------------------------------------------------------------ envelope

@pytest.mark.parametrize("command", [f"MAIL FROM:<{SENDER}>", "RCPT TO:<to@example.net>", "DATA"])
async def test_commands_before_auth_get_530(relay, command):
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    r = await c.cmd(command)
    assert (r.code, r.enhanced) == (530, "5.7.0"), r
    await c.close()


async def test_hourly_limit_451_471(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, hourly=2, total=100, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    r = await c.cmd("RCPT TO:<c@example.net>")
    assert (r.code, r.enhanced) == (451, "4.7.1"), r
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    assert (await c.reply()).code == 250
    assert sink.messages[0].rcpt_tos == ["a@example.net", "b@example.net"]
    await c.close()


async def test_total_limit_550_571(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, hourly=100, total=2, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    r = await c.cmd("RCPT TO:<c@example.net>")
    assert (r.code, r.enhanced) == (550, "5.7.1"), r
    await c.close()


async def test_too_many_recipients_452_453(relay_factory, sink_factory, provision):
    relay = await relay_factory(limits={"max_recipients": 3})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    for i in range(3):
        assert (await c.cmd(f"RCPT TO:<r{i}@example.net>")).code == 250
    r = await c.cmd("RCPT TO:<r3@example.net>")
    assert (r.code, r.enhanced) == (452, "4.5.3"), r
    assert relay.store.held(tenant.user) == 3     # the refused one reserved nothing
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    assert (await c.reply()).code == 250
    assert len(sink.messages[0].rcpt_tos) == 3
    await c.close()


async def test_mail_size_parameter_over_limit_552(relay_factory, sink_factory, provision):
    relay = await relay_factory(limits={"max_message_size": 5000})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r = await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=5001")
    assert (r.code, r.enhanced) == (552, "5.3.4"), r
    r = await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=99999999999999999999")
    assert (r.code, r.enhanced) == (552, "5.3.4"), r
    r = await c.cmd(f"MAIL FROM:<{SENDER}> SIZE=5000")
    assert r.code == 250, r
    await c.close()


def sized_message(size: int) -> bytes:
    head = b"From: app@example.com\r\nTo: to@example.net\r\nSubject: big\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    msg = head + body
    msg = msg[:size - 2] + b"\r\n"
    assert len(msg) == size
    return msg


@pytest.mark.parametrize("size", [5001, 400_000], ids=["just-over", "far-over"])
async def test_oversize_data_552_then_session_still_works(relay_factory, sink_factory,
                                                          provision, size):
    relay = await relay_factory(limits={"max_message_size": 5000})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], sized_message(size))
    assert (r.code, r.enhanced) == (552, "5.3.4"), r
    assert sink.messages == [] and sink.connections == 0
    assert relay.store.held(tenant.user) == 0
    assert await sent_total(relay, tenant.user) == 0
    # The session goes on: a message of exactly the limit is accepted.
    exact = sized_message(5000)
    r = await c.send_message(SENDER, ["to@example.net"], exact)
    assert r.code == 250, r
    assert [without_trace(m.data) for m in sink.messages] == [exact]
    await c.close()


async def test_every_upstream_tempfails_451_441_with_last_reply(
        relay, sink_factory, provision, closed_port):
    busy = await sink_factory("tempfail")
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        sink_upstream(busy, priority=1)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert "Sink is having a bad day" in r.text        # the last upstream's reply
    assert busy.messages == []
    await c.close()


async def test_deferral_quotes_the_last_upstream_not_the_first(
        relay, sink_factory, provision, closed_port):
    busy = await sink_factory("tempfail")
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(busy, priority=0),
        {"host": "127.0.0.1", "port": closed_port, "priority": 1}])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert "bad day" not in r.text
    assert "connect" in r.text.lower()
    assert busy.connections == 1
    await c.close()


async def test_permanent_refusal_554_without_failover(relay, sink_factory, provision):
    refusing = await sink_factory("permfail")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(refusing, priority=0), sink_upstream(spare, priority=1)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert r.code == 554, r
    assert r.enhanced.startswith("5.")
    assert "Sink refuses this message" in r.text
    assert spare.connections == 0 and spare.messages == []
    # A 5xx is about the message, not the server: no error counted.
    u = await upstream_by_port(relay, tenant.idapp, refusing.port)
    assert u.numerrors == 0
    assert relay.store.held(tenant.user) == 0 and await sent_total(relay, tenant.user) == 0
    await c.close()


async def test_no_upstream_451_435_at_mail(relay, provision):
    tenant = await provision(relay, plan="free")
    c = await authed(relay, tenant)
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (451, "4.3.5"), r
    await c.close()


async def test_only_disabled_upstreams_is_no_upstream(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink, status="D")])
    c = await authed(relay, tenant)
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (451, "4.3.5"), r
    await c.close()


async def test_free_owner_never_uses_system_smtps(relay_factory, sink_factory, provision):
    system = await sink_factory()
    relay = await relay_factory(system_smtps=[{"host": "127.0.0.1", "port": system.port}])
    tenant = await provision(relay, plan="free")
    c = await authed(relay, tenant)
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (451, "4.3.5"), r
    await c.close()
    assert system.connections == 0


async def test_paid_owner_without_upstreams_uses_system_smtps(relay_factory, sink_factory,
                                                              provision):
    system = await sink_factory()
    relay = await relay_factory(system_smtps=[{"host": "127.0.0.1", "port": system.port}])
    tenant = await provision(relay, plan="paid")
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert r.code == 250, r
    assert [(m.mail_from, m.rcpt_tos, without_trace(m.data)) for m in system.messages] == [
        (SENDER, ["to@example.net"], MSG)]
    await c.close()


async def test_upstream_removed_after_mail_gives_451_435_and_releases(relay, sink_factory,
                                                                      provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net>")).code == 250
    u = await upstream_by_port(relay, tenant.idapp, sink.port)
    await relay.store.remove_upstream(u.idsmtp)
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (451, "4.3.5"), r
    assert relay.store.held(tenant.user) == 0 and await sent_total(relay, tenant.user) == 0
    await c.close()


async def test_delivered_250_queued_as_session_id(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r1 = await c.send_message(SENDER, ["to@example.net"], MSG)
    r2 = await c.send_message(SENDER, ["to@example.net"], MSG)
    m1 = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", r1.text)
    m2 = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", r2.text)
    assert r1.code == r2.code == 250 and m1 and m2, (r1, r2)
    assert m1.group(1) != m2.group(1), "each message of a session has its own id"
    assert len(sink.messages) == 2
    await c.close()


# ------------------------------------------------------------------ limits read at use time

async def test_disabling_a_user_takes_effect_on_the_next_rcpt(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net>")).code == 250
    await relay.store.update_user(tenant.user, tenant.owner_id, status="Disable")
    r = await c.cmd("RCPT TO:<b@example.net>")
    assert (r.code, r.enhanced) == (525, "5.7.13"), r
    # ...and the message whose first recipient was accepted is not sent.
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (525, "5.7.13"), r
    assert sink.messages == []
    assert relay.store.held(tenant.user) == 0 and await sent_total(relay, tenant.user) == 0
    # The next MAIL of the same session is refused too.
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (525, "5.7.13"), r
    await c.close()


async def test_lowering_limits_takes_effect_on_the_next_rcpt(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, hourly=10, total=10, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    await relay.store.update_user(tenant.user, tenant.owner_id, hourly_limit=2)
    r = await c.cmd("RCPT TO:<c@example.net>")
    assert (r.code, r.enhanced) == (451, "4.7.1"), r
    await relay.store.update_user(tenant.user, tenant.owner_id, hourly_limit=10, total_limit=2)
    r = await c.cmd("RCPT TO:<d@example.net>")
    assert (r.code, r.enhanced) == (550, "5.7.1"), r
    await relay.store.update_user(tenant.user, tenant.owner_id, total_limit=3)
    assert (await c.cmd("RCPT TO:<e@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n")
    assert (await c.reply()).code == 250
    assert sink.messages[0].rcpt_tos == ["a@example.net", "b@example.net", "e@example.net"]
    await c.close()


async def test_disabling_between_auth_and_mail(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    await relay.store.update_user(tenant.user, tenant.owner_id, status="Disable")
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (525, "5.7.13"), r
    await c.close()
