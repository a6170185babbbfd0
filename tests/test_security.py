"""Secrets and hardening (issue 5; SPEC 2, 3.9, 3.13, 4.4): no password or
token in logs, metrics, /admin/status or error messages; constant-time
comparisons; private file modes whatever the umask; TLS 1.2 as the floor on
both sides; an admin socket fed garbage while mail flows."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import secrets
import signal
import ssl
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from admin_client import AdminClient, http_get
from conftest import base_config, simple_message, sink_upstream, smtp_client
from helpers_smtp import RawSMTP, b64, plain_blob
from relayd import store as store_mod
from relayd.config import TLSFiles, server_tls_context
from relayd.maillog import LogfmtFormatter
from relayd.upstream import client_tls_context
from relayd_proc import RelaydProcess

SENDER = "app@example.com"
RCPT = "to@example.net"
WINDOW = 12


def fresh(label: str) -> str:
    """A secret nobody could guess, labelled so a leak says what leaked."""
    return f"{label}-{secrets.token_urlsafe(18)}"


# ---------------------------------------------------------------- secrets never leak

@dataclass
class Exercise:
    """What one full session produced: every secret that went in (and the
    encodings a client sends on the wire), and every text relayd gave out
    that must hold none of them."""

    secrets: dict[str, str] = field(default_factory=dict)
    wire: list[bytes] = field(default_factory=list)          # AUTH blobs as sent
    outputs: list[tuple[str, bytes]] = field(default_factory=list)

    def out(self, where: str, data: bytes) -> None:
        self.outputs.append((where, data))

    def needles(self) -> list[tuple[str, bytes]]:
        """Each secret, and every WINDOW-character piece of it: a truncated
        or partly masked secret is a leak too. (WINDOW random base64
        characters are 72 bits: no false match.)"""
        found = []
        for name, value in self.secrets.items():
            found.append((name, value.encode()))
            found += [(f"a piece of {name}", value[i:i + WINDOW].encode())
                      for i in range(len(value) - WINDOW + 1)]
        found += [(f"wire blob {blob[:12]!r}", blob) for blob in self.wire]
        return found


def assert_no_secret(ex: Exercise, where: str, text: bytes | str) -> None:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    for name, needle in ex.needles():
        assert needle not in data, f"{name} appears in {where}"


async def exercise(admin: AdminClient, smtp_port: int, metrics_port: int, sink: Any,
                   system_sink: Any, ex: Exercise) -> None:
    """A whole session: owners, SMTP users and upstreams made through the
    admin API, AUTH PLAIN and LOGIN (right, wrong and misplaced secrets),
    mail through a password-protected upstream and a system SMTP, refused
    admin requests carrying secrets, then /metrics and /admin/status."""
    up_password = ex.secrets["upstream password"]

    async def call(method: str, target: str, expect: int | None, **kw: Any) -> Any:
        r = await admin.request(method, target, **kw)
        if expect is not None:
            assert r.status == expect, (target, r.status, r.body)
        return r

    # Owners, created by the operator: the token is shown once, in this answer.
    r = await call("POST", "/admin/owners", 201, json={"plan": "paid"})
    o1 = r.json()
    r = await call("POST", "/admin/owners", 201, json={"plan": "paid"})
    o2 = r.json()
    ex.secrets["owner token 1"], ex.secrets["owner token 2"] = o1["token"], o2["token"]
    h1 = {"X-Key": o1["owner_id"], "X-Access-Token": o1["token"]}

    # SMTP users (SendClean dialect); a password reset, so the old one is a secret too.
    r = await call("POST", "/settings/addSmtp", 200, json={
        "owner_id": o1["owner_id"], "token": o1["token"], "total_limit": 100,
        "hourly_limit": 100})
    user1, ex.secrets["old smtp password"] = r.json()["smtp_user_name"], r.json()["smtp_password"]
    r = await call("POST", "/settings/resetSmtpPassword", 200, json={
        "owner_id": o1["owner_id"], "token": o1["token"], "smtp_user_name": user1})
    ex.secrets["smtp password 1"] = pw1 = r.json()["smtp_password"]
    r = await call("POST", "/settings/addSmtp", 200, form={
        "owner_id": o2["owner_id"], "token": o2["token"], "total_limit": "100",
        "hourly_limit": "100"})
    user2, ex.secrets["smtp password 2"] = r.json()["smtp_user_name"], r.json()["smtp_password"]
    pw2 = ex.secrets["smtp password 2"]

    # An upstream with AUTH (seed-000 dialect) and domain settings with a password.
    r = await call("POST", "/private/smtps/save", 200, headers=h1, json={
        "idapp": o1["idapp"], "host": "127.0.0.1", "port": sink.port, "username": "upuser",
        "password": up_password, "auth": True, "startstls": False, "ssltls": False,
        "priority": 1})
    ex.out("smtps/save answer", r.body)
    idsmtp = r.json()["_id"]
    r = await call("POST", "/api/v2/email/settings?domain=unused.test", 200, headers=h1, json={
        "provider": "smtp", "description": "d", "from": "a@unused.test",
        "options": {"host": "127.0.0.1", "port": sink.port, "secure": False,
                    "auth": {"user": "upuser", "pass": ex.secrets["domain password"]}}})
    ex.out("webitel POST answer", r.body)
    await call("PATCH", f"/admin/apps/{o1['idapp']}", 200, json={"test_email": "probe@example.net"})

    # Reads: every record that holds a secret comes back masked.
    for method, target, kw in [
        ("GET", f"/private/smtps/findById?idsmtp={idsmtp}", {"headers": h1}),
        ("GET", f"/private/smtps/findByApp?idapp={o1['idapp']}", {"headers": h1}),
        ("GET", "/api/v2/email/settings?domain=unused.test", {"headers": h1}),
        ("POST", "/settings/listSmtp", {"json": {"owner_id": o1["owner_id"],
                                                 "token": o1["token"]}}),
        ("GET", "/admin/owners", {}),
        ("GET", f"/admin/users/{user1}", {}),
        ("GET", f"/admin/smtps/{idsmtp}", {}),
        ("GET", f"/admin/domains?owner_id={o1['owner_id']}", {}),
        ("POST", "/private/smtps/check", {"headers": h1, "json": {"idsmtp": idsmtp}}),
    ]:
        r = await call(method, target, 200, **kw)
        ex.out(f"{method} {target.split('?')[0]}", r.body)

    # Refused requests that carry secrets: no error message quotes them.
    ex.secrets["rejected upstream password"] = fresh("UP2")
    ex.secrets["rejected domain password"] = fresh("DP2")
    for method, target, expect, kw in [
        ("POST", "/settings/addSmtp", 401, {"json": {
            "owner_id": o1["owner_id"], "token": o2["token"], "total_limit": 1,
            "hourly_limit": 1}}),
        ("POST", "/settings/addSmtp", 400, {"json": {
            "owner_id": o1["owner_id"], "token": o1["token"], "total_limit": up_password,
            "hourly_limit": 1}}),
        ("POST", "/settings/resetSmtpPassword", None, {"json": {
            "owner_id": o1["owner_id"], "token": o1["token"], "smtp_user_name": pw1}}),
        ("POST", f"/settings/listSmtp?owner_id={o1['owner_id']}&token={o2['token']}", 401, {}),
        ("POST", "/private/smtps/save", 400, {"headers": h1, "json": {
            "idapp": o1["idapp"], "host": "127.0.0.1", "port": 99999, "auth": True,
            "username": "u", "password": ex.secrets["rejected upstream password"]}}),
        ("POST", "/private/smtps/save", 400, {"headers": h1, "json": {
            "idapp": o1["idapp"], "host": "127.0.0.1", "port": 25,
            "password": ex.secrets["rejected upstream password"] + "\r\nX-Injected: 1"}}),
        ("GET", f"/private/smtps/findById?idsmtp={idsmtp}", 403, {"headers": {
            "X-Key": o1["owner_id"], "X-Access-Token": up_password}}),
        ("POST", "/api/v2/email/settings?domain=bad.test", 400, {"headers": h1, "json": {
            "provider": "smtp", "options": {"host": "127.0.0.1", "port": 0, "auth": {
                "user": "u", "pass": ex.secrets["rejected domain password"]}}}}),
        ("POST", "/admin/owners", 400, {"json": {"plan": o1["token"]}}),
        ("POST", "/admin/owners", 400, {"body": b'{"plan": "' + pw1.encode() + b'"',
                                        "headers": {"Content-Type": "application/json"}}),
        ("GET", f"/admin/nothing-here?token={o1['token']}", 404, {}),
    ]:
        r = await call(method, target, expect, **kw)
        assert r.status >= 400, (target, r.status)
        ex.out(f"error {method} {target.split('?')[0]} -> {r.status}", r.body)

    # SMTP: wrong, old and misplaced secrets, then AUTH LOGIN and AUTH PLAIN that work.
    c = await RawSMTP.open(smtp_port)
    await c.ehlo()
    attempts = [
        plain_blob(user1, ex.secrets["old smtp password"]),     # the password before the reset
        plain_blob(pw1, "x"),                                    # the password in the user field
        plain_blob(user1, o1["token"]),                          # a token as the password
    ]
    for blob in attempts:
        ex.wire.append(blob)
        r = await c.cmd(b"AUTH PLAIN " + blob)
        assert r.code == 535, r
        ex.out("SMTP 535", str(r).encode())
    ex.wire += [b64(pw1)]
    r = await c.cmd("AUTH LOGIN")
    assert r.code == 334
    r = await c.cmd(b64(user1))
    assert r.code == 334
    r = await c.cmd(b64(pw1))
    assert r.code == 235, r
    r = await c.send_message(SENDER, [RCPT], simple_message())
    assert r.code == 250, r
    ex.out("SMTP 250", str(r).encode())
    await c.cmd("QUIT")
    await c.close()
    c = await RawSMTP.open(smtp_port)
    await c.ehlo()
    ex.wire.append(plain_blob(user2, pw2))
    r = await c.cmd(b"AUTH PLAIN " + plain_blob(user2, pw2))
    assert r.code == 235, r
    r = await c.send_message(SENDER, [RCPT], simple_message())   # paid, no upstream: system SMTP
    assert r.code == 250, r
    await c.cmd("QUIT")
    await c.close()
    # The check message and the first message went through the upstream
    # with AUTH, the second through the system SMTP with AUTH.
    assert [m.auth for m in sink.messages] == ["upuser", "upuser"]
    assert [m.auth for m in system_sink.messages] == ["sysuser"]

    status, body = await http_get(metrics_port, "/metrics")
    assert status == 200 and b"relayd_auth_attempts_total" in body
    ex.out("/metrics", body)
    r = await call("GET", "/admin/status", 200)
    ex.out("/admin/status", r.body)


def secret_set() -> Exercise:
    ex = Exercise()
    for name in ("upstream password", "domain password", "system smtp password"):
        ex.secrets[name] = fresh(name.split()[0].upper())
    return ex


def all_log_text(records: list[logging.LogRecord]) -> str:
    """Every record as relayd's formatter writes it, plus all its attributes
    (arguments, extras, exception text): a secret anywhere in a record shows."""
    fmt = LogfmtFormatter()
    return "\n".join(f"{fmt.format(r)} {r.getMessage()} {vars(r)!r}" for r in records)


async def test_no_secret_in_logs_metrics_status_or_errors_in_process(
        relay_factory, sink_factory, caplog):
    ex = secret_set()
    sink = await sink_factory(username="upuser", password=ex.secrets["upstream password"])
    system_sink = await sink_factory(username="sysuser",
                                     password=ex.secrets["system smtp password"])
    caplog.set_level(logging.DEBUG)
    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
    relay = await relay_factory(log_level="debug", system_smtps=[{
        "host": "127.0.0.1", "port": system_sink.port, "username": "sysuser",
        "password": ex.secrets["system smtp password"], "auth": True}])
    async with AdminClient(relay.config.admin.socket) as admin:
        await exercise(admin, relay.smtp_ports[0], relay.metrics_port, sink, system_sink, ex)
    logged = all_log_text(caplog.records)
    assert "event=message" in logged and "auth_failed" in logged   # the logs were captured
    assert_no_secret(ex, "the log", logged)
    for where, data in ex.outputs:
        assert_no_secret(ex, where, data)


@pytest.mark.slow
async def test_no_secret_in_a_relayd_process_stderr(tmp_path: Path, sink_factory):
    """The same session against ``python -m relayd`` at log_level debug: its
    whole stderr (the effective-config line included) holds no secret."""
    ex = secret_set()
    sink = await sink_factory(username="upuser", password=ex.secrets["upstream password"])
    system_sink = await sink_factory(username="sysuser",
                                     password=ex.secrets["system smtp password"])
    cfg = base_config(tmp_path, log_level="debug", system_smtps=[{
        "host": "127.0.0.1", "port": system_sink.port, "username": "sysuser",
        "password": ex.secrets["system smtp password"], "auth": True}])
    proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
    try:
        assert proc.metrics_port is not None
        async with AdminClient(cfg["admin"]["socket"]) as admin:
            await exercise(admin, proc.smtp_ports[0], proc.metrics_port, sink, system_sink, ex)
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.stop()
    assert "event=config" in proc.log and "level=debug" in proc.log
    assert "event=message" in proc.log
    assert_no_secret(ex, "relayd's stderr", proc.log)
    for where, data in ex.outputs:
        assert_no_secret(ex, where, data)


# ---------------------------------------------------------------- constant time

async def test_secret_comparisons_use_hmac_compare_digest(relay, provision, monkeypatch):
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    digest = store_mod.digest
    assert store_mod.secret_matches("s3cret", digest("s3cret"))
    assert calls == [(digest("s3cret"), digest("s3cret"))]
    calls.clear()
    assert not store_mod.secret_matches("s3cret", None)
    assert len(calls) == 1, "an unknown name is compared against a dummy, not skipped"

    tenant = await provision(relay)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    calls.clear()
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, "wrong"))).code == 535
    assert [a for a, _ in calls] == [digest("wrong")]
    calls.clear()
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob("smtp000000", "wrong"))).code == 535
    assert len(calls) == 1
    calls.clear()
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password))).code == 235
    assert [a for a, _ in calls] == [digest(tenant.password)]
    await c.close()

    async with AdminClient(relay.config.admin.socket) as admin:
        for owner_id, token in [(tenant.owner_id, "wrong-token"),
                                ("a" * 24, "wrong-token"),
                                (tenant.owner_id, tenant.token)]:
            calls.clear()
            r = await admin.request("POST", "/settings/listSmtp",
                                    json={"owner_id": owner_id, "token": token})
            assert r.status == (200 if token == tenant.token else 401), r.body
            assert [a for a, _ in calls] == [digest(token)], calls


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("mode", ["0660", "0600"])
async def test_file_modes_whatever_the_umask(relay_factory, provision, sink_factory, mode,
                                             monkeypatch):
    # The admin socket's mode just before relayd chmods it to admin.mode: a
    # wider one is a window in which others can connect (and stay connected).
    before_chmod: dict[str, int] = {}
    real_chmod = os.chmod

    def recording_chmod(path: Any, mode: int, *args: Any, **kw: Any) -> None:
        if Path(path).is_socket():
            before_chmod[str(path)] = stat.S_IMODE(os.stat(path).st_mode)
        real_chmod(path, mode, *args, **kw)

    monkeypatch.setattr(os, "chmod", recording_chmod)
    old = os.umask(0)
    try:
        relay = await relay_factory(admin={"mode": mode}, database=None)   # the SQLite files too
        sink = await sink_factory()
        tenant = await provision(relay, upstreams=[sink_upstream(sink)])
        client = await smtp_client(relay, tenant)          # journal writes: the WAL grows
        await client.sendmail(SENDER, [RCPT], simple_message())
        await client.quit()
    finally:
        os.umask(old)
    db = relay.config.database_path
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))
    sock = Path(relay.config.admin.socket)
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == int(mode, 8), oct(st.st_mode)
    assert before_chmod[str(sock)] & 0o077 == 0, oct(before_chmod[str(sock)])
    state = Path(relay.config.state_dir)
    assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0
    for path in state.rglob("*"):
        if path != sock:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))


# ---------------------------------------------------------------- TLS floor

def test_tls_contexts_refuse_tls_1_0_and_1_1(tls_files):
    cert, key = tls_files
    assert server_tls_context(TLSFiles(cert=cert, key=key)).minimum_version >= \
        ssl.TLSVersion.TLSv1_2
    for verify in (True, False):
        assert client_tls_context(verify).minimum_version >= ssl.TLSVersion.TLSv1_2


def legacy_context(server: bool, tls_files: tuple[str, str]) -> ssl.SSLContext:
    """A context that speaks TLS 1.0-1.1 only (OpenSSL 3 needs SECLEVEL 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():              # deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if server:
        ctx.load_cert_chain(*tls_files)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10)
    except (ssl.SSLError, ConnectionError):
        return False
    writer.close()
    return True


