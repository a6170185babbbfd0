"""Real clients that users' apps and cron jobs use, against a running relayd:
swaks, msmtp and nodemailer over STARTTLS (587-style) and implicit TLS
(465-style) with AUTH, and promtool on a scrape taken after that traffic.

swaks, msmtp and promtool come from Debian (swaks, msmtp, prometheus);
nodemailer from npm, pinned by tests/node/package-lock.json and installed
into tests/node/node_modules (``npm ci --prefix tests/node``). .ci/run
installs them all. Locally, without them, these tests are skipped with the
install command; under CI (CI=true) a missing tool is a failure, so they
can never be silently skipped there.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conftest import sink_upstream
from admin_client import http_get
from helpers_smtp import split_trace
from helpers_tools import absent, tool

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).resolve().parent / "node"


def nodemailer() -> tuple[str, str]:
    """(node, tests/node/send.mjs), nodemailer installed beside the script."""
    node = tool("node", "nodejs npm")
    if not (NODE_DIR / "node_modules" / "nodemailer" / "package.json").is_file():
        absent(f"nodemailer is not installed: npm ci --prefix {NODE_DIR}")
    return node, str(NODE_DIR / "send.mjs")


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
    # swaks (20201014) reads an argument that starts with "-" as an option,
    # whatever the form (--auth-password=-x, SWAKS_OPT_auth_password): a
    # generated password may (1 in 64), so reset it until it does not.
    while tenant.password.startswith("-"):
        tenant.password = await relay.store.reset_password(tenant.user, tenant.owner_id)
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


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
async def test_nodemailer(tls_relay, ca_file: str, mode: str, mech: str):
    """nodemailer (what Node.js apps send with) delivers over both TLS modes,
    and the message reaches the upstream with relayd's Received: on top."""
    node, script = nodemailer()
    relay, sink, tenant = tls_relay
    options = {
        "host": "127.0.0.1", "port": relay.smtp_ports[0 if mode == "starttls" else 1],
        "secure": mode == "implicit", "ca": ca_file, "name": "node-client.test",
        "user": tenant.user, "pass": tenant.password, "method": mech,
        "from": "app@example.com", "to": "ops@example.net",
        "subject": f"nodemailer {mode} {mech}", "text": "sent by nodemailer\n.dot line\n"}
    rc, out = await run(node, script, stdin=json.dumps(options).encode())
    assert rc == 0, out
    result = json.loads(out.splitlines()[-1])
    assert result["response"].startswith("250 2.0.0 Ok: queued as "), result
    assert (result["accepted"], result["rejected"]) == (["ops@example.net"], [])
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == "app@example.com" and got.rcpt_tos == ["ops@example.net"]
    trace, rest = split_trace(got.data)
    assert trace is not None, got.data[:300]
    assert (trace.name, trace.client, trace.proto, trace.id) == (
        "node-client.test", "[127.0.0.1]", "ESMTPSA", result["response"].rsplit(" ", 1)[1])
    assert split_trace(rest)[0] is None                     # one field, relayd's
    assert f"Subject: nodemailer {mode} {mech}".encode() in rest
    assert f"Message-ID: {result['messageId']}".encode() in rest
    assert b"\r\n.dot line\r\n" in rest                     # stuffed and unstuffed once


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
