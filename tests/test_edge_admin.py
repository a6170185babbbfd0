"""Reliability at the edges of the admin API: ``smtps/check`` is no port
scanner (SPEC 4.2), cheap malformed text is a 4xx and never a traceback
(SPEC 4.5), and one client address cannot monopolise a TCP listener
(admin.listen, metrics.listen).

Regressions: check used to quote whatever the target sent ("-1 Malformed SMTP
response line: SSH-2.0-OpenSSH_9.2") and Python's wording of a failed connect
("SMTPConnectError: ... [Errno 111]"); a JSON "\\ud800" in an owner id or a
token reached SQLite and hashing and came back as HTTP 500 with an
error-level traceback; 256 slow request heads from one address filled a
listener for 20 s each.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from admin_client import AdminClient, new_owner, status_of
from relayd.admin import http

CHECK = "/private/smtps/check"
SAVE = "/private/smtps/save"
SURROGATE = "\ud800"


# ---------------------------------------------------------------- A: smtps/check

@pytest.fixture
async def banner_server() -> AsyncIterator[Callable[[bytes], Any]]:
    """banner_server(data) -> port of a loopback TCP server that sends
    ``data`` to every client on connect and then closes: a foreign service
    (SSH, HTTP, ...) or an SMTP server refusing at the greeting."""
    servers: list[asyncio.AbstractServer] = []

    async def start(data: bytes) -> int:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for s in servers:
        s.close()


async def check_reply(admin: AdminClient, owner: Any, **upstream: Any) -> tuple[int, Any]:
    """Save an upstream for ``owner``'s app and check it: (status, json)."""
    r = await admin.request("PATCH", f"/admin/apps/{owner.idapp}",
                            json={"test_email": "probe@example.net"})
    assert r.status == 200, r.body
    r = await admin.request("POST", SAVE, headers=owner.headers, json={
        "idapp": owner.idapp, "host": "127.0.0.1", "auth": False, "startstls": False,
        **upstream})
    assert r.status == 200, r.body
    r = await admin.request("POST", CHECK, headers=owner.headers, json={"idsmtp": r.json()["_id"]})
    return r.status, r.json() if r.body else None


FOREIGN = [
    ("ssh", b"SSH-2.0-OpenSSH_9.2\r\n", [b"SSH", b"OpenSSH"]),
    ("http", b"HTTP/1.1 400 Bad Request\r\nServer: intranet-httpd/2.4\r\n\r\n<h1>x</h1>",
     [b"HTTP", b"intranet", b"Bad Request"]),
    ("smtp-then-junk", b"220-mx.internal ESMTP\r\nredis_version:7.2.4\r\n", [b"redis", b"7.2"]),
    ("tls-bytes", b"\x16\x03\x01\x00\x2a\x02\x00\x00\x26\x03\x03secretbytes\r\n", [b"secret"]),
    ("long-line", b"A" * 2000 + b"\r\n", [b"AAAA"]),
]


async def test_check_quotes_smtp_replies_only(admin, owner, banner_server):
    # A real SMTP refusal is quoted: the tenant needs it to fix its settings.
    port = await banner_server(b"554 5.7.1 mx.example.net does not know you\r\n")
    status, body = await check_reply(admin, owner, port=port)
    assert status == 406 and body["code"] == 5
    assert body["message"] == "SMTP check failed: 554 5.7.1 mx.example.net does not know you"
    # Anything else is described, never echoed.
    for name, banner, secrets in FOREIGN:
        status, body = await check_reply(admin, owner, port=await banner_server(banner))
        assert status == 406 and body["code"] == 5, name
        message = body["message"].encode()
        assert message.startswith(b"SMTP check failed: not an SMTP server"), (name, message)
        for leaked in [*secrets, b"Malformed", b"-1 "]:
            assert leaked not in message, (name, message)


