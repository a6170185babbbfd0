"""``relayctl user``: SMTP users, through the SendClean dialect (SPEC 4.1)
acting for the user's owner (``X-Relayd-Owner``)."""

from __future__ import annotations

import argparse
from typing import Any

from .apps import owner_of_app
from .args import add_command, add_group, drop_none, positive_int
from .output import Out, fields, table
from .transport import Api, Usage, quoted

USER_COLUMNS = ("smtp_user_name", "status", "total_limit", "hourly_limit", "sent_total",
                "sent_last_hour", "idapp")


def owner_of_user(api: Api, name: str) -> str:
    return api.call("GET", f"/admin/users/{quoted(name)}")["owner_id"]


def owner_of(api: Api, a: argparse.Namespace) -> str:
    """--owner (checked through the operator API, which says "owner not
    found" where the SendClean dialect would answer "Token MissMatch"), or
    the owner of --app."""
    if a.owner:
        return str(api.call("GET", f"/admin/owners/{quoted(str(a.owner))}")["owner_id"])
    if a.app:
        return owner_of_app(api, a.app)
    raise Usage(f"user {a.action} needs --owner OWNER_ID or --app IDAPP")


def user_add(api: Api, a: argparse.Namespace) -> Out:
    owner = owner_of(api, a)
    d = api.call("POST", "/settings/addSmtp", drop_none(
        total_limit=a.total_limit, hourly_limit=a.hourly_limit, idapp=a.app), owner=owner)
    return Out(d, fields(d, ("smtp_user_name", "smtp_password"))
               + "\n(the password is shown only now)")


def user_list(api: Api, a: argparse.Namespace) -> Out:
    owner = owner_of(api, a)
    d = api.call("POST", "/settings/listSmtp", drop_none(idapp=a.app), owner=owner)
    return Out(d["smtp_list"], table(d["smtp_list"], USER_COLUMNS))


def user_edit(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("POST", "/settings/editSmtp", drop_none(
        smtp_user_name=a.name, total_limit=a.total_limit, hourly_limit=a.hourly_limit,
        status=a.status, idapp=a.app), owner=owner_of_user(api, a.name))
    return Out(d, f"updated SMTP user {a.name}")


def user_reset_password(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("POST", "/settings/resetSmtpPassword", {"smtp_user_name": a.name},
                 owner=owner_of_user(api, a.name))
    return Out(d, fields(d, ("smtp_user_name", "smtp_password"))
               + "\n(the old password no longer works; the new one is shown only now)")


def user_remove(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("POST", "/settings/deleteSmtp", {"smtp_user_name": a.name},
                 owner=owner_of_user(api, a.name))
    return Out(d, f"removed SMTP user {a.name}")


def register(groups: Any) -> None:
    users = add_group(groups, "user", "SMTP users (the SendClean dialect)")
    s = add_command(users, "add", user_add, "create an SMTP user; prints its password once")
    s.add_argument("--owner", metavar="OWNER_ID", help="default: the owner of --app")
    s.add_argument("--app", metavar="IDAPP", help="default: the owner's default app")
    s.add_argument("--total-limit", "--total", type=positive_int, required=True, metavar="N")
    s.add_argument("--hourly-limit", "--hourly", type=positive_int, required=True, metavar="N")
    s = add_command(users, "list", user_list, "list an owner's SMTP users with sent counters")
    s.add_argument("--owner", metavar="OWNER_ID", help="default: the owner of --app")
    s.add_argument("--app", metavar="IDAPP", help="only this app's users")
    s = add_command(users, "edit", user_edit, "change an SMTP user's limits, status or app")
    s.add_argument("name", metavar="SMTP_USER_NAME")
    s.add_argument("--total-limit", "--total", type=positive_int, metavar="N")
    s.add_argument("--hourly-limit", "--hourly", type=positive_int, metavar="N")
    s.add_argument("--status", choices=("Enable", "Disable"))
    s.add_argument("--app", metavar="IDAPP", help="move to another app of the same owner")
    s = add_command(users, "reset-password", user_reset_password,
                    "generate a new password; the old one stops working at once")
    s.add_argument("name", metavar="SMTP_USER_NAME")
    s = add_command(users, "remove", user_remove, "remove an SMTP user")
    s.add_argument("name", metavar="SMTP_USER_NAME")
