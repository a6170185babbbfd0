"""SPEC 4.4 operator API, the admin listeners themselves, and SPEC 5's
/metrics and /healthz."""

from __future__ import annotations

import os
import socket
import stat

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from admin_client import AdminClient, new_app, new_owner
from conftest import base_config
from relayd import config as config_mod
from relayd.daemon import Relay
from relayd.errors import NotFound


def assert_error(r, status):
    assert r.status == status, r.body
    body = r.json()
    assert body["status"] == "error" and body["message"]
    return body


# ---------------------------------------------------------------- owners

async def test_owner_create_returns_token_once(relay, admin):
    r = await admin.request("POST", "/admin/owners", json={"plan": "paid"})
    assert r.status == 201
    body = r.json()
    assert set(body) == {"owner_id", "token", "plan", "idapp"}
    assert body["plan"] == "paid"
    assert await relay.store.authenticate_owner(body["owner_id"], body["token"]) is not None
    assert (await relay.store.get_app(body["idapp"])).owner_id == body["owner_id"]
    r = await admin.request("POST", "/admin/owners", json={})
    assert r.status == 201 and r.json()["plan"] == "free"


async def test_owner_list_and_get_never_show_tokens(admin, owner):
    r = await admin.request("GET", "/admin/owners")
    assert r.status == 200
    rows = r.json()
    assert [x["owner_id"] for x in rows] == [owner.owner_id]
    assert rows[0] == {"owner_id": owner.owner_id, "plan": "free", "idapp": owner.idapp,
                       "apps": 1, "created": rows[0]["created"]}
    assert owner.token.encode() not in r.body
    r = await admin.request("GET", f"/admin/owners/{owner.owner_id}")
    assert r.status == 200 and r.json() == rows[0]
    assert_error(await admin.request("GET", "/admin/owners/" + "0" * 24), 404)


async def test_owner_set_plan(admin, owner):
    r = await admin.request("PATCH", f"/admin/owners/{owner.owner_id}", json={"plan": "paid"})
    assert r.status == 200 and r.json()["plan"] == "paid"
    assert_error(await admin.request("PATCH", f"/admin/owners/{owner.owner_id}",
                                     json={"plan": "gold"}), 400)
    assert_error(await admin.request("PATCH", "/admin/owners/" + "0" * 24,
                                     json={"plan": "free"}), 404)


async def test_owner_remove_takes_everything(relay, admin, owner):
    r = await admin.request("POST", "/settings/addSmtp", json={**owner.creds, "total_limit": 1,
                                                               "hourly_limit": 1})
    name = r.json()["smtp_user_name"]
    r = await admin.request("DELETE", f"/admin/owners/{owner.owner_id}")
    assert r.status == 200 and r.json() == {"owner_id": owner.owner_id, "removed": True}
    assert relay.store.get_user(name) is None
    with pytest.raises(NotFound):
        await relay.store.get_app(owner.idapp)
    assert_error(await admin.request("DELETE", f"/admin/owners/{owner.owner_id}"), 404)
    r = await admin.request("POST", "/settings/listSmtp", json=owner.creds)
    assert r.status == 401


# ---------------------------------------------------------------- apps

async def test_apps(admin, owner):
    r = await admin.request("POST", "/admin/apps", json={
        "owner_id": owner.owner_id, "name": "shop", "test_email": "qa@example.com"})
    assert r.status == 201
    app = r.json()
    assert set(app) == {"idapp", "owner_id", "name", "strategy", "test_email", "created"}
    assert (app["name"], app["strategy"], app["test_email"]) == ("shop", "random",
                                                                 "qa@example.com")
    r = await admin.request("GET", "/admin/apps", query={"owner_id": owner.owner_id})
    assert [a["idapp"] for a in r.json()] == [owner.idapp, app["idapp"]]
    r = await admin.request("PATCH", f"/admin/apps/{app['idapp']}",
                            json={"test_email": "ops@example.com", "name": "store"})
    assert r.status == 200
    assert (r.json()["test_email"], r.json()["name"]) == ("ops@example.com", "store")
    r = await admin.request("GET", f"/admin/apps/{app['idapp']}")
    assert r.json()["name"] == "store"
    assert_error(await admin.request("GET", "/admin/apps", query={"owner_id": "0" * 24}), 404)
    assert_error(await admin.request("GET", "/admin/apps/" + "0" * 24), 404)


