"""Side-by-side benchmark: direct-to-sink vs via relayd, in one run.

    python -m bench                 # full matrix, 10 s per point (~8 minutes)
    python -m bench --quick         # 3 s per point, fewer points (a smoke run)
    python -m bench --database postgresql --instances 2
                                    # the matrix via 2 relayd processes on one PostgreSQL
    python -m bench --scale-out --duration 5
                                    # 1 relayd on SQLite vs 1 and 2 on PostgreSQL (~3 minutes)
    python -m bench --front haproxy,reuseport --instances 2 --duration 5
                                    # 1 and 2 relayd behind HAProxy / on SO_REUSEPORT (~4 minutes)

Starts an upstream sink (Postfix's smtp-sink when installed, else an aiosmtpd
sink), relayd as a subprocess with a generated config, provisions an owner,
upstream and SMTP user through the admin API (relayctl and the HTTP
dialects), then runs the multi-process aiosmtplib load generator against the
sink directly and through relayd for each sessions x size point, reporting
msgs/s, p50/p99 latency, relayd CPU % and peak RSS; then peak RSS with 1 000
idle authenticated sessions and for one 10 MB message. Results are written to
bench/RESULTS.md (the machine and the exact command are recorded there).
Everything listens on 127.0.0.1; every loop is bounded in count and time.

``--database postgresql`` starts a throw-away PostgreSQL cluster
(pgserver.py) for relayd's store; ``--instances N`` runs N relayd processes
on that one database, each with its own port, state_dir and admin socket,
provisioned once through the first one's admin API; the load generator's
sessions go round-robin over the N ports, and the CPU column adds up the
processes (each shown). On PostgreSQL every point gets a fresh SMTP user: the
cost of a reservation grows with the user's sends in the last hour, and a
point should not pay for the ones before it (scaleout.py explains).

``--scale-out`` runs the comparison of scaleout.py instead of the matrix:
1 relayd on SQLite, 1 on PostgreSQL and 2 on PostgreSQL, interleaved, at
1 KB and 100 KB with 50 sessions (``--sizes``, ``--sessions``, ``--repeats``,
``--users``), with msg/s, p50/p99, each relayd's CPU, relayd and PostgreSQL
CPU per message and database round trips per message. It writes its own
section of bench/RESULTS.md and keeps the matrix's (and the matrix run keeps
the scale-out section).

``--front haproxy|reuseport`` (or both, comma-separated) runs front.py's
comparison instead: ``--instances`` N (default 2) relayd processes on
PostgreSQL behind HAProxy (examples/haproxy.cfg) or on one SO_REUSEPORT
address, N = 1 and N interleaved, with relayd's CPU per message at N against
1, HAProxy's CPU per message and a 16-core estimate; its own section of
bench/RESULTS.md. With ``--rate R`` its load is paced at R msg/s per relayd
process (equal per-process load at 1 and N) and goes into a block of its
own. ``--client lean`` swaps aiosmtplib for loadgen.py's lean client (the
same bytes for a fraction of the CPU) in any run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import loadgen, results
from .harness import (HERE, Point, Relayd, Sink, fresh_user, human_size, measure, provision_owner,
                      relayd_fleet, sink_running, stop_on_sigterm)
from .procfs import reset_peak_rss, rss_kib

MATRIX_SIZES, MATRIX_SESSIONS = "1024,102400,10485760", "1,10,50"
SCALE_OUT_SIZES, SCALE_OUT_SESSIONS = "1024,102400", "50"


# ---------------------------------------------------------------- report

def report(points: list[Point], extras: list[str], args: argparse.Namespace, sink_kind: str,
           started: float) -> str:
    lines = [
        "# relayd benchmark results", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- machine: {os.cpu_count()} cores, {platform.machine()}, Linux "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- command: `{' '.join(['python -m bench'] + sys.argv[1:])}`",
        f"- sink: {sink_kind}; load generator: {args.client}, {args.processes} processes, "
        f"AUTH PLAIN when via relayd, {args.duration:g} s per point",
    ]
    if args.database != "sqlite" or args.instances > 1:
        lines.append(
            f"- relayd: {args.instances} process{'es' if args.instances > 1 else ''} on one "
            f"{args.database} database "
            "(a throw-away cluster started by the bench), sessions round-robin over their "
            "ports, a fresh SMTP user per point; CPU % per process, added up")
    lines += [
        "",
        "| size | sessions | direct msg/s | relayd msg/s | ratio | direct p50/p99 ms "
        "| relayd p50/p99 ms | relayd CPU % | relayd peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[int, int], dict[str, Point]] = {}
    for p in points:
        by_key.setdefault((p.size, p.sessions), {})[p.target] = p
    for (size, sessions), pair in sorted(by_key.items()):
        d, r = pair.get("direct"), pair.get("relayd")
        if not d or not r:
            continue
        ratio = r.rate / d.rate if d.rate else float("nan")
        cpu = f"{r.cpu_pct:.0f}" if len(r.cpu_pcts) < 2 else \
            f"{r.cpu_pct:.0f} ({' + '.join(f'{c:.0f}' for c in r.cpu_pcts)})"
        lines.append(
            f"| {human_size(size)} | {sessions} | {d.rate:.0f} | {r.rate:.0f} | {ratio:.2f} "
            f"| {d.p50_ms:.1f} / {d.p99_ms:.1f} | {r.p50_ms:.1f} / {r.p99_ms:.1f} "
            f"| {cpu} | {r.peak_rss_mib:.0f} |")
    lines += ["", *extras, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point (10)")
    p.add_argument("--quick", action="store_true", help="3 s points, 1 KB/100 KB, 1/50 sessions")
    p.add_argument("--processes", type=int, default=2, help="load generator processes (2)")
    p.add_argument("--client", choices=("aiosmtplib", "lean"), default="aiosmtplib",
                   help="the load generator's SMTP client: aiosmtplib (default), or lean: "
                        "the same bytes on bare asyncio streams, at a fraction of the CPU "
                        "that the processes measured share the cores with")
    p.add_argument("--sizes", help=f"message sizes in bytes ({MATRIX_SIZES}; "
                   f"--scale-out: {SCALE_OUT_SIZES})")
    p.add_argument("--sessions", help=f"concurrent sessions per point ({MATRIX_SESSIONS}; "
                   f"--scale-out: {SCALE_OUT_SESSIONS})")
    p.add_argument("--idle", type=int, default=1000, help="idle authenticated sessions (1000)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                   help="upstream sink: Postfix's smtp-sink when installed (auto), or aiosmtpd")
    p.add_argument("--profile", action="store_true",
                   help="sample relayd with py-spy during the 1 KB x 50 point (pip install py-spy)")
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                   help="relayd's store: its embedded SQLite (default), or a throw-away "
                   "PostgreSQL cluster that the bench starts")
    p.add_argument("--instances", type=int, default=None,
                   help="relayd processes on the one database, sessions round-robin over "
                   "them (1; more need --database postgresql); --front: N (2), run with 1 and N")
    p.add_argument("--front", type=fronts, default=None, metavar="haproxy|reuseport",
                   help="instead of the matrix: relayd on PostgreSQL behind HAProxy "
                   "(examples/haproxy.cfg) or on one SO_REUSEPORT address, or both "
                   "(haproxy,reuseport), 1 and --instances processes interleaved; writes its "
                   "own section of RESULTS.md")
    p.add_argument("--scale-out", action="store_true",
                   help="instead of the matrix: 1 relayd on SQLite vs 1 and 2 on PostgreSQL, "
                   "interleaved, with msg/s, p50/p99, CPU per process, relayd and PostgreSQL "
                   "CPU per message and database round trips per message; writes its own "
                   "section of RESULTS.md")
    p.add_argument("--sched", choices=("normal", "batch"), default="normal",
                   help="the CPU scheduling policy of the bench and every process it starts "
                   "(normal); batch: SCHED_BATCH, no preemption on wake-up, so that relayd "
                   "sharing two cores with the load generator, the sink and PostgreSQL is "
                   "not preempted each time one of them wakes")
    p.add_argument("--repeats", type=int, default=3,
                   help="--scale-out: interleaved runs of each configuration per point (3)")
    p.add_argument("--users", type=int, default=1,
                   help="--scale-out: fresh SMTP users per point, sessions round-robin over "
                   "them (1: all sessions one user, the worst case for its quota row)")
    p.add_argument("--rate", type=float, default=None,
                   help="--front: offered msg/s per relayd process, paced (an open loop): "
                   "every process carries the same load at 1 and N processes, below what "
                   "saturates the cores; default: back to back (a closed loop)")
    p.add_argument("--probe-rows", type=int, default=30000,
                   help="--scale-out: the largest hourly window (sends of one user) at which "
                   "relayd_reserve is timed after the points (30000; 0: no probe)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.instances is None:
        args.instances = 2 if args.front else 1
    if args.front:
        check_front(p, args)
    if args.quick:
        if args.scale_out:
            p.error("--quick is for the matrix: give --scale-out a --duration")
        args.duration, args.sizes, args.sessions, args.idle = 3.0, "1024,102400", "1,50", 200
    if args.scale_out and (args.database != "sqlite" or args.instances != 1 or args.profile):
        p.error("--scale-out runs its own configurations: no --database, --instances, --profile")
    if args.instances < 1 or (args.instances > 1 and args.database != "postgresql"
                              and not args.front):
        p.error("--instances N > 1 needs --database postgresql (one database they share)")
    if args.repeats < 1 or args.users < 1 or args.duration <= 0:
        p.error("--repeats, --users and --duration must be positive")
    if args.rate is not None and (args.rate <= 0 or not args.front):
        p.error("--rate is for --front, and must be positive")
    if args.profile and not shutil.which("py-spy"):
        p.error("--profile needs py-spy: pip install py-spy")
    sizes, sessions = ((SCALE_OUT_SIZES, SCALE_OUT_SESSIONS) if args.scale_out or args.front
                       else (MATRIX_SIZES, MATRIX_SESSIONS))
    args.sizes = [int(s) for s in (args.sizes or sizes).split(",")]
    args.sessions = [int(s) for s in (args.sessions or sessions).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stop_on_sigterm()
    if args.sched == "batch":           # inherited by every process started from here on
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if args.scale_out:
        from . import scaleout          # imports PostgreSQL's helpers only when needed
        return scaleout.run(args)
    if args.front:
        from . import front
        return front.run(args)
    return run_matrix(args)


def fronts(text: str) -> list[str]:
    """--front's value: haproxy, reuseport or both, comma-separated."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("haproxy", "reuseport")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected haproxy and/or reuseport, got {text!r}")
    return list(dict.fromkeys(names))


