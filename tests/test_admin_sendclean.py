"""SPEC 4.1: SMTP users in the SendClean dialect, over the real Unix socket."""

from __future__ import annotations

import time

import pytest

from admin_client import AdminClient, new_app

ADD = "/settings/addSmtp"
EDIT = "/settings/editSmtp"
RESET = "/settings/resetSmtpPassword"
LIST = "/settings/listSmtp"
DELETE = "/settings/deleteSmtp"

TOKEN_MISMATCH = {"status": "error", "code": -1, "name": "AuthenticationError",
                  "message": "Token MissMatch"}


async def add_user(admin, owner, **fields):
    r = await admin.request("POST", ADD, json={**owner.creds, "total_limit": 100,
                                               "hourly_limit": 10, **fields})
    assert r.status == 200, r.body
    return r.json()


def assert_error(r, status, name):
    assert r.status == status, r.body
    body = r.json()
    assert body["status"] == "error"
    assert body["code"] == -1 and type(body["code"]) is int
    assert body["name"] == name
    assert isinstance(body["message"], str) and body["message"]


async def test_add_returns_generated_credentials(relay, admin, owner):
    body = await add_user(admin, owner)
    assert set(body) == {"status", "message", "smtp_user_name", "smtp_password"}
    assert body["status"] == "success" and body["message"] == "SMTP User Created"
    assert body["smtp_user_name"].startswith("smtp") and body["smtp_user_name"][4:].isdigit()
    assert len(body["smtp_password"]) >= 22          # >= 128 bits of url-safe base64
    user = relay.store.check_password(body["smtp_user_name"], body["smtp_password"])
    assert user is not None and user.idapp == owner.idapp   # the default app
    assert (user.total_limit, user.hourly_limit, user.status) == (100, 10, "Enable")


async def test_add_form_encoded_and_query_string(relay, admin, owner):
    r = await admin.request("POST", ADD, form={**owner.creds, "total_limit": "7",
                                               "hourly_limit": "3"})
    assert r.status == 200, r.body
    assert relay.store.get_user(r.json()["smtp_user_name"]).total_limit == 7
    r = await admin.request("POST", ADD, query={**owner.creds, "total_limit": 5,
                                                "hourly_limit": 2})
    assert r.status == 200, r.body
    assert relay.store.get_user(r.json()["smtp_user_name"]).hourly_limit == 2


async def test_add_into_a_named_app(relay, admin, owner, other):
    idapp = await new_app(admin, owner)
    body = await add_user(admin, owner, idapp=idapp)
    assert relay.store.get_user(body["smtp_user_name"]).idapp == idapp
    # Another owner's app answers exactly like an app that does not exist.
    foreign = await admin.request("POST", ADD, json={**owner.creds, "total_limit": 1,
                                                     "hourly_limit": 1, "idapp": other.idapp})
    missing = await admin.request("POST", ADD, json={**owner.creds, "total_limit": 1,
                                                     "hourly_limit": 1, "idapp": "0" * 24})
    assert_error(foreign, 404, "ValidationError")
    assert foreign.body == missing.body


@pytest.mark.parametrize("creds", [
    {"token": "wrong"},
    {"owner_id": "0" * 24},
    {"owner_id": "0" * 24, "token": "x" * 1000},
], ids=["wrong-token", "unknown-owner", "oversized-token"])
async def test_wrong_credentials_are_token_mismatch(admin, owner, creds):
    r = await admin.request("POST", LIST, json={**owner.creds, **creds})
    assert r.status == 401
    assert r.json() == TOKEN_MISMATCH


async def test_missing_credentials(admin, owner):
    r = await admin.request("POST", LIST, json={"owner_id": owner.owner_id})
    assert_error(r, 401, "AuthenticationError")
    r = await admin.request("POST", LIST, json={})
    assert_error(r, 401, "AuthenticationError")