async def test_check_failures_in_plain_words(relay_factory, sink_factory, closed_port):
    relay = await relay_factory(timeouts={"connect": 1})
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)   # never greets
    tls_sink = await sink_factory(tls="implicit")       # a certificate relayd does not trust
    plain_sink = await sink_factory()                   # no STARTTLS, no accounts
    try:
        async with AdminClient(relay.config.admin.socket) as a:
            o = await new_owner(a)
            for upstream, words in [
                    ({"port": closed_port}, "connection refused"),
                    ({"port": silent.sockets[0].getsockname()[1]}, "timed out after 1 s"),
                    ({"port": tls_sink.port, "sslTls": True}, "TLS certificate not trusted"),
                    ({"port": plain_sink.port, "startstls": True},
                     "the server does not offer STARTTLS"),
                    ({"port": plain_sink.port, "auth": True, "username": "u", "password": "p"},
                     "AUTH refused: 535 5.7.8 Authentication credentials invalid")]:
                status, body = await check_reply(a, o, **upstream)
                assert status == 406, body
                assert body["message"] == f"SMTP check failed: {words}", body
    finally:
        silent.close()


# ---------------------------------------------------------------- B: malformed text

def bad_text_requests(o: Any, user: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, target, request kwargs): a lone surrogate, or bytes that are
    not UTF-8, in every kind of field and every place a request carries text."""
    s, creds, h = SURROGATE, o.creds, o.headers
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    doc = {"options": {"host": "smtp.example.net"}}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        # SendClean: credentials and fields in the JSON body, a form, the query
        ("POST", "/settings/listSmtp", {"json": {**creds, "owner_id": s}}),
        ("POST", "/settings/listSmtp", {"json": {**creds, "token": s}}),
        ("POST", "/settings/listSmtp", {"json": {**creds, "idapp": s}}),
        ("POST", "/settings/addSmtp", {"json": {**creds, "total_limit": 1, "hourly_limit": 1,
                                                "idapp": s}}),
        ("POST", "/settings/editSmtp", {"json": {**creds, "smtp_user_name": s}}),
        ("POST", "/settings/resetSmtpPassword", {"json": {**creds, "smtp_user_name": user,
                                                          s: "unknown key"}}),
        ("POST", "/settings/listSmtp", {"body": b'{"owner_id": "\xed\xa0\x80", "token": "x"}'}),
        ("POST", "/settings/listSmtp", {"body": b"owner_id=%ED%A0%80&token=x", "headers": form}),
        ("POST", "/settings/listSmtp?owner_id=%ED%A0%80&token=x", {}),
        # SMTPs: host (an IPv6 zone takes any text), names, ids, the query
        ("POST", SAVE, {"json": {"idapp": o.idapp, "host": f"fe80::1%{s}", "port": 25},
                        "headers": h}),
        ("POST", SAVE, {"json": {"idapp": o.idapp, "host": "h.example", "port": 25,
                                 "allowed_domains": [s]}, "headers": h}),
        ("POST", SAVE, {"json": {"idapp": s, "host": "h.example", "port": 25}, "headers": h}),
        ("POST", CHECK, {"json": {"idsmtp": s}, "headers": h}),
        ("GET", "/private/smtps/findByApp?idapp=%ED%A0%80", {"headers": h}),
        # Webitel: domain names in the query and the body, free text
        ("POST", "/api/v2/email/settings?domain=example.com",
         {"json": {**doc, "description": s}, "headers": h}),
        ("POST", "/api/v2/email/settings?domain=example.com",
         {"json": {**doc, "domain": s}, "headers": h}),
        ("POST", "/api/v2/email/settings?domain=example.com",
         {"json": {"options": {"host": s}}, "headers": h}),
        ("GET", "/api/v2/email/settings?domain=%ED%A0%80", {"headers": h}),
        # Headers carry bytes, never a surrogate: still no 500
        ("GET", "/private/smtps/findByApp?idapp=x",
         {"headers": {"X-Key": b"\xed\xa0\x80", "X-Access-Token": b"\xff"}}),
    ]
    return cases


UNIX_ONLY = [
    ("GET", "/private/smtps/findByApp?idapp=x", {"headers": {"X-Relayd-Owner": b"\xed\xa0\x80"}}),
    ("POST", "/admin/apps", {"json": {"owner_id": SURROGATE, "name": "n"}}),
    ("POST", "/admin/apps", {"json": {"owner_id": "x", "name": SURROGATE}}),
    ("GET", "/admin/owners/%ED%A0%80", {}),
    ("GET", "/admin/apps?owner_id=%ED%A0%80", {}),
    ("DELETE", "/admin/users/%ED%A0%80", {}),
]


def error_message(body: bytes) -> str:
    doc = json.loads(body)
    return str(doc.get("message") or doc.get("info"))


async def test_lone_surrogates_and_bad_utf8_are_4xx(relay_factory, caplog):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    async with AdminClient(relay.config.admin.socket) as unix, \
            AdminClient(host="127.0.0.1", port=relay.admin_tcp_port) as tcp:
        o = await new_owner(unix)
        r = await unix.request("POST", "/settings/addSmtp",
                               json={**o.creds, "total_limit": 5, "hourly_limit": 5})
        user = r.json()["smtp_user_name"]
        caplog.clear()
        cases = [(c, case) for case in bad_text_requests(o, user) for c in (unix, tcp)]
        cases += [(unix, case) for case in UNIX_ONLY]
        for client, (method, target, kwargs) in cases:
            r = await client.request(method, target, **kwargs)
            assert 400 <= r.status < 500, (method, target, kwargs, r.status, r.body)
            if "json" in kwargs and SURROGATE in json.dumps(kwargs["json"], ensure_ascii=False):
                assert "surrogate" in error_message(r.body), r.body
        # A client's mistake is no incident: nothing at error level, no traceback.
        noisy = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
        assert noisy == [], [rec.getMessage() for rec in noisy]
        # ... and the records are intact.
        r = await unix.request("POST", "/settings/listSmtp", json=o.creds)
        assert [u["smtp_user_name"] for u in r.json()["smtp_list"]] == [user]


# ---------------------------------------------------------------- C: per-address bound

SLOW_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "      # never finished


async def connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def one_request(port: int, source: str, path: str) -> int:
    reader, writer = await connect(port, source)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return status_of(raw)


async def unix_serves_many(path: str, n: int) -> None:
    held = [await asyncio.open_unix_connection(path) for _ in range(n)]
    try:
        for _, w in held:
            w.write(b"GET /admin/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for r, _ in held:
            assert status_of(await asyncio.wait_for(r.read(), 10)) == 200
    finally:
        for _, w in held:
            w.close()


async def served_eventually(port: int, source: str, path: str, status: int) -> None:
    """Poll (bounded) until ``source`` gets an answer: the server frees a
    slot once it has seen the client's close."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while True:
        try:
            if await one_request(port, source, path) == status:
                return
        except ConnectionError:
            pass
        assert loop.time() < end, "the address's slots were never freed"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("listener", ["metrics", "admin_tcp"])