def check_front(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.scale_out or args.quick or args.profile:
        p.error("--front runs its own configurations: no --scale-out, --quick, --profile")
    if args.instances < 1:
        p.error("--instances must be positive")
    args.database = "postgresql"       # the processes share one database, as relayd requires
    if "haproxy" in args.front and args.instances > 2:
        p.error("--front haproxy: examples/haproxy.cfg has two servers, so --instances <= 2")


# ---------------------------------------------------------------- the matrix

def run_matrix(args: argparse.Namespace) -> int:
    started = time.time()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relayd-bench-")))
        sink = stack.enter_context(sink_running(args.sink))
        dsn = None
        if args.database == "postgresql":
            from . import pgserver
            dsn = stack.enter_context(pgserver.pg_running())[1]
        fleet = stack.enter_context(relayd_fleet(tmp, args.instances, dsn))
        owner = provision_owner(fleet[0], sink.port)
        user, password = fresh_user(fleet, owner)
        points: list[Point] = []
        for size in args.sizes:
            for sessions in args.sessions:
                if size >= 10 * 1024 * 1024 and sessions > 10:
                    continue      # 50 x 10 MB in flight measures the loopback, not relayd
                if dsn and points:
                    user, password = fresh_user(fleet, owner)
                for target in ("direct", "relayd"):
                    points.append(matrix_point(args, fleet, sink, target, size, sessions,
                                               user, password, tmp / "profile.txt"))
        extras = ["## Targets", "", *target_lines(points), "", "## Memory", "",
                  *memory_checks(fleet[0], user, password, args.idle)]
        if args.profile and (tmp / "profile.txt").exists():
            extras += ["", *profile_lines(tmp / "profile.txt")]
    text = results.write(Path(args.out), matrix=report(points, extras, args, sink.kind, started))
    print(text)
    return 0


def matrix_point(args: argparse.Namespace, fleet: list[Relayd], sink: Sink, target: str,
                 size: int, sessions: int, user: str, password: str, profile: Path) -> Point:
    via = target == "relayd"
    job = loadgen.Job(port=tuple(r.port for r in fleet) if via else sink.port,
                      sessions=sessions, size=size, duration=args.duration,
                      user=user if via else None, password=password, client=args.client)
    profiling = args.profile and via and size == 1024 and sessions == max(args.sessions)
    point = measure(job, target, [r.pid for r in fleet] if via else [], args.processes,
                    profile if profiling else None, helpers=[sink.pid])
    print(f"{target:7} {human_size(size):>6} x{sessions:<3} "
          f"{point.rate:8.0f} msg/s  p50 {point.p50_ms:6.1f} ms  "
          f"p99 {point.p99_ms:6.1f} ms  other load {point.other_pct:.0f} %", file=sys.stderr)
    return point


def memory_checks(relayd: Relayd, user: str, password: str, idle: int) -> list[str]:
    """On a freshly started relayd (same state): a heap grown by the matrix
    would hide what one message or idle sessions cost. 10 MB first."""
    relayd.stop()
    relayd.start()
    out = []
    time.sleep(1.0)
    size = 10 * 1024 * 1024
    before = rss_kib(relayd.pid) / 1024
    reset_peak_rss(relayd.pid)
    loadgen.run(loadgen.Job(port=relayd.port, sessions=1, size=size, duration=0.1,
                            user=user, password=password, max_messages=1), 1)
    peak = rss_kib(relayd.pid, "VmHWM") / 1024
    out.append(f"- one 10 MB message: relayd peak RSS {peak:.0f} MiB, {peak - before:.0f} MiB "
               f"above idle ({before:.0f} MiB) = {(peak - before) / 10:.1f}x the message size "
               f"(target <= 3x)")
    base = rss_kib(relayd.pid) / 1024

    async def hold() -> float:
        clients = await loadgen.idle_sessions(relayd.port, user, password, idle)
        await asyncio.sleep(1.0)
        rss = rss_kib(relayd.pid) / 1024
        for c in clients:
            c.close()
        return rss

    with_idle = asyncio.run(hold())
    out.append(f"- {idle} idle authenticated sessions: relayd RSS {with_idle:.0f} MiB "
               f"(before them: {base:.0f} MiB; target <= 150 MiB)")
    return out


def profile_lines(path: Path, top: int = 15) -> list[str]:
    """Top self-time frames of a py-spy raw (collapsed stacks) profile."""
    from collections import Counter
    self_time: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        self_time[stack.split(";")[-1]] += int(count)
    out = [f"## Profile (py-spy, relayd, 1 KB x 50 sessions, {total} samples)", "",
           "| self % | frame |", "|---|---|"]
    out += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in self_time.most_common(top)]
    return out


def target_lines(points: list[Point]) -> list[str]:
    def get(target: str, sessions: int, size: int) -> Point | None:
        return next((p for p in points if (p.target, p.sessions, p.size) ==
                     (target, sessions, size)), None)

    out = []
    for sessions, size in ((50, 1024), (50, 102400)):
        d, r = get("direct", sessions, size), get("relayd", sessions, size)
        if d and r and d.rate:
            ratio = r.rate / d.rate
            out.append(f"- {sessions} sessions, {human_size(size)}: via-relayd / direct = "
                       f"{ratio:.2f} (target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
    d, r = get("direct", 10, 1024), get("relayd", 10, 1024)
    if d and r:
        delta = r.p99_ms - d.p99_ms
        out.append(f"- 10 sessions, 1 KB: p99 via relayd - p99 direct = {delta:.1f} ms "
                   f"(target <= 5 ms: {'met' if delta <= 5 else 'NOT met'})")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
