"""Real clients that users' apps and cron jobs use, against a running relayd:
swaks and msmtp over STARTTLS (587-style) and implicit TLS (465-style) with
AUTH, and promtool on a scrape taken after that traffic.

These tools come from Debian (swaks, msmtp, prometheus); .ci/run installs
them. Locally, without them, these tests are skipped with the apt command;
under CI (CI=true) a missing tool is a failure, so they can never be
silently skipped there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from conftest import sink_upstream
from admin_client import http_get

pytestmark = pytest.mark.slow


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


async def run(*argv: str, stdin: bytes = b"", timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
async def tls_relay(relay_factory, tls_files, sink_factory, provision):
    cert, key = tls_files
    relay = await relay_factory(
        listen=[{"address": "127.0.0.1:0", "tls": "starttls"},
                {"address": "127.0.0.1:0", "tls": "implicit"}],
        tls={"cert": cert, "key": key})
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    return relay, sink, tenant


@pytest.fixture
def ca_file(ca, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
async def test_swaks(tls_relay, mode: str, mech: str):
    swaks = tool("swaks", "swaks")
    relay, sink, tenant = tls_relay
    port = relay.smtp_ports[0 if mode == "starttls" else 1]
    rc, out = await run(
        swaks, "--server", "127.0.0.1", "--port", str(port),
        "--tls" if mode == "starttls" else "--tls-on-connect",
        "--auth", mech, "--auth-user", tenant.user, "--auth-password", tenant.password,
        "--ehlo", "client.test", "--from", "cron@example.com", "--to", "ops@example.net",
        "--header", f"Subject: swaks {mode} {mech}", "--body", "sent by swaks")
    assert rc == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == "cron@example.com" and got.rcpt_tos == ["ops@example.net"]
    assert f"Subject: swaks {mode} {mech}".encode() in got.data


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_msmtp(tls_relay, ca_file: str, tmp_path: Path, mode: str):
    msmtp = tool("msmtp", "msmtp")
    relay, sink, tenant = tls_relay
    port = relay.smtp_ports[0 if mode == "starttls" else 1]
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "account relay\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        "tls on\n"
        f"tls_starttls {'on' if mode == 'starttls' else 'off'}\n"
        f"tls_trust_file {ca_file}\n"
        "auth on\n"
        f"user {tenant.user}\n"
        f"password {tenant.password}\n"
        "from backup@example.com\n"
        "domain client.test\n"
        "account default : relay\n")
    conf.chmod(0o600)          # msmtp refuses a world-readable file holding a password
    message = (b"From: backup@example.com\nTo: ops@example.net\nSubject: msmtp "
               + mode.encode() + b"\n\nnightly backup done\n")
    rc, out = await run(msmtp, "-C", str(conf), "ops@example.net", stdin=message)
    assert rc == 0, out
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.rcpt_tos == ["ops@example.net"]
    assert b"nightly backup done" in got.data


async def test_promtool_accepts_metrics_after_traffic(tls_relay, tmp_path: Path):
    promtool = tool("promtool", "prometheus")
    swaks = tool("swaks", "swaks")
    relay, sink, tenant = tls_relay
    rc, out = await run(swaks, "--server", "127.0.0.1", "--port", str(relay.smtp_ports[1]),
                        "--tls-on-connect", "--auth", "PLAIN", "--auth-user", tenant.user,
                        "--auth-password", "wrong", "--from", "a@example.com",
                        "--to", "b@example.net")
    assert rc != 0 and "535 5.7.8" in out
    rc, out = await run(swaks, "--server", "127.0.0.1", "--port", str(relay.smtp_ports[1]),
                        "--tls-on-connect", "--auth", "PLAIN", "--auth-user", tenant.user,
                        "--auth-password", tenant.password, "--from", "a@example.com",
                        "--to", "b@example.net")
    assert rc == 0, out
    status, scrape = await http_get(relay.metrics_port, "/metrics")     # a real scrape
    assert status == 200
    assert b'relayd_messages_total{result="delivered"}' in scrape
    rc, out = await run(promtool, "check", "metrics", stdin=scrape)
    assert rc == 0, out
