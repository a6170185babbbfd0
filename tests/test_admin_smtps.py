"""SPEC 4.2: upstream SMTPs in the seed-000 dialect, over the real Unix socket."""

from __future__ import annotations

import pytest

from admin_client import new_app

SAVE = "/private/smtps/save"
BY_APP = "/private/smtps/findByApp"
BY_ID = "/private/smtps/findById"
REMOVE = "/private/smtps/remove"
CHECK = "/private/smtps/check"

RECORD_KEYS = {"_id", "idapp", "priority", "host", "port", "username", "password", "auth",
               "startstls", "sslTls", "debug", "defaultfromemail", "defaultfromname",
               "numerrors", "created", "modified", "status", "verify_tls", "allowed_domains"}


def seed_body(idapp, **over):
    """The create request of seed 000, with its spellings."""
    return {"idapp": idapp, "priority": 50, "host": "smtp.yourserver.net", "port": 25,
            "username": "user@yourserver.net", "password": "smtppassword1234", "auth": True,
            "startstls": True, "ssltls": False, "defaulfromemail": "info@yourserver.xyz",
            "defaultfromname": "Jonh Smith", **over}


async def save(admin, owner, **over):
    r = await admin.request("POST", SAVE, json={**seed_body(owner.idapp), **over},
                            headers=owner.headers)
    assert r.status == 200, r.body
    return r.json()


def assert_refused(r, code, message):
    assert r.status == 406, r.body
    assert r.json() == {"code": code, "message": message}


async def test_save_creates_with_seed_spellings(relay, admin, owner):
    rec = await save(admin, owner)
    assert set(rec) == RECORD_KEYS
    assert len(rec["_id"]) == 24
    assert {k: rec[k] for k in ("idapp", "priority", "host", "port", "username", "password",
                                "auth", "startstls", "sslTls", "debug", "defaultfromemail",
                                "defaultfromname", "numerrors", "status", "verify_tls")} == {
        "idapp": owner.idapp, "priority": 50, "host": "smtp.yourserver.net", "port": 25,
        "username": "user@yourserver.net", "password": "********", "auth": True,
        "startstls": True, "sslTls": False, "debug": False,
        "defaultfromemail": "info@yourserver.xyz", "defaultfromname": "Jonh Smith",
        "numerrors": 0, "status": "A", "verify_tls": True}
    assert rec["created"] and rec["modified"]
    stored = await relay.store.get_upstream(rec["_id"])
    assert stored.password == "smtppassword1234"


async def test_save_defaults_and_other_spellings(admin, owner):
    r = await admin.request("POST", SAVE, headers=owner.headers, json={
        "idapp": owner.idapp, "host": "127.0.0.1", "port": 587, "sslTls": True,
        "defaultfromemail": "a@b.example"})
    assert r.status == 200, r.body
    rec = r.json()
    assert (rec["priority"], rec["sslTls"], rec["startstls"], rec["auth"]) == (10, True, False,
                                                                               False)
    assert rec["password"] == "********" and rec["defaultfromemail"] == "a@b.example"


async def test_agreeing_spellings_are_one_parameter(admin, owner):
    rec = await save(admin, owner, ssltls=True, sslTls=True, startstls=False,
                     defaultfromemail="info@yourserver.xyz")
    assert rec["sslTls"] is True
    r = await admin.request("POST", SAVE, headers=owner.headers,
                            json={"idsmtp": rec["_id"], "_id": rec["_id"], "port": 26})
    assert r.status == 200 and r.json()["port"] == 26


async def test_save_form_encoded(admin, owner):
    r = await admin.request("POST", SAVE, headers=owner.headers, form={
        "idapp": owner.idapp, "host": "mx.example.com", "port": "465", "ssltls": "true",
        "auth": "false", "priority": "0", "allowed_domains": "a.example,b.example"})
    assert r.status == 200, r.body
    rec = r.json()
    assert (rec["port"], rec["sslTls"], rec["auth"], rec["priority"]) == (465, True, False, 0)
    assert rec["allowed_domains"] == ["a.example", "b.example"]


