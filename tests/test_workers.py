"""Several relayd processes on one host from one config file (SPEC 8; the
systemd template relayd@.service): RELAYD_INSTANCE=N gives each its own
admin socket and metrics port, the SMTP address is shared with
SO_REUSEPORT, and the metrics of all instances sum to the host's totals.
Real processes, a real PostgreSQL database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from admin_client import AdminClient, scrape
from conftest import base_config, sink_upstream
from helpers_cluster import send_one, tenant_in
from helpers_ports import free_port, free_run
from relayd import config, workers
from relayd.errors import ConfigError
from relayd_proc import RelaydProcess

pytestmark = pytest.mark.slow


def instance_config(tmp_path: Path, dsn: str, smtp: int, metrics: int) -> dict[str, Any]:
    return base_config(
        tmp_path, database=dsn, metrics={"listen": f"127.0.0.1:{metrics}"},
        listen=[{"address": f"127.0.0.1:{smtp}", "tls": "none", "auth_require_tls": False,
                 "reuse_port": True}])


async def test_instances_share_the_port_and_sum_in_metrics(tmp_path: Path, pg_dsn: str,
                                                           sink_factory: Any):
    sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, upstreams=[sink_upstream(sink)])
    smtp = free_port()
    base = free_run(2, besides=smtp)
    cfg = instance_config(tmp_path, pg_dsn, smtp, base)
    procs = [await RelaydProcess.start(cfg, tmp_path / "relayd.yaml", {"RELAYD_INSTANCE": str(n)})
             for n in (1, 2)]
    try:
        assert [p.smtp_ports for p in procs] == [[smtp], [smtp]]
        assert [p.metrics_port for p in procs] == [base + 1, base + 2]
        socket_path = Path(cfg["admin"]["socket"])
        for n in (1, 2):
            async with AdminClient(str(workers.numbered(socket_path, n))) as admin:
                status = (await admin.request("GET", "/admin/status")).json()
                assert len(status["instances"]) == 2
        before = [await scrape(base + n) for n in (1, 2)]
        codes = await asyncio.gather(*(send_one(procs[0], tenant, f"m{i}") for i in range(40)))
        assert codes == [250] * 40
        after = [await scrape(base + n) for n in (1, 2)]
        key = ("relayd_messages_total", (("result", "delivered"),))
        per_instance = [a.get(key, 0) - b.get(key, 0) for a, b in zip(after, before)]
        assert sum(per_instance) == 40 == len(sink.messages)
        assert all(n > 0 for n in per_instance), per_instance      # the kernel spread them
    finally:
        for p in procs:
            await p.stop()


def test_an_instance_needs_reuse_port_and_postgresql(tmp_path: Path):
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    with pytest.raises(ConfigError) as refused:
        workers.InstanceSource(str(path), 3).load()
    assert refused.value.problems[0].startswith("listen[0].reuse_port: must be true")
    assert refused.value.problems[1].startswith("database: RELAYD_INSTANCE runs one of")


def test_the_instance_number_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    source = config.Source(None)
    assert workers.from_environment(source) is source
    monkeypatch.setenv("RELAYD_INSTANCE", "0")
    with pytest.raises(ConfigError, match=r"\$RELAYD_INSTANCE: expected an instance number"):
        workers.from_environment(source)
    monkeypatch.setenv("RELAYD_INSTANCE", "7")
    assert workers.from_environment(source) == workers.InstanceSource(None, 7)
    assert workers.shifted("[::1]:9587", 7) == "[::1]:9594"
    assert workers.shifted("127.0.0.1:0", 7) == "127.0.0.1:0"
