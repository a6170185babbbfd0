"""Upstream SMTP servers per app, in the seed-000 dialect (SPEC 4.2).

Credentials: headers ``X-Key: <owner_id>`` and ``X-Access-Token: <token>``.
Routes (parameters in the query string and/or a JSON or form-encoded body):

    POST /private/smtps/save       create; with idsmtp (or _id) edit the given fields
    GET  /private/smtps/findByApp  ?idapp=   -> [record, ...]
    GET  /private/smtps/findById   ?idsmtp=  -> record
    POST /private/smtps/remove     idsmtp (or idapp, meaning the SMTP id) -> 200, empty body
    POST /private/smtps/check      idsmtp (or idapp, likewise) -> 200, empty body

A record has the seed's keys ``_id, idapp, priority, host, port, username,
password, auth, startstls, sslTls, debug, defaultfromemail, defaultfromname,
numerrors, created, modified, status`` plus ``verify_tls`` and
``allowed_domains`` (null = the default of SPEC 2). ``password`` is always
``"********"``, whether one is stored or not; saving ``"********"`` keeps the
stored secret (or its absence), so a record read back can be saved again
(tenants.py, which also holds the rules across fields). Accepted spellings:
``startstls``/``starttls``, ``sslTls``/``ssltls``,
``defaultfromemail``/``defaulfromemail``. A record sent back whole may carry
its read-only keys (``numerrors``, ``created``, ``modified``); they are ignored.

Status codes: 200; 400 missing or mistyped parameter (``{"code":400,...}``);
401 no credentials; 403 invalid credentials; 404 no such route; 405; 413;
500; and 406 ``{"code":N,"message":...}`` with N from ``REFUSED`` below.

A failed check (406, code 5) quotes the target's answer only when it is an
SMTP reply; for anything else it says "not an SMTP server" or what happened
in plain words ("connection refused", "timed out after 5 s", "TLS
certificate not trusted"), never a byte of a foreign service's banner: the
classification DATA's 451/554 use too (``upstream.describe``, SPEC 3.18).
"""

from __future__ import annotations

import email.message
import email.policy
import email.utils
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from .. import tenants as rules
from ..errors import NotFound, RecordError, UpstreamError
from ..maillog import event
from ..policy import format_from
from ..records import Upstream
from ..tenants import Tenants
from ..upstream import send_once
from .answers import SmtpsError, UpstreamRecord
from .endpoints import FORM, JSON, Doc, Endpoint, Family, bind
from .fields import (DomainName, Email, HeaderText, Hostname, Id, Model, NonNegativeInt, Port,
                     authenticate_headers, ignored, spellings, validate)
from .http import Route
from .request import Request
from .response import ApiError, Dialect, Response, empty_response, json_response
from .views import upstream_json

if TYPE_CHECKING:
    from ..daemon import Relay

log = logging.getLogger("relayd.admin")

MISSING = (401, "X-Key and X-Access-Token headers are required")
INVALID = (403, "Credentials not valid")

# The 406 "specific errors" (seed 000 defines 1 and 2). One table numbers
# every plan rule: 3 is raised where strategies are set, by the operator API
# (HTTP 409 with this code, see RULE_CODES), since no route of this dialect
# sets one.
SMTP_NOT_FOUND = 1
APP_NOT_FOUND = 2
PRIORITY_NEEDS_PAID_PLAN = 3      # the free plan uses the random strategy only
NO_TEST_EMAIL = 4                 # check: the app has no test_email to send to
CHECK_FAILED = 5                  # check: it failed; message has the SMTP reply or the reason
REFUSED = {
    SMTP_NOT_FOUND: "SMTP not found",
    APP_NOT_FOUND: "App not found",
    PRIORITY_NEEDS_PAID_PLAN: rules.PRIORITY_REFUSED,
    NO_TEST_EMAIL: "App has no test_email",
    CHECK_FAILED: "SMTP check failed",
}
RULE_CODES = {rules.PRIORITY_NEEDS_PAID_PLAN: PRIORITY_NEEDS_PAID_PLAN}


