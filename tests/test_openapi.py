"""GET /openapi.json (SPEC 4.6): the committed docs/openapi.json is the
document relayd builds from its route tables, the real Unix socket answers
exactly it, the TCP listener the tenant part, and every route either
listener has is in it. tests/test_schemathesis.py holds relayd to it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from relayd.admin import TCP_FAMILIES, UNIX_FAMILIES
from relayd.admin.openapi import document, render

from admin_client import AdminClient

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
REGENERATE = "python -m relayd.admin > docs/openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def served_routes(relay, name: str) -> set[tuple[str, str]]:
    [server] = [s for s in relay.other_servers if getattr(s, "name", None) == name]
    return {(r.method, r.pattern) for r in server.router.routes}


def test_committed_document_is_current():
    assert COMMITTED.read_text() == render(document(UNIX_FAMILIES)), (
        f"docs/openapi.json is not what relayd serves; regenerate it: {REGENERATE}")


def test_the_regenerate_command_prints_the_committed_document():
    out = subprocess.run([sys.executable, "-m", "relayd.admin"], capture_output=True,
                         text=True, check=True, cwd=COMMITTED.parent.parent)
    assert out.stdout == COMMITTED.read_text()
    assert out.stderr == ""


def test_document_covers_spec_4_1_to_4_6():
    doc = json.loads(COMMITTED.read_text())
    assert doc["openapi"] == "3.1.0"
    ops = operations(doc)
    for op in [("POST", "/settings/addSmtp"), ("POST", "/settings/editSmtp"),
               ("POST", "/settings/resetSmtpPassword"), ("POST", "/settings/listSmtp"),
               ("POST", "/private/smtps/save"), ("GET", "/private/smtps/findByApp"),
               ("GET", "/private/smtps/findById"), ("POST", "/private/smtps/remove"),
               ("POST", "/private/smtps/check"),
               *[(m, p + "/api/v2/email/settings") for m in ("GET", "POST", "PUT", "DELETE")
                 for p in ("", "/engine")],
               ("POST", "/admin/owners"), ("GET", "/admin/owners"),
               ("DELETE", "/admin/owners/{owner_id}"), ("PATCH", "/admin/owners/{owner_id}"),
               ("POST", "/admin/apps"), ("GET", "/admin/apps"), ("PATCH", "/admin/apps/{idapp}"),
               ("GET", "/admin/status"), ("GET", "/admin/lockouts"),
               ("DELETE", "/admin/lockouts/{ip}"), ("GET", "/openapi.json")]:
        assert op in ops, op
    schemas = doc["components"]["schemas"]
    # The credentials, as each dialect carries them.
    assert {"owner_id", "token"} <= set(schemas["AddSmtpRequest"]["required"])
    assert doc["paths"]["/private/smtps/save"]["post"]["security"] == [
        {"XKey": [], "XAccessToken": []}]
    assert doc["components"]["securitySchemes"]["XAccessToken"]["name"] == "X-Access-Token"
    assert "security" not in doc["paths"]["/admin/status"]["get"]
    # Status may carry the instances sharing the store.
    instance = schemas["InstanceInfo"]
    assert set(instance["required"]) == {"id", "hostname", "pid", "started", "last_seen"}
    assert "instances" in schemas["Status"]["properties"]
    assert "instances" not in schemas["Status"]["required"]
    # Each dialect's error shape (SPEC 4.1-4.3).
    responses = doc["components"]["responses"]
    assert responses["SendCleanError"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendCleanError"}
    assert schemas["SendCleanError"]["properties"]["code"] == {"const": -1, "type": "integer"}


def test_document_says_what_validation_refuses():
    """Made from the validating models, so it refuses what they refuse: null
    where a field is not nullable, CR/LF in header text, and it admits the
    digit strings the seed dialects take for integers (SPEC 4.6)."""
    schemas = json.loads(COMMITTED.read_text())["components"]["schemas"]
    smtp = schemas["SmtpFields"]["properties"]
    assert smtp["status"] == {"enum": ["A", "D"], "type": "string"}          # no null
    assert {"type": "null"} in smtp["username"]["anyOf"]                      # nullable
    digits = smtp["port"]["anyOf"][1]
    assert digits["type"] == "string"
    port = re.compile(digits["pattern"])
    assert all(port.fullmatch(str(n)) for n in (1, 25, 587, 9999, 10000, 65535))
    assert not any(port.fullmatch(s) for s in ("0", "65536", "99999", "-1", "1e3", " 2", ""))
    assert port.fullmatch("0025")          # relayd reads "0025" as 25
    assert smtp["defaultfromname"]["anyOf"][0]["pattern"] == "^[^\\r\\n\\x00]*$"
    assert smtp["numerrors"]["readOnly"] is True
    assert "also spelled ssltls" in smtp["sslTls"]["description"]


async def test_unix_socket_answers_the_committed_document(relay, admin):
    r = await admin.request("GET", "/openapi.json")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert r.body.decode() == COMMITTED.read_text()


async def test_every_route_of_the_unix_socket_is_documented(relay):
    doc = json.loads(COMMITTED.read_text())
    assert served_routes(relay, "admin") == operations(doc)


async def test_tcp_listener_answers_the_tenant_document(relay_factory):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    async with AdminClient(host="127.0.0.1", port=relay.admin_tcp_port) as tcp:
        r = await tcp.request("GET", "/openapi.json")
    assert r.status == 200
    doc = r.json()
    assert doc == document(TCP_FAMILIES)
    assert not any(path.startswith("/admin/") for path in doc["paths"])
    assert served_routes(relay, "admin_tcp") == operations(doc)


async def test_openapi_json_refuses_other_methods(relay, admin):
    r = await admin.request("POST", "/openapi.json", json={})
    assert r.status == 405
    assert r.headers["allow"] == "GET"
