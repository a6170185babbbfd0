"""The command-line pieces every command group shares: the options each
command repeats, argument types, and helpers that turn parsed arguments into
request bodies. Each group module's ``register`` builds its commands with
``add_group`` and ``add_command``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .output import Out
from .transport import Api

Command = Callable[[Api, argparse.Namespace], Out]


def common_options() -> argparse.ArgumentParser:
    """The top-level options again, as a parent of every command."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the subcommand, they override; absent, the
    # top-level value stands.
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="admin socket (default: see relayctl --help)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="read admin.socket from this relayd config")
    return common


def add_group(groups: Any, name: str, help: str) -> Any:
    """A command group (``relayctl NAME ACTION``); returns its subparsers."""
    g = groups.add_parser(name, help=help, description=help)
    return g.add_subparsers(dest="action", metavar="ACTION", required=True)


def add_command(group: Any, name: str, func: Command, help: str) -> argparse.ArgumentParser:
    """A command carried out by ``func``; the caller adds its arguments."""
    sub = group.add_parser(name, parents=[common_options()], help=help, description=help)
    sub.set_defaults(func=func)
    return sub


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def drop_none(**kw: Any) -> dict[str, Any]:
    """The fields that were given: an edit changes only those."""
    return {k: v for k, v in kw.items() if v is not None}


def read_secret(value: str | None, from_stdin: bool) -> str | None:
    """A password from its option, or the first line of stdin (kept out of ps)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return value
