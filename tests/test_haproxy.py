"""Debian's HAProxy, running the sample examples/haproxy.cfg unchanged, in
front of two real relayd processes on one real PostgreSQL database (SPEC 8):
mail through both, quotas exact across them, the real client address in
every mail-log line, health checks that leave no session behind, and an
instance killed under load taken out, then back in once restarted.

Clients connect from 127.0.0.2, HAProxy reaches relayd from 127.0.0.1: the
address in relayd's log can only be the client's if the PROXY header
carried it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from admin_client import scrape
from conftest import simple_message, sink_upstream
from helpers_cluster import Cluster, assert_counted_within, cluster, tenant_in, until
from helpers_ports import free_port
from helpers_smtp import ConnectionClosed, RawSMTP
from relayd_proc import RelaydProcess

__all__ = ["cluster"]           # the fixture, used by name
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "haproxy.cfg"
CLIENT = "127.0.0.2"            # the clients' own loopback address


class HAProxy:
    def __init__(self, tmp_path: Path, backends: list[tuple[int, int]]):
        self.front = {587: free_port(), 465: free_port()}
        self.stats = tmp_path / "haproxy.sock"
        self.env = {**os.environ, "HAPROXY_STATS_SOCKET": str(self.stats),
                    "RELAYD_FRONT_587": f"127.0.0.1:{self.front[587]}",
                    "RELAYD_FRONT_465": f"127.0.0.1:{self.front[465]}"}
        for i, (p587, p465) in enumerate(backends, 1):
            self.env[f"RELAYD{i}_587"] = f"127.0.0.1:{p587}"
            self.env[f"RELAYD{i}_465"] = f"127.0.0.1:{p465}"
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.proc = subprocess.Popen([binary, "-db", "-f", str(SAMPLE)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def servers(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status (UP, DOWN, ...) from the runtime API."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b"".join(iter(lambda: s.recv(65536), b""))
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {(r["pxname"], r["svname"]): r["status"].split()[0] for r in rows
                if r["svname"] not in ("FRONTEND", "BACKEND")}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def ports() -> list[tuple[int, int]]:
    """(submission, submissions) ports of relayd1 and relayd2, fixed at start
    so that a restarted instance comes back where HAProxy looks for it."""
    return [(free_port(), free_port()) for _ in range(2)]


@pytest.fixture
async def haproxy(tmp_path: Path, ports: list[tuple[int, int]]) -> AsyncIterator[HAProxy]:
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        pytest.fail("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    proxy = HAProxy(tmp_path, ports)
    try:
        await until(lambda: proxy.stats.exists() or proxy.proc.poll() is not None, timeout=15)
        assert proxy.proc.poll() is None, proxy.proc.stderr.read().decode()  # type: ignore[union-attr]
        yield proxy
    finally:
        proxy.stop()


async def relayds(cluster: Cluster, ports: list[tuple[int, int]],
                  tls_files: tuple[str, str]) -> list[RelaydProcess]:
    cert, key = tls_files

    def configure(i: int, cfg: dict[str, Any]) -> None:
        p587, p465 = ports[i]
        cfg["listen"] = [
            {"address": f"127.0.0.1:{p587}", "tls": "none", "auth_require_tls": False,
             "proxy_protocol": True},
            {"address": f"127.0.0.1:{p465}", "tls": "implicit", "proxy_protocol": True}]
        cfg["tls"] = {"cert": cert, "key": key}
    return await cluster(2, configure)


async def all_up(proxy: HAProxy, timeout: float = 20) -> None:
    await until(lambda: set(proxy.servers().values()) == {"UP"}, timeout=timeout, step=0.2)


async def send_via(proxy: HAProxy, tenant: Any, subject: str, *, tls: Any = None) -> int:
    """One message from CLIENT through HAProxy: the first refusal's code or
    the reply to DATA."""
    port = proxy.front[465 if tls else 587]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0),
                                                   ssl=tls, server_hostname="localhost" if tls else None)
    client = RawSMTP(reader, writer)
    try:
        assert (await client.reply()).code == 220
        await client.ehlo()
        await client.login(tenant.user, tenant.password)
        for line in ("MAIL FROM:<app@example.com>", "RCPT TO:<to@example.net>"):
            r = await client.cmd(line)
            if r.code != 250:
                return r.code
        assert (await client.cmd("DATA")).code == 354
        client.write(simple_message(subject=subject) + b".\r\n")
        return (await client.reply()).code
    finally:
        await client.close()


def mail_clients(proc: RelaydProcess) -> list[str]:
    return [m.group(1) for line in proc.lines if "event=message" in line
            for m in [re.search(r"\bclient=(\S+)", line)] if m]


async def test_two_instances_behind_haproxy(cluster: Cluster, ports, haproxy: HAProxy,
                                            pg_dsn: str, sink_factory, tls_files, client_ssl):
    sink = await sink_factory()
    tenant = await tenant_in(pg_dsn, hourly=9, upstreams=[sink_upstream(sink)])
    procs = await relayds(cluster, ports, tls_files)
    await all_up(haproxy)
    codes = await asyncio.gather(*(send_via(haproxy, tenant, f"m{i}", tls=client_ssl if i % 3 == 0
                                            else None) for i in range(16)))
    assert codes.count(250) == 9 and len(sink.messages) == 9, codes     # exact across both
    assert set(codes) == {250, 451}
    for proc in procs:
        clients = mail_clients(proc)
        assert clients and set(clients) == {CLIENT}, proc.log[-2000:]   # both served, by name
    # The health checks go on every 2 s; between them no session is left.
    for proc in procs:
        assert proc.metrics_port is not None

        async def idle(port: int = proc.metrics_port) -> bool:
            return (await scrape(port)).get(("relayd_sessions_active", ()), 1) == 0
        await until(idle, timeout=10, step=0.1)
    await asyncio.sleep(4.5)                                   # two more rounds of checks
    assert set(haproxy.servers().values()) == {"UP"}
    for proc in procs:
        assert "event=proxy_refused" not in proc.log


async def test_an_instance_killed_under_load_is_taken_out_and_rejoins(
        cluster: Cluster, ports, haproxy: HAProxy, pg_dsn: str, sink_factory, tls_files):
    sink = await sink_factory()
    # Limits far above what the load sends (it reached the default 1000 in
    # ~10 s), so that every refusal is the kill's and none is the quota's.
    tenant = await tenant_in(pg_dsn, total=10**6, hourly=10**6, upstreams=[sink_upstream(sink)])
    first, second = await relayds(cluster, ports, tls_files)
    await all_up(haproxy)
    accepted: list[str] = []
    stop = asyncio.Event()

    async def load(n: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                if await send_via(haproxy, tenant, f"w{n}-{i}") == 250:
                    accepted.append(f"w{n}-{i}")
            except (OSError, AssertionError, ConnectionClosed, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)       # a session on the killed one: try again

    workers = [asyncio.create_task(load(n)) for n in range(6)]
    await until(lambda: len(sink.messages) >= 30, timeout=30)
    first.signal(signal.SIGKILL)
    await first.wait()
    await until(lambda: haproxy.servers()[("relayd_587", "relayd1")] == "DOWN", timeout=15,
                step=0.2)
    before = len(sink.messages)
    await until(lambda: len(sink.messages) >= before + 30, timeout=30)     # the other goes on
    again = await cluster.restart(first)
    await until(lambda: haproxy.servers()[("relayd_587", "relayd1")] == "UP", timeout=20,
                step=0.2)
    await until(lambda: len(mail_clients(again)) >= 3, timeout=30)         # it serves again
    stop.set()
    await asyncio.gather(*workers)
    await assert_counted_within(pg_dsn, tenant, sink, accepted, in_flight=6)   # 6 sessions
    assert mail_clients(second) and set(mail_clients(second)) == {CLIENT}


def test_the_sample_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    env = {**os.environ, "HAPROXY_STATS_SOCKET": str(tmp_path / "s.sock")}
    for name in ("RELAYD_FRONT_587", "RELAYD_FRONT_465", "RELAYD1_587", "RELAYD1_465",
                 "RELAYD2_587", "RELAYD2_465"):
        env[name] = f"127.0.0.1:{free_port()}"
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    r = subprocess.run([binary, "-c", "-f", str(SAMPLE)], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
