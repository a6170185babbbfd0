"""relayctl's side of the admin socket: HTTP/1.1 over AF_UNIX, which socket.

``Api.call`` is the one place a request is made: it turns every way of not
getting a 2xx answer (no socket, nothing listening, no permission, a
refusal) into a ``Failure`` with a message for the operator. Which socket is
``resolve_socket``'s decision (the order is in the package docstring).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import urllib.parse
from typing import Any

ENV_SOCKET = "RELAYD_ADMIN_SOCKET"
EMBEDDED_SOCKET = "./relayd-data/admin.sock"
SERVICE_SOCKET = "/run/relayd/admin.sock"
OWNER_HEADER = "X-Relayd-Owner"
TIMEOUT = 120.0     # seconds; `smtp check` waits for a real upstream conversation


class Failure(Exception):
    """Print the message on stderr and exit 1."""


class Usage(Exception):
    """A usage error found after parsing: exit 2."""


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


def quoted(segment: str) -> str:
    """``segment`` made safe as one path segment of a request target."""
    return urllib.parse.quote(segment, safe="")


def resolve_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    from .. import config
    from ..errors import ConfigError
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