@pytest.mark.parametrize("fields", [
    {"total_limit": True},
    {"total_limit": 1.5},
    {"total_limit": 10.0},
    {"total_limit": 0},
    {"total_limit": -3},
    {"total_limit": 2**63},
    {"total_limit": "1e1"},      # a digit string ("10") is accepted since SPEC 4.6
    {"total_limit": None},
    {"hourly_limit": [1]},
    {"idapp": 12},
    {"bogus": 1},
], ids=["bool", "float", "integral-float", "zero", "negative", "2^63", "json-string", "null",
        "list", "idapp-int", "unknown-key"])
async def test_add_validation(admin, owner, fields):
    r = await admin.request("POST", ADD, json={**owner.creds, "total_limit": 10,
                                               "hourly_limit": 5, **fields})
    assert_error(r, 400, "ValidationError")


async def test_add_requires_limits(admin, owner):
    r = await admin.request("POST", ADD, json={**owner.creds, "total_limit": 10})
    assert_error(r, 400, "ValidationError")
    assert "hourly_limit" in r.json()["message"]


@pytest.mark.parametrize("value", ["abc", "1.5", "", "9223372036854775808", "true"])
async def test_add_form_validation(admin, owner, value):
    r = await admin.request("POST", ADD, form={**owner.creds, "total_limit": value,
                                               "hourly_limit": "5"})
    assert_error(r, 400, "ValidationError")


async def test_edit(relay, admin, owner):
    name = (await add_user(admin, owner))["smtp_user_name"]
    r = await admin.request("POST", EDIT, json={**owner.creds, "smtp_user_name": name,
                                                "total_limit": 80, "hourly_limit": 15,
                                                "status": "Disable"})
    assert r.status == 200
    assert r.json() == {"status": "success", "message": "SMTP User Updated"}
    user = relay.store.get_user(name)
    assert (user.total_limit, user.hourly_limit, user.status) == (80, 15, "Disable")
    # Only the given fields change; form-encoded works too.
    r = await admin.request("POST", EDIT, form={**owner.creds, "smtp_user_name": name,
                                                "status": "Enable"})
    assert r.status == 200
    user = relay.store.get_user(name)
    assert (user.total_limit, user.status) == (80, "Enable")


@pytest.mark.parametrize("fields", [{"status": "disable"}, {"status": "A"},
                                    {"hourly_limit": 0}, {"smtp_user_name": None}])
async def test_edit_validation(admin, owner, fields):
    name = (await add_user(admin, owner))["smtp_user_name"]
    r = await admin.request("POST", EDIT, json={**owner.creds, "smtp_user_name": name, **fields})
    assert_error(r, 400, "ValidationError")


async def test_edit_unknown_user(admin, owner):
    r = await admin.request("POST", EDIT, json={**owner.creds, "smtp_user_name": "smtp1"})
    assert_error(r, 404, "ValidationError")
    r = await admin.request("POST", EDIT, json={**owner.creds})
    assert_error(r, 400, "ValidationError")


async def test_reset_password(relay, admin, owner):
    first = await add_user(admin, owner)
    name = first["smtp_user_name"]
    r = await admin.request("POST", RESET, json={**owner.creds, "smtp_user_name": name})
    assert r.status == 200
    body = r.json()
    assert set(body) == {"status", "message", "smtp_user_name", "smtp_password"}
    assert (body["status"], body["message"], body["smtp_user_name"]) == (
        "success", "password reseted", name)
    assert body["smtp_password"] != first["smtp_password"]
    assert relay.store.check_password(name, first["smtp_password"]) is None   # at once
    assert relay.store.check_password(name, body["smtp_password"]) is not None


async def test_reset_password_needs_a_user(admin, owner):
    r = await admin.request("POST", RESET, json=owner.creds)
    assert_error(r, 400, "ValidationError")
    r = await admin.request("POST", RESET, json={**owner.creds, "smtp_user_name": "smtp1"})
    assert_error(r, 404, "ValidationError")


