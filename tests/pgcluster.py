"""A throw-away PostgreSQL cluster for tests: its own data directory, port
and socket directory, never the system cluster on 5432.

Binaries: Debian's ``/usr/lib/postgresql/<version>/bin`` (highest version)
or ``pg_config --bindir``. ``initdb`` runs once per process into a template
that each cluster copies (0.2 s instead of 1 s); ``postgres`` runs as our
child, logging to ``<base>/postgres.log``, with fsync, synchronous_commit
and full_page_writes off (a stop keeps every commit; an OS crash would
not). As root (CI) both run as ``nobody``, in a base directory (0755, under
/tmp) whose data (0700) and socket directories nobody owns. The port is
picked free at the first start (again if postgres could not bind it);
``restart()`` keeps port and data, so a DSN stays valid across stops.

Processes are always reaped: ``close()`` (the fixtures' finalizers) stops
the server and removes its directory, an ``atexit`` hook closes what is
still open, and the first cluster of a run clears what dead runs left.
Methods are synchronous, running asyncpg on a private thread and loop, so
sync and async tests alike call them; an async test whose loop must keep
running meanwhile uses ``await asyncio.to_thread(cluster.restart)``.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

from helpers_ports import free_port

DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
TMP_ROOT = "/tmp"              # world-traversable, so nobody reaches the data dir
PREFIX = "relayd-pg-"          # every base directory; the stale sweep matches it
OWNER_FILE = "owner.pid"       # the pid of the test process that made a base dir
UNPRIVILEGED_USER = "nobody"   # who runs initdb/postgres when we are root
START_TIMEOUT = 30.0           # seconds until a started server must answer queries
STOP_TIMEOUT = 30.0            # seconds a stop may take before the server is killed
PORT_ATTEMPTS = 5              # fresh ports tried when another process takes ours

# Passed as -c key=value; PgCluster(settings=...) overrides or adds.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",   # kill() may lose the last ~0.6 s of commits
    "full_page_writes": "off",
    "max_connections": "200",      # several relayd instances with pools
}
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_DBNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


class PgClusterError(RuntimeError):
    """Base class of every failure of this module."""


class PgUnavailable(PgClusterError):
    """No PostgreSQL server binaries (or no asyncpg) on this machine."""


class PgStartError(PgClusterError):
    """initdb or postgres failed or did not answer; quotes their output."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: Debian's
    versioned directory with the highest version, else ``pg_config
    --bindir`` (which, from libpq-dev alone, may name a directory without
    the server: checked)."""
    def version(bindir: str) -> tuple[int, ...]:
        name = Path(bindir).parent.name
        return tuple(int(p) for p in name.split(".")) if re.fullmatch(r"[\d.]+", name) else ()

    candidates = sorted(glob.glob(DEBIAN_BINDIRS), key=version, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        r = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            candidates.append(r.stdout.strip())
    for bindir in candidates:
        if all(os.access(Path(bindir, b), os.X_OK) for b in ("initdb", "postgres")):
            return Path(bindir)
    raise PgUnavailable(f"PostgreSQL server binaries not found: no {DEBIAN_BINDIRS}/initdb, "
                        "and pg_config --bindir names none; install Debian's postgresql "
                        "package (apt-get install -y postgresql; .ci/run does so in CI)")


def _asyncpg() -> Any:
    """asyncpg, imported late so that loading the fixtures never fails."""
    try:
        import asyncpg
    except ImportError as e:
        raise PgUnavailable(f"asyncpg is not installed ({e}): pip install asyncpg") from None
    return asyncpg


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a private thread and event loop: the
    caller's loop, running or merely set, is never touched."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgcluster") as pool:
        return pool.submit(asyncio.run, coro).result()


def _unprivileged() -> dict[str, Any]:
    """subprocess arguments that drop root to nobody (none when not root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _give_away(path: Path) -> None:
    """chown ``path`` and everything below it to nobody, when we are root."""
    ids = _unprivileged()
    if not ids:
        return
    os.chown(path, ids["user"], ids["group"])
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), ids["user"], ids["group"], follow_symlinks=False)


