"""Scale-out comparison: one relayd on SQLite, one on PostgreSQL and two on
one PostgreSQL database, side by side in one run.

    python -m bench --scale-out --duration 5        # 1 KB and 100 KB x 50 sessions
    python -m bench --scale-out --repeats 5 --sizes 1024 --sessions 10,50

Everything runs at once -- the sink, a throw-away PostgreSQL cluster
(pgserver.py), one relayd on its own SQLite file and two relayd processes on
the PostgreSQL database -- and the points are interleaved: for each size,
``--repeats`` rounds of the three configurations, the order rotated every
round, so that the machine's noise (hypervisor steal, other users'
processes: the "other load" column) spreads over all of them. "postgresql
x1" is the first of the two PostgreSQL instances alone (the other idles: a
heartbeat every 2 s); "x2" sends the sessions round-robin to both. Each
point gets a fresh SMTP user (``--users N``: N of them, sessions
round-robin over them), so that no point pays for the ones before it; the
reservation probe, after the points, times relayd_reserve for a user with
up to ``--probe-rows`` sends in its last hour (a running sum per user:
flat, where it once summed the hour on every RCPT).

Per configuration and size it reports the median msg/s (and each round's),
median p50/p99, each relayd process's CPU %, relayd CPU µs per message
(summed over processes and rounds), and for PostgreSQL the database
server's CPU µs per message and database round trips per message
(pg_stat_statements; see pgserver.py for how they are counted), with the
statements per message; then the target (PostgreSQL x1 >= 0.7x SQLite x1 at
1 KB) and a capacity estimate from the measured cost. The section goes into
bench/RESULTS.md between markers (results.py); the matrix's part is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loadgen, pgserver, results
from .harness import (Point, Relayd, Sink, fresh_user, human_size, log_digest, measure,
                      provision_owner, relayd_fleet, sink_running)

TARGET = 0.7                  # PostgreSQL x1 / SQLite x1 at 1 KB
CORES = (8, 16)               # the capacity estimate's database servers


@dataclass(frozen=True)
class Config:
    database: str
    instances: int

    @property
    def label(self) -> str:
        return f"{self.database} x{self.instances}"


CONFIGS = (Config("sqlite", 1), Config("postgresql", 1), Config("postgresql", 2))


@dataclass
class Summary:
    """The rounds of one configuration (a Config, or anything with a
    ``label`` and ``instances``) at one size x sessions."""
    config: Any
    size: int
    sessions: int
    points: list[Point]

    @property
    def rate(self) -> float:
        return statistics.median(p.rate for p in self.points)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(p, attr) for p in self.points)

    @property
    def cpu_pcts(self) -> list[float]:
        return [statistics.median(p.cpu_pcts[i] for p in self.points)
                for i in range(self.config.instances)]

    @property
    def relayd_us(self) -> float:
        msgs = sum(p.msgs for p in self.points)
        return 1e6 * sum(p.cpu_s for p in self.points) / msgs if msgs else math.nan

    @property
    def sys_share(self) -> float:
        """The part of relayd's CPU spent in the kernel (system calls, and
        the loopback deliveries and wake-ups they cause)."""
        cpu = sum(p.cpu_s for p in self.points)
        return sum(p.sys_s for p in self.points) / cpu if cpu else math.nan

    @property
    def switches_per_msg(self) -> tuple[float, float]:
        """relayd's (voluntary, involuntary) context switches per message."""
        msgs = sum(p.msgs for p in self.points) or 1
        return (sum(p.switches[0] for p in self.points) / msgs,
                sum(p.switches[1] for p in self.points) / msgs)

    @property
    def db(self) -> pgserver.DbCost | None:
        costs = [p.db for p in self.points if p.db is not None]
        return pgserver.merge(costs) if costs else None


# ---------------------------------------------------------------- running

def run(args: argparse.Namespace) -> int:
    started = time.time()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relayd-bench-")))
        sink = stack.enter_context(sink_running(args.sink))
        cluster, dsn = stack.enter_context(pgserver.pg_running())
        most = max(c.instances for c in CONFIGS if c.database == "postgresql")
        fleets = {"sqlite": stack.enter_context(relayd_fleet(tmp / "sqlite", 1)),
                  "postgresql": stack.enter_context(relayd_fleet(tmp / "pg", most, dsn))}
        owners = {db: provision_owner(fleet[0], sink.port) for db, fleet in fleets.items()}
        meter = pgserver.DbMeter(cluster)
        summaries = run_points(args, fleets, owners, meter, sink)
        probe = run_probe(args, dsn, fleets["postgresql"], owners["postgresql"])
        version = cluster.fetchval("SHOW server_version")
        logs = log_digest([r for fleet in fleets.values() for r in fleet])
        logs += pgserver.server_errors(cluster)
    section = report(summaries, probe, args, sink.kind, started, version, logs)
    text = results.write(Path(args.out), scaleout=section)
    print(text)
    return 0


