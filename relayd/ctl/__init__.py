"""relayctl: the operator's client for relayd's admin socket (SPEC 4.4).

It speaks HTTP/1.1 to the Unix socket with the standard library's
``http.client``: the operator routes (``/admin/...``, see
relayd/admin/operator.py) for owners, apps and status, and the tenant
dialects (SPEC 4.1-4.3) for SMTP users, upstream SMTPs and domain settings.
For the latter it acts for the record's owner with the ``X-Relayd-Owner``
header, which relayd honours on the Unix socket only, so the operator never
needs an owner's token and every tenant rule applies.

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

The modules, in the order a command runs through them:

* this one: the top-level parser and ``main``, which runs one command;
* ``args``: options every command repeats, argument types, ``add_group`` and
  ``add_command``, and the helpers that turn arguments into request bodies;
* one module per command group, each with its commands and a ``register``
  that declares them with their arguments: ``owners``, ``apps``, ``users``
  (SPEC 4.1), ``smtps`` (SPEC 4.2), ``domains`` (SPEC 4.3), ``status``,
  ``lockouts`` (SPEC 4.6);
* ``transport``: ``UnixHTTPConnection``, ``Api`` (every request; a
  ``Failure`` for anything but 2xx), ``resolve_socket``, ``Failure`` and
  ``Usage``;
* ``output``: ``Out`` (what a command prints) and the table and field
  formatting.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import __version__
from . import apps, domains, lockouts, owners, smtps, status, users
from .transport import (EMBEDDED_SOCKET, ENV_SOCKET, SERVICE_SOCKET, Api, Failure, Usage,
                        resolve_socket)

__all__ = ["build_parser", "main"]

EPILOG = f"""\
socket lookup: --socket PATH, else ${ENV_SOCKET}, else admin.socket of the
relayd config (-c PATH, $RELAYD_CONFIG, /etc/relayd/relayd.yaml) when one is
given or installed and readable, else {EMBEDDED_SOCKET} if it exists, else
{SERVICE_SOCKET} if it exists.

exit status: 0 done; 1 refused by relayd (reason on stderr) or relayd not
reachable; 2 usage error. Add --json for machine-readable output.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relayctl", description="Operator client for relayd's admin socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"relayctl {__version__}")
    p.add_argument("--socket", metavar="PATH", default=None, help="admin socket path")
    p.add_argument("--json", action="store_true", default=False,
                   help="print JSON for scripts instead of tables")
    p.add_argument("-c", "--config", metavar="PATH", default=None,
                   help="read admin.socket from this relayd config")
    groups = p.add_subparsers(dest="group", metavar="COMMAND", required=True)
    # In this order in relayctl --help.
    for group in (owners, apps, users, smtps, domains, status, lockouts):
        group.register(groups)
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
