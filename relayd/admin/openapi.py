"""The OpenAPI 3.1 document of the admin socket (SPEC 4.6), ``GET
/openapi.json``.

It is built, never written: ``document`` walks the route tables
(endpoints.py's ``Family`` of each dialect) and asks pydantic for the JSON
schema of the models each route's handler validates its query, path and
body parameters with and of the model of its answer (answers.py), all in
one pass, so that every model appears once under ``components/schemas``.
What pydantic cannot see -- the credentials of each dialect, the error
statuses and their dialect's error body -- comes from the ``Family``.

Each listener serves the document of the routes it has: the Unix socket
all of them, the TCP listener (``admin.listen``) the tenant dialects.
``docs/openapi.json`` is the Unix socket's, as ``python -m relayd.admin``
prints it (tests/test_openapi.py checks that it is current).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from pydantic import TypeAdapter, create_model

from .. import __version__
from .endpoints import JSON, Endpoint, Family
from .http import Route
from .request import Request
from .response import Dialect, Response

PATH = "/openapi.json"
VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

INFO = {
    "title": "relayd admin API",
    "version": __version__,
    "description": (
        "The admin socket of relayd: HTTP/1.1 with JSON bodies on the Unix socket "
        "admin.socket (every route), and on the optional TCP listener admin.listen (the "
        "tenant dialects only; /admin/ answers 404 there). Each dialect answers errors in "
        "its own shape. The seed dialects (SendClean, SMTPs) also take their parameters "
        "form-encoded or in the query string, where numbers and true/false are converted; "
        "their integer fields also accept a string of decimal digits. On the Unix socket "
        "a tenant request may carry X-Relayd-Owner: <owner_id> instead of the owner's "
        "credentials (relayctl does). Request bodies are limited to 1 MiB (413)."),
}

SECURITY = {
    "XKey": {"type": "apiKey", "in": "header", "name": "X-Key",
             "description": "The owner id."},
    "XAccessToken": {"type": "apiKey", "in": "header", "name": "X-Access-Token",
                     "description": "The owner's token, as relayctl owner add showed it."},
}
HEADER_AUTH = [{"XKey": [], "XAccessToken": []}]


def document(families: Sequence[Family]) -> dict[str, Any]:
    """The OpenAPI document of ``families``' routes and of ``GET /openapi.json``."""
    schemas, definitions = _schemas(families)
    paths: dict[str, dict[str, Any]] = {}
    for family in families:
        for e in family.endpoints:
            paths.setdefault(e.pattern, {})[e.method.lower()] = _operation(family, e, schemas,
                                                                           definitions)
    paths[PATH] = {"get": {
        "summary": "This document", "tags": ["openapi"],
        "responses": {"200": {"description": "OK", "content": {
            JSON: {"schema": {"type": "object"}}}}}}}
    components: dict[str, Any] = {"schemas": _normalized(definitions),
                                  "responses": _error_responses(families, schemas)}
    if any(f.auth_headers for f in families):
        components["securitySchemes"] = SECURITY
    tags = [{"name": f.tag, "description": f.description} for f in families]
    return {"openapi": VERSION, "info": INFO,
            "tags": [*tags, {"name": "openapi", "description": "The document itself."}],
            "paths": paths, "components": components}


