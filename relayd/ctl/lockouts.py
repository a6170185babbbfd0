"""``relayctl lockout``: client addresses locked out after failed AUTHs, over
the operator routes /admin/lockouts (SPEC 4.6, relayd/admin/operator.py)."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command, add_group
from .output import Out, table
from .transport import Api, quoted

LOCKOUT_COLUMNS = ("ip", "failures", "locked_until")


def lockout_list(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/lockouts")
    return Out(d, table(d, LOCKOUT_COLUMNS))


def lockout_clear(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("DELETE", f"/admin/lockouts/{quoted(a.ip)}")
    return Out(d, f"cleared the lockout of {d['ip']}; it may AUTH again")


def register(groups: Any) -> None:
    lockouts = add_group(groups, "lockout", "client IPs locked out after failed AUTHs")
    add_command(lockouts, "list", lockout_list, "list locked-out IPs and when each is freed")
    s = add_command(lockouts, "clear", lockout_clear, "lift one IP's lockout at once")
    s.add_argument("ip", metavar="IP", help="IPv4 or IPv6 address")
