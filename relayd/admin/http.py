"""HTTP/1.1 for the admin socket and the metrics listener: h11 over asyncio
streams and the routing table. What a request holds is decoded in
request.py, what a handler answers is in response.py.

Theory of operation
-------------------
h11 does all HTTP parsing (STYLE: no hand-written parser); this module only
moves bytes between the socket and an ``h11.Connection`` and enforces bounds:

* a request head must be complete within ``HEADER_TIMEOUT`` seconds of its
  first byte and fit in ``MAX_HEAD`` bytes (slowloris, header floods: 408 /
  431 and close); only HTTP/1.0 and 1.1 are spoken (505); a kept-alive
  connection may idle ``IDLE_TIMEOUT`` seconds between requests, a fresh one
  only ``HEADER_TIMEOUT``;
* a body may hold ``MAX_BODY`` bytes (SPEC 4.5: 1 MiB). A larger
  Content-Length is answered 413 at once, without reading the body; a chunked
  body that grows past it is answered 413 and the connection closed;
* ambiguous framing is refused, never interpreted (SPEC 4.5, RFC 9112 6.3):
  h11 itself refuses conflicting Content-Length values, but merges identical
  duplicates and lets Transfer-Encoding override Content-Length, so both of
  those are refused here (400 and close);
* at most ``MAX_CONNECTIONS`` connections per listener; beyond that new ones
  are closed at once;
* on TCP (``admin.listen``, ``metrics.listen``) also ``MAX_PER_ADDRESS``
  per client address (IPv6: per /64), and a first request head is due
  ``TCP_FIRST_HEAD_TIMEOUT`` after the accept: one address's slow heads can
  neither fill a listener nor hold slots long (peers.py). Not on the trusted
  Unix socket.

Requests are handled one at a time per connection (h11 pipelines by
buffering). A handler returns a ``Response`` or raises ``ApiError``; any
other exception is logged here with its traceback and answered 500 in the
dialect's error shape -- exception text never reaches a client. Query
strings and bodies are never logged: SendClean clients may put their token
in either.

Dialects: each route belongs to a ``Dialect`` that renders errors in its own
JSON shape and answers a store ``NotFound`` and a tenants ``RecordError`` (a
record rule refused the change) its own way; requests that match
no route (404/405) or fail before routing (400/408/413/431/505) are rendered
by the dialect owning the path's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from .. import protolog
from ..errors import NotFound, RecordError
from .peers import PerAddress, address_key
from .request import Request
from .response import ApiError, Dialect, Response, render

log = logging.getLogger("relayd.admin")

MAX_BODY = 1 << 20            # SPEC 4.5: request bodies over 1 MiB are refused
MAX_HEAD = 16 * 1024          # request line + headers; h11 answers 431 beyond
HEADER_TIMEOUT = 10.0         # seconds for a whole request head (slowloris bound)
BODY_TIMEOUT = 30.0           # seconds for a whole body once the head arrived
IDLE_TIMEOUT = 60.0           # keep-alive: seconds between requests
WRITE_TIMEOUT = 30.0          # a client that does not read its answer is dropped
MAX_CONNECTIONS = 256         # per listener; tenants on TCP must not exhaust fds
# TCP only: one client address may not take the listener for itself (the
# slow-head bound above frees a slot only after HEADER_TIMEOUT).
MAX_PER_ADDRESS = 16
TCP_FIRST_HEAD_TIMEOUT = 3.0  # seconds from accept to a whole first head (TCP)
READ_CHUNK = 64 * 1024
LINGER_TIMEOUT = 2.0          # after a refusal: how long to discard what still arrives
LINGER_BYTES = 4 * MAX_BODY   # ... and how much of it

# Counted in the raw head (see module docstring): one per request, at most.
_CONTENT_LENGTH_LINE = re.compile(rb"^content-length[ \t]*:([^\r\n]*)", re.I | re.M)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


# ---------------------------------------------------------------- routing

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str          # "/admin/owners/{owner_id}": {name} matches one segment
    handler: Handler
    dialect: Dialect

    def match(self, path: str) -> dict[str, str] | None:
        want = self.pattern.strip("/").split("/")
        got = path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params: dict[str, str] = {}
        for w, g in zip(want, got):
            if w.startswith("{") and w.endswith("}"):
                try:
                    value = urllib.parse.unquote(g, errors="strict")
                except UnicodeDecodeError:
                    return None
                if not value:
                    return None
                params[w[1:-1]] = value
            elif w != g:
                return None
        return params


class Router:
    def __init__(self, routes: Sequence[Route], dialects: Sequence[Dialect],
                 fallback: Dialect):
        self.routes = list(routes)
        self.dialects = list(dialects)
        self.fallback = fallback

    def dialect_for(self, path: str | None) -> Dialect:
        if path is not None:
            for d in self.dialects:
                if any(path.startswith(p) for p in d.prefixes):
                    return d
        return self.fallback

    async def dispatch(self, req: Request) -> Response:
        dialect = self.dialect_for(req.path)
        try:
            matched = [(r, p) for r in self.routes if (p := r.match(req.path)) is not None]
            if not matched:
                raise ApiError(404, "no such route")
            for route, params in matched:
                if route.method == req.method:
                    break
            else:
                allow = ", ".join(sorted({r.method for r, _ in matched}))
                raise ApiError(405, f"method {req.method} not allowed here; allowed: {allow}",
                               headers=[("Allow", allow)])
            dialect = route.dialect
            req.path_params = params
            return await route.handler(req)
        except ApiError as err:
            return render(dialect, err)
        except NotFound as exc:
            return render(dialect, dialect.not_found(exc))
        except RecordError as exc:
            return render(dialect, dialect.refused(exc))
        except Exception:
            # The traceback goes to the log, never to the client (STYLE 5).
            # Query and body are not logged: they may hold a token.
            log.exception("admin request failed: %s %s", req.method, req.path)
            return render(dialect, ApiError(500, "internal error"))


# ---------------------------------------------------------------- connections

class _Reject(Exception):
    """Refuse the request being read: answer ``status`` and close."""

    def __init__(self, status: int, message: str, path: str | None = None):
        self.status = status
        self.message = message
        self.path = path


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        first = True
        while True:
            try:
                req = await self.read_request(first)
            except _Reject as r:
                await self.refuse(r)
                await self.linger()
                return
            if req is None:
                return
            response = await self.server.router.dispatch(req)
            protolog.admin_request(self.server.name, req.method, req.path, response.status,
                                   _owner_named(req))
            if not await self.send(response):
                return
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()
            first = False

    async def _read(self, deadline: float) -> bytes:
        async with asyncio.timeout_at(deadline):
            return await self.reader.read(READ_CHUNK)

    async def read_request(self, first: bool) -> Request | None:
        conn = self.h11
        raw_head = bytearray(conn.trailing_data[0])
        started = bool(raw_head)
        # TCP: the first head is due TCP_FIRST_HEAD_TIMEOUT after the accept,
        # however slowly its bytes trickle in (no fresh start at the first one).
        fixed = first and not self.server.trusted
        deadline = self.loop.time() + (TCP_FIRST_HEAD_TIMEOUT if fixed else HEADER_TIMEOUT
                                       if first or started else IDLE_TIMEOUT)
        event: Any = None
        head: h11.Request | None = None
        path: str | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reject(exc.error_status_hint, _PROTOCOL_MESSAGES.get(
                    exc.error_status_hint, "malformed HTTP request"), path) from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._read(deadline)
                except TimeoutError:
                    if not started:
                        return None   # idle keep-alive connection: just close
                    raise _Reject(408, "request timed out", path) from None
                except OSError:
                    return None
                if not started and data:
                    started = True
                    if not fixed:
                        deadline = self.loop.time() + HEADER_TIMEOUT
                if conn.their_state is h11.IDLE:
                    # Bounded: h11 refuses an incomplete head past MAX_HEAD.
                    raw_head += data
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                path, _, _ = event.target.decode("ascii", "replace").partition("?")
                self._check_framing(event, raw_head, path)
                deadline = self.loop.time() + BODY_TIMEOUT
                if conn.they_are_waiting_for_100_continue:
                    try:
                        await self._write(conn.send(
                            h11.InformationalResponse(status_code=100, headers=[])))
                    except (OSError, TimeoutError):
                        return None
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _Reject(413, "request body too large", path)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                return Request(head.method.decode("ascii", "replace"), path, query,
                               list(head.headers), bytes(body), self.server.trusted)
            else:                     # ConnectionClosed
                return None

    @staticmethod
    def _check_framing(event: h11.Request, raw_head: bytes, path: str) -> None:
        if event.http_version not in (b"1.0", b"1.1"):
            raise _Reject(505, "HTTP/1.1 only", path)
        head_end = _HEAD_END.search(raw_head)
        # h11 bounds only a head still incomplete; one that arrived whole in
        # a single read is measured here.
        if head_end is None or head_end.start() > MAX_HEAD:
            raise _Reject(431, _PROTOCOL_MESSAGES[431], path)
        head = raw_head[: head_end.start()]
        lengths = _CONTENT_LENGTH_LINE.findall(head)
        if len(lengths) > 1 or any(b"," in v for v in lengths):
            raise _Reject(400, "more than one Content-Length: ambiguous request", path)
        names = {name for name, _ in event.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            raise _Reject(400, "both Transfer-Encoding and Content-Length: ambiguous request",
                          path)
        for name, value in event.headers:
            if name == b"content-length" and int(value) > MAX_BODY:
                raise _Reject(413, "request body too large", path)

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    async def send(self, response: Response, *, close: bool = False) -> bool:
        """Write ``response``; False when the connection is unusable."""
        headers = [("Content-Length", str(len(response.body)))]
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        headers.extend(response.headers)
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        try:
            data = self.h11.send(h11.Response(status_code=response.status, headers=headers,
                                              reason=reason))
            data += self.h11.send(h11.Data(data=response.body)) if response.body else b""
            data += self.h11.send(h11.EndOfMessage())
            await self._write(data)
        except (h11.LocalProtocolError, OSError, TimeoutError):
            return False
        return True

    async def refuse(self, r: _Reject) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        dialect = self.server.router.dialect_for(r.path)
        await self.send(render(dialect, ApiError(r.status, r.message)), close=True)


    async def linger(self) -> None:
        """After refusing a request whose body may still be arriving: stop
        writing and discard what comes for a moment, so that closing with
        unread data does not reset the connection (TCP RST) before the client
        has read the refusal (RFC 9112 9.6)."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_TIMEOUT):
                discarded = 0
                while discarded < LINGER_BYTES:
                    data = await self.reader.read(READ_CHUNK)
                    if not data:
                        break
                    discarded += len(data)
        except (OSError, TimeoutError):
            pass