async def test_list(relay, admin, owner):
    names = [(await add_user(admin, owner, total_limit=n))["smtp_user_name"] for n in (5, 6)]
    user = relay.store.get_user(names[0])
    now = time.time()
    for _ in range(2):
        await relay.store.reserve(user, "h", now)
    await relay.store.count(user.name, "h", now, 2)
    r = await admin.request("POST", LIST, json=owner.creds)
    assert r.status == 200
    body = r.json()
    assert set(body) == {"status", "smtp_list"} and body["status"] == "success"
    rows = {row["smtp_user_name"]: row for row in body["smtp_list"]}
    assert set(rows) == set(names)
    assert rows[names[0]] == {"smtp_user_name": names[0], "status": "Enable",
                              "total_limit": 5, "hourly_limit": 10, "idapp": owner.idapp,
                              "sent_total": 2, "sent_last_hour": 2}
    assert rows[names[1]]["sent_total"] == 0
    assert "smtp_password" not in rows[names[1]]


async def test_list_by_app(admin, owner, other):
    idapp = await new_app(admin, owner)
    await add_user(admin, owner)
    mine = (await add_user(admin, owner, idapp=idapp))["smtp_user_name"]
    r = await admin.request("POST", LIST, json={**owner.creds, "idapp": idapp})
    assert [u["smtp_user_name"] for u in r.json()["smtp_list"]] == [mine]
    r = await admin.request("POST", LIST, json={**owner.creds, "idapp": other.idapp})
    assert_error(r, 404, "ValidationError")


async def test_delete(relay, admin, owner):
    name = (await add_user(admin, owner))["smtp_user_name"]
    r = await admin.request("POST", DELETE, json={**owner.creds, "smtp_user_name": name})
    assert r.status == 200 and r.json()["status"] == "success"
    assert relay.store.get_user(name) is None
    r = await admin.request("POST", DELETE, json={**owner.creds, "smtp_user_name": name})
    assert_error(r, 404, "ValidationError")


async def test_tenant_isolation(relay, admin, owner, other):
    name = (await add_user(admin, owner))["smtp_user_name"]
    r = await admin.request("POST", LIST, json=other.creds)
    assert r.json()["smtp_list"] == []
    for path, extra in ((EDIT, {"status": "Disable"}), (RESET, {}), (DELETE, {})):
        theirs = await admin.request("POST", path, json={**other.creds, "smtp_user_name": name,
                                                         **extra})
        nobody = await admin.request("POST", path, json={**other.creds,
                                                         "smtp_user_name": "smtp1000000000",
                                                         **extra})
        assert theirs.status == 404 and theirs.body == nobody.body
    user = relay.store.get_user(name)
    assert user is not None and user.status == "Enable"


async def test_dialect_error_shapes(admin, owner):
    r = await admin.request("POST", "/settings/nope", json=owner.creds)
    assert_error(r, 404, "ValidationError")
    r = await admin.request("GET", LIST)
    assert_error(r, 405, "ValidationError")
    assert r.headers["allow"] == "POST"
    r = await admin.request("POST", LIST, body=b'{"owner_id": ', headers={
        "Content-Type": "application/json"})
    assert_error(r, 400, "ValidationError")


async def test_internal_error_is_general_error_without_details(relay, admin, owner,
                                                               monkeypatch):
    async def broken(owner_id):
        raise RuntimeError("disk on fire at /secret/path")
    monkeypatch.setattr(relay.store, "list_users", broken)
    r = await admin.request("POST", LIST, json=owner.creds)
    assert_error(r, 500, "GeneralError")
    assert b"secret" not in r.body and b"fire" not in r.body


async def test_operator_acts_as_owner_on_unix_socket_only(relay_factory):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    async with AdminClient(relay.config.admin.socket) as unix:
        r = await unix.request("POST", "/admin/owners", json={"plan": "free"})
        owner_id = r.json()["owner_id"]
        acting = {"X-Relayd-Owner": owner_id}
        r = await unix.request("POST", ADD, json={"total_limit": 1, "hourly_limit": 1},
                               headers=acting)
        assert r.status == 200
        r = await unix.request("POST", LIST, json={}, headers={"X-Relayd-Owner": "0" * 24})
        assert r.json() == TOKEN_MISMATCH
    async with AdminClient(host="127.0.0.1", port=relay.admin_tcp_port) as tcp:
        r = await tcp.request("POST", LIST, json={}, headers=acting)
        assert_error(r, 401, "AuthenticationError")
