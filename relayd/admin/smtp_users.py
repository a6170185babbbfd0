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
from typing import TYPE_CHECKING, Any, Literal

from ..errors import NotFound
from ..records import Owner
from ..tenants import Tenants
from .fields import Id, Model, PositiveInt, authenticate, validate
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
        store, ledger = self.relay.store, self.relay.ledger
        if p.idapp is not None:
            await store.get_app(p.idapp, owner.owner_id)
        now = time.time()
        users = [u for u in await store.list_users(owner.owner_id)
                 if p.idapp is None or u.idapp == p.idapp]
        return json_response({"status": "success", "smtp_list": [
            {"smtp_user_name": u.name, "status": u.status, "total_limit": u.total_limit,
             "hourly_limit": u.hourly_limit, "idapp": u.idapp,
             "sent_total": ledger.sent_total(u.name),
             "sent_last_hour": ledger.sent_last_hour(u.name, now)}
            for u in users]})


def routes(relay: Relay, tenants: Tenants) -> list[Route]:
    api = SendClean(relay, tenants)
    return [Route("POST", f"/settings/{name}", handler, DIALECT) for name, handler in (
        ("addSmtp", api.add), ("editSmtp", api.edit), ("resetSmtpPassword", api.reset_password),
        ("listSmtp", api.list), ("deleteSmtp", api.delete))]
