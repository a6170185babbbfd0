"""The validation toolkit the admin dialects share.

Strict pydantic models with the seed spellings as aliases (``Model``,
``spellings``), the field types of SPEC 4.5 (positive integers below 2^63,
ports -- both also given as a JSON string of decimal digits, SPEC 4.6 -- e-mail addresses, host names, text that reaches a header or an SMTP
command and so may hold no CR, LF or NUL), ``validate`` (form and query
values converted, errors as one 400 line that never quotes the input) and
``authenticate``: the owner a request acts for.

Acting for an owner: on the trusted Unix socket only, a tenant-dialect request
may carry ``X-Relayd-Owner: <owner_id>`` instead of the owner's credentials;
relayctl uses it to manage any owner's records without knowing its token
(whoever can open the socket is the operator anyway). The header is ignored
on TCP.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar, Union

from pydantic import (AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict,
                      Field, GetJsonSchemaHandler, ValidationError, model_validator)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ..errors import NotFound
from ..records import Owner
from .request import Params, Request
from .response import ApiError

if TYPE_CHECKING:
    from ..daemon import Relay

OWNER_HEADER = "X-Relayd-Owner"
MAX_CREDENTIAL = 256          # longer owner ids / tokens cannot be ours: refuse unhashed


# ---------------------------------------------------------------- field types

def _no_ctl(value: str) -> str:
    # CR/LF would let a value inject a header or an SMTP command; NUL is
    # refused by most MTAs and truncates C strings.
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("must not contain CR, LF or NUL")
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain NUL")
    return value


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# RFC 5321 4.1.2 dot-atom local part (ASCII: relayd does not offer SMTPUTF8).
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _domain(value: str) -> str:
    _no_ctl(value)
    if len(value) > 253 or not _DOMAIN_RE.fullmatch(value):
        raise ValueError("is not a valid domain name")
    return value.lower().rstrip(".")


def _host(value: str) -> str:
    _no_ctl(value)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        return _domain(value)


def _email(value: str) -> str:
    _no_ctl(value)
    local, at, domain = value.rpartition("@")
    if (not at or len(value) > 254 or len(local) > 64 or not _LOCAL_RE.fullmatch(local)
            or not _DOMAIN_RE.fullmatch(domain)):
        raise ValueError("is not a valid e-mail address")
    return value


class _Documented:
    """Says in the JSON schema (openapi.py) what a validator function above
    checks, so that the document refuses what validation refuses: its
    keywords are added to the type's generated schema."""

    def __init__(self, **keywords: Any):
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(core), **self.keywords}


_NO_CTL = _Documented(pattern=r"^[^\r\n\x00]*$")

# Text that may reach a header or an SMTP command (RFC 5322 2.1.1 line limit).
HeaderText = Annotated[str, Field(max_length=998), AfterValidator(_no_ctl), _NO_CTL]
FreeText = Annotated[str, Field(max_length=4096), AfterValidator(_no_nul),
                     _Documented(pattern=r"^[^\x00]*$")]
Id = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_ctl), _NO_CTL]
_DIGITS = re.compile(r"[0-9]{1,30}")


def _digit_string(value: Any) -> Any:
    """SPEC 4.6: a JSON string of decimal digits (``"200"``, as seed 001's own
    listSmtp answer has it) is the integer; "", "-1", "1e3", " 2", "0x10"
    stay strings and fail the strict int check. Booleans are left alone."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return value


class _OrDigits:
    """The JSON schema of an integer field that also takes a digit string:
    the integer's schema, or a string whose pattern matches exactly the
    numerals of the integer's range (JSON Schema bounds no string's value)."""

    def __get_pydantic_json_schema__(self, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 0) - 1)
        return {"anyOf": [schema, {
            "type": "string", "maxLength": 30, "pattern": f"^0*(?:{_numerals(lo, hi)})$",
            "description": "the same integer as a string of decimal digits"}]}


def _numerals(lo: int, hi: int) -> str:
    """A regex alternation matching the numerals of lo..hi (0 <= lo <= hi),
    without leading zeros."""
    parts: list[str] = []
    whole: list[int] = []         # widths (less one) whose every numeral is in range
    for width in range(len(str(lo)), len(str(hi)) + 1):
        first, last = max(lo, 10 ** (width - 1) if width > 1 else 0), min(hi, 10 ** width - 1)
        if width > 1 and (first, last) == (10 ** (width - 1), 10 ** width - 1):
            whole.append(width - 1)
        else:
            parts += _same_width(str(first), str(last))
    if whole:
        parts.append(f"[1-9][0-9]{{{whole[0]},{whole[-1]}}}")
    return "|".join(parts)


def _same_width(a: str, b: str) -> list[str]:
    """Patterns for the numerals a..b, both of the same width."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_width(a[1:], b[1:])]
    n = len(a) - 1
    from_zero, to_nines = a[1:] == "0" * n, b[1:] == "9" * n
    out = [] if from_zero else [a[0] + p for p in _same_width(a[1:], "9" * n)]
    first, last = int(a[0]) + (not from_zero), int(b[0]) - (not to_nines)
    if first <= last:
        out.append(f"[{first}-{last}][0-9]{{{n}}}" if first < last else f"{first}[0-9]{{{n}}}")
    if not to_nines:
        out += [b[0] + p for p in _same_width("0" * n, b[1:])]
    return out


