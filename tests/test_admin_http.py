"""Hostile HTTP input against the admin socket (STYLE 12, SPEC 4.5): each case
gets its refusal, and relayd answers normally afterwards."""

from __future__ import annotations

import asyncio
import json

import pytest

from admin_client import AdminClient, raw_exchange, status_of
from relayd.admin import http

MIB = 1 << 20


def req(head: str, body: bytes = b"", *, close: bool = True) -> bytes:
    """A request from ``head`` (lines separated by \\n). ``close`` adds
    Connection: close so that raw_exchange sees the end of the answer."""
    line, _, rest = head.partition("\n")
    if close:
        line += "\nConnection: close"
    return (line + "\n" + rest).replace("\n", "\r\n").encode() + b"\r\n" + body


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return req(f"POST {path} HTTP/1.1\nHost: x\nContent-Type: {content_type}\n"
               f"Content-Length: {len(body)}\n", body)


HOSTILE = [
    # name, raw request, expected status
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("http-0.9", b"GET /admin/status\r\n\r\n", 400),
    ("no-host", req("GET /admin/status HTTP/1.1\n"), 400),
    ("bare-lf-garbage", b"GET /admin/status HTTP/1.1\nHost: x\nBad Header\n\n", 400),
    ("header-with-space", req("GET /admin/status HTTP/1.1\nHost: x\nX Key: y\n"), 400),
    ("two-content-lengths-equal",
     req("POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: 2\nContent-Length: 2\n",
         b"{}"), 400),
    ("two-content-lengths-differ",
     req("POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: 2\nContent-Length: 20\n",
         b"{}"), 400),
    ("content-length-list",
     req("POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: 2, 2\n", b"{}"), 400),
    ("te-and-content-length",
     req("POST /admin/owners HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"
         "Content-Length: 7\n", b"2\r\n{}\r\n0\r\n\r\n"), 400),
    ("unknown-transfer-coding",
     req("POST /admin/owners HTTP/1.1\nHost: x\nTransfer-Encoding: gzip\n"), 501),
    ("negative-content-length",
     req("POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: -1\n"), 400),
    ("oversize-content-length",
     req(f"POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: {MIB + 1}\n"), 413),
    ("huge-content-length",
     req("POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: 99999999999999999\n"), 413),
    ("oversize-chunked",
     req("POST /admin/owners HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n",
         b"".join([b"10000\r\n" + b"a" * 0x10000 + b"\r\n"] * 17)), 413),
    ("huge-header", req("GET /admin/status HTTP/1.1\nHost: x\nX-Big: " + "a" * 20000 + "\n"),
     431),
    ("many-headers",
     req("GET /admin/status HTTP/1.1\nHost: x\n" + "".join(f"X-{i}: v\n" for i in range(3000))),
     431),
    ("bad-json", post("/admin/owners", b'{"plan": '), 400),
    ("json-array", post("/admin/owners", b'["free"]'), 400),
    ("json-deep-nesting", post("/admin/owners", b"[" * 100000), 400),
    ("json-huge-integer", post("/admin/owners", b'{"plan": ' + b"9" * 5000 + b"}"), 400),
    ("json-nan", post("/admin/owners", b'{"plan": NaN}'), 400),
    ("json-duplicate-keys", post("/admin/owners", b'{"plan": "free", "plan": "paid"}'), 400),
    ("json-not-utf8", post("/admin/owners", b'{"plan": "\xff\xfe"}'), 400),
    ("json-wrong-type", post("/admin/owners", b'{"plan": 1}'), 400),
    ("form-not-utf8",
     post("/admin/owners", b"plan=%ff", "application/x-www-form-urlencoded"), 400),
    ("form-malformed", post("/admin/owners", b"plan", "application/x-www-form-urlencoded"), 400),
    ("form-repeated-key",
     post("/admin/owners", b"plan=free&plan=paid", "application/x-www-form-urlencoded"), 400),
    ("multipart", post("/admin/owners", b"--x--", "multipart/form-data; boundary=x"), 415),
    ("query-repeated-key", req("GET /admin/apps?owner_id=a&owner_id=b HTTP/1.1\nHost: x\n"),
     400),
    ("query-bad-percent", req("GET /admin/apps?owner_id=%ff%fe HTTP/1.1\nHost: x\n"), 400),
    ("query-and-body-both", req("POST /admin/owners?plan=free HTTP/1.1\nHost: x\n"
                                "Content-Type: application/json\nContent-Length: 16\n",
                                b'{"plan": "paid"}'), 400),
    ("repeated-credential-header",
     req("GET /private/smtps/findByApp?idapp=x HTTP/1.1\nHost: x\nX-Key: a\nX-Key: b\n"
         "X-Access-Token: t\n"), 400),
    ("crlf-in-json-value",
     post("/admin/apps", json.dumps({"owner_id": "a" * 24, "name": "x\r\nInjected: 1"}).encode()),
     400),
    ("nul-in-json-value",
     post("/admin/apps", json.dumps({"owner_id": "a" * 24, "name": "x\x00y"}).encode()), 400),
    ("unknown-route", req("GET /etc/passwd HTTP/1.1\nHost: x\n"), 404),
    ("dot-dot-route", req("GET /admin/../admin/status HTTP/1.1\nHost: x\n"), 404),
    ("bad-method", req("BREW /admin/status HTTP/1.1\nHost: x\n"), 405),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in HOSTILE],
                         ids=[n for n, _, _ in HOSTILE])
