"""``relayctl status``: listeners, upstream health, config generation and
the cluster's live instances, from the operator route /admin/status."""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_command
from .output import Out, fields, table, zoned
from .transport import Api


def status(api: Api, a: argparse.Namespace) -> Out:
    d = api.call("GET", "/admin/status")
    d = zoned(d)
    head = fields(d, ("version", "hostname", "config_generation", "started", "uptime",
                      "draining", "sessions"))
    listeners = table([{**x, "where": x.get("address") or x.get("socket")}
                       for x in d["listeners"]], ("kind", "where", "port", "tls"))
    # Health (SPEC 4.6): the error count, the last error's time (ISO 8601
    # UTC) and reason, and whether failover skips the upstream for now.
    rows = [{**u, "state": "cooling down" if u.get("cooling_down") else u.get("status", "A")}
            for u in d["upstreams"] + d["system_smtps"] + d.get("domain_routes", [])]
    upstreams = table(rows, ("idsmtp", "host", "port", "state", "numerrors", "last_error_at",
                             "last_error"))
    # The cluster (SPEC 8.5): every live relayd on the same database.
    instances = table(d.get("instances", []), ("id", "hostname", "pid", "started", "last_seen"))
    return Out(d, f"{head}\n\nlisteners:\n{listeners}\n\nupstreams:\n{upstreams}"
                  f"\n\ninstances:\n{instances}")


def register(groups: Any) -> None:
    add_command(groups, "status", status,
                "listeners, upstream health, config generation, cluster instances")
