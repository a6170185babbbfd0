"""``relayctl smtp``: an app's upstream SMTP servers, through the seed-000
dialect (SPEC 4.2) acting for the app's owner (``X-Relayd-Owner``)."""

from __future__ import annotations

import argparse
from typing import Any

from .apps import owner_of_app
from .args import add_command, add_group, drop_none, non_negative_int, positive_int, read_secret
from .output import Out, fields, table, zoned
from .transport import Api, Usage, quoted

SMTP_COLUMNS = ("_id", "priority", "host", "port", "username", "auth", "startstls", "sslTls",
                "status", "numerrors", "defaultfromemail")


def owner_of_smtp(api: Api, idsmtp: str) -> str:
    return api.call("GET", f"/admin/smtps/{quoted(idsmtp)}")["owner_id"]


def smtp_save(api: Api, a: argparse.Namespace) -> Out:
    if a.id is None and a.app is None:
        raise Usage("smtp save needs --app IDAPP (create) or --id IDSMTP (edit)")
    body = drop_none(
        idsmtp=a.id, idapp=a.app, host=a.host, port=a.port, priority=a.priority,
        username=a.username, password=read_secret(a.password, a.password_stdin), auth=a.auth,
        startstls=a.starttls, sslTls=a.ssltls, verify_tls=a.verify_tls, debug=a.debug,
        defaultfromemail=a.from_email, defaultfromname=a.from_name, status=a.status,
        allowed_domains=a.allowed_domains.split(",") if a.allowed_domains is not None else None)
    owner = owner_of_smtp(api, a.id) if a.id else owner_of_app(api, a.app)
    d = zoned(api.call("POST", "/private/smtps/save", body, owner=owner))
    return Out(d, fields(d))


def smtp_list(api: Api, a: argparse.Namespace) -> Out:
    d = zoned(api.call("GET", "/private/smtps/findByApp", query={"idapp": a.app},
                       owner=owner_of_app(api, a.app)))
    return Out(d, table(d, SMTP_COLUMNS))


def smtp_get(api: Api, a: argparse.Namespace) -> Out:
    d = zoned(api.call("GET", "/private/smtps/findById", query={"idsmtp": a.idsmtp},
                       owner=owner_of_smtp(api, a.idsmtp)))
    return Out(d, fields(d))


def smtp_remove(api: Api, a: argparse.Namespace) -> Out:
    api.call("POST", "/private/smtps/remove", {"idsmtp": a.idsmtp},
             owner=owner_of_smtp(api, a.idsmtp))
    return Out({"idsmtp": a.idsmtp, "removed": True}, f"removed upstream {a.idsmtp}")


def smtp_check(api: Api, a: argparse.Namespace) -> Out:
    api.call("POST", "/private/smtps/check", {"idsmtp": a.idsmtp},
             owner=owner_of_smtp(api, a.idsmtp))
    return Out({"idsmtp": a.idsmtp, "check": "ok"},
               f"check passed: upstream {a.idsmtp} accepted a message to the app's test_email")


def _save_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--id", metavar="IDSMTP", help="edit this upstream")
    s.add_argument("--app", metavar="IDAPP", help="the app (create), or move to it (edit)")
    s.add_argument("--host")
    s.add_argument("--port", type=positive_int)
    s.add_argument("--priority", type=non_negative_int, help="0 = highest; default 10")
    s.add_argument("--username")
    secret = s.add_mutually_exclusive_group()
    secret.add_argument("--password", help="visible in ps; prefer --password-stdin")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    s.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                   help="authenticate with username/password")
    s.add_argument("--starttls", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--ssltls", action=argparse.BooleanOptionalAction, default=None,
                   help="implicit TLS (port 465)")
    s.add_argument("--verify-tls", action=argparse.BooleanOptionalAction, default=None,
                   help="verify the upstream's certificate (default: yes)")
    s.add_argument("--debug", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--from-email", metavar="ADDR", help="defaultfromemail")
    s.add_argument("--from-name", metavar="NAME", help="defaultfromname")
    s.add_argument("--allowed-domains", metavar="D1,D2",
                   help="sender domains sent unchanged (default: from the addresses)")
    s.add_argument("--status", choices=("A", "D"), help="A = active, D = disabled")


def register(groups: Any) -> None:
    smtps = add_group(groups, "smtp", "upstream SMTP servers per app")
    _save_arguments(add_command(
        smtps, "save", smtp_save,
        "create an upstream (--app, --host, --port) or edit one (--id: given fields only)"))
    s = add_command(smtps, "list", smtp_list, "list an app's upstreams")
    s.add_argument("--app", required=True, metavar="IDAPP")
    s = add_command(smtps, "get", smtp_get, "show one upstream (password masked)")
    s.add_argument("idsmtp", metavar="IDSMTP")
    s = add_command(smtps, "remove", smtp_remove, "remove an upstream")
    s.add_argument("idsmtp", metavar="IDSMTP")
    s = add_command(smtps, "check", smtp_check,
                    "send a test message to the app's test_email through this upstream")
    s.add_argument("idsmtp", metavar="IDSMTP")
