"""Signals sent to a real relayd process: SIGHUP reload (valid and invalid
file, with a session open) and SIGTERM/SIGINT drain (SPEC 1, 3.12, 6)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from conftest import base_config, simple_message, sink_upstream
from helpers_records import Tenant, provision_db
from relayd_proc import RelaydProcess

pytestmark = pytest.mark.slow


@pytest.fixture
async def started(tmp_path: Path, sink_factory: Any):
    """(process, tenant, sink, config dict) with relayd running in a subprocess."""
    procs: list[RelaydProcess] = []

    async def start(**overrides: Any):
        sink = await sink_factory()
        cfg = base_config(tmp_path, metrics={"listen": None}, **overrides)
        tenant = await provision_db(Path(cfg["state_dir"]), upstreams=[sink_upstream(sink)])
        proc = await RelaydProcess.start(cfg, tmp_path / "relayd.yaml")
        procs.append(proc)
        return proc, tenant, sink, cfg

    yield start
    for p in procs:
        await p.stop()


async def connect(proc: RelaydProcess, tenant: Tenant | None = None) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=proc.smtp_ports[0],
                             local_hostname="client.test", start_tls=False, timeout=20)
    await client.connect()
    await client.ehlo()
    if tenant is not None:
        await client.login(tenant.user, tenant.password)
    return client


def size_limit(client: aiosmtplib.SMTP) -> int:
    return int(client.esmtp_extensions["size"])


async def test_sighup_valid_file_applies_without_dropping_sessions(started):
    proc, tenant, sink, cfg = await started(limits={"max_message_size": 100_000})
    old = await connect(proc, tenant)
    assert size_limit(old) == 100_000

    cfg["limits"]["max_message_size"] = 200_000
    proc.config_path.write_text(yaml.safe_dump(cfg))
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    line = await proc.wait_for("event=reloaded", start=mark)
    assert "generation=2" in line

    # The session opened before the reload goes on and delivers.
    await old.sendmail("app@example.com", ["r@example.net"], simple_message())
    await old.quit()
    assert len(sink.messages) == 1
    # A new session sees the new limit.
    new = await connect(proc, tenant)
    assert size_limit(new) == 200_000
    await new.quit()


async def test_sighup_invalid_file_keeps_running_config(started):
    proc, tenant, sink, cfg = await started(limits={"max_message_size": 100_000})
    session = await connect(proc, tenant)

    cfg["limits"]["max_message_size"] = 300_000
    cfg["limits"]["bogus_key"] = 1
    proc.config_path.write_text(yaml.safe_dump(cfg))
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    line = await proc.wait_for("limits.bogus_key: unknown key", start=mark)
    assert "event=reload_failed" in line
    await proc.wait_for("keeping the running configuration", start=mark)

    await session.sendmail("app@example.com", ["r@example.net"], simple_message())
    await session.quit()
    new = await connect(proc, tenant)
    assert size_limit(new) == 100_000, "an invalid file must change nothing"
    await new.quit()
    assert proc.proc.returncode is None


async def test_sighup_listener_change_is_logged_as_needing_restart(started):
    proc, tenant, sink, cfg = await started()
    cfg["listen"].append({"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False})
    proc.config_path.write_text(yaml.safe_dump(cfg))
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    line = await proc.wait_for("event=reload_needs_restart", start=mark)
    assert "key=listen" in line


async def test_sigterm_between_rcpt_and_data_still_delivers_then_exits_0(started):
    proc, tenant, sink, cfg = await started(drain_timeout=30)
    client = await connect(proc, tenant)
    await client.mail("app@example.com")
    await client.rcpt("r@example.net")

    proc.signal(signal.SIGTERM)
    await proc.wait_for("event=draining")
    # New connections are refused (or told 421) while the transaction finishes.
    with pytest.raises((aiosmtplib.SMTPConnectError, aiosmtplib.SMTPConnectResponseError,
                        ConnectionError, OSError)):
        late = aiosmtplib.SMTP(hostname="127.0.0.1", port=proc.smtp_ports[0], timeout=5)
        await late.connect()
        await late.ehlo()
    response = await client.data(simple_message())
    assert response.code == 250
    assert len(sink.messages) == 1
    assert await proc.wait() == 0


async def test_sigterm_when_idle_exits_0_promptly(started):
    proc, tenant, sink, cfg = await started(drain_timeout=60)
    idle = await connect(proc, tenant)     # connected, no transaction: told 421
    proc.signal(signal.SIGTERM)
    # SPEC 3.12: an idle relayd exits 0 within 5 s (drain_timeout is 60 here).
    assert await proc.wait(timeout=5) == 0
    idle.close()


async def test_second_signal_exits_at_once(started):
    proc, tenant, sink, cfg = await started(drain_timeout=120)
    client = await connect(proc, tenant)
    await client.mail("app@example.com")          # a transaction keeps the drain waiting
    proc.signal(signal.SIGINT)
    await proc.wait_for("event=draining")
    proc.signal(signal.SIGTERM)
    assert await proc.wait(timeout=10) == 0
    assert "event=second_signal" in proc.log
    client.close()


async def test_sighup_swaps_the_tls_certificate(started, tmp_path: Path):
    import ssl

    import trustme

    def issue(name: str, ca: trustme.CA) -> tuple[str, str]:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = issue("live", old_ca)
    proc, tenant, sink, cfg = await started(
        listen=[{"address": "127.0.0.1:0", "tls": "implicit"}], tls={"cert": cert, "key": key})

    async def handshake_ok(ca: trustme.CA) -> bool:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=proc.smtp_ports[0], use_tls=True,
                                 tls_context=ctx, timeout=10)
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectError:
            return False
        await client.quit()
        return True

    assert await handshake_ok(old_ca) and not await handshake_ok(new_ca)
    # Same paths, new contents (as certbot's renewal does), then SIGHUP.
    new_cert, new_key = issue("renewed", new_ca)
    Path(cert).write_bytes(Path(new_cert).read_bytes())
    Path(key).write_bytes(Path(new_key).read_bytes())
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    await proc.wait_for("event=reloaded", start=mark)
    assert await handshake_ok(new_ca) and not await handshake_ok(old_ca)