async def test_one_address_cannot_monopolise_a_tcp_listener(relay_factory, listener):
    relay = await relay_factory(admin={"listen": "127.0.0.1:0"})
    port = relay.metrics_port if listener == "metrics" else relay.admin_tcp_port
    path, served = ("/metrics", 200) if listener == "metrics" else ("/nope", 404)
    slow = []
    try:
        for _ in range(http.MAX_PER_ADDRESS):
            reader, writer = await connect(port, "127.0.0.1")
            writer.write(SLOW_HEAD)
            slow.append((reader, writer))
        # Everything each slow connection gets, up to its close.
        answers = [asyncio.create_task(r.read()) for r, _ in slow]
        # One more from the same address is closed at once, unanswered ...
        reader, writer = await connect(port, "127.0.0.1")
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        assert not any(a.done() for a in answers), "the slow ones are still held"
        # ... while another address is served, and the trusted Unix socket,
        # which has no per-address bound, takes more than that many at once.
        assert await one_request(port, "127.0.0.2", path) == served
        if listener == "admin_tcp":
            await unix_serves_many(relay.config.admin.socket, http.MAX_PER_ADDRESS + 2)
        # The slow heads are cut off after the header timeout (408), freeing
        # the address's slots.
        await asyncio.wait(answers, timeout=http.TCP_FIRST_HEAD_TIMEOUT + 3)
        assert all(a.done() for a in answers), "slow heads outlived the header timeout"
        assert {status_of(a.result()) for a in answers} == {408}
        # Once those clients hang up, the address is served again.
        for _, w in slow:
            w.close()
        await served_eventually(port, "127.0.0.1", path, served)
    finally:
        for _, w in slow:
            w.close()