async def test_hostile_request_is_refused_and_relayd_survives(relay, admin, data, expected):
    raw = await raw_exchange(relay, data)
    assert status_of(raw) == expected, raw[:300]
    if expected >= 400:
        # Every refusal is JSON in a dialect's shape; nothing of the input is echoed.
        body = raw.partition(b"\r\n\r\n")[2]
        assert b"garbage" not in body and b"Injected" not in body
        error = json.loads(body)
        assert error.get("message") or error.get("info")
    r = await admin.request("GET", "/admin/status")
    assert r.status == 200


async def test_a_body_of_exactly_one_mib_is_read(relay, admin):
    filler = b" " * (MIB - len(b'{"plan": "free", "x": ""}'))
    body = b'{"plan": "free", "x": ""' + filler + b"}"
    assert len(body) == MIB
    raw = await raw_exchange(relay, post("/admin/owners", body))
    assert status_of(raw) == 400           # read and validated (unknown key), not 413
    assert b"unknown parameter" in raw


async def test_refusal_names_the_dialect(relay):
    raw = await raw_exchange(relay, req(
        f"POST /settings/addSmtp HTTP/1.1\nHost: x\nContent-Length: {MIB + 1}\n"))
    assert status_of(raw) == 413
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert body == {"status": "error", "code": -1, "name": "ValidationError",
                    "message": "request body too large"}


async def test_slowloris_head_times_out(relay, admin, monkeypatch):
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.3)
    raw = await raw_exchange(relay, b"GET /admin/status HTTP/1.1\r\nHost: x\r\nX-Slow: 1",
                             timeout=10)
    assert raw.endswith(b"}")           # answered, then closed (raw_exchange saw EOF)
    assert status_of(raw) == 408
    assert (await admin.request("GET", "/admin/status")).status == 200


async def test_slow_body_times_out(relay, monkeypatch):
    monkeypatch.setattr(http, "BODY_TIMEOUT", 0.3)
    raw = await raw_exchange(relay, req(
        "POST /admin/owners HTTP/1.1\nHost: x\nContent-Length: 100\n", b'{"plan"'), timeout=10)
    assert status_of(raw) == 408


async def test_silent_connection_is_closed_without_answer(relay, monkeypatch):
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.3)
    assert await raw_exchange(relay, b"", timeout=10) == b""


async def test_half_closed_incomplete_request(relay, admin):
    raw = await raw_exchange(relay, b"GET /admin/status HTTP/1.1\r\nHost: x\r\n",
                             half_close=True)
    assert status_of(raw) in (0, 400)
    assert (await admin.request("GET", "/admin/status")).status == 200


async def test_keep_alive_and_pipelining(relay):
    one = req("GET /admin/owners HTTP/1.1\nHost: x\n", close=False)
    last = req("GET /admin/status HTTP/1.1\nHost: x\n")
    raw = await raw_exchange(relay, one + one + last)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    async with AdminClient(relay.config.admin.socket) as c:
        for _ in range(3):
            assert (await c.request("GET", "/admin/owners")).status == 200
        writer = c.writer
        assert (await c.request("GET", "/admin/status")).status == 200
        assert c.writer is writer          # the same connection throughout


async def test_expect_100_continue(relay):
    body = b'{"plan": "paid"}'
    reader, writer = await asyncio.open_unix_connection(relay.config.admin.socket)
    try:
        writer.write(req(f"POST /admin/owners HTTP/1.1\nHost: x\nExpect: 100-continue\n"
                         f"Content-Type: application/json\nContent-Length: {len(body)}\n",
                         close=False))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert final.startswith(b"HTTP/1.1 201 ")
    finally:
        writer.close()


async def test_connection_limit(relay, admin, monkeypatch):
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    held = [await asyncio.open_unix_connection(relay.config.admin.socket) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)
        extra = await raw_exchange(relay, req("GET /admin/status HTTP/1.1\nHost: x\n"))
        assert extra == b""                # closed at once, unanswered
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.05)
    assert (await admin.request("GET", "/admin/status")).status == 200


async def test_tcp_listener_survives_hostile_input(relay_factory):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    raw = await raw_exchange(relay, b"\x16\x03\x01garbage\r\n\r\n", tcp_port=relay.admin_tcp_port)
    assert status_of(raw) == 400
    raw = await raw_exchange(relay, req(
        f"POST /settings/addSmtp HTTP/1.1\nHost: x\nContent-Length: {4 * MIB}\n",
        b"a" * MIB), tcp_port=relay.admin_tcp_port)
    assert status_of(raw) == 413
    async with AdminClient(host="127.0.0.1", port=relay.admin_tcp_port) as c:
        r = await c.request("POST", "/settings/listSmtp", json={})
        assert r.status == 401


@pytest.mark.parametrize("method,path,kwargs,shape", [
    ("POST", "/settings/listSmtp", {"json": {}}, {"status", "code", "name", "message"}),
    ("GET", "/private/smtps/findByApp", {"query": {"idapp": "a" * 24}}, {"code", "message"}),
    ("GET", "/api/v2/email/settings", {"query": {"domain": "a.example"}}, {"status", "info"}),
    ("GET", "/admin/owners/" + "a" * 24, {}, {"status", "message"}),
], ids=["sendclean", "smtps", "webitel", "operator"])
async def test_internal_error_in_each_dialect_shape(relay, admin, monkeypatch, method, path,
                                                    kwargs, shape):
    async def broken(*args, **kw):
        raise RuntimeError("secret internals")
    for name in ("get_owner", "get_app", "get_domain", "list_users"):
        monkeypatch.setattr(relay.store, name, broken)
    owner = {"X-Relayd-Owner": "a" * 24}            # acting as an owner: get_owner breaks
    r = await admin.request(method, path, headers=owner, **kwargs)
    assert r.status == 500 and set(r.json()) == shape
    assert b"secret" not in r.body
