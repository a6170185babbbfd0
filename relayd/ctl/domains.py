"""``relayctl domain``: per-domain email settings, through the Webitel
dialect (SPEC 4.3) acting for ``--owner`` (``X-Relayd-Owner``); the list
comes from the operator route /admin/domains."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command, add_group, drop_none, positive_int, read_secret
from .output import Out, fields, table
from .transport import Api

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


def _owner_and_domain(s: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    s.add_argument("domain", metavar="DOMAIN")
    return s


def _set_arguments(s: argparse.ArgumentParser) -> None:
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


def register(groups: Any) -> None:
    domains = add_group(groups, "domain",
                        "per-domain email settings (the Webitel dialect)")
    s = add_command(domains, "list", domain_list, "list an owner's domain settings")
    s.add_argument("--owner", required=True, metavar="OWNER_ID")
    _owner_and_domain(add_command(domains, "get", domain_get,
                                  "show a domain's settings (password masked)"))
    _set_arguments(_owner_and_domain(add_command(domains, "set", domain_set,
                                                 "create or replace a domain's settings")))
    _owner_and_domain(add_command(domains, "delete", domain_delete,
                                  "remove a domain's settings"))
