"""relayctl: the operator's client for relayd's admin socket (SPEC 4.4).

It speaks HTTP/1.1 to the Unix socket with the standard library's
``http.client`` (``UnixHTTPConnection`` below): the operator routes
(``/admin/...``, see relayd/admin/operator.py) for owners, apps and status,
and the tenant dialects (SPEC 4.1-4.3) for SMTP users, upstream SMTPs and
domain settings. For the latter it acts for the record's owner with the
``X-Relayd-Owner`` header, which relayd honours on the Unix socket only, so
the operator never needs an owner's token and every tenant rule applies.

Which socket: ``--socket PATH``; else ``$RELAYD_ADMIN_SOCKET``; else
``admin.socket`` of the config relayd itself would read when one is given or
installed (``-c PATH``, ``$RELAYD_CONFIG``, ``/etc/relayd/relayd.yaml``) and
readable; else ``./relayd-data/admin.sock`` (the embedded default) if it
exists; else ``/run/relayd/admin.sock`` (the packaged service) if it exists;
else ``./relayd-data/admin.sock``, and the error says it is missing.

Output: human-readable tables by default, ``--json`` for scripts. Exit
status: 0 done; 1 relayd refused the operation (its reason on stderr) or
could not be reached (missing socket, nothing listening, no permission);
2 usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ENV_SOCKET = "RELAYD_ADMIN_SOCKET"
EMBEDDED_SOCKET = "./relayd-data/admin.sock"
SERVICE_SOCKET = "/run/relayd/admin.sock"
OWNER_HEADER = "X-Relayd-Owner"
TIMEOUT = 120.0     # seconds; `smtp check` waits for a real upstream conversation


EPILOG = f"""\
socket lookup: --socket PATH, else ${ENV_SOCKET}, else admin.socket of the
relayd config (-c PATH, $RELAYD_CONFIG, /etc/relayd/relayd.yaml) when one is
given or installed and readable, else {EMBEDDED_SOCKET} if it exists, else
{SERVICE_SOCKET} if it exists.