async def test_edit_changes_given_fields_and_keeps_masked_password(relay, admin, owner):
    rec = await save(admin, owner)
    r = await admin.request("POST", SAVE, headers=owner.headers, json={
        "idsmtp": rec["_id"], "priority": 0, "password": "********", "status": "D"})
    assert r.status == 200, r.body
    edited = r.json()
    assert (edited["priority"], edited["status"], edited["host"]) == (0, "D",
                                                                      "smtp.yourserver.net")
    assert edited["password"] == "********"
    assert (await relay.store.get_upstream(rec["_id"])).password == "smtppassword1234"
    # Round trip of a whole record as read back (with its read-only keys).
    got = (await admin.request("GET", BY_ID, query={"idsmtp": rec["_id"]},
                               headers=owner.headers)).json()
    got["port"] = 2525
    r = await admin.request("POST", SAVE, headers=owner.headers, json=got)
    assert r.status == 200, r.body
    stored = await relay.store.get_upstream(rec["_id"])
    assert (stored.port, stored.password) == (2525, "smtppassword1234")
    # A new password replaces the secret.
    r = await admin.request("POST", SAVE, headers=owner.headers,
                            json={"_id": rec["_id"], "password": "n3w"})
    assert (await relay.store.get_upstream(rec["_id"])).password == "n3w"


async def test_edit_clears_nullable_fields(relay, admin, owner):
    rec = await save(admin, owner)
    r = await admin.request("POST", SAVE, headers=owner.headers, json={
        "idsmtp": rec["_id"], "defaultfromemail": None, "defaultfromname": None,
        "password": None, "auth": False})
    assert r.status == 200
    assert r.json()["defaultfromemail"] is None
    assert r.json()["password"] == "********"        # masked even when none is stored
    assert (await relay.store.get_upstream(rec["_id"])).password is None
    # ... and the masked record saves back without inventing a password.
    r = await admin.request("POST", SAVE, headers=owner.headers, json=r.json())
    assert r.status == 200
    assert (await relay.store.get_upstream(rec["_id"])).password is None


@pytest.mark.parametrize("over", [
    {"port": 0}, {"port": 65536}, {"port": "0x19"}, {"port": True}, {"port": 25.0},
    {"priority": -1}, {"priority": 2**63}, {"auth": "yes"}, {"auth": 1},
    {"host": "bad host"}, {"host": ""}, {"host": 7},
    {"host": "smtp.example.com\r\nRCPT TO:<x@y>"}, {"username": "u\r\nX: y"},
    {"password": "p\nq"}, {"password": "p\x00q"}, {"defaultfromname": "J\rS"},
    {"defaulfromemail": "a@b.example\r\nBcc: c@d.example"}, {"defaultfromemail": "not-an-address"},
    {"status": "X"}, {"allowed_domains": ["ok.example", "bad domain"]}, {"port": None},
    {"unknown": 1}, {"startstls": True, "sslTls": True},
    {"auth": True, "username": None}, {"ssltls": True, "sslTls": False},
    {"password": "********"},
], ids=lambda o: repr(o)[:40])
async def test_save_validation(admin, owner, over):
    r = await admin.request("POST", SAVE, json=seed_body(owner.idapp, **over),
                            headers=owner.headers)
    assert r.status == 400, r.body
    body = r.json()
    assert body["code"] == 400 and body["message"]
    assert "smtppassword1234" not in body["message"]


@pytest.mark.parametrize("missing", ["idapp", "host", "port"])
async def test_save_requires(admin, owner, missing):
    body = seed_body(owner.idapp)
    del body[missing]
    r = await admin.request("POST", SAVE, json=body, headers=owner.headers)
    assert r.status == 400 and missing in r.json()["message"]


async def test_credentials(admin, owner):
    body = seed_body(owner.idapp)
    r = await admin.request("POST", SAVE, json=body)
    assert r.status == 401
    r = await admin.request("POST", SAVE, json=body, headers={"X-Key": owner.owner_id})
    assert r.status == 401
    r = await admin.request("POST", SAVE, json=body, headers={**owner.headers,
                                                              "X-Access-Token": "nope"})
    assert r.status == 403
    r = await admin.request("GET", BY_APP, query={"idapp": owner.idapp},
                            headers={**owner.headers, "X-Key": "0" * 24})
    assert r.status == 403


async def test_app_not_found(admin, owner, other):
    for idapp in (other.idapp, "0" * 24):
        r = await admin.request("POST", SAVE, json=seed_body(idapp), headers=owner.headers)
        assert_refused(r, 2, "App not found")
        r = await admin.request("GET", BY_APP, query={"idapp": idapp}, headers=owner.headers)
        assert_refused(r, 2, "App not found")


async def test_find_by_app(admin, owner):
    idapp = await new_app(admin, owner)
    a = await save(admin, owner)
    b = await save(admin, owner, host="smtp.anothersmtp.net", priority=150)
    await save(admin, owner, idapp=idapp)
    r = await admin.request("GET", BY_APP, query={"idapp": owner.idapp}, headers=owner.headers)
    assert r.status == 200
    assert [x["_id"] for x in r.json()] == [a["_id"], b["_id"]]
    assert all(x["password"] == "********" and set(x) == RECORD_KEYS for x in r.json())
    r = await admin.request("GET", BY_APP, headers=owner.headers)
    assert r.status == 400


