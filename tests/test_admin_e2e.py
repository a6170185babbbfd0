"""End to end: records made only through the admin socket, then real mail
through relayd to recording upstreams."""

from __future__ import annotations

import aiosmtplib
import pytest

from admin_client import AdminClient, delta, new_app, new_owner, scrape, unix_client
from conftest import Tenant, simple_message, smtp_client
from helpers_smtp import without_trace


async def make_user(c: AdminClient, owner, idapp: str, **limits) -> Tenant:
    r = await c.request("POST", "/settings/addSmtp", json={
        **owner.creds, "idapp": idapp, "total_limit": 100, "hourly_limit": 10, **limits})
    assert r.status == 200, r.body
    body = r.json()
    return Tenant(owner.owner_id, owner.token, idapp, body["smtp_user_name"],
                  body["smtp_password"])


async def test_provisioned_through_the_api_mail_arrives(relay, sink_factory):
    sink = await sink_factory()
    async with unix_client(relay) as c:
        owner = await new_owner(c, "free")
        idapp = await new_app(c, owner, name="shop", test_email="qa@example.net")
        r = await c.request("POST", "/private/smtps/save", headers=owner.headers, json={
            "idapp": idapp, "host": "127.0.0.1", "port": sink.port, "auth": False,
            "startstls": False, "sslTls": False, "defaultfromemail": "noreply@example.com"})
        assert r.status == 200, r.body
        tenant = await make_user(c, owner, idapp)

        # The registry is process-wide: other tests' relays count there too.
        before = await scrape(relay.metrics_port)
        client = await smtp_client(relay, tenant)
        errors, reply = await client.sendmail("app@example.com",
                                              ["a@example.net", "b@example.net"],
                                              simple_message())
        await client.quit()
        assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
        assert len(sink.messages) == 1
        assert sink.messages[0].rcpt_tos == ["a@example.net", "b@example.net"]
        assert without_trace(sink.messages[0].data) == simple_message()

        r = await c.request("POST", "/settings/listSmtp", json=owner.creds)
        row = r.json()["smtp_list"][0]
        assert (row["sent_total"], row["sent_last_hour"]) == (2, 2)

        after = await scrape(relay.metrics_port)
        assert delta(before, after, "relayd_messages_total", result="delivered") == 1

        # The old password stops working as soon as it is reset.
        r = await c.request("POST", "/settings/resetSmtpPassword",
                            json={**owner.creds, "smtp_user_name": tenant.user})
        new_password = r.json()["smtp_password"]
        client = await smtp_client(relay)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login(tenant.user, tenant.password)
        client.close()
        client = await smtp_client(relay)
        await client.login(tenant.user, new_password)

        # Disabling takes effect on the next command of an open session.
        r = await c.request("POST", "/settings/editSmtp", json={
            **owner.creds, "smtp_user_name": tenant.user, "status": "Disable"})
        assert r.status == 200
        with pytest.raises(aiosmtplib.SMTPResponseException):
            await client.sendmail("app@example.com", ["c@example.net"], simple_message())
        client.close()
    assert len(sink.messages) == 1


async def test_domain_settings_route_first(relay, sink_factory):
    app_sink, domain_sink = await sink_factory(), await sink_factory()
    async with unix_client(relay) as c:
        owner = await new_owner(c, "paid")
        r = await c.request("POST", "/private/smtps/save", headers=owner.headers, json={
            "idapp": owner.idapp, "host": "127.0.0.1", "port": app_sink.port})
        assert r.status == 200
        r = await c.request("POST", "/api/v2/email/settings", query={"domain": "example.org"},
                            headers=owner.headers, json={
                                "provider": "smtp", "from": "pbx@example.org",
                                "options": {"host": "127.0.0.1", "port": domain_sink.port,
                                            "secure": False}})
        assert r.status == 200, r.body
        tenant = await make_user(c, owner, owner.idapp)
    client = await smtp_client(relay, tenant)
    await client.sendmail("pbx@example.org", ["x@example.net"],
                          simple_message(sender="pbx@example.org"))
    await client.sendmail("app@example.com", ["y@example.net"], simple_message())
    await client.quit()
    assert [m.rcpt_tos for m in domain_sink.messages] == [["x@example.net"]]
    assert [m.rcpt_tos for m in app_sink.messages] == [["y@example.net"]]