_Digits = BeforeValidator(_digit_string)
# Shared by the seed dialects only: the operator API has no integer field.
PositiveInt = Annotated[int, Field(gt=0, lt=2**63), _Digits, _OrDigits()]
NonNegativeInt = Annotated[int, Field(ge=0, lt=2**63), _Digits, _OrDigits()]
Port = Annotated[int, Field(ge=1, le=65535), _Digits, _OrDigits()]
Email = Annotated[str, AfterValidator(_email), _Documented(format="email")]
Hostname = Annotated[str, AfterValidator(_host), _Documented(
    maxLength=253, anyOf=[{"format": "hostname"}, {"format": "ipv4"}, {"format": "ipv6"}])]
DomainName = Annotated[str, AfterValidator(_domain),
                       _Documented(format="hostname")]


def spellings(*names: str) -> Any:
    """A field accepted under several names (the seeds' spellings); the
    document names the first and mentions the others."""
    return Field(None, validation_alias=AliasChoices(*names),
                 description=f"also spelled {', '.join(names[1:])}")


def ignored() -> Any:
    """A read-only key of a record sent back whole: accepted, ignored."""
    return Field(None, json_schema_extra={"readOnly": True})


# ---------------------------------------------------------------- models

class Model(BaseModel):
    """Strict payload model: no unknown keys, no silent type conversion
    (a JSON ``true`` is not an integer, ``1.0`` is not a port). Fields not in
    ``nullable`` refuse an explicit null. Two spellings of one field given
    with different values are refused, never picked from."""

    model_config = ConfigDict(extra="forbid", strict=True)
    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _spelling_and_null(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, info in cls.model_fields.items():
            given = [s for s in _field_spellings(name, info) if s in data]
            if len({repr(data[s]) for s in given}) > 1:
                raise ValueError(f"{' and '.join(given)} are spellings of one parameter "
                                 "and disagree")
            for extra in given[1:]:       # the same value twice: keep one
                del data[extra]
            if given and data[given[0]] is None and name not in cls.nullable:
                raise ValueError(f"{given[0]}: must not be null")
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The schema as validation has it: a field outside ``nullable``
        may be left out but not given as null."""
        schema = handler(core)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name, info in cls.model_fields.items():
            prop = properties.get(_field_spellings(name, info)[0])
            if prop is not None and name not in cls.nullable:
                _refuse_null(prop)
        return schema


_NULL = {"type": "null"}


def _refuse_null(prop: dict[str, Any]) -> None:
    if prop.get("default", ...) is None:
        del prop["default"]
    branches = prop.pop("anyOf", None)
    if branches is None:
        if prop.get("readOnly"):          # ignored(): any value but null
            prop["not"] = _NULL
        return
    rest = [b for b in branches if b != _NULL]
    if len(rest) == 1:
        prop.update(rest[0])
    else:
        prop["anyOf"] = rest


def _field_spellings(name: str, info: FieldInfo) -> list[str]:
    if isinstance(info.validation_alias, AliasChoices):
        return [c for c in info.validation_alias.choices if isinstance(c, str)]
    return [info.alias or name]


def _kind(annotation: Any) -> type | None:
    """int, bool or list when a form value for this field needs converting."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kind(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        kinds = {_kind(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is list:
        return list
    if annotation is bool or annotation is int:
        return annotation
    return None


_FORM_INT = re.compile(r"[+-]?\d{1,20}")


def _from_text(kind: type | None, value: str) -> Any:
    """SPEC 4.5: form-encoded numbers and true/false are converted; anything
    else stays a string and fails strict validation."""
    if kind is int and _FORM_INT.fullmatch(value):
        return int(value)
    if kind is bool and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind is list:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


M = TypeVar("M", bound=Model)


def validate(model: type[M], params: Params | dict[str, Any]) -> M:
    """The model for ``params``, or ApiError(400) naming the first problem."""
    if isinstance(params, dict):
        params = Params(params, set())
    values = dict(params.values)
    kinds = {s: _kind(info.annotation)
             for name, info in model.model_fields.items()
             for s in _field_spellings(name, info)}
    for key in params.text_keys & set(values):
        if isinstance(values[key], str):
            values[key] = _from_text(kinds.get(key), values[key])
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ApiError(400, describe(exc)) from None


_MESSAGES = {"missing": "is required", "extra_forbidden": "unknown parameter"}


def describe(exc: ValidationError) -> str:
    """``field: what is wrong`` for the first error; the input is never quoted
    (it may be a password)."""
    err = exc.errors(include_input=False, include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = _MESSAGES.get(err["type"]) or err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


# ---------------------------------------------------------------- owners

async def authenticate(relay: Relay, req: Request, owner_id: Any, token: Any, *,
                       missing: tuple[int, str], invalid: tuple[int, str]) -> Owner:
    """The owner the request acts for. ``missing``/``invalid``: the dialect's
    (status, message) for absent and wrong credentials. An unknown owner and
    a wrong token get the same answer, in the same time."""
    if req.trusted:
        acting = req.header(OWNER_HEADER)
        if acting is not None:
            try:
                return await relay.store.get_owner(acting)
            except NotFound:
                raise ApiError(*invalid) from None
    if owner_id in (None, "") or token in (None, ""):
        raise ApiError(*missing)
    if (not isinstance(owner_id, str) or not isinstance(token, str)
            or len(owner_id) > MAX_CREDENTIAL or len(token) > MAX_CREDENTIAL):
        raise ApiError(*invalid)
    owner = await relay.store.authenticate_owner(owner_id, token)
    if owner is None:
        raise ApiError(*invalid)
    return owner


async def authenticate_headers(relay: Relay, req: Request, *, missing: tuple[int, str],
                               invalid: tuple[int, str]) -> Owner:
    """``X-Key: <owner_id>`` and ``X-Access-Token: <token>`` (seeds 000 and 004)."""
    return await authenticate(relay, req, req.header("X-Key"), req.header("X-Access-Token"),
                              missing=missing, invalid=invalid)
