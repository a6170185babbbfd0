"""relayd as a real subprocess, for signal, drain and restart tests.

The process runs ``python -m relayd -c FILE``; its stderr (logfmt) is read
continuously so tests can wait for events, and the bound ports (config uses
port 0) are taken from its ``event=listening`` lines.
"""

from __future__ import annotations

import asyncio
import os
import re
from signal import Signals
import sys
from pathlib import Path
from typing import Any

import yaml

STARTUP_TIMEOUT = 30.0


class RelaydProcess:
    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.smtp_ports: list[int] = []
        self.metrics_port: int | None = None

    @classmethod
    async def start(cls, config: dict[str, Any], path: Path,
                    env: dict[str, str] | None = None) -> RelaydProcess:
        """``env``: added to the environment (RELAYD_CONFIG is never inherited)."""
        path.write_text(yaml.safe_dump(config))
        self = cls(path)
        env = {**{k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}, **(env or {})}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "-c", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env)
        self._reader = asyncio.create_task(self._read())
        await self.wait_for("event=started", STARTUP_TIMEOUT)
        self.smtp_ports = self.ports("smtp")
        self.metrics_port = (self.ports("metrics") or [None])[0]
        return self

    def ports(self, service: str) -> list[int]:
        """Bound ports of ``service`` (smtp, admin_tcp, metrics), from the log."""
        return [int(m.group(1)) for line in self.lines
                if "event=listening" in line and f"service={service} " in line
                for m in [re.search(r"\bport=(\d+)", line)] if m]

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for(self, needle: str, timeout: float = 15.0, start: int = 0) -> str:
        """Wait until a stderr line (from index ``start`` on) contains ``needle``."""
        async def scan() -> str:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if needle in line:
                        return line
                seen = len(self.lines)
                if self.proc is not None and self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"relayd exited before logging {needle!r}:\n" + self.log)
                self._new_line.clear()
                await self._new_line.wait()
        try:
            return await asyncio.wait_for(scan(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {needle!r} in relayd's log within {timeout}s:\n{self.log}")

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return rc

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