@pytest.mark.parametrize("fields", [
    {"test_email": "nope"}, {"test_email": "a@b.example\r\nBcc: c@d.example"},
    {"name": "x\ny"}, {"strategy": "round-robin"}, {"name": None}, {"extra": 1},
])
async def test_app_validation(admin, owner, fields):
    r = await admin.request("POST", "/admin/apps", json={
        "owner_id": owner.owner_id, "name": "a", **fields})
    assert_error(r, 400)


async def test_priority_strategy_needs_paid_plan(admin, owner):
    r = await admin.request("POST", "/admin/apps", json={
        "owner_id": owner.owner_id, "name": "p", "strategy": "priority"})
    body = assert_error(r, 409)
    assert body["code"] == 3 and "paid plan" in body["message"]
    r = await admin.request("PATCH", f"/admin/apps/{owner.idapp}", json={"strategy": "priority"})
    assert_error(r, 409)
    await admin.request("PATCH", f"/admin/owners/{owner.owner_id}", json={"plan": "paid"})
    r = await admin.request("PATCH", f"/admin/apps/{owner.idapp}", json={"strategy": "priority"})
    assert r.status == 200 and r.json()["strategy"] == "priority"
    # Back to free while an app uses priority: refused, with the reason.
    r = await admin.request("PATCH", f"/admin/owners/{owner.owner_id}", json={"plan": "free"})
    assert owner.idapp in assert_error(r, 409)["message"]


async def test_app_remove(relay, admin, owner):
    assert_error(await admin.request("DELETE", f"/admin/apps/{owner.idapp}"), 409)
    idapp = await new_app(admin, owner)
    r = await admin.request("POST", "/settings/addSmtp", json={
        **owner.creds, "total_limit": 1, "hourly_limit": 1, "idapp": idapp})
    name = r.json()["smtp_user_name"]
    r = await admin.request("DELETE", f"/admin/apps/{idapp}")
    assert r.status == 200 and r.json() == {"idapp": idapp, "removed": True}
    assert relay.store.get_user(name) is None


# ---------------------------------------------------------------- lookups

async def test_lookups(admin, owner):
    r = await admin.request("POST", "/settings/addSmtp", json={**owner.creds, "total_limit": 3,
                                                               "hourly_limit": 2})
    name = r.json()["smtp_user_name"]
    r = await admin.request("GET", f"/admin/users/{name}")
    assert r.status == 200
    assert (r.json()["owner_id"], r.json()["total_limit"]) == (owner.owner_id, 3)
    assert b"password" not in r.body
    assert_error(await admin.request("GET", "/admin/users/smtp1"), 404)
    r = await admin.request("POST", "/private/smtps/save", headers=owner.headers, json={
        "idapp": owner.idapp, "host": "h.example", "port": 25, "password": "s3cret"})
    idsmtp = r.json()["_id"]
    r = await admin.request("GET", f"/admin/smtps/{idsmtp}")
    assert r.json()["owner_id"] == owner.owner_id and r.json()["password"] == "********"
    assert b"s3cret" not in r.body
    await admin.request("POST", "/api/v2/email/settings", query={"domain": "d.example"},
                        headers=owner.headers,
                        json={"options": {"host": "h.example", "auth": {"user": "u",
                                                                        "pass": "s3cret"}}})
    r = await admin.request("GET", "/admin/domains", query={"owner_id": owner.owner_id})
    assert [d["domain"] for d in r.json()] == ["d.example"]
    assert b"s3cret" not in r.body


# ---------------------------------------------------------------- status

async def test_status(relay, admin, owner):
    await admin.request("POST", "/private/smtps/save", headers=owner.headers, json={
        "idapp": owner.idapp, "host": "h.example", "port": 25})
    r = await admin.request("GET", "/admin/status")
    assert r.status == 200
    body = r.json()
    assert body["config_generation"] == 1 and type(body["config_generation"]) is int
    kinds = {x["kind"]: x for x in body["listeners"]}
    assert kinds["smtp"]["port"] == relay.smtp_ports[0]
    assert kinds["metrics"]["port"] == relay.metrics_port
    assert kinds["admin"]["socket"] == relay.config.admin.socket
    assert [u["host"] for u in body["upstreams"]] == ["h.example"]
    assert body["upstreams"][0]["numerrors"] == 0
    relay.generation += 1          # what a successful SIGHUP reload does
    r = await admin.request("GET", "/admin/status")
    assert r.json()["config_generation"] == 2


