"""SPEC 2-3.7: upstream TLS (STARTTLS and implicit), certificate
verification and upstream AUTH, against recording aiosmtpd sinks that use a
throw-away trustme CA. A TLS or AUTH failure is transient: it is counted
and the next upstream is tried; with none left the client gets 451 4.4.1.
"""

from __future__ import annotations

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import authed, upstream_by_port, without_trace

SENDER = "app@example.com"
MSG = simple_message()


async def send(relay, tenant):
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["to@example.net"], MSG)
    await c.close()
    return r


@pytest.mark.parametrize("tls, fields", [
    ("starttls", {"startstls": True}),
    ("implicit", {"ssltls": True}),
], ids=["starttls", "implicit"])
async def test_tls_without_verification_delivers_over_tls(relay, sink_factory, provision,
                                                          tls, fields):
    sink = await sink_factory(tls=tls)
    tenant = await provision(relay, upstreams=[sink_upstream(sink, verify_tls=False, **fields)])
    r = await send(relay, tenant)
    assert r.code == 250, r
    assert len(sink.messages) == 1
    if tls == "starttls":
        assert sink.messages[0].tls is True
    # (An implicit-TLS sink speaks nothing but TLS, so delivery proves it;
    # conftest's Received.tls only sees STARTTLS sessions.)
    assert without_trace(sink.messages[0].data) == MSG


@pytest.mark.parametrize("tls, fields", [
    ("starttls", {"startstls": True}),
    ("implicit", {"ssltls": True}),
], ids=["starttls", "implicit"])
async def test_untrusted_certificate_is_a_transient_failure(relay, sink_factory, provision,
                                                            tls, fields):
    """verify_tls defaults to true; the trustme CA is not in the system trust
    store, so the handshake fails: 451 4.4.1, counted, nothing delivered."""
    sink = await sink_factory(tls=tls)
    tenant = await provision(relay, upstreams=[sink_upstream(sink, **fields)])
    r = await send(relay, tenant)
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert sink.messages == []
    assert (await upstream_by_port(relay, tenant.idapp, sink.port)).numerrors == 1


async def test_tls_failure_fails_over_to_the_next_upstream(relay, sink_factory, provision):
    untrusted = await sink_factory(tls="starttls")
    plain = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(untrusted, startstls=True, priority=0),
        sink_upstream(plain, priority=1)])
    assert (await send(relay, tenant)).code == 250
    assert untrusted.messages == [] and len(plain.messages) == 1


async def test_plain_upstream_is_not_silently_upgraded(relay, sink_factory, provision):
    """startstls: false means plain even when the server offers STARTTLS
    (aiosmtplib's start_tls=None default would upgrade, PITFALLS).

    The sink offers STARTTLS with a certificate but takes plain sessions,
    and verify_tls is off, so an upgrade would succeed and deliver: only
    the session's TLS flag tells the two apart."""
    sink = await sink_factory(tls="starttls", require_starttls=False)
    tenant = await provision(relay, upstreams=[
        sink_upstream(sink, startstls=False, verify_tls=False)])
    r = await send(relay, tenant)
    assert r.code == 250, r
    assert [(without_trace(m.data), m.tls) for m in sink.messages] == [(MSG, False)]


async def test_upstream_auth_with_right_credentials(relay, sink_factory, provision):
    sink = await sink_factory(username="relay-user", password="s3cret-upstream")
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, auth=True, username="relay-user", password="s3cret-upstream")])
    r = await send(relay, tenant)
    assert r.code == 250, r
    assert sink.messages[0].auth == "relay-user"


async def test_upstream_auth_over_starttls(relay, sink_factory, provision):
    sink = await sink_factory(tls="starttls", username="relay-user", password="pw")
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, auth=True, username="relay-user", password="pw", startstls=True,
        verify_tls=False)])
    assert (await send(relay, tenant)).code == 250
    got = sink.messages[0]
    assert (got.auth, got.tls) == ("relay-user", True)


async def test_upstream_auth_failure_is_transient_and_fails_over(relay, sink_factory,
                                                                 provision):
    locked = await sink_factory(username="relay-user", password="right")
    spare = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(locked, auth=True, username="relay-user", password="wrong", priority=0),
        sink_upstream(spare, priority=1)])
    r = await send(relay, tenant)
    assert r.code == 250, r
    assert locked.messages == [] and len(spare.messages) == 1
    assert (await upstream_by_port(relay, tenant.idapp, locked.port)).numerrors == 1


async def test_upstream_auth_failure_alone_is_451_441(relay, sink_factory, provision):
    locked = await sink_factory(username="relay-user", password="right")
    tenant = await provision(relay, upstreams=[
        sink_upstream(locked, auth=True, username="relay-user", password="wrong")])
    r = await send(relay, tenant)
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert "AUTH" in r.text
    assert "wrong" not in r.text       # the upstream password is not echoed