def interleave(args: argparse.Namespace, configs: Sequence[Any],
               one: Callable[[Any, int, int], Point]) -> list[Summary]:
    """``one(config, size, sessions)`` for each size x sessions, ``--repeats``
    rounds of all ``configs`` each, the order rotated every round."""
    summaries: dict[tuple[Any, int, int], Summary] = {}
    for size in args.sizes:
        for sessions in args.sessions:
            for rnd in range(args.repeats):
                k = rnd % len(configs)
                for config in [*configs[k:], *configs[:k]]:
                    point = one(config, size, sessions)
                    summaries.setdefault((config, size, sessions),
                                         Summary(config, size, sessions, [])).points.append(point)
    return list(summaries.values())


def run_points(args: argparse.Namespace, fleets: dict[str, list[Relayd]],
               owners: dict[str, dict], meter: pgserver.DbMeter, sink: Sink) -> list[Summary]:
    def one(config: Config, size: int, sessions: int) -> Point:
        fleet = fleets[config.database][:config.instances]
        idle = [r.pid for f in fleets.values() for r in f if r not in fleet]
        return run_point(args, config, fleet, owners[config.database], size, sessions,
                         meter if config.database == "postgresql" else None, [sink.pid, *idle])
    return interleave(args, CONFIGS, one)


def run_point(args: argparse.Namespace, config: Config, fleet: list[Relayd], owner: dict,
              size: int, sessions: int, meter: pgserver.DbMeter | None,
              helpers: list[int]) -> Point:
    """One point; ``helpers``: the bench's other processes (sink, idle relayds)."""
    logins = tuple(fresh_user(fleet, owner) for _ in range(args.users))
    job = loadgen.Job(port=tuple(r.port for r in fleet), sessions=sessions, size=size,
                      duration=args.duration, logins=logins, client=args.client)
    point = measure(job, config.label, [r.pid for r in fleet], args.processes, db=meter,
                    helpers=helpers)
    progress(config.label, point)
    return point


def progress(label: str, point: Point, more: str = "") -> None:
    """One point's line on stderr."""
    db = point.db
    print(f"{label:16} {human_size(point.size):>6} x{point.sessions:<3} {point.rate:8.0f} msg/s  "
          f"p50 {point.p50_ms:6.1f} ms  p99 {point.p99_ms:6.1f} ms  relayd "
          f"{1e6 * point.cpu_s / max(1, point.msgs):5.0f} µs/msg"
          + (f"  postgres {db.cpu_us_per_msg:5.0f} µs/msg  {db.round_trips_per_msg:4.1f} rt/msg"
             if db else "") + more + f"  other load {point.other_pct:.0f} %", file=sys.stderr)


