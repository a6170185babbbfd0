"""The bench's moving parts, shared by the default matrix (__main__.py) and
the scale-out comparison (scaleout.py): the upstream sink, relayd processes
with generated configs (one, or a fleet on one database), provisioning
through the admin API, and the measurement of one point (msg/s, latency
percentiles, each relayd process's CPU and peak RSS, optionally a database
meter). Every wait is bounded; every process started here is stopped by the
context managers, on errors too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from . import loadgen
from .procfs import cpu_seconds, cpu_times, machine_cpu, own_cpu, reset_peak_rss, rss_kib, switches

HERE = Path(__file__).resolve().parent
USER_VISIBLE_TIMEOUT = 10.0     # seconds a new SMTP user may take to reach every instance


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
    try:
        wait_port(port)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, port, kind


@dataclass(frozen=True)
class Sink:
    port: int
    kind: str               # what it is, for the report
    pid: int


@contextlib.contextmanager
def sink_running(kind: str = "auto") -> Iterator[Sink]:
    """The upstream sink for the block."""
    proc, port, description = start_sink(kind)
    try:
        yield Sink(port, description, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Relayd:
    """One relayd process. ``port`` is its own plain listener (readiness,
    provisioning checks, or the load itself); ``listeners`` come before it
    (a PROXY protocol or SO_REUSEPORT one: bound once ``port`` answers)."""

    def __init__(self, workdir: Path, extra: dict | None = None,
                 listeners: Sequence[dict] = ()):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = workdir / "admin.sock"
        cfg = {
            "listen": [*listeners, {"address": f"127.0.0.1:{self.port}", "tls": "none",
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
        self.log = workdir / "relayd.log"           # its stderr: warnings and errors
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relayd", "-c", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def relayd_fleet(workdir: Path, count: int, database: str | None = None,
                 listeners: Callable[[int], list[dict]] | None = None) -> Iterator[list[Relayd]]:
    """``count`` relayd processes for the block, each with its own port,
    state_dir and admin socket (``workdir``/i0, i1, ...), all on
    ``database`` (a DSN; None: each its own SQLite file in its state_dir);
    ``listeners(i)``: more listeners of the i-th."""
    extra = {"database": database} if database else None
    fleet: list[Relayd] = []
    try:
        for i in range(count):
            fleet.append(Relayd(workdir / f"i{i}", extra, listeners(i) if listeners else ()))
        yield fleet
    finally:
        for relayd in fleet:
            relayd.stop()


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


def provision_owner(relayd: Relayd, sink_port: int) -> dict[str, Any]:
    """An owner (relayctl) with an upstream to the sink (seed-000 dialect)."""
    out = subprocess.run([sys.executable, "-m", "relayd.ctl", "--socket", str(relayd.socket),
                          "--json", "owner", "add", "--plan", "paid"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    owner = json.loads(out)
    auth = {"X-Key": owner["owner_id"], "X-Access-Token": owner["token"]}
    api(relayd.socket, "/private/smtps/save",
        {"idapp": owner["idapp"], "host": "127.0.0.1", "port": sink_port,
         "username": "bench", "password": "bench", "auth": False, "startstls": False,
         "ssltls": False}, auth)
    return owner


def add_user(relayd: Relayd, owner: dict[str, Any]) -> tuple[str, str]:
    """A new SMTP user of ``owner`` without practical limits (SendClean dialect)."""
    user = api(relayd.socket, "/settings/addSmtp",
               {"owner_id": owner["owner_id"], "token": owner["token"],
                "total_limit": 2**62, "hourly_limit": 2**62})
    return user["smtp_user_name"], user["smtp_password"]


def provision(relayd: Relayd, sink_port: int) -> tuple[str, str]:
    """Owner (relayctl), upstream (seed-000 dialect), SMTP user (SendClean)."""
    return add_user(relayd, provision_owner(relayd, sink_port))


def fresh_user(fleet: Sequence[Relayd], owner: dict[str, Any]) -> tuple[str, str]:
    """A new SMTP user, created through the fleet's first instance, once
    it can log in on all of them."""
    user, password = add_user(fleet[0], owner)
    if len(fleet) > 1:
        wait_user([r.port for r in fleet], user, password)
    return user, password


def wait_user(ports: Sequence[int], user: str, password: str,
              timeout: float = USER_VISIBLE_TIMEOUT) -> None:
    """Until ``user`` can log in on every port: instances on one database
    learn of a user created through another within about a second."""
    async def can_login(port: int) -> bool:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test",
                                 start_tls=False, timeout=10)
        try:
            await client.connect()
            await client.login(user, password)
            await client.quit()
            return True
        except (aiosmtplib.SMTPException, OSError):
            client.close()
            return False

    async def until_all() -> None:
        pending = list(ports)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if not await can_login(p)]
            if pending:
                await asyncio.sleep(0.1)
        if pending:
            raise RuntimeError(f"SMTP user {user} cannot log in on ports {pending} "
                               f"after {timeout:g} s")

    asyncio.run(until_all())


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
    cpu_pct: float | None = None              # all relayd processes together
    peak_rss_mib: float | None = None         # the largest of them
    cpu_pcts: list[float] = field(default_factory=list)   # each relayd process
    cpu_s: float = 0.0                        # relayd CPU seconds, all processes
    sys_s: float = 0.0                        # the part of cpu_s spent in the kernel
    db: Any = None                            # what a database meter measured
    other_pct: float = 0.0                    # CPU % of everything else on the machine
    steal_pct: float = 0.0                    # CPU % the hypervisor took
    watched_s: list[float] = field(default_factory=list)  # CPU seconds of measure's ``watch``
    switches: tuple[int, int] = (0, 0)        # relayd's (voluntary, involuntary), all processes


class Background:
    """The machine's CPU beyond the bench's own processes during a point:
    whatever else runs there (another user's tests), which the numbers of a
    point on a shared machine must be read against."""

    def __init__(self, pids: Sequence[int]):
        self.pids = list(pids)          # ours but not our reaped children: sink, relayd...
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_cpu()
        self.ours0 = own_cpu() + sum(cpu_seconds(p) for p in self.pids)

    def end(self, point: Point, also_ours: float = 0.0) -> None:
        """Into ``point``: the others' and the hypervisor's CPU %, ``also_ours``
        (seconds: the database server's) not counted as others'."""
        busy, steal = machine_cpu()
        ours = own_cpu() + sum(cpu_seconds(p) for p in self.pids) - self.ours0 + also_ours
        elapsed = time.monotonic() - self.t0
        point.other_pct = max(0.0, 100 * (busy - self.busy0 - ours) / elapsed)
        point.steal_pct = 100 * (steal - self.steal0) / elapsed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _py_spy(pid: int, duration: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["py-spy", "record", "-p", str(pid), "-d", str(int(duration) + 1), "-r", "250",
         "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(job: loadgen.Job, target: str, pids: Sequence[int], processes: int,
            profile_to: Path | None = None, db: Any = None,
            helpers: Sequence[int] = (), watch: Sequence[int] = ()) -> Point:
    """Run ``job`` and measure it, with the CPU and peak RSS of the relayd
    processes ``pids`` (none: direct to the sink), py-spy on the first when
    ``profile_to`` is given, ``db`` (begin()/end(msgs) -> a cost with
    ``cpu_s``) around it, and the machine's other load (``helpers``: more
    processes of ours, the sink; ``watch``: more, whose CPU seconds go
    into ``watched_s``: a load balancer)."""
    for pid in pids:
        reset_peak_rss(pid)
    if db is not None:
        db.begin()
    background = Background([*pids, *helpers, *watch])
    times0 = [cpu_times(pid) for pid in pids]        # (user, system) of each
    switches0 = [switches(pid) for pid in pids]
    watched0 = [cpu_seconds(pid) for pid in watch]
    spy = _py_spy(pids[0], job.duration, profile_to) if pids and profile_to else None
    latencies, errors, wall = loadgen.run(job, processes)
    times = [(u - u0, k - k0) for (u, k), (u0, k0) in
             zip((cpu_times(pid) for pid in pids), times0)]
    cpu = [u + k for u, k in times]
    switched = [(v - v0, i - i0) for (v, i), (v0, i0) in
                zip((switches(pid) for pid in pids), switches0)]
    watched = [cpu_seconds(pid) - c for pid, c in zip(watch, watched0)]
    if spy is not None:
        spy.wait(60)
    point = Point(target, job.sessions, job.size, len(latencies), len(errors),
                  len(latencies) / wall, percentile(latencies, 0.5) * 1000,
                  percentile(latencies, 0.99) * 1000)
    point.watched_s = watched
    point.switches = (sum(v for v, _ in switched), sum(i for _, i in switched))
    if db is not None:
        point.db = db.end(len(latencies))
    background.end(point, point.db.cpu_s if point.db is not None else 0.0)
    if pids:
        point.cpu_pcts = [100 * c / wall for c in cpu]
        point.cpu_pct = sum(point.cpu_pcts)
        point.cpu_s = sum(cpu)
        point.sys_s = sum(k for _, k in times)
        point.peak_rss_mib = max(rss_kib(pid, "VmHWM") for pid in pids) / 1024
    if errors:
        print(f"  {len(errors)} session errors, first: {errors[0]}", file=sys.stderr)
    return point


def human_size(n: int) -> str:
    return f"{n // (1024 * 1024)} MB" if n >= 1024 * 1024 else f"{n // 1024} KB"


def digest(lines: Iterable[tuple[str, str]], top: int = 8, width: int = 500) -> list[str]:
    """(source, log line) pairs as Markdown list items, alike lines counted
    once (numbers, ids and times blanked out), most frequent first."""
    counts: dict[str, int] = {}
    example: dict[str, str] = {}
    for source, line in lines:
        key = re.sub(r"[0-9a-f]{8,}|\d+", "N", line.split(" exc=", 1)[0])[:200]
        counts[key] = counts.get(key, 0) + 1
        example.setdefault(key, f"{source}: {line}")
    ranked = sorted(counts, key=lambda k: -counts[k])
    return [f"- {counts[k]} x `{example[k][:width]}`" for k in ranked[:top]]


def log_lines(path: Path, limit: int = 100_000) -> list[str]:
    """The first ``limit`` lines of a log file (none if it is missing)."""
    if not path.exists():
        return []
    with open(path, errors="replace") as f:
        return [line.rstrip("\n") for _, line in zip(range(limit), f)]


def _short(line: str) -> str:
    """A relayd log line without its time, its traceback cut to the exception."""
    line = re.sub(r"^ts=\S+ ", "", line)
    head, sep, exc = line.partition(" exc=")
    if not sep:
        return line
    last = [part for part in exc.strip('"').split("\\x0a") if part.strip()][-1:]
    return f"{head} exc=... {last[0].strip() if last else ''}"


def log_digest(relayds: Sequence[Relayd], top: int = 8) -> list[str]:
    """The relayd processes' warnings and errors (their stderr), digested."""
    return digest(((r.log.parent.name, _short(line))
                   for r in relayds for line in log_lines(r.log)), top)


def stop_on_sigterm() -> None:
    """SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so that every
    context manager above stops its processes."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
