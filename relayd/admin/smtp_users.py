"""SMTP users in the SendClean dialect (SPEC 4.1; seeds 001-003).

Routes (POST; parameters in a JSON or form-encoded body, or the query string):

    /settings/addSmtp           {owner_id, token, total_limit, hourly_limit, idapp?}
    /settings/editSmtp          {owner_id, token, smtp_user_name, total_limit?, hourly_limit?,
                                 status?, idapp?}
    /settings/resetSmtpPassword {owner_id, token, smtp_user_name}
    /settings/listSmtp          {owner_id, token, idapp?}
    /settings/deleteSmtp        {owner_id, token, smtp_user_name}   (relayd extension)

``idapp`` defaults to the owner's default app (its first). A generated
password appears once, in the answer of addSmtp or resetSmtpPassword; only
its hash is stored, so listSmtp has none (SPEC wins over the seeds here).

Errors: ``{"status":"error","code":-1,"name":N,"message":M}`` with HTTP 400
(``ValidationError``: bad or missing parameter, bad JSON), 401
(``AuthenticationError``: missing credentials, or "Token MissMatch" for a
wrong owner_id/token pair), 404 (``ValidationError``: unknown SMTP user or
app, including another owner's), 405/413/415 (``ValidationError``) and 500
(``GeneralError``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from ..errors import NotFound
from ..records import Owner
from ..tenants import Tenants
from .answers import PasswordReset, SendCleanError, SmtpList, UserChanged, UserCreated
from .endpoints import FORM, JSON, Doc, Endpoint, Family, bind
from .fields import MAX_CREDENTIAL, Id, Model, PositiveInt, authenticate, validate
from .http import Route
from .request import Request
from .response import ApiError, Dialect, Response, json_response

if TYPE_CHECKING:
    from ..daemon import Relay

MISSING = (401, "owner_id and token are required")
INVALID = (401, "Token MissMatch")


def _render(err: ApiError) -> Response:
    if err.status == 401:
        name = "AuthenticationError"
    elif err.status >= 500:
        name = "GeneralError"
    else:
        name = "ValidationError"
    return json_response({"status": "error", "code": -1, "name": name,
                          "message": err.message}, err.status)


def _not_found(exc: NotFound) -> ApiError:
    return ApiError(404, "idapp not found" if exc.kind.startswith("app")
                    else "smtp_user_name not found")


DIALECT = Dialect("sendclean", ("/settings/",), _render, _not_found)

UserName = Id


class AddSmtp(Model):
    total_limit: PositiveInt
    hourly_limit: PositiveInt
    idapp: Id | None = None


class EditSmtp(Model):
    smtp_user_name: UserName
    total_limit: PositiveInt | None = None
    hourly_limit: PositiveInt | None = None
    status: Literal["Enable", "Disable"] | None = None
    idapp: Id | None = None


class UserRef(Model):
    smtp_user_name: UserName


class ListSmtp(Model):
    idapp: Id | None = None


Credential = Annotated[str, Field(min_length=1, max_length=MAX_CREDENTIAL)]


class Credentials(Model):
    """The owner's credentials, given with every request's parameters (the
    document adds them to each body model). ``authenticate`` checks them
    before the rest is validated, so that a request without them is a 401
    whatever else is wrong with it."""

    owner_id: Credential
    token: Credential


class SendClean:
    def __init__(self, relay: Relay, tenants: Tenants):
        self.relay = relay
        self.tenants = tenants

    async def _request(self, req: Request, model: type[Any]) -> tuple[Owner, Any]:
        params = req.params()
        owner_id = params.values.pop("owner_id", None)
        token = params.values.pop("token", None)
        owner = await authenticate(self.relay, req, owner_id, token,
                                   missing=MISSING, invalid=INVALID)
        return owner, validate(model, params)

    async def add(self, req: Request) -> Response:
        owner, p = await self._request(req, AddSmtp)
        store = self.relay.store
        idapp = p.idapp or (await store.default_app(owner.owner_id)).idapp
        user, password = await store.create_user(owner.owner_id, idapp, p.total_limit,
                                                 p.hourly_limit)
        return json_response({"status": "success", "message": "SMTP User Created",
                              "smtp_user_name": user.name, "smtp_password": password})

    async def edit(self, req: Request) -> Response:
        owner, p = await self._request(req, EditSmtp)
        await self.relay.store.update_user(
            p.smtp_user_name, owner.owner_id, total_limit=p.total_limit,
            hourly_limit=p.hourly_limit, status=p.status, idapp=p.idapp)
        return json_response({"status": "success", "message": "SMTP User Updated"})

    async def reset_password(self, req: Request) -> Response:
        owner, p = await self._request(req, UserRef)
        password = await self.relay.store.reset_password(p.smtp_user_name, owner.owner_id)
        return json_response({"status": "success", "message": "password reseted",
                              "smtp_user_name": p.smtp_user_name, "smtp_password": password})

    async def delete(self, req: Request) -> Response:
        owner, p = await self._request(req, UserRef)
        await self.tenants.remove_user(p.smtp_user_name, owner.owner_id)
        return json_response({"status": "success", "message": "SMTP User Deleted"})

    async def list(self, req: Request) -> Response:
        owner, p = await self._request(req, ListSmtp)
        store = self.relay.store
        if p.idapp is not None:
            await store.get_app(p.idapp, owner.owner_id)
        now = time.time()
        users = [u for u in await store.list_users(owner.owner_id)
                 if p.idapp is None or u.idapp == p.idapp]
        listed = []
        for u in users:
            sent_total, sent_last_hour = await store.usage(u.name, now)
            listed.append({"smtp_user_name": u.name, "status": u.status,
                           "total_limit": u.total_limit, "hourly_limit": u.hourly_limit,
                           "idapp": u.idapp, "sent_total": sent_total,
                           "sent_last_hour": sent_last_hour})
        return json_response({"status": "success", "smtp_list": listed})


_USER_NAME = "smtp_user_name: another owner's or an unknown one is a 404"

FAMILY = Family(
    DIALECT, tag="SendClean",
    description="SMTP users (SPEC 4.1, seeds 001-003). POST; the parameters, owner_id and "
                "token among them, in a JSON or form-encoded body (or the query string).",
    error=SendCleanError, errors=(400, 401, 404, 413, 415, 500),
    media=(JSON, FORM), credentials=Credentials, endpoints=(
        Endpoint("POST", "/settings/addSmtp", SendClean.add, Doc(
            "Create an SMTP user; its password is shown here only", UserCreated,
            body=AddSmtp, description="idapp defaults to the owner's default app.")),
        Endpoint("POST", "/settings/editSmtp", SendClean.edit, Doc(
            "Change an SMTP user's limits, status or app", UserChanged, body=EditSmtp,
            description=_USER_NAME)),
        Endpoint("POST", "/settings/resetSmtpPassword", SendClean.reset_password, Doc(
            "Give an SMTP user a new password; the old one stops working at once",
            PasswordReset, body=UserRef, description=_USER_NAME)),
        Endpoint("POST", "/settings/listSmtp", SendClean.list, Doc(
            "List the owner's SMTP users (of one app with idapp), without passwords",
            SmtpList, body=ListSmtp)),
        Endpoint("POST", "/settings/deleteSmtp", SendClean.delete, Doc(
            "Remove an SMTP user (a relayd extension)", UserChanged, body=UserRef,
            description=_USER_NAME)),
    ))


def routes(relay: Relay, tenants: Tenants) -> list[Route]:
    return bind(SendClean(relay, tenants), FAMILY)