def _child_env() -> dict[str, str]:
    """Our environment without PG* variables (PGDATA, PGPORT... would
    redirect the tools), in the C locale: English log lines, which the
    bind-failure check reads, and a locale initdb always accepts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _new_base(prefix: str) -> Path:
    """A fresh base directory (0755) recording its owner pid."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_ROOT)).resolve()
    os.chmod(base, 0o755)
    (base / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return base


# ---------------------------------------------------------------- processes

def _children(pid: int) -> list[int]:
    """``pid``'s children. Backends call setsid(), so a kill of the
    postmaster's process group would miss them. (Without the kernel's
    children file, none: orphaned backends exit on their own.)"""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until ``pids`` (not our children) are dead. Zombies count as
    dead: they hold no shared memory, and init, their parent once the
    postmaster is gone, reaps them (within ~2 s on these machines)."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _sweep_stale() -> None:
    """Remove the base directories of runs that died without cleaning up
    (owner pid gone), after an immediate stop of a postmaster still
    running there (checked: its command line names that data directory)."""
    for base in glob.glob(os.path.join(TMP_ROOT, PREFIX + "*")):
        try:
            os.kill(int(Path(base, OWNER_FILE).read_text()), 0)
        except PermissionError:
            continue                        # another user's run, alive
        except (OSError, ValueError):
            pass                            # the owner is gone, or not written yet
        else:
            continue                        # the owner still runs
        with suppress(OSError):
            if time.time() - os.path.getmtime(base) < 60:
                continue                    # maybe just being made
        data = os.path.join(base, "data")
        try:
            pid = int(Path(data, "postmaster.pid").read_text().split()[0])
            if data.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGQUIT)
                _wait_gone([pid], 10)
        except (OSError, ValueError, IndexError):
            pass                            # no postmaster left
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- the template

_TEMPLATES: dict[Path, Path] = {}     # bindir -> initdb'd data dir, never started
_TEMPLATE_LOCK = threading.Lock()
_LIVE: set[PgCluster] = set()
_PID = os.getpid()                    # a forked child must not close our clusters


def _template(bindir: Path) -> Path:
    """A data directory initdb'd once per process per bindir, to copy;
    the first one also clears the leftovers of dead runs."""
    with _TEMPLATE_LOCK:
        if bindir not in _TEMPLATES:
            _sweep_stale()
            base = _new_base(PREFIX + "template-")
            data = base / "data"
            data.mkdir(mode=0o700)
            _give_away(data)
            r = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "--no-sync", "-A", "trust",
                 "-U", "postgres", "-E", "UTF8", "--locale=C"],
                cwd=base, env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=120, **_unprivileged())
            if r.returncode != 0:
                shutil.rmtree(base, ignore_errors=True)
                raise PgStartError(f"{bindir}/initdb failed (exit {r.returncode}):\n"
                                   f"{r.stdout}{r.stderr}")
            _TEMPLATES[bindir] = data
        return _TEMPLATES[bindir]


@atexit.register
def _close_all() -> None:
    """The safety net behind the fixtures' finalizers."""
    if os.getpid() != _PID:
        return
    for cluster in list(_LIVE):
        cluster.close()
    for data in _TEMPLATES.values():
        shutil.rmtree(data.parent, ignore_errors=True)
    _TEMPLATES.clear()


# ---------------------------------------------------------------- the cluster

