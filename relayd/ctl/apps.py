"""``relayctl app``: apps, their routing strategy and test address, over the
operator routes (/admin/apps); and ``owner_of_app``, how the tenant commands
find whom to act for."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command, add_group, drop_none
from .output import Out, fields, table
from .transport import Api, quoted

APP_COLUMNS = ("idapp", "owner_id", "name", "strategy", "test_email", "created")
STRATEGIES = ("random", "priority")


def owner_of_app(api: Api, idapp: str) -> str:
    return api.call("GET", f"/admin/apps/{quoted(idapp)}")["owner_id"]


def app_add(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("POST", "/admin/apps", drop_none(owner_id=a.owner, name=a.name,
                                                  strategy=a.strategy, test_email=a.test_email))
    return Out(d, fields(d))


def app_list(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/apps", query=drop_none(owner_id=a.owner))
    return Out(d, table(d, APP_COLUMNS))


def app_get(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", f"/admin/apps/{quoted(a.idapp)}")
    return Out(d, fields(d))


def app_edit(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("PATCH", f"/admin/apps/{quoted(a.idapp)}",
                 drop_none(name=a.name, strategy=a.strategy, test_email=a.test_email))
    return Out(d, fields(d))


def app_remove(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("DELETE", f"/admin/apps/{quoted(a.idapp)}")
    return Out(d, f"removed app {a.idapp} with its SMTP users and upstreams")


def register(groups: Any) -> None:
    apps = add_group(groups, "app", "apps: routing strategy and test address")
    s = add_command(apps, "add", app_add, "create an app for an owner")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("--name", required=True)
    s.add_argument("--strategy", choices=STRATEGIES, default="random", help="default: random")
    s.add_argument("--test-email", metavar="ADDR", help="where `smtp check` sends")
    s = add_command(apps, "list", app_list, "list apps")
    s.add_argument("--owner", metavar="OWNER_ID", help="only this owner's")
    s = add_command(apps, "get", app_get, "show one app")
    s.add_argument("idapp", metavar="IDAPP")
    s = add_command(apps, "edit", app_edit, "change an app")
    s.add_argument("idapp", metavar="IDAPP")
    s.add_argument("--name")
    s.add_argument("--strategy", choices=STRATEGIES)
    s.add_argument("--test-email", metavar="ADDR")
    s = add_command(apps, "remove", app_remove, "remove an app with its users and upstreams")
    s.add_argument("idapp", metavar="IDAPP")
