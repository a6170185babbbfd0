"""SPEC 3: every reply code of the SMTP session, each provoked by the input
that triggers it, against a real relayd and real recording upstreams on
loopback. Also the hostile-bytes tests of the session (STYLE 12): DATA
framing and SMTP smuggling, bare LF, HTTP and TLS bytes on the SMTP port.

Replies are read with a raw client (helpers_smtp.RawSMTP) so that every code
and enhanced code is seen exactly as relayd wrote it.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from conftest import simple_message, sink_upstream
from helpers_records import sent_total
from helpers_smtp import (
    SMUGGLED, ConnectionClosed, RawSMTP, authed, b64, dot_stuff, normalised, plain_blob,
    upstream_by_port, wait_for, without_trace)

SENDER = "app@example.com"
MSG = simple_message()


def ehlo_keywords(reply) -> dict[str, str]:
    """EHLO keyword -> parameters (first line is the greeting)."""
    out = {}
    for line in reply.lines[1:]:
        key, _, params = line.partition(" ")
        out[key.upper()] = params
    return out


async def tls_relay(relay_factory, tls_files):
    """One relayd with a plain loopback listener (0), a STARTTLS listener
    that requires TLS for AUTH (1) and an implicit-TLS listener (2)."""
    cert, key = tls_files
    return await relay_factory(
        listen=[
            {"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False},
            {"address": "127.0.0.1:0", "tls": "starttls", "auth_require_tls": True},
            {"address": "127.0.0.1:0", "tls": "implicit"},
        ],
        tls={"cert": cert, "key": key})


# ------------------------------------------------------------------ EHLO / TLS / AUTH

async def test_ehlo_on_plain_loopback_listener_advertises_auth_and_size(relay_factory):
    relay = await relay_factory(limits={"max_message_size": 123456})
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner.code == 220
    kw = ehlo_keywords(await c.ehlo())
    assert kw["AUTH"] == "PLAIN LOGIN"
    assert kw["SIZE"] == "123456"
    await c.close()


async def test_starttls_listener_hides_auth_until_tls(relay_factory, tls_files, client_ssl,
                                                      sink_factory, provision):
    relay = await tls_relay(relay_factory, tls_files)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[1])
    kw = ehlo_keywords(await c.ehlo())
    assert "STARTTLS" in kw
    assert "AUTH" not in kw
    assert "SIZE" in kw
    r = await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password))
    assert (r.code, r.enhanced) == (538, "5.7.11")
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (530, "5.7.0")

    await c.starttls(client_ssl)
    kw = ehlo_keywords(await c.ehlo())
    assert kw["AUTH"] == "PLAIN LOGIN"
    assert "STARTTLS" not in kw
    await c.login(tenant.user, tenant.password)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert (r.code, r.enhanced) == (250, "2.0.0"), r
    assert len(sink.messages) == 1
    await c.close()


async def test_implicit_tls_listener(relay_factory, tls_files, client_ssl, sink_factory,
                                     provision):
    relay = await tls_relay(relay_factory, tls_files)
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await RawSMTP.open(relay.smtp_ports[2], ssl_ctx=client_ssl)
    assert c.banner.code == 220
    assert c.writer.get_extra_info("ssl_object") is not None
    kw = ehlo_keywords(await c.ehlo())
    assert kw["AUTH"] == "PLAIN LOGIN"
    assert "STARTTLS" not in kw
    await c.login(tenant.user, tenant.password)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    assert r.code == 250, r
    assert without_trace(sink.messages[0].data) == MSG
    await c.close()


async def _auth(c: RawSMTP, form: str, user: str, password: str):
    """Run one AUTH exchange in ``form``; return the final reply."""
    if form == "plain-initial":
        return await c.cmd(b"AUTH PLAIN " + plain_blob(user, password))
    if form == "plain-challenge":
        r = await c.cmd("AUTH PLAIN")
        assert r.code == 334, r
        return await c.cmd(plain_blob(user, password))
    if form == "login-initial":
        r = await c.cmd(b"AUTH LOGIN " + b64(user))
        assert r.code == 334, r
        return await c.cmd(b64(password))
    if form == "login-challenge":
        r = await c.cmd("AUTH LOGIN")
        assert r.code == 334, r
        r = await c.cmd(b64(user))
        assert r.code == 334, r
        return await c.cmd(b64(password))
    raise AssertionError(form)


AUTH_FORMS = ["plain-initial", "plain-challenge", "login-initial", "login-challenge"]


@pytest.mark.parametrize("form", AUTH_FORMS)
async def test_auth_forms_accept_right_and_refuse_wrong_credentials(relay, provision, form):
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    r = await _auth(c, form, tenant.user, tenant.password + "x")
    assert (r.code, r.enhanced) == (535, "5.7.8"), r
    r = await _auth(c, form, "smtp0000000000", tenant.password)        # unknown user
    assert (r.code, r.enhanced) == (535, "5.7.8"), r
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (530, "5.7.0"), "a failed AUTH must not authenticate"
    r = await _auth(c, form, tenant.user, tenant.password)
    assert (r.code, r.enhanced) == (235, "2.7.0"), r
    await c.close()


async def test_auth_with_undecodable_base64_is_a_syntax_error_not_a_hang(relay, provision):
    await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    r = await c.cmd("AUTH PLAIN !!!not-base64!!!")
    assert r.code == 501, r
    r = await c.cmd("NOOP")
    assert r.code == 250
    await c.close()


async def test_disabled_user_gets_525_at_auth(relay_factory, provision):
    relay = await relay_factory(auth_failures={"max": 2, "window": 600})
    tenant = await provision(relay)
    await relay.store.update_user(tenant.user, tenant.owner_id, status="Disable")
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    for form in ("plain-initial", "login-challenge"):
        r = await _auth(c, form, tenant.user, tenant.password)
        assert (r.code, r.enhanced) == (525, "5.7.13"), r
    # A disabled user's right password is not a failed AUTH: two of them with
    # auth_failures.max 2 do not lock the address out.
    await relay.store.update_user(tenant.user, tenant.owner_id, status="Enable")
    await c.login(tenant.user, tenant.password)
    await c.close()


async def test_lockout_after_max_failures(relay_factory, provision):
    relay = await relay_factory(auth_failures={"max": 3, "window": 600})
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    for _ in range(3):
        r = await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))
        assert (r.code, r.enhanced) == (535, "5.7.8"), r
    # Locked out: even the right password is refused, and the connection closed.
    r = await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password))
    assert (r.code, r.enhanced) == (421, "4.7.0"), r
    assert await c.at_eof()
    await c.close()
    # A new connection from the same address is refused on the banner.
    c2 = await RawSMTP.open(relay.smtp_ports[0])
    assert (c2.banner.code, c2.banner.enhanced) == (421, "4.7.0"), c2.banner
    assert await c2.at_eof()
    await c2.close()


async def test_failures_below_the_maximum_do_not_lock_out(relay_factory, provision):
    relay = await relay_factory(auth_failures={"max": 3, "window": 600})
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    for _ in range(2):
        r = await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))
        assert r.code == 535
    await c.login(tenant.user, tenant.password)
    await c.close()
    c2 = await RawSMTP.open(relay.smtp_ports[0])
    assert c2.banner.code == 220
    await c2.close()


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


# ------------------------------------------------------------------ addresses

@pytest.mark.parametrize("address", ["a\x00b@example.com", "a\tb@example.com"])
async def test_control_characters_in_addresses_are_refused(relay, sink_factory, provision,
                                                           address):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    # The command is well-formed (aiosmtpd's 501 is for syntax errors), so it
    # is relayd's own address check that refuses it: 553, with the sender's
    # or the recipient's enhanced code.
    r = await c.cmd(f"MAIL FROM:<{address}>".encode())
    assert (r.code, r.enhanced) == (553, "5.1.7"), r
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    r = await c.cmd(f"RCPT TO:<{address}>".encode())
    assert (r.code, r.enhanced) == (553, "5.1.3"), r
    assert relay.store.held(tenant.user) == 0
    await c.close()


# ------------------------------------------------------------------ DATA framing / smuggling

@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
                                      b"\n.\r", b"\r.\r"],
                         ids=repr)
async def test_only_crlf_dot_crlf_ends_data(relay, sink_factory, provision, fake_end):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    body = MSG + b"first part" + fake_end + SMUGGLED + b"last line\r\n"
    r = await c.send_message(SENDER, ["to@example.net"], body)
    # SPEC 3.10 allows refusing such a body or relaying it once, intact;
    # relayd relays it (README "DATA framing"): one message, the fake marker
    # inside it, line endings made CRLF.
    assert r.code == 250 and "queued as" in r.text, r
    assert [(m.mail_from, m.rcpt_tos, without_trace(m.data)) for m in sink.messages] == [
        (SENDER, ["to@example.net"], normalised(body))]
    # The smuggled commands were never executed; the session is in step.
    r = await c.cmd("QUIT")
    assert r.code == 221
    assert len(sink.messages) == 1
    await c.close()


async def test_bare_lf_data_command_never_opens_data(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    c.write(b"DATA\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (500, "5.5.2"), r
    # What follows is not a message, nor commands: relayd has closed the
    # connection (README: its body would run as commands), so not one more
    # reply comes.
    c.write(MSG + b".\r\n" + SMUGGLED + b".\r\n")
    with pytest.raises((ConnectionClosed, ConnectionError)):
        await c.reply()
    await c.close()
    await wait_for(lambda: not relay.sessions)
    assert sink.messages == []
    assert relay.store.held(tenant.user) == 0


async def test_nul_and_8bit_bytes_are_relayed_intact(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    body = MSG + b"nul:\x00: high:\xff\xfe\x80: utf8:" + "日本語".encode() + b"\r\n"
    r = await c.send_message(SENDER, ["to@example.net"], body)
    # SPEC 3.10 allows refusing or relaying; relayd relays (README).
    assert r.code == 250 and "queued as" in r.text, r
    assert [without_trace(m.data) for m in sink.messages] == [body]
    await c.close()


async def test_dot_stuffing_is_undone_exactly_once(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    original = (b"From: app@example.com\r\nSubject: dots\r\n\r\n"
                b".\r\n"
                b"..\r\n"
                b".leading dot\r\n"
                b"..two leading dots\r\n"
                b"...\r\n"
                b"a line with . inside\r\n"
                b".\r\n")
    r = await c.send_message(SENDER, ["to@example.net"], dot_stuff(original))
    assert r.code == 250, r
    assert without_trace(sink.messages[0].data) == original
    await c.close()


async def test_body_line_dot_dot_arrives_as_dot(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    # Raw, as a client writes it: the first DATA line itself is stuffed.
    r = await c.send_message(SENDER, ["to@example.net"],
                             b"..first\r\nSubject: x\r\n\r\n..\r\n..x\r\n")
    assert r.code == 250, r
    assert without_trace(sink.messages[0].data) == b".first\r\nSubject: x\r\n\r\n.\r\n.x\r\n"
    await c.close()


async def test_empty_message(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], b"")
    assert r.code == 250, r
    assert len(sink.messages) == 1 and without_trace(sink.messages[0].data).strip() == b""
    await c.close()


@pytest.mark.parametrize("after", [b"QUIT\r\n", b"MAIL FROM:<app@example.com>\r\nQUIT\r\n"])
async def test_commands_pipelined_after_the_end_marker_are_processed(relay, sink_factory,
                                                                     provision, after):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(MSG + b".\r\n" + after)        # one write
    r = await c.reply()
    assert r.code == 250 and "queued as" in r.text, r
    if after.startswith(b"MAIL"):
        assert (await c.reply()).code == 250
    r = await c.reply()
    assert r.code == 221, r
    assert await c.at_eof()
    assert [without_trace(m.data) for m in sink.messages] == [MSG]
    await c.close()


async def test_end_marker_split_across_writes(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    for cut in (1, 2, 3, 4):         # split "\r\n.\r\n" after each of its bytes
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await c.cmd("RCPT TO:<to@example.net>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        data = MSG[:-2] + b"\r\n.\r\n"
        c.write(data[:len(MSG) - 2 + cut])
        await c.writer.drain()
        await asyncio.sleep(0.01)    # let the first part be read on its own
        c.write(data[len(MSG) - 2 + cut:])
        r = await c.reply()
        assert r.code == 250, (cut, r)
    assert [without_trace(m.data) for m in sink.messages] == [MSG] * 4
    await c.close()


async def test_http_request_on_the_smtp_port(relay, sink_factory, provision):
    c = await RawSMTP.open(relay.smtp_ports[0])
    c.write(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    for _ in range(3):
        r = await c.reply()
        assert r.code >= 500, r
    await c.close()
    # relayd is unharmed.
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    assert (await c.send_message(SENDER, ["to@example.net"], MSG)).code == 250
    await c.close()


async def test_tls_client_hello_on_plain_port(relay):
    c = await RawSMTP.open(relay.smtp_ports[0])
    # The start of a TLS 1.2 ClientHello record, then a line end so that the
    # command reader gets a "line".
    c.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n")
    r = await c.reply()
    assert r.code >= 500, r
    await c.close()
    await wait_for(lambda: not relay.sessions)
    c = await RawSMTP.open(relay.smtp_ports[0])
    assert c.banner.code == 220
    await c.close()


async def test_auth_mechanism_names_are_case_insensitive(relay, provision):
    # RFC 4422 3.1: "auth plain" is AUTH PLAIN (Postfix accepts it too).
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    r = await c.cmd(b"auth plain " + plain_blob(tenant.user, tenant.password))
    assert (r.code, r.enhanced) == (235, "2.7.0"), r
    await c.close()


async def test_failed_auth_logs_only_real_user_names(relay, provision, caplog):
    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    # A password typed into the user field must not reach the log.
    typed = "correct-horse-battery-staple"
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob(typed, "x"))).code == 535
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))).code == 535
    await c.close()
    logged = "\n".join(r.getMessage() + str(getattr(r, "logfmt", "")) for r in caplog.records)
    assert typed not in logged
    assert "(unknown)" in logged and tenant.user in logged