class PgCluster:
    """One throw-away PostgreSQL server. ``start()`` it, hand out
    ``dsn(name)``; ``stop()``, ``kill()`` and ``restart()`` keep the port
    and data; ``close()`` ends it for good.

    ``settings`` override or add to SETTINGS (``-c`` options), e.g.
    ``{"synchronous_commit": "on"}`` for a test that kills the server and
    expects its last commits back."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        self.settings = {**SETTINGS, **(settings or {})}
        self.base: Path | None = None
        self.port = 0
        self._port_settled = False      # True once a DSN may have been handed out
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "postgres.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self.running and self._proc else None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    # -------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the server (the first time: copy the template, pick a
        port) and return once it answers queries. Raises PgUnavailable
        without binaries or asyncpg, PgStartError (with the log tail) when
        it exits or does not answer within START_TIMEOUT."""
        if self._closed:
            raise PgClusterError("start() after close()")
        if self.running:
            return
        _asyncpg()
        if self.base is None:
            self._prepare()
        for _ in range(PORT_ATTEMPTS):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            why = _run_async(self._until_ready(time.monotonic() + START_TIMEOUT))
            if why is None:
                self._port_settled = True
                return
            log = self.log_path.read_bytes()[offset:]
            if why == "exited" and not self._port_settled and b"could not bind" in log:
                self.port = free_port()
                continue
            self._start_failed(why)
        self._start_failed(f"found no free port in {PORT_ATTEMPTS} attempts")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and reap it: ``fast`` (SIGINT: disconnects
        clients, checkpoints), ``smart`` (SIGTERM: waits for clients to
        leave) or ``immediate`` (SIGQUIT: no checkpoint, crash recovery at
        the next start). Past STOP_TIMEOUT the server is killed and
        PgClusterError raised."""
        if mode not in STOP_SIGNALS:
            raise ValueError(f"stop mode {mode!r}: one of {', '.join(STOP_SIGNALS)}")
        if not self.running:
            return
        assert self._proc is not None
        self._proc.send_signal(STOP_SIGNALS[mode])
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PgClusterError(f"postgres did not stop ({mode}) within {STOP_TIMEOUT:.0f} s: "
                                 "killed") from None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would (the
        next start recovers); return once all are dead. With
        synchronous_commit off, the last ~0.6 s of commits may be lost."""
        if not self.running:
            return
        assert self._proc is not None
        pid = self._proc.pid
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)    # no new children while we list them
        kids = _children(pid)
        for p in [pid, *kids]:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self._proc.wait()
        _wait_gone(kids, 10)

    def restart(self, mode: str = "fast") -> None:
        """stop(mode) if running, then start() on the same port and data."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the server (immediate: its data is thrown away) and remove
        the base directory, for good. Idempotent."""
        self._closed = True
        try:
            self.stop("immediate")
        except PgClusterError:
            pass                            # killed, which is all we need
        self.kill()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
        _LIVE.discard(self)

    # -------------------------------------------------------- databases

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (letters, digits, underscores); its DSN."""
        self.fetchval(f'CREATE DATABASE "{_check_name(name)}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ``name`` if it exists, disconnecting its clients."""
        self.fetchval(f'DROP DATABASE IF EXISTS "{_check_name(name)}" WITH (FORCE)')

    def fetchval(self, query: str, *args: Any, dbname: str = "postgres") -> Any:
        """Run one query on its own connection; the first column of its
        first row (asyncpg's ``fetchval``)."""
        async def run() -> Any:
            conn = await _asyncpg().connect(self.dsn(dbname), timeout=10)
            try:
                return await conn.fetchval(query, *args)
            finally:
                await conn.close()
        return _run_async(run())

    # -------------------------------------------------------- internals

    def _prepare(self) -> None:
        """The base directory: data copied from the template, socket
        directory, owner file; a free port."""
        template = _template(self.bindir)
        self.base = _new_base(PREFIX)
        _LIVE.add(self)
        shutil.copytree(template, self.data_dir, symlinks=True)
        sockets = self.base / "sockets"
        sockets.mkdir(mode=0o700)
        for path in (self.data_dir, sockets):
            _give_away(path)
        self.settings.setdefault("unix_socket_directories", str(sockets))
        self.port = free_port()

    def _launch(self) -> None:
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C meant for pytest does not reach it.
            self._proc = subprocess.Popen(
                argv, cwd=self.base, env=_child_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **_unprivileged())

    async def _until_ready(self, deadline: float) -> str | None:
        """None once the server answers a query and is ours (its
        data_directory is ours: another process may hold the port while
        ours fails to bind); else "exited" or "timeout"."""
        asyncpg = _asyncpg()
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return "exited"
            try:
                conn = await asyncpg.connect(self.dsn(), timeout=2)
                try:
                    ours = await conn.fetchval("SELECT current_setting('data_directory')")
                finally:
                    await conn.close()
                if ours == str(self.data_dir):
                    return None
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError):
                pass                        # refused, or "the database system is starting up"
            await asyncio.sleep(0.05)
        return "timeout"

    def _start_failed(self, why: str) -> NoReturn:
        if why == "exited" and self._proc is not None:
            why = f"exited with code {self._proc.returncode}"
        elif why == "timeout":
            why = f"did not answer within {START_TIMEOUT:.0f} s"
        self.kill()
        raise PgStartError(f"postgres ({self.bindir}) on 127.0.0.1:{self.port} {why}; "
                           f"log {self.log_path}, last lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _check_name(name: str) -> str:
    if not _DBNAME.match(name):
        raise ValueError(f"database name {name!r}: letters, digits and underscores only")
    return name
