"""The bench's PostgreSQL: a throw-away cluster with pg_stat_statements, and
what one point costs in it.

* ``pg_running()`` starts the cluster (tests/pgcluster.py's PgCluster: own
  port, data and socket directory, fsync and synchronous_commit off, run as
  ``nobody`` when root) with pg_stat_statements preloaded, creates the
  database relayd uses, and removes everything when the block ends.
* ``DbMeter`` measures a point: the database server's CPU (the postmaster
  and its children in /proc; children that exit during the point are in the
  postmaster's cutime/cstime once reaped) and its statements
  (pg_stat_statements, reset at the start of the point, read at its end,
  for relayd's database only; the meter's own queries go to ``postgres``).
* Round trips are counted as the top-level statements pg_stat_statements
  saw. A client round trip is one extended-protocol Bind/Execute/Sync per
  statement (asyncpg prepares once per connection and caches), so each call
  is one round trip, BEGIN and COMMIT included. The one exception is
  asyncpg's pool reset query (``SELECT pg_advisory_unlock_all(); CLOSE ALL;
  UNLISTEN *; RESET ALL``), one simple-protocol message that the extension
  records as four statements: it counts once. pg_stat_database's
  ``xact_commit`` would count transactions, not round trips (a BEGIN ...
  COMMIT of four round trips is one), and backends flush it at most once a
  second, so a 5 s point would not see its own.
* ``reserve_probe()`` times relayd's ``relayd_reserve`` directly, on one
  connection, for a user with 0 to tens of thousands of sends in its
  hourly window: the reservation's server CPU as that window fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

# The project's one throw-away PostgreSQL starter lives with the tests
# (tests/pgcluster.py: binaries, running as nobody under root, free ports,
# cleanup of dead runs). The bench reuses it instead of carrying a copy, so
# the tests directory goes on the import path (appended: nothing shadowed).
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from pgcluster import PgCluster, PgClusterError  # noqa: E402

from . import harness  # noqa: E402
from .procfs import CLK_TCK  # noqa: E402

DBNAME = "relayd"
SETTINGS = {"shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "top"}
RESET_FOLLOWERS = ("CLOSE ALL", "UNLISTEN *", "RESET ALL")   # ride with pg_advisory_unlock_all
PROBE_INSTANCE = "bench-probe"
PROBE_BATCH = 500           # sends rows per INSERT (its trigger updates one row per send)
PROBE_CALLS = 100           # relayd_reserve calls per window size
ProbeRow = tuple[int, float, float]     # sends in the window, server CPU µs, wall µs
PROBE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


@contextlib.contextmanager
def pg_running() -> Iterator[tuple[PgCluster, str]]:
    """A started cluster and the DSN of an empty database for relayd."""
    cluster = PgCluster(settings=SETTINGS)
    try:
        try:
            cluster.start()
        except PgClusterError as exc:
            raise SystemExit(f"cannot start PostgreSQL for the bench: {exc}") from None
        cluster.fetchval("CREATE EXTENSION pg_stat_statements")
        yield cluster, cluster.create_database(DBNAME)
    finally:
        cluster.close()


def server_cpu(postmaster: int) -> float:
    """CPU seconds of the postmaster, its reaped children and its live ones."""
    def fields(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    kids = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    total = 0
    for kid in kids:
        with contextlib.suppress(OSError, IndexError):
            f = fields(int(kid))
            total += int(f[11]) + int(f[12])                # utime + stime
    f = fields(postmaster)
    total += sum(int(x) for x in f[11:15])                  # + cutime + cstime
    return total / CLK_TCK


Statements = dict[int, tuple[int, float]]     # queryid -> (calls, total ms)


@dataclass
class DbCost:
    msgs: int
    cpu_s: float                                # the database server's CPU
    statements: Statements = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)   # queryid -> its text

    @property
    def round_trips(self) -> int:
        return sum(calls for q, (calls, _) in self.statements.items()
                   if self.texts.get(q) not in RESET_FOLLOWERS)

    @property
    def cpu_us_per_msg(self) -> float:
        return 1e6 * self.cpu_s / self.msgs if self.msgs else float("nan")

    @property
    def round_trips_per_msg(self) -> float:
        return self.round_trips / self.msgs if self.msgs else float("nan")

    def add(self, other: DbCost) -> None:
        """``other``'s statements into these."""
        for q, (calls, ms) in other.statements.items():
            c, t = self.statements.get(q, (0, 0.0))
            self.statements[q] = (c + calls, t + ms)
            self.texts[q] = _better(self.texts.get(q), other.texts[q])


def _better(old: str | None, new: str) -> str:
    """The normalised text of a statement (constants as $n) over a raw one:
    pg_stat_statements stores the raw text when an entry is created by a
    statement prepared before the reset."""
    return new if old is None or new.count("$") > old.count("$") else old