def run_probe(args: argparse.Namespace, dsn: str, fleet: list[Relayd],
                owner: dict) -> list[pgserver.ProbeRow] | str:
    """relayd_reserve's cost as a fresh user's hourly window fills, or why not."""
    top = args.probe_rows
    if top <= 0:
        return "not measured (--probe-rows 0)"
    user, _ = fresh_user(fleet[:1], owner)
    try:
        return pgserver.reserve_probe(dsn, user, (0, top // 30, top // 3, top))
    except pgserver.PROBE_ERRORS as exc:
        return f"not measured: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- report

def find(summaries: list[Summary], label: str, size: int, sessions: int) -> Summary | None:
    return next((s for s in summaries if (s.config.label, s.size, s.sessions) ==
                 (label, size, sessions)), None)


def report(summaries: list[Summary], probe: list[pgserver.ProbeRow] | str,
           args: argparse.Namespace, sink_kind: str, started: float, version: str,
           logs: list[str]) -> str:
    lines = [
        "## Scale-out: SQLite vs PostgreSQL, one and two relayd processes", "",
        *header_lines(args, started, sink_kind, version, "sessions round-robin over the instances"),
        "",
        "| size | sessions | configuration | msg/s | msg/s per round | p50 / p99 ms "
        "| relayd CPU % per process | relayd CPU µs/msg | postgres CPU µs/msg "
        "| DB round trips/msg | other load % (steal) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {c: i for i, c in enumerate(CONFIGS)}
    for s in sorted(summaries, key=lambda s: (s.size, s.sessions, order[s.config])):
        db = s.db
        lines.append(
            f"| {human_size(s.size)} | {s.sessions} | {s.config.label} | {s.rate:.0f} "
            f"| {' / '.join(f'{p.rate:.0f}' for p in s.points)} "
            f"| {s.median('p50_ms'):.1f} / {s.median('p99_ms'):.1f} "
            f"| {' + '.join(f'{c:.0f}' for c in s.cpu_pcts)} | {s.relayd_us:.0f} "
            f"| {f'{db.cpu_us_per_msg:.0f}' if db else '-'} "
            f"| {f'{db.round_trips_per_msg:.1f}' if db else '-'} "
            f"| {s.median('other_pct'):.0f} ({s.median('steal_pct'):.0f}) |")
    errors = sum(p.errors for s in summaries for p in s.points)
    lines += ["", "Other load: the machine's CPU beyond the bench's own processes (load "
              "generator, sink, relayd, PostgreSQL) during the point, in % of one core, "
              "median of the rounds; steal: what the hypervisor took.", "",
              f"Session errors over all points: {errors}. " + (
                  "relayd's warnings and errors, then PostgreSQL's, most frequent first:" if logs
                  else "Neither relayd nor PostgreSQL logged a warning or an error."),
              "", *logs, *([""] if logs else [])]
    lines += target_lines(summaries) + statement_lines(summaries)
    lines += probe_table(probe) + capacity_lines(summaries, probe, args.users)
    return "\n".join(lines)


def header_lines(args: argparse.Namespace, started: float, sink_kind: str, version: str,
                 spread: str) -> list[str]:
    """The run's circumstances; ``spread``: how sessions reach relayd."""
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- machine: {os.cpu_count()} cores, {platform.machine()}, Linux "
        f"{platform.release()}, Python {platform.python_version()}: the load generator, "
        "every relayd process and PostgreSQL share these cores" + (
            "; every process SCHED_BATCH (`--sched batch`: no preemption on wake-up)"
            if args.sched == "batch" else ""),
        f"- command: `{' '.join(['python -m bench'] + sys.argv[1:])}`",
        f"- sink: {sink_kind}; load generator: {args.client}, {args.processes} processes, AUTH "
        f"PLAIN, {spread}; {args.duration:g} s per point, "
        f"{args.repeats} interleaved round(s) per configuration (order rotated each round); "
        "medians of the rounds, CPU per message over all of them",
        f"- PostgreSQL {version}: throw-away cluster on 127.0.0.1 (fsync, synchronous_commit "
        "and full_page_writes off), pg_stat_statements loaded",
        f"- SMTP users: {args.users} fresh per point" + (
            ", every session logged in as it (one user's quota: the worst case for its row lock)"
            if args.users == 1 else ", sessions round-robin over them"),
    ]


def target_lines(summaries: list[Summary]) -> list[str]:
    out = ["### Targets", ""]
    for s in sorted({(s.size, s.sessions) for s in summaries}):
        lite, pg1, pg2 = (find(summaries, c.label, *s) for c in CONFIGS)
        if not (lite and pg1 and pg2 and lite.rate and pg1.rate):
            continue
        ratio = pg1.rate / lite.rate
        verdict = (f" (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})"
                   if s[0] == 1024 else "")
        out.append(f"- {human_size(s[0])} x {s[1]} sessions: postgresql x1 / sqlite x1 = "
                   f"{ratio:.2f}{verdict}; postgresql x2 / postgresql x1 = "
                   f"{pg2.rate / pg1.rate:.2f}")
    return out + [""]


def statement_lines(summaries: list[Summary]) -> list[str]:
    """Calls per message and mean server time of each statement relayd sent."""
    pg = [s for s in sorted(summaries, key=lambda s: (s.size, s.sessions, s.config.instances))
          if s.db is not None and s.db.msgs]
    if not pg:
        return []
    heads = [f"{s.config.label}, {human_size(s.size)} x {s.sessions}" for s in pg]
    out = ["### Database statements per message (pg_stat_statements, top level)", "",
           "Calls per message, then mean server time per call in µs (lock waits included); "
           "each call is one round trip (asyncpg's default pool reset query, four statements "
           "in one message, would count once; relayd's pool no longer sends it).", "",
           "| statement | " + " | ".join(heads) + " |",
           "|---|" + "---|" * len(heads)]
    first = pg[0].db
    queries = sorted({q for s in pg for q in s.db.statements},
                     key=lambda q: -first.statements.get(q, (0, 0.0))[0])
    for q in queries:
        cells = []
        for s in pg:
            calls, ms = s.db.statements.get(q, (0, 0.0))
            cells.append(f"{calls / s.db.msgs:.2f} @ {1000 * ms / calls:.0f}" if calls else "-")
        if any(c != "-" and not c.startswith("0.00") for c in cells):
            text = next(s.db.texts[q] for s in pg if q in s.db.texts)
            text = text if len(text) <= 90 else text[:87] + "..."
            out.append(f"| `{text}` | " + " | ".join(cells) + " |")
    return out + [""]


def probe_table(probe: list[pgserver.ProbeRow] | str) -> list[str]:
    out = ["### relayd_reserve as the user's hourly window fills", ""]
    if isinstance(probe, str):
        return out + [f"Reservation probe {probe}.", ""]
    out += [f"One connection calling `relayd_reserve` {pgserver.PROBE_CALLS} times per row, "
            "for a user with that many sends in its last hour (the other users' load idle).", "",
            "| sends in the user's last hour | server CPU µs per call | wall µs per call |",
            "|---|---|---|"]
    out += [f"| {w} | {cpu:.0f} | {wall:.0f} |" for w, cpu, wall in probe]
    return out + [""]


def window_slope(probe: list[pgserver.ProbeRow] | str) -> tuple[float, float] | None:
    """(server CPU µs of a reservation at an empty window, µs more per send
    in the window) from the probe's first and last rows."""
    if isinstance(probe, str) or len(probe) < 2 or probe[-1][0] <= probe[0][0]:
        return None
    (w0, t0, _), (w1, t1, _) = probe[0], probe[-1]
    return t0, max(0.0, (t1 - t0) / (w1 - w0))


def capacity_lines(summaries: list[Summary], probe: list[pgserver.ProbeRow] | str,
                   users: int) -> list[str]:
    """The on-paper capacity of one PostgreSQL server from the measured costs."""
    sizes = sorted({(s.size, s.sessions) for s in summaries})
    pg1 = find(summaries, "postgresql x1", *sizes[0]) if sizes else None
    if pg1 is None or pg1.db is None or not pg1.db.msgs:
        return []
    c = pg1.db.cpu_us_per_msg
    out = ["### Capacity on paper", "",
           f"- measured: c = {c:.0f} µs of PostgreSQL CPU per message (postgresql x1, "
           f"{human_size(pg1.size)} x {pg1.sessions}, {users} fresh SMTP user(s) per point)"]
    slope = window_slope(probe)
    if slope:
        t0, k = slope
        n = pg1.db.msgs / len(pg1.points) / users
        c = max(1.0, c - k * n / 2)
        out.append(f"- of which the point's own hourly window (~{n / 2:,.0f} sends on average, "
                   f"+{k:.3f} µs each, probe above) is ~{k * n / 2:.0f} µs: c0 = {c:.0f} µs "
                   "for a user with a short window")
    out.append("- one server of C cores saturates at about C x 1 000 000 / c0 msg/s: "
               + ", ".join(f"{n} cores ~ {n * 1e6 / c:,.0f} msg/s" for n in CORES)
               + " (at 70 % CPU: " + ", ".join(f"{0.7 * n * 1e6 / c:,.0f}" for n in CORES)
               + "), if the load is spread over many users")
    if slope and slope[1] > 0:
        t0, k = slope
        # One user's reservations serialise on its row: r * (t0 + k * 3600 * r) <= 1e6 µs/s.
        r = (-t0 + math.sqrt(t0 * t0 + 4 * k * 3600 * 1e6)) / (2 * k * 3600)
        out += [f"- a user sending r msg/s steadily has 3600 x r sends in its window: each of "
                f"its reservations costs {k * 3600:.0f} x r µs more (at 10 msg/s: "
                f"{k * 36000:,.0f} µs, {1 + k * 36000 / c:.0f}x c0)",
                f"- one user's reservations serialise on its row lock: r x ({t0:.0f} + "
                f"{k * 3600:.0f} x r) µs <= 1 s gives at most ~{r:.0f} msg/s for any one user "
                "if each reservation came alone, sustained for an hour, whatever the number of "
                "cores; concurrent ones are batched (relayd_reserve_many), which takes the row "
                "once per batch, so a busy user's bound is higher (the points above send all "
                "their sessions as one user)"]
    return out + [""]