exit status: 0 done; 1 refused by relayd (reason on stderr) or relayd not
reachable; 2 usage error. Add --json for machine-readable output.
"""


class Failure(Exception):
    """Print the message on stderr and exit 1."""


class Usage(Exception):
    """A usage error found after parsing: exit 2."""


# ---------------------------------------------------------------- transport

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Api:
    def __init__(self, path: str):
        self.path = path

    def call(self, method: str, target: str, body: dict[str, Any] | None = None, *,
             query: dict[str, Any] | None = None, owner: str | None = None) -> Any:
        """The decoded JSON answer (None for an empty one); Failure for any
        answer that is not 2xx."""
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if owner is not None:
            headers[OWNER_HEADER] = owner
        conn = UnixHTTPConnection(self.path)
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except FileNotFoundError:
            raise Failure(f"admin socket {self.path} does not exist (is relayd running? "
                          f"use --socket PATH or ${ENV_SOCKET})") from None
        except ConnectionRefusedError:
            raise Failure(f"nothing is listening on admin socket {self.path} "
                          "(is relayd running?)") from None
        except PermissionError:
            raise Failure(f"permission denied on admin socket {self.path}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Failure(f"admin socket {self.path}: {exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = None
        if not 200 <= response.status < 300:
            raise Failure(_reason(decoded, response.status, response.reason))
        return decoded


def _reason(body: Any, status: int, phrase: str) -> str:
    """The refusal's message, whichever dialect's error shape carries it."""
    if isinstance(body, dict):
        for key in ("message", "info", "Info"):
            if isinstance(body.get(key), str):
                return body[key]
    return f"HTTP {status} {phrase}"


def resolve_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    from . import config
    from .errors import ConfigError
    source = config.locate(args.config)
    if source.path is not None:
        try:
            return source.load().admin.socket
        except ConfigError:   # unreadable (not in relayd's group) or invalid: look around
            pass
    for candidate in (EMBEDDED_SOCKET, SERVICE_SOCKET):
        if os.path.exists(candidate):
            return candidate
    return EMBEDDED_SOCKET


# ---------------------------------------------------------------- output

@dataclass
class Out:
    """What a command prints: ``data`` with --json, else ``text``."""

    data: Any
    text: str


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(record: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    keys = list(keys or record)
    width = max(len(k) for k in keys)
    return "\n".join(f"{k.ljust(width)}  {_cell(record.get(k))}" for k in keys)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def read_secret(value: str | None, from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return value


def quoted(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# ---------------------------------------------------------------- owners and apps

OWNER_COLUMNS = ("owner_id", "plan", "idapp", "apps", "created")
APP_COLUMNS = ("idapp", "owner_id", "name", "strategy", "test_email", "created")


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


# ---------------------------------------------------------------- lookups

def owner_of_app(api: Api, idapp: str) -> str:
    return api.call("GET", f"/admin/apps/{quoted(idapp)}")["owner_id"]


def owner_of_user(api: Api, name: str) -> str:
    return api.call("GET", f"/admin/users/{quoted(name)}")["owner_id"]


def owner_of_smtp(api: Api, idsmtp: str) -> str:
    return api.call("GET", f"/admin/smtps/{quoted(idsmtp)}")["owner_id"]


# ---------------------------------------------------------------- SMTP users (4.1)

USER_COLUMNS = ("smtp_user_name", "status", "total_limit", "hourly_limit", "sent_total",
                "sent_last_hour", "idapp")


def owner_of(api: Api, a: argparse.Namespace) -> str:
    """--owner, or the owner of --app."""
    if a.owner:
        return str(a.owner)
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


# ---------------------------------------------------------------- upstream SMTPs (4.2)

SMTP_COLUMNS = ("_id", "priority", "host", "port", "username", "auth", "startstls", "sslTls",
                "status", "numerrors", "defaultfromemail")


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
    d = api.call("POST", "/private/smtps/save", body, owner=owner)
    return Out(d, fields(d))


def smtp_list(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/private/smtps/findByApp", query={"idapp": a.app},
                 owner=owner_of_app(api, a.app))
    return Out(d, table(d, SMTP_COLUMNS))


def smtp_get(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/private/smtps/findById", query={"idsmtp": a.idsmtp},
                 owner=owner_of_smtp(api, a.idsmtp))
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


# ---------------------------------------------------------------- domain settings (4.3)

DOMAIN_PATH = "/api/v2/email/settings"


def _domain_text(d: dict[str, Any]) -> str:
    o = d.get("options") or {}
    flat = {"domain": d.get("domain"), "_id": d.get("_id"), "provider": d.get("provider"),
            "description": d.get("description"), "from": d.get("from"),
            "host": o.get("host"), "port": o.get("port"), "secure": o.get("secure"),
            "reject_unauthorized": (o.get("tls") or {}).get("rejectUnauthorized"),
            "debug": o.get("debug"), "user": (o.get("auth") or {}).get("user"),
            "pass": (o.get("auth") or {}).get("pass")}
    return fields(flat)


def domain_list(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/domains", query={"owner_id": a.owner})
    rows = [{"domain": x["domain"], "host": x["options"].get("host"),
             "port": x["options"].get("port"), "from": x.get("from"),
             "description": x.get("description")} for x in d]
    return Out(d, table(rows, ("domain", "host", "port", "from", "description")))


def domain_get(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", DOMAIN_PATH, query={"domain": a.domain}, owner=a.owner)
    return Out(d, _domain_text(d))


def domain_set(api: Api, a: argparse.Namespace) -> Out:
    options: dict[str, Any] = drop_none(host=a.host, port=a.port, secure=a.secure, debug=a.debug)
    if a.reject_unauthorized is not None:
        options["tls"] = {"rejectUnauthorized": a.reject_unauthorized}
    password = read_secret(a.password, a.pass_stdin)
    if a.user is not None or password is not None:
        options["auth"] = drop_none(user=a.user, **{"pass": password})
    body = drop_none(provider="smtp", description=a.description, options=options,
                     **{"from": a.from_})
    d = api.call("POST", DOMAIN_PATH, body, query={"domain": a.domain}, owner=a.owner)
    return Out(d, _domain_text(d))


def domain_delete(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("DELETE", DOMAIN_PATH, query={"domain": a.domain}, owner=a.owner)
    return Out(d, f"removed the settings of {a.domain}")


# ---------------------------------------------------------------- status

def status(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/status")
    head = fields(d, ("version", "hostname", "config_generation", "uptime", "draining",
                      "sessions"))
    listeners = table([{**x, "where": x.get("address") or x.get("socket")}
                       for x in d["listeners"]], ("kind", "where", "port", "tls"))
    upstreams = table(d["upstreams"] + d["system_smtps"],
                      ("idsmtp", "host", "port", "status", "numerrors", "last_error"))
    return Out(d, f"{head}\n\nlisteners:\n{listeners}\n\nupstreams:\n{upstreams}")


# ---------------------------------------------------------------- arguments

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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the subcommand, they override; absent, the
    # top-level value stands.
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="admin socket (default: see relayctl --help)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="read admin.socket from this relayd config")

    p = argparse.ArgumentParser(
        prog="relayctl", description="Operator client for relayd's admin socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", default=None, help="admin socket path")
    p.add_argument("--json", action="store_true", default=False,
                   help="print JSON for scripts instead of tables")
    p.add_argument("-c", "--config", metavar="PATH", default=None,
                   help="read admin.socket from this relayd config")
    groups = p.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def command(group: Any, name: str, func: Callable[[Api, argparse.Namespace], Out],
                help: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    def group(name: str, help: str) -> Any:
        g = groups.add_parser(name, help=help, description=help)
        return g.add_subparsers(dest="action", metavar="ACTION", required=True)

    plans = ("free", "paid")
    strategies = ("random", "priority")

    owners = group("owner", "owners (tenants) and their plans")
    s = command(owners, "add", owner_add, "create an owner; prints its token once")
    s.add_argument("--plan", choices=plans, default="free", help="default: free")
    command(owners, "list", owner_list, "list owners (never tokens)")
    s = command(owners, "get", owner_get, "show one owner")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s = command(owners, "remove", owner_remove, "remove an owner and all its records")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s = command(owners, "set-plan", owner_set_plan, "change an owner's plan")
    s.add_argument("owner_id", metavar="OWNER_ID")
    s.add_argument("plan", choices=plans, metavar="PLAN", help="free or paid")

    apps = group("app", "apps: routing strategy and test address")
    s = command(apps, "add", app_add, "create an app for an owner")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("--name", required=True)
    s.add_argument("--strategy", choices=strategies, default="random", help="default: random")
    s.add_argument("--test-email", metavar="ADDR", help="where `smtp check` sends")
    s = command(apps, "list", app_list, "list apps")
    s.add_argument("--owner", metavar="OWNER_ID", help="only this owner's")
    s = command(apps, "get", app_get, "show one app")
    s.add_argument("idapp", metavar="IDAPP")
    s = command(apps, "edit", app_edit, "change an app")
    s.add_argument("idapp", metavar="IDAPP")
    s.add_argument("--name")
    s.add_argument("--strategy", choices=strategies)
    s.add_argument("--test-email", metavar="ADDR")
    s = command(apps, "remove", app_remove, "remove an app with its users and upstreams")
    s.add_argument("idapp", metavar="IDAPP")

    users = group("user", "SMTP users (the SendClean dialect, SPEC 4.1)")
    s = command(users, "add", user_add, "create an SMTP user; prints its password once")
    s.add_argument("--owner", metavar="OWNER_ID", help="default: the owner of --app")
    s.add_argument("--app", metavar="IDAPP", help="default: the owner's default app")
    s.add_argument("--total-limit", "--total", type=positive_int, required=True, metavar="N")
    s.add_argument("--hourly-limit", "--hourly", type=positive_int, required=True, metavar="N")
    s = command(users, "list", user_list, "list an owner's SMTP users with sent counters")
    s.add_argument("--owner", metavar="OWNER_ID", help="default: the owner of --app")
    s.add_argument("--app", metavar="IDAPP", help="only this app's users")
    s = command(users, "edit", user_edit, "change an SMTP user's limits, status or app")
    s.add_argument("name", metavar="SMTP_USER_NAME")
    s.add_argument("--total-limit", "--total", type=positive_int, metavar="N")
    s.add_argument("--hourly-limit", "--hourly", type=positive_int, metavar="N")
    s.add_argument("--status", choices=("Enable", "Disable"))
    s.add_argument("--app", metavar="IDAPP", help="move to another app of the same owner")
    s = command(users, "reset-password", user_reset_password,
                "generate a new password; the old one stops working at once")
    s.add_argument("name", metavar="SMTP_USER_NAME")
    s = command(users, "remove", user_remove, "remove an SMTP user")
    s.add_argument("name", metavar="SMTP_USER_NAME")

    smtps = group("smtp", "upstream SMTP servers per app (SPEC 4.2)")
    s = command(smtps, "save", smtp_save,
                "create an upstream (--app, --host, --port) or edit one (--id: given fields only)")
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
    s = command(smtps, "list", smtp_list, "list an app's upstreams")
    s.add_argument("--app", required=True, metavar="IDAPP")
    s = command(smtps, "get", smtp_get, "show one upstream (password masked)")
    s.add_argument("idsmtp", metavar="IDSMTP")
    s = command(smtps, "remove", smtp_remove, "remove an upstream")
    s.add_argument("idsmtp", metavar="IDSMTP")
    s = command(smtps, "check", smtp_check,
                "send a test message to the app's test_email through this upstream")
    s.add_argument("idsmtp", metavar="IDSMTP")

    domains = group("domain", "per-domain email settings (the Webitel dialect, SPEC 4.3)")
    s = command(domains, "list", domain_list, "list an owner's domain settings")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s = command(domains, "get", domain_get, "show a domain's settings (password masked)")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("domain", metavar="DOMAIN")
    s = command(domains, "set", domain_set, "create or replace a domain's settings")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("domain", metavar="DOMAIN")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=positive_int, help="default: 465 with --secure, else 587")
    s.add_argument("--secure", action=argparse.BooleanOptionalAction, default=None,
                   help="implicit TLS")
    s.add_argument("--user", help="AUTH user")
    secret = s.add_mutually_exclusive_group()
    secret.add_argument("--pass", dest="password", help="AUTH password (visible in ps)")
    secret.add_argument("--pass-stdin", action="store_true",
                        help="read the AUTH password from the first line of stdin")
    s.add_argument("--from", dest="from_", metavar="ADDR", help="default sender")
    s.add_argument("--description")
    s.add_argument("--reject-unauthorized", action=argparse.BooleanOptionalAction,
                   default=None, help="verify the server's certificate (default: yes)")
    s.add_argument("--debug", action=argparse.BooleanOptionalAction, default=None)
    s = command(domains, "delete", domain_delete, "remove a domain's settings")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("domain", metavar="DOMAIN")

    command(groups, "status", status, "listeners, upstream health, config generation")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    api = Api(resolve_socket(args))
    try:
        out = args.func(api, args)
    except Usage as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    except Failure as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out.data, indent=2))
    else:
        print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
