"""SPEC 3.1-3.3: the greeting's capabilities on plain, STARTTLS and
implicit-TLS listeners, and AUTH: its forms, wrong credentials, disabled
users, lockouts, mechanism names and what the auth-failure log names;
against a real relayd on loopback, read with a raw client
(helpers_smtp.RawSMTP) so that every code is seen as relayd wrote it.
"""

from __future__ import annotations

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import RawSMTP, b64, plain_blob, without_trace

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
