"""SPEC 4.3: per-domain email settings in the Webitel dialect (seed 004)."""

from __future__ import annotations

import copy

import pytest


PATH = "/api/v2/email/settings"

SEED_BODY = {
    "provider": "smtp",
    "description": "My Setting",
    "from": "my@webitel.com",
    "options": {
        "host": "m.webitel.com",
        "port": 465,
        "secure": True,
        "debug": False,
        "tls": {"rejectUnauthorized": False},
        "auth": {"user": "my@webitel.com", "pass": "itte574dsts485"},
    },
}


def body(**over):
    b = copy.deepcopy(SEED_BODY)
    b.update(over)
    return b


async def post(admin, owner, domain="my.webitel.com", payload=None, method="POST"):
    return await admin.request(method, PATH, query={"domain": domain},
                               json=payload if payload is not None else body(),
                               headers=owner.headers)


def assert_error(r, status):
    assert r.status == status, r.body
    b = r.json()
    assert b["status"] == "error" and isinstance(b["info"], str) and b["info"]


async def test_crud_round_trip(relay, admin, owner):
    r = await post(admin, owner)
    assert r.status == 200, r.body
    doc = r.json()
    assert set(doc) == {"_id", "provider", "description", "from", "options", "domain"}
    assert len(doc["_id"]) == 24 and doc["domain"] == "my.webitel.com"
    expected_options = copy.deepcopy(SEED_BODY["options"])
    expected_options["auth"]["pass"] = "********"
    assert doc["options"] == expected_options
    assert (doc["provider"], doc["description"], doc["from"]) == ("smtp", "My Setting",
                                                                  "my@webitel.com")

    r = await admin.request("GET", PATH, query={"domain": "my.webitel.com"},
                            headers=owner.headers)
    assert r.status == 200 and r.json() == doc

    r = await post(admin, owner, payload=body(description="My updated setting"), method="PUT")
    assert r.status == 200 and r.json()["description"] == "My updated setting"
    assert r.json()["_id"] == doc["_id"]

    # Sending the masked document back keeps the stored password.
    back = r.json()
    back["options"]["port"] = 587
    back["options"]["secure"] = False
    r = await post(admin, owner, payload=back, method="PUT")
    assert r.status == 200, r.body
    stored = await relay.store.get_domain(owner.owner_id, "my.webitel.com")
    assert stored.options["auth"]["pass"] == "itte574dsts485"
    assert stored.options["port"] == 587

    r = await admin.request("DELETE", PATH, query={"domain": "my.webitel.com"},
                            headers=owner.headers)
    assert r.status == 200 and r.json() == {"status": "OK", "Info": "Removed 1 record."}
    r = await admin.request("GET", PATH, query={"domain": "my.webitel.com"},
                            headers=owner.headers)
    assert_error(r, 404)
    r = await admin.request("DELETE", PATH, query={"domain": "my.webitel.com"},
                            headers=owner.headers)
    assert_error(r, 404)


async def test_defaults_and_domain_case(admin, owner):
    r = await post(admin, owner, domain="Example.ORG",
                   payload={"options": {"host": "127.0.0.1"}})
    assert r.status == 200, r.body
    doc = r.json()
    assert doc["domain"] == "example.org" and doc["provider"] == "smtp"
    assert doc["options"] == {"host": "127.0.0.1", "port": 587, "secure": False,
                              "debug": False, "tls": {"rejectUnauthorized": True}}
    r = await admin.request("GET", PATH, query={"domain": "example.org"}, headers=owner.headers)
    assert r.status == 200


async def test_put_needs_existing_settings(admin, owner):
    r = await post(admin, owner, method="PUT")
    assert_error(r, 404)


async def test_credentials_and_domain_parameter(admin, owner):
    r = await admin.request("GET", PATH, query={"domain": "my.webitel.com"})
    assert_error(r, 401)
    r = await admin.request("GET", PATH, query={"domain": "my.webitel.com"},
                            headers={"X-Access-Token": owner.token})
    assert_error(r, 401)
    r = await admin.request("GET", PATH, query={"domain": "my.webitel.com"},
                            headers={**owner.headers, "X-Access-Token": "bad"})
    assert_error(r, 403)
    r = await admin.request("POST", PATH, json=body(), headers=owner.headers)
    assert_error(r, 400)
    r = await admin.request("GET", PATH, query={"domain": "not a domain"}, headers=owner.headers)
    assert_error(r, 400)


@pytest.mark.parametrize("mutate", [
    lambda b: b.update(provider="sendgrid"),
    lambda b: b.update({"from": "not-an-address"}),
    lambda b: b.update({"from": "a@b.example\r\nBcc: x@y.example"}),
    lambda b: b["options"].update(port=0),
    lambda b: b["options"].update(port="465.0"),   # "465" is accepted (SPEC 4.6)
    lambda b: b["options"].update(secure="true"),
    lambda b: b["options"].update(host="m.webitel.com\r\nX: y"),
    lambda b: b["options"].pop("host"),
    lambda b: b["options"]["auth"].update(user="u\nv"),
    lambda b: b["options"]["auth"].update({"pass": "p\r\n"}),
    lambda b: b["options"]["auth"].update({"pass": "********"}),
    lambda b: b["options"]["tls"].update(rejectUnauthorized=0),
    lambda b: b["options"].update(pool=True),
    lambda b: b.update(domain="other.example"),
    lambda b: b.pop("options"),
    lambda b: b.update(bogus=1),
], ids=["provider", "from", "from-crlf", "port-0", "port-string", "secure-string",
        "host-crlf", "no-host", "user-lf", "pass-crlf", "mask-on-create", "tls-int",
        "unknown-option", "domain-mismatch", "no-options", "unknown-key"])
async def test_body_validation(admin, owner, mutate):
    b = body()
    mutate(b)
    r = await post(admin, owner, payload=b)
    assert_error(r, 400)
    assert "itte574dsts485" not in r.json()["info"]


async def test_read_back_document_with_domain_and_id_is_accepted(admin, owner):
    doc = (await post(admin, owner)).json()
    r = await post(admin, owner, payload=doc, method="PUT")
    assert r.status == 200, r.body


async def test_tenant_isolation(relay, admin, owner, other):
    assert (await post(admin, owner)).status == 200
    for method in ("GET", "DELETE"):
        r = await admin.request(method, PATH, query={"domain": "my.webitel.com"},
                                headers=other.headers)
        assert_error(r, 404)
    r = await post(admin, other, method="PUT")
    assert_error(r, 404)
    # The other owner's own settings for the same domain are separate records.
    r = await post(admin, other, payload=body(description="theirs"))
    assert r.status == 200
    mine = await admin.request("GET", PATH, query={"domain": "my.webitel.com"},
                               headers=owner.headers)
    assert mine.json()["description"] == "My Setting"


async def test_dialect_error_shapes(admin, owner):
    r = await admin.request("PATCH", PATH, query={"domain": "a.example"}, headers=owner.headers)
    assert_error(r, 405)
    r = await admin.request("GET", "/api/v2/email/nope", headers=owner.headers)
    assert_error(r, 404)
    r = await admin.request("POST", PATH, query={"domain": "a.example"}, body=b"[1,",
                            headers={**owner.headers, "Content-Type": "application/json"})
    assert_error(r, 400)
    r = await admin.request("POST", PATH, query={"domain": "a.example"},
                            form={"provider": "smtp"}, headers=owner.headers)
    assert_error(r, 415)