def render(doc: dict[str, Any]) -> str:
    """Pretty-printed with sorted keys: the same document, the same text."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def route(families: tuple[Family, ...], dialect: Dialect) -> Route:
    """``GET /openapi.json`` answering the document of ``families``."""

    async def serve(req: Request) -> Response:
        return Response(200, _rendered(families), JSON)

    return Route("GET", PATH, serve, dialect)


@functools.cache
def _rendered(families: tuple[Family, ...]) -> bytes:
    # Built at the first request (not at each start: tests start many relays)
    # and kept: the tables are constants.
    return render(document(families)).encode()


# ---------------------------------------------------------------- schemas

def _body_model(family: Family, e: Endpoint) -> Any:
    """The documented body: the handler's model, with the credentials where
    the dialect carries them among the parameters (SendClean)."""
    model = e.doc.body
    if model is None or family.credentials is None:
        return model
    return _with_credentials(model, family.credentials)


@functools.cache
def _with_credentials(model: type[Any], credentials: type[Any]) -> type[Any]:
    # The body model's own settings (nullable, config) come first in the MRO.
    return create_model(f"{model.__name__}Request", __base__=(model, credentials))


def _types(family: Family, e: Endpoint) -> list[Any]:
    return [t for t in (e.doc.query, e.doc.path, _body_model(family, e), e.doc.answer)
            if t is not None]


def _schemas(families: Sequence[Family]) -> tuple[dict[Any, Any], dict[str, Any]]:
    """The JSON schema of every type the families name, by type, and the
    definitions they refer to; one pydantic pass, so one name per model."""
    wanted: dict[Any, None] = {}
    for family in families:
        wanted[family.error] = None
        for e in family.endpoints:
            wanted.update(dict.fromkeys(_types(family, e)))
    inputs = [(t, "validation", TypeAdapter(t)) for t in wanted]
    mapping, definitions = TypeAdapter.json_schemas(inputs, ref_template=REF)
    schemas = {t: schema for (t, _), schema in mapping.items()}
    return schemas, definitions.get("$defs", {})


_CONST_TYPES = {bool: "boolean", int: "integer", str: "string"}


def _normalized(schema: Any) -> Any:
    """Without pydantic's per-property titles (the property names say it),
    and a ``const`` always with its ``type``, which pydantic releases before
    2.9 leave out: every version admitted makes the same document."""
    if isinstance(schema, list):
        return [_normalized(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _normalized(_drop_title(s)) for name, s in value.items()}
        else:
            out[key] = _normalized(value)
    if "const" in out and "type" not in out:
        out["type"] = _CONST_TYPES[type(out["const"])]
    return out


def _drop_title(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != "title"}


# ---------------------------------------------------------------- operations

def _operation(family: Family, e: Endpoint, schemas: dict[Any, Any],
               definitions: dict[str, Any]) -> dict[str, Any]:
    doc = e.doc
    op: dict[str, Any] = {"summary": doc.summary, "tags": [family.tag]}
    if doc.description:
        op["description"] = doc.description
    parameters = [*_parameters(doc.path, "path", schemas, definitions),
                  *_parameters(doc.query, "query", schemas, definitions)]
    if parameters:
        op["parameters"] = parameters
    body = _body_model(family, e)
    if body is not None:
        required = bool(_resolve(schemas[body], definitions).get("required"))
        op["requestBody"] = {"required": required, "content": {
            media: {"schema": schemas[body]} for media in family.media}}
    if family.auth_headers:
        op["security"] = HEADER_AUTH
    op["responses"] = _responses(family, e, schemas)
    return op


def _parameters(model: Any, where: str, schemas: dict[Any, Any],
                definitions: dict[str, Any]) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = _resolve(schemas[model], definitions)
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        param: dict[str, Any] = {"name": name, "in": where,
                                 "required": where == "path" or name in required,
                                 "schema": _normalized(_drop_title(prop))}
        if "description" in prop:
            param["description"] = prop["description"]
        out.append(param)
    return out


def _resolve(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return definitions[ref.rpartition("/")[2]]


def _responses(family: Family, e: Endpoint, schemas: dict[Any, Any]) -> dict[str, Any]:
    doc = e.doc
    success: dict[str, Any] = {"description": _phrase(doc.status)}
    if doc.answer is not None:
        success["content"] = {JSON: {"schema": schemas[doc.answer]}}
    else:
        success["description"] += " (an empty body)"
    responses = {str(doc.status): success}
    for status in sorted({*family.errors, *doc.errors}):
        responses[str(status)] = {"$ref": f"#/components/responses/{_error_name(family)}"}
    return responses


def _error_name(family: Family) -> str:
    return f"{family.tag}Error"


def _error_responses(families: Sequence[Family], schemas: dict[Any, Any]) -> dict[str, Any]:
    """One response per dialect for all its error statuses: its error body."""
    return {_error_name(f): {
        "description": f"An error, in the {f.tag} dialect's shape",
        "content": {JSON: {"schema": schemas[f.error]}}} for f in families}


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase
