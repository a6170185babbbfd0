"""What the bench reads of /proc: a process's CPU seconds (user, system),
its context switches and memory, and the whole machine's busy and stolen
time. Linux only, like the machines the bench runs on."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """``pid``'s (user, system) CPU seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK     # utime, stime


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status, each its first number (kB for
    the memory ones)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        first = value.split()[:1]
        if first and first[0].isdigit():
            fields[key] = int(first[0])
    return fields


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of ``pid``'s main thread:
    for relayd, its event loop's sleeps in epoll_wait (a wake-up each) and
    the times the kernel took the core from it."""
    status = proc_status(pid)
    return status["voluntary_ctxt_switches"], status["nonvoluntary_ctxt_switches"]


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores
    (/proc/stat: user + nice + system + irq + softirq; steal)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / CLK_TCK, f[7] / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children (the load
    generator's workers once joined, the sink once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    return proc_status(pid).get(key, 0)


def reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
