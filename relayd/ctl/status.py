"""``relayctl status``: listeners, upstream health and config generation,
from the operator route /admin/status."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command
from .output import Out, fields, table
from .transport import Api


def status(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/status")
    head = fields(d, ("version", "hostname", "config_generation", "uptime", "draining",
                      "sessions"))
    listeners = table([{**x, "where": x.get("address") or x.get("socket")}
                       for x in d["listeners"]], ("kind", "where", "port", "tls"))
    upstreams = table(d["upstreams"] + d["system_smtps"],
                      ("idsmtp", "host", "port", "status", "numerrors", "last_error"))
    return Out(d, f"{head}\n\nlisteners:\n{listeners}\n\nupstreams:\n{upstreams}")


def register(groups: Any) -> None:
    add_command(groups, "status", status, "listeners, upstream health, config generation")
