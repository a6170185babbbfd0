"""Entry points: ``relayd`` (the daemon) and ``relayctl`` (the operator client)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from . import __version__, config, maillog, workers
from .errors import ConfigError

RELAYD_EPILOG = """\
config file lookup: -c PATH, else $RELAYD_CONFIG, else /etc/relayd/relayd.yaml,
else the embedded default (SMTP on 127.0.0.1:2587 without TLS, state in
./relayd-data/, admin socket ./relayd-data/admin.sock, metrics on
127.0.0.1:9587).

signals: SIGHUP reloads the config (all or nothing); SIGTERM/SIGINT drain
(stop accepting, let sessions in progress finish up to drain_timeout, exit 0);
a second SIGTERM/SIGINT exits at once.

relayd --print-config prints every key with its effective value (defaults filled
in, secrets masked); the README describes each one.

RELAYD_INSTANCE=N (1-999, set by the systemd template unit relayd@N) runs
relayd as instance N of several on one host sharing one config: admin socket
admin-N.sock beside the configured one, metrics (and admin TCP) port + N; every
listener needs reuse_port: true and the database must be PostgreSQL.

relayd --copy-to postgresql://user@host:port/dbname copies every record of the
configured store (password and token hashes, counters and the hourly window
included) into that empty database, e.g. to move from the embedded SQLite
file to PostgreSQL; stop relayd first. A path copies into an SQLite file.
"""


def relayd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relayd",
        description="SMTP submission relay: authenticates generated SMTP users, enforces "
                    "their quotas and forwards mail through the owner's upstream SMTP servers.",
        epilog=RELAYD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="PATH", help="YAML config file")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print every error with its YAML path, "
                        "exit 0 (valid) or 1 (invalid), like nginx -t")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config (defaults filled in, secrets masked) and exit")
    p.add_argument("--copy-to", metavar="DSN",
                   help="copy the configured store into the empty database DSN "
                        "(postgresql://... or an SQLite file path), print the counts and exit")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    return p


def relayd_main(argv: list[str] | None = None) -> int:
    args = relayd_parser().parse_args(argv)
    source = config.locate(args.config)
    try:
        source = workers.from_environment(source)     # $RELAYD_INSTANCE: relayd@N
        cfg = source.load()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        if args.check:
            print(f"relayd: configuration {exc.source} is invalid", file=sys.stderr)
        return 1
    if args.check:
        print(f"relayd: configuration {source} is valid")
        return 0
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config.effective(cfg), sort_keys=False), end="")
        return 0
    if args.copy_to:
        return run_loop(copy_to(cfg, args.copy_to))
    # Every file relayd creates (database, journal, sockets) starts private;
    # the admin socket is then chmod-ed to admin.mode explicitly.
    os.umask(0o077)
    maillog.setup(cfg.log_level)
    from . import daemon
    maillog.event(daemon.log, logging.INFO, "config", source=str(source),
                  **config.flatten(config.effective(cfg)))
    try:
        return run_loop(daemon.run(cfg, source))
    except KeyboardInterrupt:
        return 0


async def copy_to(cfg: config.Config, target: str) -> int:
    """relayd --copy-to: the configured store into ``target`` (store/copying.py)."""
    from .dsn import check_database, masked
    from .errors import StoreError
    from .store import open_store, store_for
    from .store.copying import copy_store, report
    try:
        check_database(target)
    except ValueError as exc:
        print(f"relayd: --copy-to: {exc}", file=sys.stderr)
        return 2
    source, dest = open_store(cfg), store_for(target)
    try:
        await source.open()
        await dest.open()
        counts = await copy_store(source, dest)  # type: ignore[arg-type]
    except StoreError as exc:
        print(f"relayd: --copy-to: {exc}", file=sys.stderr)
        return 1
    finally:
        await dest.close()
        await source.close()
    print(f"relayd: copied {source.path} to {masked(target)}:\n{report(counts)}")
    return 0


def run_loop(main: Any) -> int:
    """Run on uvloop when it is installed (it is a dependency), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def relayctl_main(argv: list[str] | None = None) -> int:
    from .ctl import main
    return main(argv)
