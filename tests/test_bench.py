"""The benchmark harness runs end to end (sink, relayd, provisioning through
the admin API, load generator, memory checks, report): a smoke run with tiny
durations so that bench/ cannot rot. It asserts the report's shape, never a
speed: performance goals live in the benchmark itself.

The scale-out comparison (``--scale-out``) gets the same: a throw-away
PostgreSQL cluster, one relayd on SQLite and two on PostgreSQL, one round
of each configuration; so does the front comparison (``--front haproxy``,
``--front reuseport``: two relayd processes behind HAProxy or on one
SO_REUSEPORT port). Like the PostgreSQL and HAProxy tests, they fail rather
than skip without PostgreSQL or HAProxy: CI installs both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_smoke_run(tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--duration", "0.5", "--sizes", "1024",
         "--sessions", "2", "--idle", "5", "--processes", "1", "--sink", "aiosmtpd",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 1 KB | 2 |")]
    assert len(rows) == 1, report
    direct, relayd = (float(x) for x in rows[0].split("|")[3:5])
    assert direct > 0 and relayd > 0, "both targets delivered messages"
    measured = report.split("## Analysis (hand-written")[0]      # not the prose after it
    assert "sink: aiosmtpd sink;" in measured
    assert "5 idle authenticated sessions" in measured
    assert "one 10 MB message" in measured
    assert "session errors" not in r.stderr, r.stderr[-2000:]


def test_bench_scale_out_smoke_run(tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# relayd benchmark results\n\nthe matrix's table\n")
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--scale-out", "--duration", "0.5", "--sizes", "1024",
         "--sessions", "2", "--repeats", "1", "--processes", "1", "--sink", "aiosmtpd",
         "--probe-rows", "100", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("# relayd benchmark results\n\nthe matrix's table\n"), \
        "the matrix's part is kept"
    rows = {cells[3]: cells for cells in (
        [c.strip() for c in line.split("|")] for line in report.splitlines()
        if line.startswith("| 1 KB | 2 | "))}
    assert set(rows) == {"sqlite x1", "postgresql x1", "postgresql x2"}, report
    for label, cells in rows.items():
        assert float(cells[4]) > 0, f"{label} delivered messages"
        assert float(cells[8]) > 0, f"{label}: relayd CPU per message"
    assert len(rows["postgresql x2"][7].split("+")) == 2, "each process's CPU"
    assert rows["sqlite x1"][9:11] == ["-", "-"], "no database cost for SQLite"
    for label in ("postgresql x1", "postgresql x2"):
        postgres_us, round_trips = (float(x) for x in rows[label][9:11])
        assert postgres_us > 0 and round_trips >= 1, rows[label]
    measured = report.split("## Analysis (hand-written")[0]      # not the prose after it
    assert "postgresql x1 / sqlite x1 = " in measured and "(target >= 0.7: " in measured
    assert "`SELECT relayd_reserve_many($1, $2, $3, $4)`" in measured, "the statements table"
    assert "| 100 |" in measured, "the reservation probe's largest window"
    assert "8 cores ~ " in measured and "16 cores ~ " in measured
    assert report.count("## Analysis (hand-written") == 1
    assert "session errors" not in r.stderr, r.stderr[-2000:]


RATE = 20      # msg/s per relayd process: far below what even one session sends back to back


@pytest.mark.parametrize("front,more", [
    ("haproxy", []),
    ("reuseport", ["--client", "lean", "--rate", str(RATE)]),
])
def test_bench_front_smoke_run(tmp_path: Path, front: str, more: list[str]):
    """``--front``: two relayd processes on PostgreSQL behind HAProxy
    (examples/haproxy.cfg) or on one SO_REUSEPORT port, N = 1 and 2; on
    SO_REUSEPORT with the lean client, paced (``--rate`` per process)."""
    out = tmp_path / "RESULTS.md"
    out.write_text("# relayd benchmark results\n\nthe matrix's table\n")
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--front", front, "--instances", "2",
         "--duration", "1", "--sizes", "1024", "--sessions", "2", "--repeats", "1",
         "--processes", "1", "--sink", "aiosmtpd", "--out", str(out), *more],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("# relayd benchmark results\n\nthe matrix's table\n"), \
        "the matrix's part is kept"
    rows = {cells[3]: cells for cells in (
        [c.strip() for c in line.split("|")] for line in report.splitlines()
        if line.startswith("| 1 KB | 2 | "))}
    assert set(rows) == {f"{front} x1", f"{front} x2"}, report
    for label, cells in rows.items():
        assert float(cells[4]) > 0, f"{label} delivered messages"
        if more:        # paced: x1 offers RATE msg/s, x2 twice that
            assert float(cells[4]) <= RATE * int(label[-1]) * 1.3, f"{label} was paced"
        cpu_us, kernel = cells[8].split()
        # the kernel's share, in clock ticks of 10 ms: a 1 s paced point may have none
        assert float(cpu_us) > 0 and 0 <= float(kernel.strip("(%)")) <= 100, cells[8]
        wakeups, preemptions = (float(x) for x in cells[9].split(" / "))
        assert wakeups > 0 and preemptions >= 0, cells
        postgres_us, round_trips = (float(x) for x in cells[11:13])
        assert postgres_us > 0 and round_trips > 0, cells
        assert (cells[10] == "-") == (front == "reuseport"), "HAProxy's CPU, for HAProxy only"
    assert len(rows[f"{front} x2"][7].split("+")) == 2, "each process's CPU"
    measured = report.split("## Analysis (hand-written")[0]      # not the prose after it
    assert f"- {front}, 1 KB x 2: " in measured and "(bound: +10%)" in measured
    assert "µs/msg pooled (" in measured and ": median " in measured, "the growth per round"
    assert f"load generator: {'lean' if more else 'aiosmtplib'}, 1 processes" in measured
    if more:        # its own block, the closed loop's (none here) kept
        assert f"PostgreSQL, paced at {RATE} msg/s per relayd process" in measured
        assert "<!-- end of front, paced -->" in measured and "16 cores on paper" not in measured
    else:
        assert "PostgreSQL, closed loop" in measured and "<!-- end of front -->" in measured
        assert "16 cores on paper" in measured and f"| {front}, 1 KB |" in measured
    assert report.count("## Analysis (hand-written") == 1
    assert "session errors" not in r.stderr, r.stderr[-2000:]


def test_lean_client_dot_stuffs_like_rfc_5321():
    """RFC 5321 4.5.2: a line starting with a period gets one more; the
    message ends in CRLF.CRLF."""
    from bench.loadgen import dot_stuffed
    assert dot_stuffed(b".a\r\nb\r\n..c") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuffed(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n", "no empty line added"
