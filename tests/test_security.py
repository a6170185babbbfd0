"""Secrets and hardening (issue 5; SPEC 2, 3.9, 3.13, 4.4): no password or
token in logs, metrics, /admin/status or error messages; constant-time
comparisons; private file modes whatever the umask. TLS, admin garbage and
exception text: test_security_edges.py."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from admin_client import AdminClient, http_get
from conftest import base_config, simple_message, sink_upstream, smtp_client
from helpers_smtp import RawSMTP, b64, plain_blob
from relayd import store as store_mod
from relayd.maillog import LogfmtFormatter
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


@dataclass
class Made:
    """The records one exercise made: two owners (the first with an
    upstream), an SMTP user each."""

    o1: dict[str, Any]
    o2: dict[str, Any]
    user1: str
    pw1: str
    user2: str
    pw2: str
    idsmtp: str = ""

    @property
    def h1(self) -> dict[str, str]:
        return {"X-Key": self.o1["owner_id"], "X-Access-Token": self.o1["token"]}


async def call(admin: AdminClient, method: str, target: str, expect: int | None,
               **kw: Any) -> Any:
    r = await admin.request(method, target, **kw)
    if expect is not None:
        assert r.status == expect, (target, r.status, r.body)
    return r


async def exercise(admin: AdminClient, smtp_port: int, metrics_port: int, sink: Any,
                   system_sink: Any, ex: Exercise) -> None:
    """A whole session: owners, SMTP users and upstreams made through the
    admin API, AUTH PLAIN and LOGIN (right, wrong and misplaced secrets),
    mail through a password-protected upstream and a system SMTP, refused
    admin requests carrying secrets, then /metrics and /admin/status."""
    made = await make_records(admin, sink, ex)
    await read_back(admin, made, ex)
    await refused_requests(admin, made, ex)
    await smtp_sessions(smtp_port, made, ex)
    # The check message and the first message went through the upstream
    # with AUTH, the second through the system SMTP with AUTH.
    assert [m.auth for m in sink.messages] == ["upuser", "upuser"]
    assert [m.auth for m in system_sink.messages] == ["sysuser"]
    status, body = await http_get(metrics_port, "/metrics")
    assert status == 200 and b"relayd_auth_attempts_total" in body
    ex.out("/metrics", body)
    r = await call(admin, "GET", "/admin/status", 200)
    ex.out("/admin/status", r.body)


async def make_records(admin: AdminClient, sink: Any, ex: Exercise) -> Made:
    # Owners, created by the operator: the token is shown once, in this answer.
    o1 = (await call(admin, "POST", "/admin/owners", 201, json={"plan": "paid"})).json()
    o2 = (await call(admin, "POST", "/admin/owners", 201, json={"plan": "paid"})).json()
    ex.secrets["owner token 1"], ex.secrets["owner token 2"] = o1["token"], o2["token"]

    # SMTP users (SendClean dialect); a password reset, so the old one is a secret too.
    r = await call(admin, "POST", "/settings/addSmtp", 200, json={
        "owner_id": o1["owner_id"], "token": o1["token"], "total_limit": 100,
        "hourly_limit": 100})
    user1, ex.secrets["old smtp password"] = r.json()["smtp_user_name"], r.json()["smtp_password"]
    r = await call(admin, "POST", "/settings/resetSmtpPassword", 200, json={
        "owner_id": o1["owner_id"], "token": o1["token"], "smtp_user_name": user1})
    ex.secrets["smtp password 1"] = pw1 = r.json()["smtp_password"]
    r = await call(admin, "POST", "/settings/addSmtp", 200, form={
        "owner_id": o2["owner_id"], "token": o2["token"], "total_limit": "100",
        "hourly_limit": "100"})
    user2, ex.secrets["smtp password 2"] = r.json()["smtp_user_name"], r.json()["smtp_password"]
    made = Made(o1, o2, user1, pw1, user2, ex.secrets["smtp password 2"])

    # An upstream with AUTH (seed-000 dialect) and domain settings with a password.
    r = await call(admin, "POST", "/private/smtps/save", 200, headers=made.h1, json={
        "idapp": o1["idapp"], "host": "127.0.0.1", "port": sink.port, "username": "upuser",
        "password": ex.secrets["upstream password"], "auth": True, "startstls": False,
        "ssltls": False, "priority": 1})
    ex.out("smtps/save answer", r.body)
    made.idsmtp = r.json()["_id"]
    r = await call(admin, "POST", "/api/v2/email/settings?domain=unused.test", 200,
                   headers=made.h1, json={
                       "provider": "smtp", "description": "d", "from": "a@unused.test",
                       "options": {"host": "127.0.0.1", "port": sink.port, "secure": False,
                                   "auth": {"user": "upuser",
                                            "pass": ex.secrets["domain password"]}}})
    ex.out("webitel POST answer", r.body)
    await call(admin, "PATCH", f"/admin/apps/{o1['idapp']}", 200,
               json={"test_email": "probe@example.net"})
    return made


async def read_back(admin: AdminClient, made: Made, ex: Exercise) -> None:
    """Reads: every record that holds a secret comes back masked."""
    o1, h1, idsmtp = made.o1, made.h1, made.idsmtp
    for method, target, kw in [
        ("GET", f"/private/smtps/findById?idsmtp={idsmtp}", {"headers": h1}),
        ("GET", f"/private/smtps/findByApp?idapp={o1['idapp']}", {"headers": h1}),
        ("GET", "/api/v2/email/settings?domain=unused.test", {"headers": h1}),
        ("POST", "/settings/listSmtp", {"json": {"owner_id": o1["owner_id"],
                                                 "token": o1["token"]}}),
        ("GET", "/admin/owners", {}),
        ("GET", f"/admin/users/{made.user1}", {}),
        ("GET", f"/admin/smtps/{idsmtp}", {}),
        ("GET", f"/admin/domains?owner_id={o1['owner_id']}", {}),
        ("POST", "/private/smtps/check", {"headers": h1, "json": {"idsmtp": idsmtp}}),
    ]:
        r = await call(admin, method, target, 200, **kw)
        ex.out(f"{method} {target.split('?')[0]}", r.body)


async def refused_requests(admin: AdminClient, made: Made, ex: Exercise) -> None:
    """Refused requests that carry secrets: no error message quotes them."""
    o1, o2, h1, pw1 = made.o1, made.o2, made.h1, made.pw1
    up_password = ex.secrets["upstream password"]
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
        ("GET", f"/private/smtps/findById?idsmtp={made.idsmtp}", 403, {"headers": {
            "X-Key": o1["owner_id"], "X-Access-Token": up_password}}),
        ("POST", "/api/v2/email/settings?domain=bad.test", 400, {"headers": h1, "json": {
            "provider": "smtp", "options": {"host": "127.0.0.1", "port": 0, "auth": {
                "user": "u", "pass": ex.secrets["rejected domain password"]}}}}),
        ("POST", "/admin/owners", 400, {"json": {"plan": o1["token"]}}),
        ("POST", "/admin/owners", 400, {"body": b'{"plan": "' + pw1.encode() + b'"',
                                        "headers": {"Content-Type": "application/json"}}),
        ("GET", f"/admin/nothing-here?token={o1['token']}", 404, {}),
    ]:
        r = await call(admin, method, target, expect, **kw)
        assert r.status >= 400, (target, r.status)
        ex.out(f"error {method} {target.split('?')[0]} -> {r.status}", r.body)


async def smtp_sessions(smtp_port: int, made: Made, ex: Exercise) -> None:
    """Wrong, old and misplaced secrets, then AUTH LOGIN and AUTH PLAIN that work."""
    user1, pw1 = made.user1, made.pw1
    c = await RawSMTP.open(smtp_port)
    await c.ehlo()
    attempts = [
        plain_blob(user1, ex.secrets["old smtp password"]),     # the password before the reset
        plain_blob(pw1, "x"),                                    # the password in the user field
        plain_blob(user1, made.o1["token"]),                     # a token as the password
    ]
    for blob in attempts:
        ex.wire.append(blob)
        r = await c.cmd(b"AUTH PLAIN " + blob)
        assert r.code == 535, r
        ex.out("SMTP 535", str(r).encode())
    ex.wire += [b64(pw1)]
    assert (await c.cmd("AUTH LOGIN")).code == 334
    assert (await c.cmd(b64(user1))).code == 334
    r = await c.cmd(b64(pw1))
    assert r.code == 235, r
    r = await c.send_message(SENDER, [RCPT], simple_message())
    assert r.code == 250, r
    ex.out("SMTP 250", str(r).encode())
    await c.cmd("QUIT")
    await c.close()
    c = await RawSMTP.open(smtp_port)
    await c.ehlo()
    ex.wire.append(plain_blob(made.user2, made.pw2))
    r = await c.cmd(b"AUTH PLAIN " + plain_blob(made.user2, made.pw2))
    assert r.code == 235, r
    r = await c.send_message(SENDER, [RCPT], simple_message())   # paid, no upstream: system SMTP
    assert r.code == 250, r
    await c.cmd("QUIT")
    await c.close()


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
