"""Lifecycle: start, SIGHUP reload, SIGTERM/SIGINT drain.

``Relay`` is the running state every part shares (config, store with its
quota state, upstream error book, auth throttle, sessions); the SMTP sessions and
the admin socket hold a reference to it and read ``relay.config`` at use
time, so a reload takes effect for the next session or message.

Reload policy (chasquid's): load -> validate -> swap, all or nothing. A file
that does not load or validate changes nothing: the errors are logged with
their YAML paths and counted in relayd_config_reloads_total{result="error"}.
Listener, state_dir, database and admin/metrics addresses cannot move under
a running process; a change to them is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import random
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from . import delivery, maillog, metrics, replies, routing, storewatch
from .config import Config, Source, server_tls_context
from .errors import ConfigError, StoreError
from .maillog import event
from .policy import AuthThrottle
from .pool import Pool
from .records import Upstream
from .store import open_store

if TYPE_CHECKING:
    from .smtp import RelaySMTP

log = logging.getLogger("relayd")

PRUNE_INTERVAL = 300.0     # seconds between deletions of expired quota journal rows
RESTART_KEYS = ("listen", "state_dir", "database", "admin", "metrics", "hostname")


def system_upstreams(cfg: Config) -> list[Upstream]:
    return [
        Upstream(idsmtp=f"system:{i}", **s.model_dump(exclude={"allowed_domains"}),
                 allowed_domains=tuple(s.allowed_domains) if s.allowed_domains is not None else None)
        for i, s in enumerate(cfg.system_smtps)
    ]


class Relay:
    def __init__(self, config: Config, source: Source | None = None):
        self.config = config
        self.source = source
        self.generation = 1
        self.hostname = config.hostname or socket.gethostname()
        self.store = open_store(config)
        self.pool = Pool()
        self.throttle = AuthThrottle(config.auth_failures.max, config.auth_failures.window)
        self.rng = random.SystemRandom()
        self._error_counts = functools.partial(delivery.upstream_error_counts, self)
        self.system = system_upstreams(config)
        self.server_tls: ssl.SSLContext | None = (
            server_tls_context(config.tls) if config.tls else None)
        self.sessions: set[RelaySMTP] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.inflight: set[asyncio.Future[Any]] = set()
        self.draining = False
        # Why the store cannot take records (storewatch.py), or None: MAIL 451, /healthz 503.
        self.store_problem: str | None = None
        self.smtp_servers: list[tuple[Any, asyncio.AbstractServer]] = []
        self.other_servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopped = asyncio.Event()
        self.started_at = time.time()
        # Set by admin.start(): where the admin and metrics listeners are.
        self.admin_socket: str | None = None
        self.admin_tcp_port: int | None = None
        self.metrics_port: int | None = None

    # ------------------------------------------------------------ start/stop

    async def start(self) -> None:
        """Open the store, then every listener. On a failure what was opened
        is closed again: the store's thread would keep the process alive."""
        try:
            await self._open()
        except BaseException:
            await self._shut()
            raise

    async def _open(self) -> None:
        from .smtp import RelaySMTP
        from . import admin

        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        await self.store.open()
        metrics.UPSTREAM_ERRORS.source = self._error_counts
        loop = asyncio.get_running_loop()
        for lst in self.config.listen:
            server = await loop.create_server(
                lambda lst=lst: RelaySMTP(self, lst.tls, lst.auth_require_tls,
                                          lst.proxy_protocol),
                # implicit TLS too is accepted plain: RelaySMTP counts the
                # connection, then runs and bounds the handshake (admission.py)
                lst.host, lst.port, reuse_address=True, reuse_port=lst.reuse_port or None)
            self.smtp_servers.append((lst, server))
            event(log, logging.INFO, "listening", service="smtp", address=lst.address,
                  tls=lst.tls, port=self.port_of(server), proxy_protocol=lst.proxy_protocol,
                  reuse_port=lst.reuse_port)
        self.other_servers.extend(await admin.start(self))
        event(log, logging.INFO, "listening", service="admin", address=self.admin_socket)
        if self.admin_tcp_port is not None:
            event(log, logging.INFO, "listening", service="admin_tcp",
                  address=self.config.admin.listen, port=self.admin_tcp_port)
        if self.metrics_port is not None:
            event(log, logging.INFO, "listening", service="metrics",
                  address=self.config.metrics.listen, port=self.metrics_port)
        self._tasks.append(asyncio.create_task(self._prune_loop()))
        self._tasks.append(asyncio.create_task(storewatch.watch(self)))

    @staticmethod
    def port_of(server: asyncio.AbstractServer) -> int:
        return server.sockets[0].getsockname()[1]

    @property
    def smtp_ports(self) -> list[int]:
        return [self.port_of(s) for _, s in self.smtp_servers]

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            try:
                await self.store.prune_sends(time.time())
            except StoreError:
                log.exception("cannot prune the quota journal")

    async def drain(self, timeout: float | None = None) -> None:
        """SPEC 3.12: stop accepting, let transactions in progress finish up
        to drain_timeout, then close everything."""
        if self.draining:
            return
        self.draining = True
        timeout = self.config.drain_timeout if timeout is None else timeout
        event(log, logging.INFO, "draining", sessions=len(self.sessions), timeout=timeout)
        for _, server in self.smtp_servers:
            server.close()
        # Idle sessions (no transaction open) are told and closed now; the
        # others get 421 after their current message (see smtp.py).
        for s in list(self.sessions):
            if s.envelope is None or s.envelope.mail_from is None:
                s.close(replies.SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self.sessions or self.inflight) and loop.time() < end:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.close()
        await self.close()

    async def close(self) -> None:
        await self._shut()
        self.stopped.set()
        event(log, logging.INFO, "stopped")

    async def _shut(self) -> None:
        if metrics.UPSTREAM_ERRORS.source == self._error_counts:
            metrics.UPSTREAM_ERRORS.source = None
        for t in self._tasks:
            t.cancel()
        for _, server in self.smtp_servers:
            server.close()
        for server in self.other_servers:
            server.close()
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=5)
        await self.pool.close()
        await self.store.close()

    @property
    def errors(self) -> routing.ErrorBook:
        """Upstream health (numerrors, last error) of every upstream, kept by
        the store; delivery.py counts into it."""
        return self.store.view.health

    # ------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """SIGHUP: load -> validate -> swap, all or nothing."""
        if self.source is None:
            return False
        try:
            new = self.source.load()
            # Validate the certificate into a scratch context before swapping.
            if new.tls is not None:
                server_tls_context(new.tls)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [f"tls: {exc}"]
            metrics.CONFIG_RELOADS.labels("error").inc()
            for problem in problems:
                event(log, logging.ERROR, "reload_failed", config=str(self.source), error=problem)
            event(log, logging.ERROR, "reload_failed", config=str(self.source),
                  error="keeping the running configuration", generation=self.generation)
            return False
        old = self.config
        for key in RESTART_KEYS:
            if getattr(old, key) != getattr(new, key):
                event(log, logging.WARNING, "reload_needs_restart", key=key,
                      msg=f"{key} changed; it takes effect only after a restart")
        # Swap. New certificates go into the live context so that both the
        # STARTTLS and the implicit-TLS listeners use them for new handshakes.
        if new.tls is not None and self.server_tls is not None:
            self.server_tls.load_cert_chain(new.tls.cert, new.tls.key)
        merged = new.model_copy(update={k: getattr(old, k) for k in RESTART_KEYS})
        self.config = merged
        self.system = system_upstreams(merged)
        self.throttle.reconfigure(merged.auth_failures.max, merged.auth_failures.window)
        maillog.set_level(merged.log_level)
        self.generation += 1
        metrics.CONFIG_RELOADS.labels("ok").inc()
        event(log, logging.INFO, "reloaded", config=str(self.source), generation=self.generation)
        return True


async def run(config: Config, source: Source) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    relay = Relay(config, source)
    try:
        await relay.start()
    except (OSError, StoreError) as exc:
        event(log, logging.ERROR, "start_failed", error=str(exc))
        return 1
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            event(log, logging.WARNING, "second_signal", signal=signame, msg="exiting now")
            os._exit(0)
        event(log, logging.INFO, "signal", signal=signame)
        asyncio.ensure_future(relay.drain())

    def on_hup() -> None:
        asyncio.ensure_future(relay.reload())

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Ready only now: a signal that arrives after this line is handled.
    event(log, logging.INFO, "started", config=str(source), generation=relay.generation)
    sd_notify("READY=1")
    await relay.stopped.wait()
    sd_notify("STOPPING=1")
    return 0


def sd_notify(state: str) -> None:
    """systemd Type=notify readiness, without a dependency: one datagram."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError:
        log.warning("sd_notify to %s failed", addr)
