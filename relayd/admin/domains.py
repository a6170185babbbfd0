"""Per-domain email settings in the Webitel dialect (SPEC 4.3; seed 004).

Credentials: headers ``X-Key: <owner_id>`` and ``X-Access-Token: <token>``.
One resource, ``/api/v2/email/settings?domain=D``, also answered as
``/engine/api/v2/email/settings?domain=D`` (the path of seed 004's curl
examples; same handlers, same errors):

    GET     -> the settings (404 when there are none)
    POST    create, or replace existing settings of D -> the settings
    PUT     replace existing settings (404 when there are none) -> the settings
    DELETE  -> {"status":"OK","Info":"Removed 1 record."} (404 when there are none)

The body is a JSON object as in seed 004: ``provider`` (``smtp``, the only
one), ``description``, ``from``, ``options`` {``host``, ``port`` (default
465 when ``secure``, else 587), ``secure``, ``debug``,
``tls.rejectUnauthorized`` (default true), ``auth`` {``user``, ``pass``}}. A
``domain`` or ``_id`` in the body (a document read back) is accepted; the
domain must then match the query. Responses add ``_id`` and ``domain`` and
always show ``options.auth.pass`` as ``"********"``; sending the mask back
keeps the stored password (tenants.py).

Errors: ``{"status":"error","info":M}`` with 400 (bad or missing parameter,
missing ``domain``), 401 (no credentials), 403 (invalid credentials), 404,
405, 413 and 500. Another owner's settings for the same domain are
invisible: each owner has its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import RecordError
from ..records import DomainSettings
from ..tenants import Tenants
from .answers import DomainRecord, DomainRemoved, WebitelError
from .endpoints import JSON, Doc, Endpoint, Family, bind
from .fields import (DomainName, Email, FreeText, HeaderText, Hostname, Model, Port,
                     authenticate_headers, validate)
from .http import Route
from .request import Request
from .response import ApiError, Dialect, Response, json_response
from .views import domain_json

if TYPE_CHECKING:
    from ..daemon import Relay

MISSING = (401, "X-Key and X-Access-Token headers are required")
INVALID = (403, "Credentials not valid")
PATH = "/api/v2/email/settings"
ENGINE = "/engine"    # seed 004's curl examples put every route under /engine (SPEC 4.6)


def _render(err: ApiError) -> Response:
    return json_response({"status": "error", "info": err.message}, err.status)


def _refused(exc: RecordError) -> ApiError:
    return ApiError(400, exc.message)     # the mask with no password stored to keep


DIALECT = Dialect("webitel", ("/api/v2/email/", f"{ENGINE}/api/v2/email/"), _render,
                  refused=_refused)


class TlsOptions(Model):
    rejectUnauthorized: bool = True


class AuthOptions(Model):
    nullable = frozenset({"user", "pass_"})

    user: HeaderText | None = None
    pass_: HeaderText | None = Field(None, alias="pass")


class Options(Model):
    nullable = frozenset({"auth"})

    host: Hostname
    port: Port | None = None
    secure: bool = False
    debug: bool = False
    tls: TlsOptions = Field(default_factory=TlsOptions)
    auth: AuthOptions | None = None


class Settings(Model):
    nullable = frozenset({"from_"})

    provider: Literal["smtp"] = "smtp"
    description: FreeText = ""
    from_: Email | None = Field(None, alias="from")
    options: Options
    domain: DomainName | None = None      # read-back document: must match the query
    id_: Any = Field(None, alias="_id",   # read-back document: ignored
                     json_schema_extra={"readOnly": True})


class DomainRef(Model):
    domain: DomainName


class Webitel:
    def __init__(self, relay: Relay, tenants: Tenants):
        self.relay = relay
        self.tenants = tenants

    async def _target(self, req: Request) -> tuple[str, str]:
        """(owner_id, domain): credentials first, then the query."""
        owner = await authenticate_headers(self.relay, req, missing=MISSING, invalid=INVALID)
        return owner.owner_id, validate(DomainRef, req.query()).domain

    async def _existing(self, owner_id: str, domain: str) -> DomainSettings:
        found = await self.relay.store.get_domain(owner_id, domain)
        if found is None:
            raise ApiError(404, "Not found")
        return found

    async def get(self, req: Request) -> Response:
        owner_id, domain = await self._target(req)
        return json_response(domain_json(await self._existing(owner_id, domain)))

    async def post(self, req: Request) -> Response:
        owner_id, domain = await self._target(req)
        return await self._put(req, owner_id, domain)

    async def put(self, req: Request) -> Response:
        owner_id, domain = await self._target(req)
        await self._existing(owner_id, domain)
        return await self._put(req, owner_id, domain)

    async def _put(self, req: Request, owner_id: str, domain: str) -> Response:
        body, is_text = req.body_object()
        if is_text:
            raise ApiError(415, "send the settings as a JSON object")
        s = validate(Settings, body)
        if s.domain is not None and s.domain != domain:
            raise ApiError(400, "domain: the body names another domain than the query")
        opts = s.options
        options: dict[str, Any] = {
            "host": opts.host, "port": opts.port or (465 if opts.secure else 587),
            "secure": opts.secure, "debug": opts.debug,
            "tls": {"rejectUnauthorized": opts.tls.rejectUnauthorized}}
        if opts.auth is not None:
            options["auth"] = {"user": opts.auth.user, "pass": opts.auth.pass_}
        saved = await self.tenants.put_domain(
            owner_id, domain, provider=s.provider, description=s.description, from_=s.from_,
            options=options)
        return json_response(domain_json(saved))

    async def delete(self, req: Request) -> Response:
        owner_id, domain = await self._target(req)
        removed = await self.relay.store.delete_domain(owner_id, domain)
        if not removed:
            raise ApiError(404, "Not found")
        return json_response({"status": "OK", "Info": f"Removed {removed} record."})


def _endpoints(prefix: str) -> tuple[Endpoint, ...]:
    also = (f"The path of seed 004's curl examples; the same as {PATH}." if prefix
            else "")
    return (
        Endpoint("GET", prefix + PATH, Webitel.get, Doc(
            "A domain's email settings", DomainRecord, query=DomainRef, description=also)),
        Endpoint("POST", prefix + PATH, Webitel.post, Doc(
            "Create a domain's email settings, or replace them", DomainRecord,
            query=DomainRef, body=Settings, description=also)),
        Endpoint("PUT", prefix + PATH, Webitel.put, Doc(
            "Replace a domain's existing email settings", DomainRecord, query=DomainRef,
            body=Settings, description=also)),
        Endpoint("DELETE", prefix + PATH, Webitel.delete, Doc(
            "Remove a domain's email settings", DomainRemoved, query=DomainRef,
            description=also)),
    )


FAMILY = Family(
    DIALECT, tag="Webitel",
    description="Per-domain email settings (SPEC 4.3, seed 004); options.auth.pass is always "
                "shown masked, and sending the mask back keeps the stored password.",
    error=WebitelError, errors=(400, 401, 403, 404, 413, 415, 500),
    media=(JSON,), auth_headers=True, endpoints=(*_endpoints(""), *_endpoints(ENGINE)))


def routes(relay: Relay, tenants: Tenants) -> list[Route]:
    return bind(Webitel(relay, tenants), FAMILY)