def refused(code: int, detail: str = "") -> ApiError:
    return ApiError(406, REFUSED[code] + (f": {detail}" if detail else ""), code=code)


def _render(err: ApiError) -> Response:
    return json_response({"code": err.code if err.code is not None else err.status,
                          "message": err.message}, err.status)


def _not_found(exc: NotFound) -> ApiError:
    return refused(APP_NOT_FOUND if exc.kind == "app" else SMTP_NOT_FOUND)


# The record rules of tenants.py in this dialect's words and spellings; each
# is a missing or mistyped parameter here (400).
_WORDING = {
    rules.TLS_MODES: "startstls and sslTls are mutually exclusive",
    rules.AUTH_NEEDS_USERNAME: "username: is required when auth is true",
}


def _refused(exc: RecordError) -> ApiError:
    code = RULE_CODES.get(exc.rule)
    if code is not None:
        return ApiError(406, exc.message, code=code)
    return ApiError(400, _WORDING.get(exc.rule, exc.message))


DIALECT = Dialect("smtps", ("/private/smtps",), _render, _not_found, _refused)


class SmtpFields(Model):
    # Without idsmtp a new upstream, which needs these (tenants.py).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["idsmtp"]}, {"required": list(rules.NEW_UPSTREAM_NEEDS)}]})
    nullable = frozenset({"username", "password", "defaultfromemail", "defaultfromname",
                          "allowed_domains"})

    idsmtp: Id | None = spellings("idsmtp", "_id")
    idapp: Id | None = None
    priority: NonNegativeInt | None = None
    host: Hostname | None = None
    port: Port | None = None
    username: HeaderText | None = None
    password: HeaderText | None = None
    auth: bool | None = None
    startstls: bool | None = spellings("startstls", "starttls")
    ssltls: bool | None = spellings("sslTls", "ssltls")
    verify_tls: bool | None = None
    debug: bool | None = None
    defaultfromemail: Email | None = spellings("defaultfromemail", "defaulfromemail")
    defaultfromname: HeaderText | None = None
    allowed_domains: list[DomainName] | None = None
    status: Literal["A", "D"] | None = None
    # Read-only keys of a record sent back whole: accepted, ignored.
    numerrors: Any = ignored()
    created: Any = ignored()
    modified: Any = ignored()


READ_ONLY = {"idsmtp", "numerrors", "created", "modified"}


class SmtpRef(Model):
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["idsmtp"]},
                                                           {"required": ["idapp"]}]})

    idsmtp: Id | None = None
    idapp: Id | None = Field(None, description="the SMTP id, as seed 000's remove and check "
                                               "tables call it")

    @property
    def smtp_id(self) -> str:
        smtp_id = self.idsmtp or self.idapp
        if not smtp_id:
            raise ApiError(400, "idsmtp: is required")
        return smtp_id


class AppRef(Model):
    idapp: Id


def check_message(u: Upstream, sender: str, to: str, hostname: str) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = format_from(u.defaultfromname, sender)
    msg["To"] = to
    msg["Subject"] = "relayd SMTP check"
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg.set_content(f"relayd sent this message to check the upstream SMTP server "
                    f"{u.host}:{u.port} (id {u.idsmtp}). No action is needed.\n")
    return msg.as_bytes(policy=email.policy.SMTP)


