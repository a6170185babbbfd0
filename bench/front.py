"""Front comparison (issue 13): N relayd processes on one PostgreSQL
database behind HAProxy, or sharing one SO_REUSEPORT address.

    python -m bench --front haproxy,reuseport --instances 2 --duration 5
    python -m bench --front reuseport --instances 4 --sizes 1024

Everything runs at once, as in the scale-out comparison (scaleout.py): the
sink, a throw-away PostgreSQL cluster (pgserver.py), ``--instances`` N relayd
processes on it, and the fronts, with the points interleaved (for each size,
``--repeats`` rounds of every configuration, the order rotated each round).
The configurations are each front with 1 and with N processes; "x1" is the
first process alone (the others idle: a heartbeat every 2 s). Each relayd
process has, besides its own plain listener (readiness and provisioning
checks only):

* ``haproxy``: a listener with ``proxy_protocol: true`` on a port of its
  own. HAProxy runs examples/haproxy.cfg unchanged, its addresses from the
  environment: one HAProxy per N, its two servers ``relayd1`` and
  ``relayd2`` the first two processes (for N = 1 both point at the first
  one, so it also gets both servers' health checks); the config has two
  servers, so N <= 2. The config's implicit-TLS frontend (465) is bound,
  but its servers point at ports where nothing listens: the bench sends no
  TLS, and those servers stay DOWN. The load generator connects to the
  587 frontend. HAProxy's CPU is measured (all its threads) and reported
  per message.
* ``reuseport``: for each N, a plain listener with ``reuse_port: true`` on
  one port that the first N processes share; the load generator connects to
  that one port and the kernel spreads the sessions over the processes.

Per configuration and size: the median msg/s (and each round's), p50/p99,
each relayd process's CPU %, relayd CPU µs per message summed over the
processes, HAProxy's, PostgreSQL's, and database round trips per message;
then relayd's CPU per message at N against 1 (the issue's bound: at most
10 % more) and a 16-core estimate from the measured costs. The section goes
into bench/RESULTS.md between markers of its own (results.py).

By default the load is a closed loop: every session sends back to back, so
the cores saturate and N processes share what one process had alone.
``--rate R`` paces the load instead (an open loop) at R msg/s per relayd
process, so that each process carries the same load at 1 and at N: that
run goes into a block of its own ("front, paced"), and has no 16-core
estimate (a host at capacity runs closed-loop costs).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import loadgen, pgserver, results
from .harness import (HERE, Point, Relayd, free_port, fresh_user, human_size, log_digest,
                      log_lines, measure, provision_owner, relayd_fleet, sink_running, wait_port)
from .scaleout import Summary, find, header_lines, interleave, progress

FRONTS = ("haproxy", "reuseport")
SAMPLE = HERE.parent / "examples" / "haproxy.cfg"
HAPROXY_SERVERS = 2           # relayd1 and relayd2 in the sample config
GROWTH = 0.10                 # relayd CPU per message at N may exceed N = 1's by this much
CORES = 16                    # the on-paper host


@dataclass(frozen=True)
class FrontConfig:
    front: str
    instances: int

    @property
    def label(self) -> str:
        return f"{self.front} x{self.instances}"


def counts(args: argparse.Namespace) -> list[int]:
    return sorted({1, args.instances})


# ---------------------------------------------------------------- HAProxy

class HAProxy:
    """examples/haproxy.cfg, unchanged, in front of the relayd ports ``backends``."""

    def __init__(self, workdir: Path, backends: list[int]):
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise SystemExit("--front haproxy needs HAProxy: apt-get install haproxy")
        self.port = free_port()
        self.stats = workdir / "haproxy.sock"
        self.log = workdir / "haproxy.log"
        servers = (backends * HAPROXY_SERVERS)[:HAPROXY_SERVERS]     # N = 1: both the same
        env = {**os.environ, "HAPROXY_STATS_SOCKET": str(self.stats),
               "RELAYD_FRONT_587": f"127.0.0.1:{self.port}",
               "RELAYD_FRONT_465": f"127.0.0.1:{free_port()}"}
        for i, port in enumerate(servers, 1):
            env[f"RELAYD{i}_587"] = f"127.0.0.1:{port}"
            env[f"RELAYD{i}_465"] = f"127.0.0.1:{free_port()}"       # nothing there: DOWN
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(SAMPLE)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def servers(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status from the runtime API."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b"".join(iter(lambda: s.recv(65536), b""))
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {(r["pxname"], r["svname"]): r["status"].split()[0] for r in rows
                if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_up(self, timeout: float = 20) -> None:
        """Until the 587 backend's servers pass their health checks."""
        wait_port(self.port, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {log_lines(self.log, 20)}")
            with contextlib.suppress(OSError):
                status = {s for (b, _), s in self.servers().items() if b == "relayd_587"}
                if status == {"UP"}:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"HAProxy's relayd_587 servers not UP after {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def haproxy_running(workdir: Path, backends: list[int]) -> Iterator[HAProxy]:
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = HAProxy(workdir, backends)
    try:
        proxy.wait_up()
        yield proxy
    finally:
        proxy.stop()


# ---------------------------------------------------------------- running

def run(args: argparse.Namespace) -> int:
    started = time.time()
    ns = counts(args)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relayd-bench-")))
        sink = stack.enter_context(sink_running(args.sink))
        cluster, dsn = stack.enter_context(pgserver.pg_running())
        proxied = [free_port() for _ in range(args.instances)]
        shared = {n: free_port() for n in ns}

        def listeners(i: int) -> list[dict]:
            plain = {"tls": "none", "auth_require_tls": False}
            out = [{"address": f"127.0.0.1:{shared[n]}", "reuse_port": True, **plain}
                   for n in ns if "reuseport" in args.front and i < n]
            if "haproxy" in args.front:
                out.append({"address": f"127.0.0.1:{proxied[i]}", "proxy_protocol": True,
                            **plain})
            return out

        fleet = stack.enter_context(relayd_fleet(tmp / "pg", args.instances, dsn, listeners))
        proxies = {n: stack.enter_context(haproxy_running(tmp / f"haproxy{n}", proxied[:n]))
                   for n in ns if "haproxy" in args.front}
        owner = provision_owner(fleet[0], sink.port)
        meter = pgserver.DbMeter(cluster)
        configs = [FrontConfig(f, n) for f in args.front for n in ns]

        def one(config: FrontConfig, size: int, sessions: int) -> Point:
            proxy = proxies.get(config.instances) if config.front == "haproxy" else None
            port = proxy.port if proxy else shared[config.instances]
            return run_point(args, config, fleet, owner, port, size, sessions, meter,
                             [sink.pid, *(p.pid for p in proxies.values() if p is not proxy)],
                             [proxy.pid] if proxy else [])

        summaries = interleave(args, configs, one)
        version = cluster.fetchval("SHOW server_version")
        logs = log_digest(fleet) + pgserver.server_errors(cluster)
        logs += [f"- haproxy: `{line}`" for p in proxies.values() for line in log_lines(p.log)
                 if "ALERT" in line and "relayd_465" not in line][:5]     # 465: DOWN by design
    section = report(summaries, args, sink.kind, started, version, logs)
    print(results.write(Path(args.out), **{"front_paced" if args.rate else "front": section}))
    return 0


def run_point(args: argparse.Namespace, config: FrontConfig, fleet: list[Relayd], owner: dict,
              port: int, size: int, sessions: int, meter: pgserver.DbMeter,
              helpers: list[int], watch: list[int]) -> Point:
    """One point on ``port``; ``helpers``: the sink, idle HAProxies (idle
    relayds added here); ``watch``: the HAProxy in front."""
    busy = fleet[:config.instances]
    logins = tuple(fresh_user(busy, owner) for _ in range(args.users))
    job = loadgen.Job(port=port, sessions=sessions, size=size, duration=args.duration,
                      logins=logins, client=args.client,
                      rate=args.rate * config.instances if args.rate else None)
    point = measure(job, config.label, [r.pid for r in busy], args.processes, db=meter,
                    helpers=[*helpers, *(r.pid for r in fleet[config.instances:])], watch=watch)
    progress(config.label, point, f"  haproxy {haproxy_us(point):5.0f} µs/msg" if watch else "")
    return point


def haproxy_us(point: Point) -> float:
    return 1e6 * sum(point.watched_s) / point.msgs if point.msgs else float("nan")


def summary_haproxy_us(s: Summary) -> float:
    msgs = sum(p.msgs for p in s.points)
    return 1e6 * sum(sum(p.watched_s) for p in s.points) / msgs if msgs else float("nan")


# ---------------------------------------------------------------- report

def report(summaries: list[Summary], args: argparse.Namespace, sink_kind: str, started: float,
           version: str, logs: list[str]) -> str:
    load = (f"paced at {args.rate:g} msg/s per relayd process" if args.rate
            else "closed loop")
    lines = [
        "## Behind a front: HAProxy vs SO_REUSEPORT, 1 and N relayd processes on PostgreSQL, "
        + load,
        "",
        *header_lines(args, started, sink_kind, version,
                      "all sessions to one address (HAProxy's 587 frontend, or the "
                      "SO_REUSEPORT port the processes share)"),
        "- HAProxy: examples/haproxy.cfg unchanged (send-proxy-v2, SMTP health checks every "
        "2 s), relayd listeners with proxy_protocol: true; for x1 both of its servers are the "
        "one process; its 465 servers point at dead ports (DOWN, no TLS in this bench)",
        "",
        "| size | sessions | configuration | msg/s | msg/s per round | p50 / p99 ms "
        "| relayd CPU % per process | relayd CPU µs/msg (kernel %) "
        "| relayd wake-ups / preemptions per msg | HAProxy CPU µs/msg | postgres CPU µs/msg "
        "| DB round trips/msg | other load % (steal) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {(f, n): i for i, (f, n) in enumerate((f, n) for f in FRONTS for n in counts(args))}
    for s in sorted(summaries, key=lambda s: (s.size, s.sessions,
                                              order[(s.config.front, s.config.instances)])):
        db = s.db
        haproxy = f"{summary_haproxy_us(s):.0f}" if s.config.front == "haproxy" else "-"
        lines.append(
            f"| {human_size(s.size)} | {s.sessions} | {s.config.label} | {s.rate:.0f} "
            f"| {' / '.join(f'{p.rate:.0f}' for p in s.points)} "
            f"| {s.median('p50_ms'):.1f} / {s.median('p99_ms'):.1f} "
            f"| {' + '.join(f'{c:.0f}' for c in s.cpu_pcts)} "
            f"| {s.relayd_us:.0f} ({s.sys_share:.0%}) "
            f"| {' / '.join(f'{n:.1f}' for n in s.switches_per_msg)} | {haproxy} "
            f"| {db.cpu_us_per_msg:.0f} | {db.round_trips_per_msg:.1f} "
            f"| {s.median('other_pct'):.0f} ({s.median('steal_pct'):.0f}) |")
    errors = sum(p.errors for s in summaries for p in s.points)
    lines += ["", f"Session errors over all points: {errors}. " + (
        "Warnings and errors of relayd, PostgreSQL and HAProxy, most frequent first:" if logs
        else "Neither relayd, PostgreSQL nor HAProxy logged a warning or an error."),
        "", *logs, *([""] if logs else [])]
    return "\n".join(lines + growth_lines(summaries, args) + (
        [] if args.rate else capacity_lines(summaries, args)))


def growth_lines(summaries: list[Summary], args: argparse.Namespace) -> list[str]:
    """relayd CPU per message at N against N = 1, per front and size: over
    all rounds, and round by round (the two points of a round ran minutes
    apart at most, so a drift of the machine's speed over the run cancels)."""
    n = args.instances
    out = [f"### relayd CPU per message, {n} processes against 1 (bound: +{GROWTH:.0%})", "",
           "Pooled: CPU over messages of all rounds; per round: the growth within each "
           "round, and their median, which the verdict reads.", ""]
    if n == 1:
        return out + ["Only N = 1 was run (--instances 1).", ""]
    for front in args.front:
        for size, sessions in sorted({(s.size, s.sessions) for s in summaries}):
            one = find(summaries, f"{front} x1", size, sessions)
            many = find(summaries, f"{front} x{n}", size, sessions)
            if not (one and many and one.relayd_us and one.rate):
                continue
            rounds = paired_growth(one, many)
            growth = statistics.median(rounds)
            out.append(f"- {front}, {human_size(size)} x {sessions}: {one.relayd_us:.0f} -> "
                       f"{many.relayd_us:.0f} µs/msg pooled "
                       f"({many.relayd_us / one.relayd_us - 1:+.0%}); per round "
                       f"{' / '.join(f'{g:+.0%}' for g in rounds)}: median {growth:+.0%} "
                       f"({'met' if growth <= GROWTH else 'NOT met'}); msg/s x{n} / x1 = "
                       f"{many.rate / one.rate:.2f}")
    return out + [""]


def paired_growth(one: Summary, many: Summary) -> list[float]:
    """Each round's relayd CPU per message at N over N = 1's, minus 1."""
    return [(b.cpu_s / b.msgs) / (a.cpu_s / a.msgs) - 1
            for a, b in zip(one.points, many.points) if a.msgs and b.msgs and a.cpu_s]


def capacity_lines(summaries: list[Summary], args: argparse.Namespace) -> list[str]:
    """A 16-core host on paper, from the measured costs of the largest N."""
    out = [f"### {CORES} cores on paper (measured costs at x{args.instances}; the load "
           "generator elsewhere)", "",
           "| front, size | relayd µs/msg | HAProxy µs/msg | postgres µs/msg "
           f"| all on one {CORES}-core host, msg/s | relayd (+HAProxy) on {CORES} cores, "
           f"PostgreSQL elsewhere | PostgreSQL alone on {CORES} cores |",
           "|---|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s.config.front, s.size)):
        if s.config.instances != args.instances or s.db is None or not s.db.msgs:
            continue
        r, c = s.relayd_us, s.db.cpu_us_per_msg
        h = summary_haproxy_us(s) if s.config.front == "haproxy" else 0.0
        out.append(f"| {s.config.front}, {human_size(s.size)} | {r:.0f} | {h:.0f} | {c:.0f} "
                   f"| {CORES * 1e6 / (r + h + c):,.0f} | {CORES * 1e6 / (r + h):,.0f} "
                   f"| {CORES * 1e6 / c:,.0f} |")
    return out + ["", f"Each column is {CORES} x 1 000 000 µs / (the CPU µs per message of "
                  "what runs on those cores), at 100 % CPU and with one relayd process per "
                  "core; bench/analysis.md discusses what holds and what does not.", ""]