async def test_find_by_id(admin, owner, other):
    rec = await save(admin, owner)
    r = await admin.request("GET", BY_ID, query={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert r.status == 200 and r.json() == rec
    r = await admin.request("GET", BY_ID, query={"idsmtp": rec["_id"]}, headers=other.headers)
    assert_refused(r, 1, "SMTP not found")
    r = await admin.request("GET", BY_ID, headers=owner.headers)
    assert r.status == 400


async def test_remove(relay, admin, owner, other):
    rec = await save(admin, owner)
    r = await admin.request("POST", REMOVE, json={"idsmtp": rec["_id"]}, headers=other.headers)
    assert_refused(r, 1, "SMTP not found")
    r = await admin.request("POST", REMOVE, json={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert r.status == 200 and r.body == b""
    r = await admin.request("GET", BY_ID, query={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert_refused(r, 1, "SMTP not found")
    r = await admin.request("POST", REMOVE, json={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert_refused(r, 1, "SMTP not found")
    r = await admin.request("POST", REMOVE, json={}, headers=owner.headers)
    assert r.status == 400


async def test_remove_by_seed_idapp_meaning_smtp_id(admin, owner):
    rec = await save(admin, owner)
    r = await admin.request("POST", REMOVE, form={"idapp": rec["_id"]}, headers=owner.headers)
    assert r.status == 200 and r.body == b""


async def test_edit_isolation(admin, owner, other):
    rec = await save(admin, owner)
    r = await admin.request("POST", SAVE, json={"idsmtp": rec["_id"], "port": 26},
                            headers=other.headers)
    assert_refused(r, 1, "SMTP not found")
    r = await admin.request("POST", SAVE, json={"idsmtp": rec["_id"], "idapp": other.idapp},
                            headers=owner.headers)
    assert_refused(r, 2, "App not found")


async def set_test_email(admin, idapp, address):
    r = await admin.request("PATCH", f"/admin/apps/{idapp}", json={"test_email": address})
    assert r.status == 200


async def test_check_sends_to_test_email(admin, owner, sink_factory):
    sink = await sink_factory()
    await set_test_email(admin, owner.idapp, "probe@example.net")
    rec = await save(admin, owner, host="127.0.0.1", port=sink.port, auth=False,
                     startstls=False)
    r = await admin.request("POST", CHECK, json={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert r.status == 200 and r.body == b""
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.rcpt_tos == ["probe@example.net"]
    assert got.mail_from == "info@yourserver.xyz"
    assert b"Subject: relayd SMTP check" in got.data
    # The seed's `idapp` spelling of the SMTP id works too.
    r = await admin.request("POST", CHECK, form={"idapp": rec["_id"]}, headers=owner.headers)
    assert r.status == 200 and len(sink.messages) == 2


async def test_check_failure_carries_upstream_reply(admin, owner, sink_factory, closed_port):
    sink = await sink_factory("tempfail")
    await set_test_email(admin, owner.idapp, "probe@example.net")
    rec = await save(admin, owner, host="127.0.0.1", port=sink.port, auth=False,
                     startstls=False)
    r = await admin.request("POST", CHECK, json={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert r.status == 406
    assert r.json()["code"] == 5
    assert "451" in r.json()["message"] and "bad day" in r.json()["message"]
    down = await save(admin, owner, host="127.0.0.1", port=closed_port, auth=False,
                      startstls=False)
    r = await admin.request("POST", CHECK, json={"idsmtp": down["_id"]}, headers=owner.headers)
    assert r.status == 406 and r.json()["code"] == 5
    assert "smtppassword1234" not in r.json()["message"]


async def test_check_needs_test_email_and_own_smtp(admin, owner, other):
    rec = await save(admin, owner)
    r = await admin.request("POST", CHECK, json={"idsmtp": rec["_id"]}, headers=owner.headers)
    assert_refused(r, 4, "App has no test_email")
    r = await admin.request("POST", CHECK, json={"idsmtp": rec["_id"]}, headers=other.headers)
    assert_refused(r, 1, "SMTP not found")


async def test_dialect_error_shapes(admin, owner):
    r = await admin.request("GET", "/private/smtps/nope", headers=owner.headers)
    assert r.status == 404 and r.json()["code"] == 404
    r = await admin.request("GET", SAVE, headers=owner.headers)
    assert r.status == 405 and r.json()["code"] == 405
    r = await admin.request("POST", SAVE, body=b"{nope", headers={
        **owner.headers, "Content-Type": "application/json"})
    assert r.status == 400 and set(r.json()) == {"code", "message"}
