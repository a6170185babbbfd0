"""The benchmark harness runs end to end (sink, relayd, provisioning through
the admin API, load generator, memory checks, report): a smoke run with tiny
durations so that bench/ cannot rot. It asserts the report's shape, never a
speed: performance goals live in the benchmark itself."""

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
    assert "sink: aiosmtpd sink;" in report
    assert "5 idle authenticated sessions" in report
    assert "one 10 MB message" in report
    assert "session errors" not in r.stderr, r.stderr[-2000:]