_PROTOCOL_MESSAGES = {
    400: "malformed HTTP request",
    431: "request header fields too large",
    505: "HTTP/1.1 only",
    501: "unsupported transfer coding",
}


def _owner_named(req: Request) -> str | None:
    """The owner id a request names (header or query), for the debug log."""
    try:
        return req.header("X-Relayd-Owner") or req.query().get("owner_id")
    except ApiError:
        return None


class HttpServer(asyncio.AbstractServer):
    """One listener (Unix or TCP) serving ``router``. Closing it also closes
    the connections it accepted, so that a stopped relayd leaves no handler
    tasks behind, and removes its Unix socket file."""

    def __init__(self, router: Router, *, trusted: bool, name: str):
        self.router = router
        self.trusted = trusted
        self.name = name
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._per_address = PerAddress(MAX_PER_ADDRESS)
        self._unix: tuple[str, int] | None = None     # (path, inode) of our socket file

    async def start_unix(self, path: str) -> None:
        # The socket file is born 0600 whatever the umask (Linux gives it the
        # mode of the socket's inode, which fchmod sets before bind); the
        # caller then chmods it to admin.mode. Binding by path under a
        # permissive umask (embedded use: relayd's CLI sets 077) left a
        # window between listen() and that chmod in which anyone able to
        # reach the directory could connect, and keep the connection.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(OSError):      # not every system allows it
                os.fchmod(sock.fileno(), 0o600)
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        self.server = await asyncio.start_unix_server(self._client, sock=sock)
        self._unix = (path, os.stat(path).st_ino)

    async def start_tcp(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host, port, reuse_address=True)

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server else ()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = "" if self.trusted else address_key(writer)      # "": not bounded
        if (len(self._writers) >= MAX_CONNECTIONS or not self.is_serving()
                or not self._per_address.admit(key)):
            writer.close()
            return
        self._writers.add(writer)
        try:
            await _Connection(self, reader, writer).run()
        except Exception:
            log.exception("%s connection failed", self.name)
        finally:
            self._writers.discard(writer)
            self._per_address.release(key)
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.close()
        if self._unix is not None:
            # Remove the socket file, unless another process has put its own
            # there since (Python 3.11's asyncio leaves it behind).
            path, inode = self._unix
            self._unix = None
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()

    def is_serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def start_serving(self) -> None:
        pass

    async def serve_forever(self) -> None:
        if self.server is not None:
            await self.server.serve_forever()
