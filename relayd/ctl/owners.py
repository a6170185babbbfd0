"""``relayctl owner``: owners (tenants) and their plans, over the operator
routes (/admin/owners, relayd/admin/operator.py)."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command, add_group
from .output import Out, fields, table
from .transport import Api, quoted

OWNER_COLUMNS = ("owner_id", "plan", "idapp", "apps", "created")
PLANS = ("free", "paid")


def owner_add(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("POST", "/admin/owners", {"plan": a.plan})
    return Out(d, fields(d) + "\n(the token is shown only now; store it safely)")


def owner_list(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/owners")
    return Out(d, table(d, OWNER_COLUMNS))


def owner_get(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", f"/admin/owners/{quoted(a.owner_id)}")
    return Out(d, fields(d))


def owner_remove(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("DELETE", f"/admin/owners/{quoted(a.owner_id)}")
    return Out(d, f"removed owner {a.owner_id} with its apps, SMTP users, upstreams "
                  "and domain settings")


def owner_set_plan(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("PATCH", f"/admin/owners/{quoted(a.owner_id)}", {"plan": a.plan})
    return Out(d, fields(d))


def register(groups: Any) -> None:
    owners = add_group(groups, "owner", "owners (tenants) and their plans")
    s = add_command(owners, "add", owner_add, "create an owner; prints its token once")
    s.add_argument("--plan", choices=PLANS, default="free", help="default: free")
    add_command(owners, "list", owner_list, "list owners (never tokens)")
    s = add_command(owners, "get", owner_get, "show one owner")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s = add_command(owners, "remove", owner_remove, "remove an owner and all its records")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s = add_command(owners, "set-plan", owner_set_plan, "change an owner's plan")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s.add_argument("plan", choices=PLANS, metavar="PLAN", help="free or paid")