class Smtps:
    def __init__(self, relay: Relay, tenants: Tenants):
        self.relay = relay
        self.tenants = tenants

    async def _owner_id(self, req: Request) -> str:
        owner = await authenticate_headers(self.relay, req, missing=MISSING, invalid=INVALID)
        return owner.owner_id

    async def save(self, req: Request) -> Response:
        owner_id = await self._owner_id(req)
        p = validate(SmtpFields, req.params())
        fields = p.model_dump(exclude_unset=True, exclude=READ_ONLY)
        upstream = await self.tenants.save_upstream(owner_id, fields, p.idsmtp)
        return json_response(upstream_json(upstream))

    async def find_by_app(self, req: Request) -> Response:
        owner_id = await self._owner_id(req)
        p = validate(AppRef, req.params())
        store = self.relay.store
        await store.get_app(p.idapp, owner_id)
        return json_response([upstream_json(u) for u in await store.list_upstreams(p.idapp)])

    async def find_by_id(self, req: Request) -> Response:
        owner_id = await self._owner_id(req)
        p = validate(SmtpRef, req.params())
        upstream = await self.relay.store.get_upstream(p.smtp_id, owner_id)
        return json_response(upstream_json(upstream))

    async def remove(self, req: Request) -> Response:
        owner_id = await self._owner_id(req)
        p = validate(SmtpRef, req.params())
        await self.tenants.remove_upstream(p.smtp_id, owner_id)
        return empty_response()

    async def check(self, req: Request) -> Response:
        """Send a real message to the app's test_email through this upstream
        alone (no failover, numerrors untouched: this is a probe)."""
        owner_id = await self._owner_id(req)
        p = validate(SmtpRef, req.params())
        relay = self.relay
        u = await relay.store.get_upstream(p.smtp_id, owner_id)
        app = await relay.store.get_app(u.idapp or "", owner_id)
        if not app.test_email:
            raise refused(NO_TEST_EMAIL)
        sender = u.defaultfromemail or (
            u.username if u.username and "@" in u.username else f"postmaster@{relay.hostname}")
        timeouts = relay.config.timeouts
        try:
            reply = await send_once(u, sender, [app.test_email],
                                    check_message(u, sender, app.test_email, relay.hostname),
                                    local_hostname=relay.hostname,
                                    connect_timeout=timeouts.connect,
                                    command_timeout=timeouts.command)
        except UpstreamError as exc:
            # The log keeps the technical account, the target's answer as it
            # came included, for the operator.
            event(log, logging.INFO, "smtp_check", upstream=u.idsmtp, host=u.host,
                  result="failed", detail=exc.reply, reply=exc.detail)
            raise refused(CHECK_FAILED, exc.reply) from None
        event(log, logging.INFO, "smtp_check", upstream=u.idsmtp, host=u.host, result="ok",
              reply=reply)
        return empty_response()


FAMILY = Family(
    DIALECT, tag="SMTPs",
    description="Upstream SMTP servers per app (SPEC 4.2, seed 000). Parameters in the query "
                "string and/or a JSON or form-encoded body. A 406 carries the seed's specific "
                "error as code: 1 SMTP not found, 2 App not found, 3 priority needs the paid "
                "plan, 4 the app has no test_email, 5 the check failed.",
    error=SmtpsError, errors=(400, 401, 403, 406, 413, 415, 500),
    media=(JSON, FORM), auth_headers=True, endpoints=(
        Endpoint("POST", "/private/smtps/save", Smtps.save, Doc(
            "Create an upstream SMTP, or with idsmtp change the fields given", UpstreamRecord,
            body=SmtpFields, description="password \"********\" keeps the stored one.")),
        Endpoint("GET", "/private/smtps/findByApp", Smtps.find_by_app, Doc(
            "List an app's upstream SMTPs", list[UpstreamRecord], query=AppRef)),
        Endpoint("GET", "/private/smtps/findById", Smtps.find_by_id, Doc(
            "One upstream SMTP", UpstreamRecord, query=SmtpRef)),
        Endpoint("POST", "/private/smtps/remove", Smtps.remove, Doc(
            "Remove an upstream SMTP; an empty 200", body=SmtpRef)),
        Endpoint("POST", "/private/smtps/check", Smtps.check, Doc(
            "Send a test message to the app's test_email through this upstream alone; "
            "an empty 200 when it was accepted", body=SmtpRef)),
    ))


def routes(relay: Relay, tenants: Tenants) -> list[Route]:
    return bind(Smtps(relay, tenants), FAMILY)