async def test_tls_1_1_handshakes_fail_both_ways(relay_factory, tls_files, client_ssl):
    """A real TLS 1.1 client against relayd's implicit-TLS listener, and
    relayd's upstream client context against a TLS 1.1-only server. A control
    handshake between the two legacy ends first proves the local OpenSSL can
    speak TLS 1.1 at all; if it cannot, only the context settings are
    asserted (test_tls_contexts_refuse_tls_1_0_and_1_1) and this test skips."""
    try:
        legacy_server = legacy_context(True, tls_files)
        legacy_client = legacy_context(False, tls_files)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this OpenSSL cannot build TLS 1.1 contexts: {exc}")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=legacy_server)
    old_port = server.sockets[0].getsockname()[1]
    try:
        if not await handshake(old_port, legacy_client):
            pytest.skip("this OpenSSL refuses TLS 1.1 even between two TLS 1.1 ends")
        # relayd as the client of a TLS 1.1-only upstream: refused.
        assert not await handshake(old_port, client_tls_context(False))
    finally:
        server.close()
    cert, key = tls_files
    relay = await relay_factory(listen=[{"address": "127.0.0.1:0", "tls": "implicit"}],
                                tls={"cert": cert, "key": key})
    port = relay.smtp_ports[0]
    assert not await handshake(port, legacy_client)       # TLS 1.1 client: refused
    c = await RawSMTP.open(port, ssl_ctx=client_ssl)      # a modern client gets the banner
    assert c.banner is not None and c.banner.code == 220
    assert c.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    await c.close()


