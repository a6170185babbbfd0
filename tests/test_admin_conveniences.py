"""Operator conveniences of SPEC 4.6 in the seed dialects: the ``/engine``
prefix of the Webitel routes, JSON syntax errors with their position, digit
strings for integer fields, the Content-Type hint, and relayctl naming an
unknown owner."""

from __future__ import annotations

import copy
import json

import pytest
from admin_client import AdminClient, new_owner, raw_exchange, status_of
from test_relayctl import relayctl

ADD = "/settings/addSmtp"
EDIT = "/settings/editSmtp"
LIST = "/settings/listSmtp"
SAVE = "/private/smtps/save"
SETTINGS = "/api/v2/email/settings"
ENGINE = "/engine" + SETTINGS
REFUSED_DIGITS = ["", "-1", "1e3", " 2", "0x10", "2 ", "+5", "1.0"]

WEBITEL_BODY = {
    "provider": "smtp", "description": "My Setting", "from": "my@webitel.com",
    "options": {"host": "m.webitel.com", "port": 465, "secure": True, "debug": False,
                "tls": {"rejectUnauthorized": False},
                "auth": {"user": "my@webitel.com", "pass": "itte574dsts485"}},
}


def smtps_body(idapp, **over):
    return {"idapp": idapp, "priority": 50, "host": "smtp.yourserver.net", "port": 25,
            "username": "user@yourserver.net", "password": "smtppassword1234", "auth": True,
            "startstls": True, "ssltls": False, "defaulfromemail": "info@yourserver.xyz",
            "defaultfromname": "Jonh Smith", **over}


def webitel_body(**options):
    b = copy.deepcopy(WEBITEL_BODY)
    b["options"].update(options)
    return b


@pytest.fixture(params=["unix", "tcp"])
async def clients(request, relay_factory):
    """(relay, client on the listener under test, owner)."""
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    async with AdminClient(relay.config.admin.socket) as unix:
        owner = await new_owner(unix)
    if request.param == "unix":
        client = AdminClient(relay.config.admin.socket)
    else:
        client = AdminClient(host="127.0.0.1", port=relay.admin_tcp_port)
    async with client:
        yield relay, client, owner


# ------------------------------------------------------------ /engine prefix

async def test_engine_prefix_answers_every_webitel_route(clients):
    relay, client, owner = clients
    q = {"domain": "my.webitel.com"}
    r = await client.request("POST", ENGINE, query=q, json=WEBITEL_BODY, headers=owner.headers)
    assert r.status == 200, r.body
    assert r.json()["domain"] == "my.webitel.com"
    assert r.json()["options"]["auth"]["pass"] == "********"
    r = await client.request("GET", ENGINE, query=q, headers=owner.headers)
    assert r.status == 200 and r.json()["description"] == "My Setting"
    r = await client.request("GET", SETTINGS, query=q, headers=owner.headers)
    assert r.status == 200 and r.json()["description"] == "My Setting"   # one resource
    r = await client.request("PUT", ENGINE, query=q, json={**WEBITEL_BODY, "description": "2"},
                             headers=owner.headers)
    assert r.status == 200 and r.json()["description"] == "2"
    r = await client.request("DELETE", ENGINE, query=q, headers=owner.headers)
    assert r.status == 200 and r.json() == {"status": "OK", "Info": "Removed 1 record."}
    r = await client.request("GET", ENGINE, query=q, headers=owner.headers)
    assert r.status == 404 and r.json() == {"status": "error", "info": "Not found"}


async def test_engine_prefix_has_the_same_errors(clients):
    relay, client, owner = clients
    q = {"domain": "my.webitel.com"}
    for path in (SETTINGS, ENGINE):
        r = await client.request("GET", path, query=q)
        assert r.status == 401 and set(r.json()) == {"status", "info"}, path
        r = await client.request("GET", path, query=q,
                                 headers={"X-Key": owner.owner_id, "X-Access-Token": "bad"})
        assert r.status == 403 and r.json()["status"] == "error", path
        r = await client.request("GET", path, headers=owner.headers)
        assert r.status == 400 and set(r.json()) == {"status", "info"}, path
        r = await client.request("PUT", path, query=q, json=WEBITEL_BODY, headers=owner.headers)
        assert r.status == 404 and r.json() == {"status": "error", "info": "Not found"}, path
        r = await client.request("PATCH", path, query=q, headers=owner.headers)
        assert r.status == 405 and set(r.json()) == {"status", "info"}, path
    r = await client.request("GET", "/engine/api/v2/email/other", headers=owner.headers)
    assert r.status == 404 and set(r.json()) == {"status", "info"}     # Webitel's shape


