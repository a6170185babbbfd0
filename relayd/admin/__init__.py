"""The admin socket (SPEC 4) and the metrics listener (SPEC 5).

``start(relay)`` opens three kinds of listener, all HTTP/1.1 through h11
(``http.py``):

* the Unix admin socket at ``admin.socket`` -- trusted: the operator API
  (``operator.py``, routes under ``/admin/``) and the three tenant dialects.
  Its parent directory is created 0700 when missing; a stale socket file is
  removed first, but a socket a live process answers on, or a path that is not
  a socket, is left alone and start-up fails. The socket is chmod-ed to
  ``admin.mode`` explicitly, whatever the umask;
* the optional TCP listener ``admin.listen`` -- tenants only: SMTP users
  (``smtp_users.py``, SendClean dialect, 4.1), upstream SMTPs
  (``upstreams.py``, seed-000 dialect, 4.2) and domain settings
  (``domains.py``, Webitel dialect, 4.3); ``/admin/*`` answers 404 there;
* the metrics listener ``metrics.listen`` (null disables it): ``GET /metrics``
  (Prometheus text) and ``GET /healthz`` (200 while every SMTP listener
  serves, relayd is not draining and the store watch sees no problem
  (storewatch.py), else 503).

Both admin listeners also answer ``GET /openapi.json`` (``openapi.py``): the
OpenAPI document of their routes, built from the same route tables.

Every dialect maps its requests onto one ``Tenants`` (tenants.py), which
holds the record rules and removal cascades, and its errors onto its own
shape; its routes are a table (``endpoints.py``: each route with the models
it validates with and the model of its answer, ``answers.py``). The rest of
the package is shared: ``fields.py`` (validation, authentication),
``views.py`` (records as JSON), ``request.py`` and ``response.py``.

After ``start`` the relay carries the bound addresses, for callers that bind
port 0 (tests) and for ``GET /admin/status``:

* ``relay.admin_socket`` -- the Unix socket path (str);
* ``relay.admin_tcp_port`` -- the TCP admin port, or None when disabled;
* ``relay.metrics_port`` -- the metrics port, or None when disabled.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

from .. import metrics
from ..config import parse_hostport
from ..tenants import Tenants
from . import domains, openapi, operator, smtp_users, upstreams
from .http import HttpServer, Route, Router
from .request import Request
from .response import PLAIN, Response, text_response

if TYPE_CHECKING:
    from ..daemon import Relay

STALE_PROBE_TIMEOUT = 1.0     # seconds to see whether a process answers on an old socket

# The route tables of each admin listener (and of its GET /openapi.json).
TCP_FAMILIES = (smtp_users.FAMILY, upstreams.FAMILY, domains.FAMILY)
UNIX_FAMILIES = (operator.FAMILY, *TCP_FAMILIES)


# ---------------------------------------------------------------- start-up

async def start(relay: Relay) -> list[asyncio.AbstractServer]:
    """Start the admin socket(s) and the metrics listener; return the servers."""
    cfg = relay.config
    tenants = Tenants(relay.store, forget_upstreams=metrics.forget_upstreams)
    tenant_routes = [*smtp_users.routes(relay, tenants), *upstreams.routes(relay, tenants),
                     *domains.routes(relay, tenants)]
    tenant_dialects = [f.dialect for f in TCP_FAMILIES]
    servers: list[asyncio.AbstractServer] = []
    relay.admin_socket = cfg.admin.socket
    relay.admin_tcp_port = None
    relay.metrics_port = None
    try:
        unix = HttpServer(
            Router([*operator.routes(relay, tenants), *tenant_routes,
                    openapi.route(UNIX_FAMILIES, operator.DIALECT)],
                   [*tenant_dialects, operator.DIALECT], operator.DIALECT),
            trusted=True, name="admin")
        await _start_unix(unix, Path(cfg.admin.socket), cfg.admin.mode_bits)
        servers.append(unix)
        if cfg.admin.listen:
            tcp = HttpServer(Router([*tenant_routes, openapi.route(TCP_FAMILIES, operator.DIALECT)],
                                    tenant_dialects, operator.DIALECT),
                             trusted=False, name="admin_tcp")
            await tcp.start_tcp(*parse_hostport(cfg.admin.listen))
            servers.append(tcp)
            relay.admin_tcp_port = tcp.sockets[0].getsockname()[1]
        if cfg.metrics.listen:
            scrape = HttpServer(_metrics_router(relay), trusted=False, name="metrics")
            await scrape.start_tcp(*parse_hostport(cfg.metrics.listen))
            servers.append(scrape)
            relay.metrics_port = scrape.sockets[0].getsockname()[1]
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _metrics_router(relay: Relay) -> Router:
    async def exposition(req: Request) -> Response:
        return Response(200, metrics.exposition(), CONTENT_TYPE_LATEST)

    async def healthz(req: Request) -> Response:
        up = (bool(relay.smtp_servers) and not relay.draining and relay.store_problem is None
              and all(server.is_serving() for _, server in relay.smtp_servers))
        return text_response("ok\n") if up else text_response("unavailable\n", 503)

    return Router([Route("GET", "/metrics", exposition, PLAIN),
                   Route("GET", "/healthz", healthz, PLAIN)], [], PLAIN)


async def _start_unix(server: HttpServer, path: Path, mode: int) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)      # mkdir's mode is filtered by the umask
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        if await _answers(path):
            raise OSError(errno.EADDRINUSE, f"admin socket {path} is in use by another process")
        path.unlink()
    await server.start_unix(str(path))
    os.chmod(path, mode)


async def _answers(path: Path) -> bool:
    try:
        async with asyncio.timeout(STALE_PROBE_TIMEOUT):
            _, writer = await asyncio.open_unix_connection(str(path))
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