# ---------------------------------------------------------------- admin garbage

def garbage_payloads(rng: random.Random) -> list[bytes]:
    return [
        rng.randbytes(rng.randint(1, 4096)),
        b"POST /admin/owners HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pl",
        b"GET /admin/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * rng.randint(1, 9000),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
        b"POST /settings/addSmtp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffff\r\n" + rng.randbytes(512),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(100),
    ]


async def test_admin_socket_garbage_while_mail_flows(relay, sink_factory, provision, caplog):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    path = relay.config.admin.socket
    rng = random.Random(20261123)
    mail_done = asyncio.Event()
    sent_garbage = 0
    held: list[asyncio.StreamWriter] = []     # half requests left open during the burst

    async def garbage() -> None:
        nonlocal sent_garbage
        for i in range(400):                  # bounded in count...
            if mail_done.is_set() and i >= 50:
                break
            payload = rng.choice(garbage_payloads(rng))
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(payload)
                await writer.drain()
            except ConnectionError:
                continue                      # relayd may close first: that is fine
            sent_garbage += 1
            if i % 10 == 0 and len(held) < 20:
                held.append(writer)
            else:
                writer.close()
            await asyncio.sleep(0)

    async def mail(n: int) -> None:
        client = await smtp_client(relay, tenant)
        for i in range(5):
            await client.sendmail(SENDER, [RCPT], simple_message(subject=f"m{n}-{i}"))
        await client.quit()

    async def all_mail() -> None:
        try:
            await asyncio.gather(*(mail(n) for n in range(4)))
        finally:
            mail_done.set()

    async with asyncio.timeout(60):                 # ...and in time
        await asyncio.gather(garbage(), all_mail())
    assert sent_garbage >= 50
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages)
    assert subjects == sorted(f"m{n}-{i}".encode() for n in range(4) for i in range(5))
    async with AdminClient(path) as admin:
        r = await admin.request("GET", "/admin/status")
        assert r.status == 200 and r.json()["sessions"] == 0
        r = await admin.request("POST", "/admin/owners", json={"plan": "free"})
        assert r.status == 201
    for writer in held:
        writer.close()
    # Garbage is refused, never an internal error.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---------------------------------------------------------------- exception text

async def test_smtp_exception_text_never_reaches_the_client(relay, provision, monkeypatch,
                                                            caplog):
    """STYLE 5: an unexpected exception is answered 451 4.3.0 and logged with
    the session id; its text (paths, internals) stays in the log."""
    tenant = await provision(relay)
    detail = fresh("internal-detail")

    def broken(*args: Any) -> Any:
        raise RuntimeError(f"{detail} at /var/lib/relayd/relayd.db")

    monkeypatch.setattr("relayd.delivery.route", broken)
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    await c.login(tenant.user, tenant.password)
    r = await c.cmd(f"MAIL FROM:<{SENDER}>")
    assert (r.code, r.enhanced) == (451, "4.3.0"), r
    assert detail not in r.text and "relayd.db" not in r.text and "RuntimeError" not in r.text
    assert (await c.cmd("NOOP")).code == 250            # the session goes on
    [session] = [s.session.id for s in relay.sessions]
    await c.close()
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"session={session}" in errors[0].getMessage()
    assert errors[0].exc_info is not None and detail in str(errors[0].exc_info[1])
