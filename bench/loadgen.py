"""The load generator: worker processes, each running asyncio SMTP sessions
with aiosmtplib that send messages back to back until a deadline.

One worker process per core keeps the generator from being the only thing
measured; each session authenticates once (AUTH PLAIN) when credentials are
given, optionally after STARTTLS, then loops MAIL/RCPT/DATA: back to back
(a closed loop: as fast as the server answers), or paced (``rate``: the
job's offered msg/s, each session sending on a schedule of its own and at
once when it is behind). The client is
aiosmtplib, or (``client="lean"``) a few lines on asyncio's streams that
send the very bytes aiosmtplib sends (EHLO, AUTH PLAIN, MAIL FROM with
SIZE, RCPT TO, DATA, the message dot-stuffed once, QUIT) at a fraction of
its CPU: on two shared cores the load generator's CPU is taken from the
processes measured. A job may
name several ports (relayd instances): session i of the job connects to
port i mod len(ports), round-robin over the whole job, not per worker; and
several SMTP users (``logins``): session i logs in as user i mod len(logins).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing as mp
import time
from dataclasses import dataclass

import aiosmtplib

from relayd.wire import wire_data

MAX_MESSAGES_PER_SESSION = 1_000_000     # a bound on every loop, besides the deadline


@dataclass(frozen=True)
class Job:
    port: int | tuple[int, ...]     # one port, or several: sessions round-robin over them
    sessions: int
    size: int
    duration: float
    user: str | None = None
    password: str | None = None
    starttls: bool = False
    max_messages: int = MAX_MESSAGES_PER_SESSION
    logins: tuple[tuple[str, str], ...] = ()     # (user, password)s instead of user/password
    client: str = "aiosmtplib"      # or "lean" (see the module docstring)
    rate: float | None = None       # offered msg/s of the whole job; None: back to back

    def start_of(self, session: int, start_at: float) -> tuple[float, float]:
        """When the ``session``-th session sends first, and its interval
        (0: back to back): paced sessions are evenly staggered."""
        if not self.rate:
            return start_at, 0.0
        interval = self.sessions / self.rate
        return start_at + interval * session / self.sessions, interval

    @property
    def ports(self) -> tuple[int, ...]:
        return self.port if isinstance(self.port, tuple) else (self.port,)

    def port_of(self, session: int) -> int:
        """The port of the job's ``session``-th session."""
        return self.ports[session % len(self.ports)]

    def login_of(self, session: int) -> tuple[str, str] | None:
        """The (user, password) of the job's ``session``-th session, or None."""
        if self.logins:
            return self.logins[session % len(self.logins)]
        return (self.user, self.password or "") if self.user else None


def make_message(size: int) -> bytes:
    head = (b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.com>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


class Refused(Exception):
    """A reply the lean client did not expect."""


class LeanClient:
    """aiosmtplib's wire for one login and MAIL/RCPT/DATA loops, on plain
    asyncio streams (no STARTTLS)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._stuffed = (b"", b"")        # a message and its DATA bytes: stuffed once

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), 120)
        await self._reply(220)
        await self.command(b"EHLO bench.test\r\n", 250)

    async def login(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.command(f"AUTH PLAIN {token}\r\n".encode(), 235)

    async def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        if self._stuffed[0] is not message:
            self._stuffed = (message, dot_stuffed(message))
        await self.command(f"MAIL FROM:<{sender}> SIZE={len(message)}\r\n".encode(), 250)
        for recipient in recipients:
            await self.command(f"RCPT TO:<{recipient}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        await self.command(self._stuffed[1], 250)

    async def quit(self) -> None:
        await self.command(b"QUIT\r\n", 221)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def command(self, data: bytes, expect: int) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self._reply(expect)

    async def _reply(self, expect: int) -> None:
        assert self.reader is not None
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 120)
            if not line:
                raise ConnectionResetError("connection closed by the server")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != expect:
            raise Refused(f"{expect} expected: {line.decode(errors='replace').rstrip()}")


def dot_stuffed(message: bytes) -> bytes:
    """The DATA bytes of ``message``: dot-stuffed, then the final dot on a
    line of its own (relayd's own framing of what it relays upstream)."""
    return b"".join(wire_data(message))


async def _session(job: Job, session: int, message: bytes, start_at: float, deadline: float,
                   latencies: list[float], errors: list[str]) -> None:
    port, login = job.port_of(session), job.login_of(session)
    client: aiosmtplib.SMTP | LeanClient = (
        LeanClient(port) if job.client == "lean" else
        aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test",
                        start_tls=job.starttls, validate_certs=False, timeout=120))
    try:
        await client.connect()
        if login:
            await client.login(*login)
        send_at, interval = job.start_of(session, start_at)
        for _ in range(job.max_messages):
            if (delay := send_at - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            await client.sendmail("bench@example.com", ["sink@example.net"], message)
            latencies.append(time.perf_counter() - t0)
            send_at += interval
        await client.quit()
    except (aiosmtplib.SMTPException, Refused, OSError, asyncio.TimeoutError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
        client.close()


async def _worker(job: Job, first: int, sessions: int,
                  start_at: float) -> tuple[list[float], list[str]]:
    """Sessions ``first`` .. ``first + sessions - 1`` of the job."""
    message = make_message(job.size)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = start_at + job.duration
    await asyncio.gather(*(_session(job, first + i, message, start_at, deadline, latencies, errors)
                           for i in range(sessions)))
    return latencies, errors


def _worker_main(job: Job, first: int, sessions: int, start_at: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_worker(job, first, sessions, start_at)))


def run(job: Job, processes: int = 2) -> tuple[list[float], list[str], float]:
    """Run ``job`` spread over worker processes; return (latencies, errors,
    measured wall time)."""
    processes = max(1, min(processes, job.sessions))
    share = [job.sessions // processes + (1 if i < job.sessions % processes else 0)
             for i in range(processes)]
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    # All sessions connect and authenticate first, then start together.
    start_at = time.monotonic() + 1.0 + job.sessions * 0.01
    firsts = [sum(share[:i]) for i in range(processes)]
    procs = [ctx.Process(target=_worker_main, args=(job, first, n, start_at, out))
             for first, n in zip(firsts, share)]
    for p in procs:
        p.start()
    latencies: list[float] = []
    errors: list[str] = []
    for _ in procs:
        lat, err = out.get(timeout=job.duration + 300)
        latencies += lat
        errors += err
    for p in procs:
        p.join(timeout=30)
    return latencies, errors, job.duration


async def idle_sessions(port: int, user: str, password: str, count: int,
                        starttls: bool = False) -> list[aiosmtplib.SMTP]:
    """Open ``count`` authenticated sessions and leave them idle."""
    clients = []
    for _ in range(count):
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test",
                            start_tls=starttls, validate_certs=False, timeout=60)
        await c.connect()
        await c.login(user, password)
        clients.append(c)
    return clients