async def test_engine_prefix_over_raw_tcp(relay_factory):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    raw = await raw_exchange(relay, b"GET /engine/api/v2/email/settings?domain=a.example "
                             b"HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             tcp_port=relay.admin_tcp_port)
    assert status_of(raw) == 401 and b'"info"' in raw


# ------------------------------------------------------------ invalid JSON

BROKEN = b'{\n"total_limit": 1,\n}'          # seed 001's own trailing comma
WHERE = "Expecting property name enclosed in double quotes at line 3, column 1"


@pytest.mark.parametrize("method,path,shape", [
    ("POST", ADD, {"status": "error", "code": -1, "name": "ValidationError"}),
    ("POST", SAVE, {"code": 400}),
    ("POST", SETTINGS + "?domain=a.example", {"status": "error"}),
    ("POST", ENGINE + "?domain=a.example", {"status": "error"}),
], ids=["sendclean", "smtps", "webitel", "webitel-engine"])
async def test_invalid_json_names_line_and_column(clients, method, path, shape):
    relay, client, owner = clients
    headers = {**owner.headers, "Content-Type": "application/json"}
    r = await client.request(method, path, body=BROKEN, headers=headers)
    assert r.status == 400, r.body
    d = r.json()
    message = d.pop("message", None) or d.pop("info")
    assert d == shape
    assert message == f"invalid JSON body: {WHERE}"


async def test_invalid_json_on_the_operator_api(admin):
    r = await admin.request("POST", "/admin/owners", body=b'{"plan": "free"',
                            headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.json() == {"status": "error", "message": "invalid JSON body: Expecting ',' "
                        "delimiter at line 1, column 16"}


async def test_seed_001_example_with_trailing_comma_is_a_positioned_400(admin, owner):
    body = ('{\n"owner_id": "%s",\n"token": "%s",\n"total_limit": 100,\n"hourly_limit": 10,\n}'
            % (owner.owner_id, owner.token)).encode()
    r = await admin.request("POST", ADD, body=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.json()["message"] == ("invalid JSON body: Expecting property name enclosed in "
                                   "double quotes at line 6, column 1")


# ------------------------------------------------------------ digit strings

async def test_sendclean_accepts_digit_strings(clients):
    relay, client, owner = clients
    r = await client.request("POST", ADD, json={**owner.creds, "total_limit": "200",
                                                "hourly_limit": "010"})
    assert r.status == 200, r.body
    name = r.json()["smtp_user_name"]
    r = await client.request("POST", EDIT, json={**owner.creds, "smtp_user_name": name,
                                                 "hourly_limit": "15"})
    assert r.status == 200, r.body
    r = await client.request("POST", LIST, json=owner.creds)
    (user,) = r.json()["smtp_list"]
    assert (user["total_limit"], user["hourly_limit"]) == (200, 15)      # integers back
    for value in [*REFUSED_DIGITS, "0", str(2**63), True, 1.5]:
        r = await client.request("POST", ADD, json={**owner.creds, "total_limit": value,
                                                    "hourly_limit": 1})
        assert r.status == 400, (value, r.body)
        assert r.json()["name"] == "ValidationError"
        assert r.json()["message"].startswith("total_limit: ")


async def test_smtps_accepts_digit_strings(clients):
    relay, client, owner = clients
    r = await client.request("POST", SAVE, json=smtps_body(owner.idapp, port="2525",
                                                           priority="7"),
                             headers=owner.headers)
    assert r.status == 200, r.body
    assert (r.json()["port"], r.json()["priority"]) == (2525, 7)
    for value in [*REFUSED_DIGITS, "0", "65536", True]:
        r = await client.request("POST", SAVE, json=smtps_body(owner.idapp, port=value),
                                 headers=owner.headers)
        assert r.status == 400, (value, r.body)
        assert r.json()["code"] == 400 and r.json()["message"].startswith("port: ")


async def test_webitel_accepts_digit_strings(clients):
    relay, client, owner = clients
    r = await client.request("POST", SETTINGS, query={"domain": "a.example"},
                             json=webitel_body(port="2465"), headers=owner.headers)
    assert r.status == 200, r.body
    assert r.json()["options"]["port"] == 2465
    for value in [*REFUSED_DIGITS, "0", "65536", False]:
        r = await client.request("POST", SETTINGS, query={"domain": "a.example"},
                                 json=webitel_body(port=value), headers=owner.headers)
        assert r.status == 400, (value, r.body)
        assert r.json()["status"] == "error" and r.json()["info"].startswith("options.port: ")


# ------------------------------------------------------------ Content-Type hint

async def test_missing_content_type_gets_a_hint(clients):
    relay, client, owner = clients
    r = await client.request("POST", LIST, body=json.dumps(owner.creds).encode())
    assert r.status == 200 and r.json()["status"] == "success"     # valid JSON: no need
    r = await client.request("POST", ADD, body=BROKEN, headers=owner.headers)
    assert r.status == 400
    assert r.json()["message"] == f"invalid JSON body: {WHERE} (send Content-Type: " \
                                  "application/json)"
    r = await client.request("POST", ENGINE, query={"domain": "a.example"}, body=BROKEN,
                             headers=owner.headers)
    assert r.status == 400 and r.json()["info"].endswith("(send Content-Type: application/json)")


async def test_form_body_sent_as_json_gets_the_form_hint(clients):
    relay, client, owner = clients
    r = await client.request("POST", ADD, body=b"total_limit=1&hourly_limit=1",
                             headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.json()["message"].endswith(
        "(send Content-Type: application/x-www-form-urlencoded)")


async def test_json_body_sent_as_form_gets_the_json_hint(clients):
    relay, client, owner = clients
    r = await client.request("POST", SAVE, body=b'{"idapp": "x"}',
                             headers={**owner.headers,
                                      "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 400
    assert r.json() == {"code": 400, "message": "malformed form body (send Content-Type: "
                        "application/json)"}


# ------------------------------------------------------------ relayctl

async def test_user_list_for_unknown_owner_says_owner_not_found(relay, admin, owner):
    run = await relayctl(relay, "--json", "user", "list", "--owner", owner.owner_id)
    assert run.rc == 0, run.err
    assert run.out.strip() == "[]"
    run = await relayctl(relay, "user", "list", "--owner", "0" * 24)
    assert run.rc == 1, (run.out, run.err)
    assert "owner not found" in run.err and "MissMatch" not in run.err
    run = await relayctl(relay, "user", "add", "--owner", "nobody", "--total", "1",
                         "--hourly", "1")
    assert run.rc == 1 and "owner not found" in run.err