async def test_operator_errors(admin):
    assert_error(await admin.request("GET", "/admin/nope"), 404)
    r = await admin.request("PUT", "/admin/owners")
    assert_error(r, 405)
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert_error(await admin.request("POST", "/admin/owners", body=b"{",
                                     headers={"Content-Type": "application/json"}), 400)
    assert_error(await admin.request("POST", "/admin/owners", json={"plan": True}), 400)


async def test_internal_error_does_not_leak(relay, admin, monkeypatch):
    async def broken():
        raise RuntimeError("secret /var/lib/relayd detail")
    monkeypatch.setattr(relay.store, "list_owners", broken)
    r = await admin.request("GET", "/admin/owners")
    assert r.status == 500 and r.json() == {"status": "error", "message": "internal error"}


# ---------------------------------------------------------------- listeners

async def test_tcp_listener_is_tenant_only(relay_factory):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    async with AdminClient(relay.config.admin.socket) as unix:
        owner = await new_owner(unix)
    async with AdminClient(host="127.0.0.1", port=relay.admin_tcp_port) as tcp:
        for method, path in (("GET", "/admin/status"), ("GET", "/admin/owners"),
                             ("POST", "/admin/owners")):
            r = await tcp.request(method, path, json={})
            assert r.status == 404
        r = await tcp.request("POST", "/settings/listSmtp", json=owner.creds)
        assert r.status == 200 and r.json()["status"] == "success"
        r = await tcp.request("GET", "/private/smtps/findByApp", query={"idapp": owner.idapp},
                              headers=owner.headers)
        assert r.status == 200 and r.json() == []


async def test_socket_mode_and_private_parent(relay_factory, tmp_path):
    path = tmp_path / "fresh" / "run" / "admin.sock"
    relay = await relay_factory(admin={"socket": str(path), "mode": "0600"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert relay.admin_socket == str(path)


async def test_default_socket_mode_and_removal_on_close(relay):
    path = relay.config.admin.socket
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    await relay.close()
    assert not os.path.exists(path)


async def test_stale_socket_is_replaced_live_one_is_not(relay_factory, tmp_path):
    path = tmp_path / "s" / "admin.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                        # the file stays, nobody listens
    relay = await relay_factory(admin={"socket": str(path)})
    async with AdminClient(str(path)) as c:
        assert (await c.request("GET", "/admin/status")).status == 200
    await fails_to_start(tmp_path, "in use", admin={"socket": str(path)})
    async with AdminClient(str(path)) as c:       # the first relayd still owns it
        assert (await c.request("GET", "/admin/status")).status == 200
    assert relay.admin_socket == str(path)


async def test_regular_file_is_never_replaced(tmp_path):
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    await fails_to_start(tmp_path, "not a socket", admin={"socket": str(path)})
    assert path.read_text() == "precious"


async def fails_to_start(tmp_path, reason, **overrides):
    relay = Relay(config_mod.parse(base_config(tmp_path, **overrides)))
    try:
        with pytest.raises(OSError, match=reason):
            await relay.start()
    finally:
        await relay.close()      # what start opened before the admin socket failed


# ---------------------------------------------------------------- metrics

async def test_metrics_and_healthz(relay):
    async with AdminClient(host="127.0.0.1", port=relay.metrics_port) as m:
        r = await m.request("GET", "/metrics")
        assert r.status == 200
        assert r.headers["content-type"] == CONTENT_TYPE_LATEST
        assert b"relayd_messages_total" in r.body and b"relayd_sessions_active" in r.body
        r = await m.request("GET", "/healthz")
        assert r.status == 200
        assert (await m.request("GET", "/admin/status")).status == 404
        assert (await m.request("POST", "/metrics")).status == 405
        relay.smtp_servers[0][1].close()          # an SMTP listener is down
        assert (await m.request("GET", "/healthz")).status == 503


async def test_metrics_disabled(relay_factory):
    relay = await relay_factory(metrics={"listen": None})
    assert relay.metrics_port is None and relay.admin_tcp_port is None
