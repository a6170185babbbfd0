"""What an admin handler answers: a ``Response``, or an ``ApiError`` that the
route's ``Dialect`` renders in its own JSON shape.

A handler may also let a store ``NotFound`` or a tenants ``RecordError``
escape; the dialect turns those into its ``ApiError`` too (``not_found``,
``refused``), so that the record rules stay free of HTTP (tenants.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotFound, RecordError


class ApiError(Exception):
    """An answer other than success. ``code``: the seed-000 406 code (or the
    operator API's rule code) where one applies."""

    def __init__(self, status: int, message: str, *, code: int | None = None,
                 headers: Sequence[tuple[str, str]] = ()):
        self.status = status
        self.message = message
        self.code = code
        self.headers = list(headers)
        super().__init__(message)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(obj: Any, status: int = 200) -> Response:
    # no-store: answers carry tokens and generated passwords.
    return Response(status, json.dumps(obj).encode(), "application/json",
                    [("Cache-Control", "no-store")])


def empty_response(status: int = 200) -> Response:
    return Response(status, b"", None, [("Cache-Control", "no-store")])


def text_response(text: str, status: int = 200,
                  content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, text.encode(), content_type)


def _record_not_found(exc: NotFound) -> ApiError:
    return ApiError(404, f"{exc.kind} not found")


def _record_refused(exc: RecordError) -> ApiError:
    return ApiError(409, exc.message)


@dataclass(frozen=True)
class Dialect:
    """How one API dialect spells an error. ``prefixes``: the paths it owns,
    so that a 404 under ``/settings/`` still answers in SendClean's shape.
    ``not_found``: its answer when a handler's record does not exist (or
    belongs to another owner: the store raises the same NotFound).
    ``refused``: its answer when a record rule refuses the change."""

    name: str
    prefixes: tuple[str, ...]
    render: Callable[[ApiError], Response]
    not_found: Callable[[NotFound], ApiError] = _record_not_found
    refused: Callable[[RecordError], ApiError] = _record_refused


def render(dialect: Dialect, err: ApiError) -> Response:
    response = dialect.render(err)
    response.headers.extend(err.headers)
    return response


def _plain_error(err: ApiError) -> Response:
    return text_response(f"{err.status} {err.message}\n", err.status)


PLAIN = Dialect("plain", (), _plain_error)
