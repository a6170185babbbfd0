"""Side-by-side benchmark: direct-to-sink vs via relayd, in one run.

    python -m bench                 # full matrix, 10 s per point (~8 minutes)
    python -m bench --quick         # 3 s per point, fewer points (a smoke run)

Starts an upstream sink (Postfix's smtp-sink when installed, else an aiosmtpd
sink), relayd as a subprocess with a generated config, provisions an owner,
upstream and SMTP user through the admin API (relayctl and the HTTP
dialects), then runs the multi-process aiosmtplib load generator against the
sink directly and through relayd for each sessions x size point, reporting
msgs/s, p50/p99 latency, relayd CPU % and peak RSS; then peak RSS with 1 000
idle authenticated sessions and for one 10 MB message. Results are written to
bench/RESULTS.md (the machine and the exact command are recorded there).
Everything listens on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import loadgen

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def start_sink(kind: str = "auto") -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    smtp_sink = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
    if kind == "smtp-sink" and not smtp_sink:
        raise SystemExit("smtp-sink is not installed: apt-get install postfix")
    if smtp_sink and kind != "aiosmtpd":
        argv = [smtp_sink, "-u", "nobody", f"127.0.0.1:{port}", "1024"]
        kind = "Postfix smtp-sink"
    else:
        argv = [sys.executable, "-m", "bench.sink", str(port)]
        kind = "aiosmtpd sink" + ("" if kind == "aiosmtpd" else " (smtp-sink not installed)")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=HERE.parent)
    wait_port(port)
    return proc, port, kind


class Relayd:
    def __init__(self, workdir: Path, extra: dict | None = None):
        self.port = free_port()
        self.socket = workdir / "admin.sock"
        cfg = {
            "listen": [{"address": f"127.0.0.1:{self.port}", "tls": "none",
                        "auth_require_tls": False}],
            "hostname": "relayd.bench",
            "state_dir": str(workdir / "state"),
            "admin": {"socket": str(self.socket)},
            "metrics": {"listen": None},
            "limits": {"max_message_size": 64 * 1024 * 1024, "max_sessions": 5000,
                       "max_sessions_per_ip": 5000},
            "log_level": "warning",
            **(extra or {}),
        }
        self.config = workdir / "relayd.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime + stime


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---------------------------------------------------------------- provisioning

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def api(sock: Path, path: str, body: dict, headers: dict | None = None) -> dict:
    conn = UnixHTTP(str(sock))
    conn.request("POST", path, json.dumps(body),
                 {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {data[:300]!r}")
    return json.loads(data) if data else {}


def provision(relayd: Relayd, sink_port: int) -> tuple[str, str]:
    """Owner (relayctl), upstream (seed-000 dialect), SMTP user (SendClean)."""
    out = subprocess.run([sys.executable, "-m", "relayd.ctl", "--socket", str(relayd.socket),
                          "--json", "owner", "add", "--plan", "paid"],
                         check=True, capture_output=True, text=True).stdout
    owner = json.loads(out)
    auth = {"X-Key": owner["owner_id"], "X-Access-Token": owner["token"]}
    api(relayd.socket, "/private/smtps/save",
        {"idapp": owner["idapp"], "host": "127.0.0.1", "port": sink_port,
         "username": "bench", "password": "bench", "auth": False, "startstls": False,
         "ssltls": False}, auth)
    user = api(relayd.socket, "/settings/addSmtp",
               {"owner_id": owner["owner_id"], "token": owner["token"],
                "total_limit": 2**62, "hourly_limit": 2**62})
    return user["smtp_user_name"], user["smtp_password"]


# ---------------------------------------------------------------- measuring

@dataclass
class Point:
    target: str
    sessions: int
    size: int
    msgs: int
    errors: int
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_pct: float | None = None
    peak_rss_mib: float | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(job: loadgen.Job, target: str, pid: int | None, processes: int,
            profile_to: Path | None = None) -> Point:
    spy = None
    if pid:
        reset_peak_rss(pid)
        cpu0 = cpu_seconds(pid)
        if profile_to is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(pid), "-d", str(int(job.duration) + 1), "-r", "250",
                 "-f", "raw", "-o", str(profile_to), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies, errors, wall = loadgen.run(job, processes)
    if spy is not None:
        spy.wait(60)
    point = Point(target, job.sessions, job.size, len(latencies), len(errors),
                  len(latencies) / wall, percentile(latencies, 0.5) * 1000,
                  percentile(latencies, 0.99) * 1000)
    if pid:
        point.cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / wall
        point.peak_rss_mib = rss_kib(pid, "VmHWM") / 1024
    if errors:
        print(f"  {len(errors)} session errors, first: {errors[0]}", file=sys.stderr)
    return point


def human_size(n: int) -> str:
    return f"{n // (1024 * 1024)} MB" if n >= 1024 * 1024 else f"{n // 1024} KB"


# ---------------------------------------------------------------- report

def report(points: list[Point], extras: list[str], args: argparse.Namespace, sink_kind: str,
           started: float) -> str:
    lines = [
        "# relayd benchmark results", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- machine: {os.cpu_count()} cores, {platform.machine()}, Linux "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- command: `{' '.join(['python -m bench'] + sys.argv[1:])}`",
        f"- sink: {sink_kind}; load generator: aiosmtplib, {args.processes} processes, "
        f"AUTH PLAIN when via relayd, {args.duration:g} s per point", "",
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
        lines.append(
            f"| {human_size(size)} | {sessions} | {d.rate:.0f} | {r.rate:.0f} | {ratio:.2f} "
            f"| {d.p50_ms:.1f} / {d.p99_ms:.1f} | {r.p50_ms:.1f} / {r.p99_ms:.1f} "
            f"| {r.cpu_pct:.0f} | {r.peak_rss_mib:.0f} |")
    lines += ["", *extras, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point (10)")
    p.add_argument("--quick", action="store_true", help="3 s points, 1 KB/100 KB, 1/50 sessions")
    p.add_argument("--processes", type=int, default=2, help="load generator processes (2)")
    p.add_argument("--sizes", default="1024,102400,10485760")
    p.add_argument("--sessions", default="1,10,50")
    p.add_argument("--idle", type=int, default=1000, help="idle authenticated sessions (1000)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                   help="upstream sink: Postfix's smtp-sink when installed (auto), or aiosmtpd")
    p.add_argument("--profile", action="store_true",
                   help="sample relayd with py-spy during the 1 KB x 50 point (pip install py-spy)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.sizes, args.sessions, args.idle = 3.0, "1024,102400", "1,50", 200
    sizes = [int(s) for s in args.sizes.split(",")]
    sessions_list = [int(s) for s in args.sessions.split(",")]
    started = time.time()

    if args.profile and not shutil.which("py-spy"):
        p.error("--profile needs py-spy: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
        profile_path = Path(tmp) / "profile.txt"
        sink, sink_port, sink_kind = start_sink(args.sink)
        relayd = Relayd(Path(tmp))
        try:
            user, password = provision(relayd, sink_port)
            points: list[Point] = []
            for size in sizes:
                for sessions in sessions_list:
                    if size >= 10 * 1024 * 1024 and sessions > 10:
                        continue      # 50 x 10 MB in flight measures the loopback, not relayd
                    for target in ("direct", "relayd"):
                        job = loadgen.Job(
                            port=sink_port if target == "direct" else relayd.port,
                            sessions=sessions, size=size, duration=args.duration,
                            user=user if target == "relayd" else None, password=password)
                        profiling = (args.profile and target == "relayd" and size == 1024
                                     and sessions == max(sessions_list))
                        point = measure(job, target,
                                        relayd.pid if target == "relayd" else None,
                                        args.processes, profile_path if profiling else None)
                        points.append(point)
                        print(f"{target:7} {human_size(size):>6} x{sessions:<3} "
                              f"{point.rate:8.0f} msg/s  p50 {point.p50_ms:6.1f} ms  "
                              f"p99 {point.p99_ms:6.1f} ms", file=sys.stderr)
            extras = [f"## Memory", ""]
            extras += memory_checks(relayd, user, password, args.idle)
            ratios = target_lines(points)
            extras = ["## Targets", "", *ratios, "", *extras]
            if args.profile and profile_path.exists():
                extras += ["", *profile_lines(profile_path)]
        finally:
            relayd.stop()
            sink.terminate()
            sink.wait(10)
    text = report(points, extras, args, sink_kind, started)
    analysis = HERE / "analysis.md"
    if analysis.exists():
        text += "\n" + analysis.read_text()
    Path(args.out).write_text(text)
    print(text)
    return 0


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
