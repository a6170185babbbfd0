"""Logs that mean something (the "Operator experience" issue): at
``log_level: info`` a whole session of a real relayd process writes exactly
one line, the mail-log line, and no library warnings (aiosmtpd warned
"auth_required == True but auth_require_tls == False" on every connection
of a plain loopback listener, even where that reads like a security hole,
and "Session.login_data is deprecated" on every AUTH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from conftest import base_config, simple_message, sink_upstream
from helpers_records import provision_db
from relayd_proc import RelaydProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tls", ["none", "implicit"])
async def test_a_session_at_info_logs_exactly_the_mail_log_line(tmp_path: Path, sink_factory: Any,
                                                                tls_files, client_ssl, tls):
    sink = await sink_factory()
    cert, key = tls_files
    listener = ({"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False}
                if tls == "none" else {"address": "127.0.0.1:0", "tls": "implicit"})
    cfg = base_config(tmp_path, log_level="info", metrics={"listen": None},
                      listen=[listener], tls={"cert": cert, "key": key})
    tenant = await provision_db(Path(cfg["state_dir"]), upstreams=[sink_upstream(sink)])
    proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
    try:
        mark = len(proc.lines)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=proc.smtp_ports[0],
                                 local_hostname="client.test", start_tls=False, timeout=20,
                                 use_tls=tls == "implicit", tls_context=client_ssl)
        await client.connect()
        await client.login(tenant.user, tenant.password)
        await client.sendmail("app@example.com", ["r@example.net"], simple_message())
        await client.quit()
        line = await proc.wait_for("event=message", start=mark)
        assert len(sink.messages) == 1
    finally:
        await proc.stop()         # anything logged for the session's end is in by now
    session_lines = [ln for ln in proc.lines[mark:] if "event=stopped" not in ln]
    assert session_lines == [line], "\n".join(session_lines)
    assert "result=delivered" in line


async def test_debug_logs_the_conversations_with_secrets_redacted(tmp_path: Path, sink_factory: Any):
    """log_level: debug shows each SMTP command and reply by session id, the
    upstream dialogue and admin requests; never a password, its base64, an
    AUTH answer, a token, or a line a client sent after a 538."""
    import base64

    from admin_client import AdminClient
    from helpers_smtp import RawSMTP, b64

    sink = await sink_factory()
    cfg = base_config(tmp_path, log_level="debug", metrics={"listen": None})
    tenant = await provision_db(Path(cfg["state_dir"]), upstreams=[sink_upstream(sink)])
    proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
    try:
        c = await RawSMTP.open(proc.smtp_ports[0])
        await c.ehlo()
        assert (await c.cmd("AUTH LOGIN")).code == 334
        assert (await c.cmd(b64(tenant.user))).code == 334
        assert (await c.cmd(b64(tenant.password))).code == 235
        assert (await c.cmd(b"CORRECTHORSE" + tenant.password[:8].encode())).code == 500
        await c.send_message("app@example.com", ["r@example.net"], simple_message())
        await c.cmd("QUIT")
        async with AdminClient(cfg["admin"]["socket"]) as admin:
            r = await admin.request("GET", f"/admin/owners/{tenant.owner_id}?token={tenant.token}")
            assert r.status == 200
        await proc.wait_for("event=admin_request")
    finally:
        await proc.stop()
    log = proc.log
    session = next(ln for ln in proc.lines if "event=message" in ln).split("session=")[1].split()[0]
    for needle in (f'event=smtp_command session={session} command="MAIL FROM:<app@example.com>"',
                   'command="AUTH LOGIN"', 'command="<AUTH answer,',
                   'command="<unrecognised command,',
                   'event=smtp_reply', 'reply="235 2.7.0 Authentication successful"',
                   'event=upstream_dialogue', 'command="MAIL FROM:<app@example.com>"',
                   "event=admin_request", "status=200"):
        assert needle in log, needle
    assert f"path=/admin/owners/{tenant.owner_id}" in log
    for secret in (tenant.password, base64.b64encode(tenant.password.encode()).decode(),
                   tenant.token, tenant.password[:8]):
        assert secret not in log, secret