class DbMeter:
    """begin()/end(msgs) around a point (harness.measure's ``db``)."""

    def __init__(self, cluster: PgCluster, dbname: str = DBNAME):
        self.cluster, self.dbname = cluster, dbname
        self.cpu0 = 0.0

    def begin(self) -> None:
        self.cluster.fetchval("SELECT pg_stat_statements_reset()")
        assert self.cluster.pid is not None, "postgres is not running"
        self.cpu0 = server_cpu(self.cluster.pid)

    def end(self, msgs: int) -> DbCost:
        assert self.cluster.pid is not None, "postgres is not running"
        cpu = server_cpu(self.cluster.pid) - self.cpu0
        cost = self.statements()
        cost.msgs, cost.cpu_s = msgs, cpu
        return cost

    def statements(self) -> DbCost:
        """pg_stat_statements for relayd's database, as a cost of no messages."""
        rows = self.cluster.fetchval(
            "SELECT json_agg(json_build_array(queryid, query, calls, total_exec_time)) "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
            "WHERE datname = $1)", self.dbname)
        out = DbCost(0, 0.0)
        for queryid, query, calls, ms in json.loads(rows or "[]"):
            out.add(DbCost(0, 0.0, {queryid: (calls, ms)},
                           {queryid: " ".join(query.split()).rstrip(";")}))
        return out


def server_errors(cluster: PgCluster, top: int = 6) -> list[str]:
    """The server log's ERROR, FATAL and PANIC entries with their DETAIL,
    CONTEXT and STATEMENT lines (a deadlock names both statements),
    digested."""
    prefix = re.compile(r"^\S+ \S+ \S+ \[\d+\] ")          # date time zone [pid]
    entries: list[list[str]] = []
    for line in harness.log_lines(cluster.log_path):
        text = prefix.sub("", line)
        if text.startswith(("ERROR:", "FATAL:", "PANIC:")):
            entries.append([text])
        elif entries and len(entries[-1]) < 12 and (
                line.startswith("\t") or text.startswith(("DETAIL:", "CONTEXT:", "STATEMENT:"))):
            entries[-1].append(" ".join(text.split()))
        elif entries and len(entries[-1]) < 12 and not text.startswith("HINT:"):
            entries.append([])                  # the entry ended: later lines are not its
    picked = [("postgres", " / ".join(e)) for e in entries if e]
    return harness.digest(picked, top, width=900)


def merge(costs: Sequence[DbCost]) -> DbCost:
    """Several points' costs as one (the rounds of a configuration)."""
    total = DbCost(sum(c.msgs for c in costs), sum(c.cpu_s for c in costs))
    for cost in costs:
        total.add(cost)
    return total


# ---------------------------------------------------------------- reserve probe

def _backend_cpu_ns(pid: int) -> int:
    """On-CPU time of one (single-threaded) backend, in ns: schedstat's
    resolution, where stat's ticks (10 ms) would swallow 100 calls."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def _probe(dsn: str, user: str, windows: Sequence[int]) -> list[ProbeRow]:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        backend = await con.fetchval("SELECT pg_backend_pid()")
        out, have, now = [], 0, time.time()
        for window in windows:
            for _ in range(-(-(window - have) // PROBE_BATCH)):      # bounded: ceil(n / batch)
                n = min(PROBE_BATCH, window - have)
                await con.execute(
                    "INSERT INTO sends (user_name, ts, rcpts) "
                    "SELECT $1, $2 - g * 0.01, 1 FROM generate_series($3::int, $4::int) g",
                    user, now, have, have + n - 1)
                have += n
            await con.execute("ANALYZE sends")
            await con.fetchval("SELECT relayd_reserve($1, $2, $3, $4)",     # warm: plans cached
                               user, f"{PROBE_INSTANCE}-{window}", PROBE_INSTANCE, time.time())
            cpu0, t0 = _backend_cpu_ns(backend), time.perf_counter()
            for i in range(PROBE_CALLS):
                await con.fetchval("SELECT relayd_reserve($1, $2, $3, $4)",
                                   user, f"{PROBE_INSTANCE}-{window}-{i}", PROBE_INSTANCE,
                                   time.time())
            wall = time.perf_counter() - t0
            cpu = (_backend_cpu_ns(backend) - cpu0) / 1e9
            await con.execute("DELETE FROM holds WHERE instance = $1", PROBE_INSTANCE)
            out.append((window, 1e6 * cpu / PROBE_CALLS, 1e6 * wall / PROBE_CALLS))
        return out
    finally:
        await con.close()


def reserve_probe(dsn: str, user: str,
                  windows: Sequence[int] = (0, 1000, 10000, 30000)) -> list[ProbeRow]:
    """(sends in the user's hourly window, server CPU µs, wall µs) per
    relayd_reserve call. ``user`` must be a fresh SMTP user: it gets the
    sends rows (and their sent_total)."""
    return asyncio.run(_probe(dsn, user, windows))
