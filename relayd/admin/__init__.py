"""The admin socket (SPEC 4) and the metrics listener (SPEC 5).

``start(relay)`` opens three kinds of listener, all HTTP/1.1 through h11
(``http.py``):

* the Unix admin socket at ``admin.socket`` -- trusted: the operator API
  (``operator.py``, routes under ``/admin/``) and the three tenant dialects.
  Its parent directory is created 0700 when missing; a stale socket file is
  removed first, but a socket a live process answers on, or a path that is not
  a socket, is left alone and start-up fails. The socket is chmod-ed to
  ``admin.mode`` explicitly, whatever the umask;
* the optional TCP listener ``admin.listen`` -- tenants only: the SendClean
  (``sendclean.py``, 4.1), SMTPs (``smtps.py``, 4.2) and Webitel
  (``webitel.py``, 4.3) dialects; ``/admin/*`` answers 404 there;
* the metrics listener ``metrics.listen`` (null disables it): ``GET /metrics``
  (Prometheus text) and ``GET /healthz`` (200 while every SMTP listener
  serves, relayd is not draining and the store watch sees no problem
  (storewatch.py), else 503).

After ``start`` the relay carries the bound addresses, for callers that bind
port 0 (tests) and for ``GET /admin/status``:

* ``relay.admin_socket`` -- the Unix socket path (str);
* ``relay.admin_tcp_port`` -- the TCP admin port, or None when disabled;
* ``relay.metrics_port`` -- the metrics port, or None when disabled.

Acting for an owner: on the trusted Unix socket only, a tenant-dialect request
may carry ``X-Relayd-Owner: <owner_id>`` instead of the owner's credentials;
relayctl uses it to manage any owner's records without knowing its token
(whoever can open the socket is the operator anyway). The header is ignored
on TCP.

The rest of this module is the toolkit the dialect modules share: strict
pydantic models with the seed spellings as aliases, the field types of SPEC
4.5 (positive integers below 2^63, ports, e-mail addresses, host names, text
that reaches a header or an SMTP command and so may hold no CR, LF or NUL),
``validate`` (form and query values converted, errors as one 400 line that
never quotes the input) and ``authenticate``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar, Union

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field,
                      ValidationError, model_validator)
from pydantic.fields import FieldInfo

from .. import metrics
from ..config import parse_hostport
from ..errors import NotFound
from ..records import Owner
from .http import (PLAIN, ApiError, HttpServer, Params, Request, Response, Route, Router,
                   text_response)

if TYPE_CHECKING:
    from ..daemon import Relay

MASK = "********"             # what every response shows instead of an upstream password
OWNER_HEADER = "X-Relayd-Owner"
MAX_CREDENTIAL = 256          # longer owner ids / tokens cannot be ours: refuse unhashed
STALE_PROBE_TIMEOUT = 1.0     # seconds to see whether a process answers on an old socket


# ---------------------------------------------------------------- start-up

async def start(relay: Relay) -> list[asyncio.AbstractServer]:
    """Start the admin socket(s) and the metrics listener; return the servers."""
    # The dialect modules import this package's toolkit, so they load here.
    from . import operator, sendclean, smtps, webitel

    cfg = relay.config
    tenant_routes = [*sendclean.routes(relay), *smtps.routes(relay), *webitel.routes(relay)]
    tenant_dialects = [sendclean.DIALECT, smtps.DIALECT, webitel.DIALECT]
    servers: list[asyncio.AbstractServer] = []
    relay.admin_socket = cfg.admin.socket
    relay.admin_tcp_port = None
    relay.metrics_port = None
    try:
        unix = HttpServer(
            Router([*operator.routes(relay), *tenant_routes],
                   [*tenant_dialects, operator.DIALECT], operator.DIALECT),
            trusted=True, name="admin")
        await _start_unix(unix, Path(cfg.admin.socket), cfg.admin.mode_bits)
        servers.append(unix)
        if cfg.admin.listen:
            tcp = HttpServer(Router(tenant_routes, tenant_dialects, operator.DIALECT),
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


# Text that may reach a header or an SMTP command (RFC 5322 2.1.1 line limit).
HeaderText = Annotated[str, Field(max_length=998), AfterValidator(_no_ctl)]
FreeText = Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)]
Id = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_ctl)]
PositiveInt = Annotated[int, Field(gt=0, lt=2**63)]
NonNegativeInt = Annotated[int, Field(ge=0, lt=2**63)]
Port = Annotated[int, Field(ge=1, le=65535)]
Email = Annotated[str, AfterValidator(_email)]
Hostname = Annotated[str, AfterValidator(_host)]
DomainName = Annotated[str, AfterValidator(_domain)]


def spellings(*names: str) -> Any:
    """A field accepted under several names (the seeds' spellings)."""
    return Field(None, validation_alias=AliasChoices(*names))


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
