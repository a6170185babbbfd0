"""The request side of the admin HTTP server (http.py): a ``Request`` as
read off the connection, and its parameters decoded -- the query string, a
JSON body or a form-encoded one -- refusing whatever is ambiguous (a key
given twice, in the query and the body, duplicate JSON keys) or not text
(invalid UTF-8, a lone surrogate) with a 400 that quotes nothing of the
input: SendClean clients may put their token in either.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .response import ApiError

MAX_FIELDS = 200              # query/form fields per request (urllib's own DoS guard)


@dataclass
class Params:
    """Flat request parameters from the query string and the body.
    ``text_keys``: those that arrived as text (query, form-encoded) and may be
    converted (SPEC 4.5: form-encoded numbers and true/false)."""

    values: dict[str, Any]
    text_keys: set[str]


def _pairs(text: str, where: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                                       errors="strict", max_num_fields=MAX_FIELDS)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f"malformed {where}") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise ApiError(400, f"parameter {key} given more than once")
        out[key] = value
    return out


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_unicode(obj: Any) -> bool:
    """Whether every string (keys too) encodes as UTF-8. JSON's "\\ud800"
    yields a lone surrogate, which SQLite and hashing refuse with an exception
    (a 500): checked here, once, for every dialect. Query, form, path (strict
    UTF-8) and headers (Latin-1) never hold one."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


HINT_JSON = "(send Content-Type: application/json)"
HINT_FORM = "(send Content-Type: application/x-www-form-urlencoded)"


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _hint(media: str, body: bytes) -> str:
    """For a body that is not JSON: which Content-Type would have fitted it
    (SPEC 4.6), when the one sent (or its absence) is the likely mistake."""
    try:
        _pairs(body.decode("utf-8"), "form body")
    except (ApiError, UnicodeDecodeError):
        return f" {HINT_JSON}" if media != "application/json" else ""
    return f" {HINT_FORM}"


@dataclass
class Request:
    method: str
    path: str
    query_string: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # The Unix socket: operator routes exist there, and X-Relayd-Owner works.
    trusted: bool = False
    path_params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """One header's value; a repeated header is ambiguous (400)."""
        key = name.lower().encode()
        values = [v for k, v in self.headers if k == key]
        if len(values) > 1:
            raise ApiError(400, f"header {name} given more than once")
        return values[0].decode("latin-1") if values else None

    def query(self) -> dict[str, str]:
        if not self.query_string:
            return {}
        return _pairs(self.query_string, "query string")

    def body_object(self) -> tuple[dict[str, Any], bool]:
        """The body as a JSON object or form fields; (values, is_text)."""
        if not self.body:
            return {}, False
        media = (self.header("Content-Type") or "").split(";")[0].strip().lower()
        if media == "application/x-www-form-urlencoded":
            try:
                text = self.body.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "form body is not UTF-8") from None
            try:
                return _pairs(text, "form body"), True
            except ApiError as err:
                if _is_json(self.body):
                    err.message += f" {HINT_JSON}"
                raise
        if media.startswith("multipart/"):
            raise ApiError(415, "send JSON or application/x-www-form-urlencoded")
        try:
            obj = json.loads(self.body, object_pairs_hook=_refuse_duplicate_keys,
                             parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            # The parser's own words and position (SPEC 4.6): they name what
            # it expected, never the input.
            raise ApiError(400, f"invalid JSON body: {exc.msg} at line {exc.lineno}, "
                                f"column {exc.colno}{_hint(media, self.body)}") from None
        except (ValueError, RecursionError):
            # ValueError also covers bad UTF-8, duplicate keys and integers
            # too long to convert; nothing of the input is echoed.
            raise ApiError(400, "invalid JSON body") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the JSON body must be an object")
        if not _is_unicode(obj):
            raise ApiError(400, "invalid JSON body: a string holds a lone surrogate "
                                "(not valid Unicode)")
        return obj, False

    def params(self) -> Params:
        """Query string and body merged; a key in both is ambiguous (400)."""
        query = self.query()
        body, body_is_text = self.body_object()
        both = set(query) & set(body)
        if both:
            raise ApiError(400, f"parameter {sorted(both)[0]} given in both the query "
                                "string and the body")
        text_keys = set(query) | (set(body) if body_is_text else set())
        return Params({**query, **body}, text_keys)
