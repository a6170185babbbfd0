"""The admin route tables as data: one ``Family`` per dialect, holding its
``Endpoint``s (method, path pattern, the API class's handler and its ``Doc``).

``bind`` turns a family into the ``Route``s of http.py for one API object;
openapi.py turns the same families into the OpenAPI document. A ``Doc``
names the pydantic models the handler validates its query, body and path
parameters with, and the type of its answer, so that the document is made
from what validates the requests and cannot drift from it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .http import Route
from .request import Request
from .response import Dialect, Response

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Doc:
    """``query``/``body``/``path``: the models the handler validates those
    parameters with (None: it takes none). ``answer``: the type of the
    ``status`` answer's JSON body (a model, or ``list[model]``); None for an
    empty body. ``errors``: statuses this route answers besides its family's."""

    summary: str
    answer: Any = None
    status: int = 200
    query: type[Any] | None = None
    body: type[Any] | None = None
    path: type[Any] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""


Function = Callable[[Any, Request], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    pattern: str
    function: Function        # an API class's method, bound by ``bind``
    doc: Doc


@dataclass(frozen=True)
class Family:
    """One dialect's routes. ``error``: the model of its error bodies;
    ``errors``: the statuses any of its routes may answer (bad parameter,
    credentials, body too large, ...). The owner's credentials come as the
    headers X-Key and X-Access-Token (``auth_headers``), or among the
    parameters as ``credentials`` (a model: SendClean's owner_id and token),
    or not at all (the operator API: whoever can open the Unix socket).
    ``media``: the request body types it reads."""

    dialect: Dialect
    tag: str
    description: str
    error: type[Any]
    errors: tuple[int, ...]
    media: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    auth_headers: bool = False
    credentials: type[Any] | None = None


def bind(api: object, family: Family) -> list[Route]:
    """The routes of ``family``, their handlers bound to ``api``."""
    return [Route(e.method, e.pattern, functools.partial(e.function, api), family.dialect)
            for e in family.endpoints]
