"""The operator API (SPEC 4.4): owners, apps and status. Unix socket only.

Route table (JSON bodies; list routes answer a JSON array):

    GET    /admin/status                   listeners with bound ports, upstream health,
                                           config_generation, sessions, uptime
    GET    /admin/owners                   [owner, ...]            (never tokens)
    POST   /admin/owners     {plan}        201 {owner_id, token, plan, idapp}
                                           (the token appears here only; idapp = default app)
    GET    /admin/owners/{owner_id}        owner
    PATCH  /admin/owners/{owner_id} {plan} owner
    DELETE /admin/owners/{owner_id}        {owner_id, removed: true}  (with its apps, SMTP
                                           users, upstreams and domain settings)
    GET    /admin/apps[?owner_id=]         [app, ...]
    POST   /admin/apps {owner_id, name, strategy?, test_email?}   201 app
    GET    /admin/apps/{idapp}             app
    PATCH  /admin/apps/{idapp} {name?, strategy?, test_email?}    app
    DELETE /admin/apps/{idapp}             {idapp, removed: true}  (not an owner's last app)
    GET    /admin/users/{smtp_user_name}   the SMTP user with its owner_id (no password)
    GET    /admin/smtps/{idsmtp}           the upstream record (masked) with its owner_id
    GET    /admin/domains?owner_id=        [domain settings, ...]  (masked)
    GET    /admin/lockouts                 [{ip, failures, locked_until}, ...]  (SPEC 4.6)
    DELETE /admin/lockouts/{ip}            {ip, cleared: true}  (404 if it was not locked)

owner = {owner_id, plan, created, idapp (default app), apps (count)};
app = {idapp, owner_id, name, strategy, test_email, created}.

The lookups (users, smtps) let relayctl find the owner of a record and then
speak the tenant dialects for it with ``X-Relayd-Owner`` (see fields.py),
so every rule of those dialects applies to the operator too.

Errors: ``{"status":"error","message":M}`` (plus ``code`` for a plan rule)
with 400 (bad parameter or JSON), 404 (no such owner/app/record/route), 405,
409 (refused by a rule of tenants.py: the priority strategy on the free
plan -- code 3 as in the SMTPs dialect -- or removing an owner's last app),
413 and 500.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field

from .. import __version__, metrics
from ..errors import RecordError, StoreError
from ..maillog import event
from ..records import App, Owner
from ..routing import FailoverRules
from ..tenants import Tenants
from ..timefmt import iso_z
from .answers import (AppRecord, AppRemoved, DomainRecord, LockoutCleared, LockoutRow,
                      OperatorError, OwnerCreated, OwnerRecord, OwnerRemoved, SmtpLookup, Status,
                      UserLookup)
from .endpoints import JSON, Doc, Endpoint, Family, bind
from .fields import Email, HeaderText, Id, M, Model, validate
from .http import Route
from .request import Request
from .response import ApiError, Dialect, Response, json_response
from .upstreams import RULE_CODES
from .views import domain_json, upstream_json

if TYPE_CHECKING:
    from ..daemon import Relay

log = logging.getLogger("relayd.admin")

Plan = Literal["free", "paid"]
Strategy = Literal["random", "priority"]
AppName = HeaderText


def _render(err: ApiError) -> Response:
    body: dict[str, Any] = {"status": "error", "message": err.message}
    if err.code is not None:
        body["code"] = err.code
    return json_response(body, err.status)


def _refused(exc: RecordError) -> ApiError:
    """409, with the SMTPs dialect's code where the rule has one (a plan rule)."""
    return ApiError(409, exc.message, code=RULE_CODES.get(exc.rule))


# Also the fallback shape for paths no dialect owns, and for /admin/* on the
# TCP listener, where the operator routes do not exist.
DIALECT = Dialect("operator", ("/admin/",), _render, refused=_refused)


class NewOwner(Model):
    plan: Plan = "free"


class PlanChange(Model):
    plan: Plan


class NewApp(Model):
    owner_id: Id
    name: AppName
    strategy: Strategy = "random"
    test_email: Email | None = None


class AppChange(Model):
    name: AppName | None = None
    strategy: Strategy | None = None
    test_email: Email | None = None


class OwnerFilter(Model):
    owner_id: Id | None = None


class OwnerRef(Model):
    owner_id: Id


# Path parameters: the router hands over any non-empty segment; a record
# that does not exist is a 404 (an id of the wrong shape cannot exist).
PathText = Annotated[str, Field(min_length=1)]


class OwnerPath(Model):
    owner_id: PathText


class AppPath(Model):
    idapp: PathText


class UserPath(Model):
    smtp_user_name: PathText


class SmtpPath(Model):
    idsmtp: PathText


def _ip(value: str) -> str:
    try:
        # The form sessions record (str of the parsed address), so that
        # 2001:DB8::0001 finds 2001:db8::1.
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


class LockoutPath(Model):
    ip: Annotated[str, AfterValidator(_ip),
                  Field(json_schema_extra={"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]})]


def _path(req: Request, model: type[M]) -> M:
    return validate(model, req.path_params)


def app_json(a: App) -> dict[str, Any]:
    return {"idapp": a.idapp, "owner_id": a.owner_id, "name": a.name, "strategy": a.strategy,
            "test_email": a.test_email, "created": iso_z(a.created)}


class Operator:
    def __init__(self, relay: Relay, tenants: Tenants):
        self.relay = relay
        self.tenants = tenants

    # ------------------------------------------------------------ status

    async def status(self, req: Request) -> Response:
        relay = self.relay
        cfg = relay.config
        listeners: list[dict[str, Any]] = [
            {"kind": "smtp", "address": lst.address, "port": relay.port_of(server),
             "tls": lst.tls, "serving": server.is_serving()}
            for lst, server in relay.smtp_servers]
        listeners.append({"kind": "admin", "socket": relay.admin_socket})
        if relay.admin_tcp_port is not None:
            listeners.append({"kind": "admin_tcp", "address": cfg.admin.listen,
                              "port": relay.admin_tcp_port})
        if relay.metrics_port is not None:
            listeners.append({"kind": "metrics", "address": cfg.metrics.listen,
                              "port": relay.metrics_port})
        # Health (SPEC 4.6): numerrors, last_error_at, last_error (the
        # reason, worded as in SPEC 3.18) and cooling_down, for every kind.
        now = time.time()
        f = cfg.failover
        rules = FailoverRules(f.max_errors, f.cooldown, f.max_attempts)

        def shown(h: dict[str, Any]) -> dict[str, Any]:
            return {**h, "last_error_at": iso_z(h["last_error_at"])}

        system = [{"idsmtp": u.idsmtp, "host": u.host, "port": u.port,
                   **relay.errors.health(u, now, rules)} for u in relay.system]
        return json_response({
            "version": __version__,
            "hostname": relay.hostname,
            "config_generation": relay.generation,
            "started": iso_z(relay.started_at),
            "uptime": int(now - relay.started_at),
            "draining": relay.draining,
            "sessions": len(relay.sessions),
            "listeners": listeners,
            "upstreams": [shown(h) for h in relay.store.view.upstream_health(now, rules)],
            "system_smtps": [shown(h) for h in system],
            "domain_routes": [shown(h)
                              for h in relay.store.view.domain_route_health(now, rules)],
            "instances": await self._instances(),
        })

    async def _instances(self) -> list[dict[str, Any]]:
        """The cluster's live members (SPEC 8.5); none known while the store is down."""
        try:
            return await self.relay.store.instances()
        except StoreError:
            return []

    # ------------------------------------------------------------ owners

    async def _owner_json(self, owner: Owner) -> dict[str, Any]:
        apps = await self.relay.store.list_apps(owner.owner_id)
        default = await self.relay.store.default_app(owner.owner_id) if apps else None
        return {"owner_id": owner.owner_id, "plan": owner.plan, "created": iso_z(owner.created),
                "idapp": default.idapp if default else None, "apps": len(apps)}

    async def list_owners(self, req: Request) -> Response:
        validate(Model, req.params())
        return json_response([await self._owner_json(o)
                              for o in await self.relay.store.list_owners()])

    async def create_owner(self, req: Request) -> Response:
        p = validate(NewOwner, req.params())
        owner, token, app = await self.relay.store.create_owner(p.plan)
        return json_response({"owner_id": owner.owner_id, "token": token, "plan": owner.plan,
                              "idapp": app.idapp}, 201)

    async def get_owner(self, req: Request) -> Response:
        owner = await self.relay.store.get_owner(_path(req, OwnerPath).owner_id)
        return json_response(await self._owner_json(owner))

    async def set_plan(self, req: Request) -> Response:
        owner = await self.relay.store.get_owner(_path(req, OwnerPath).owner_id)
        p = validate(PlanChange, req.params())
        updated = await self.tenants.set_plan(owner.owner_id, p.plan)
        return json_response(await self._owner_json(updated))

    async def remove_owner(self, req: Request) -> Response:
        owner = await self.relay.store.get_owner(_path(req, OwnerPath).owner_id)
        await self.tenants.remove_owner(owner.owner_id)
        return json_response({"owner_id": owner.owner_id, "removed": True})

    # ------------------------------------------------------------ apps

    async def list_apps(self, req: Request) -> Response:
        p = validate(OwnerFilter, req.params())
        if p.owner_id is not None:
            await self.relay.store.get_owner(p.owner_id)
        return json_response([app_json(a) for a in await self.relay.store.list_apps(p.owner_id)])

    async def create_app(self, req: Request) -> Response:
        p = validate(NewApp, req.params())
        app = await self.tenants.create_app(p.owner_id, p.name, p.strategy, p.test_email)
        return json_response(app_json(app), 201)

    async def get_app(self, req: Request) -> Response:
        return json_response(app_json(await self.relay.store.get_app(_path(req, AppPath).idapp)))

    async def edit_app(self, req: Request) -> Response:
        app = await self.relay.store.get_app(_path(req, AppPath).idapp)
        p = validate(AppChange, req.params())
        updated = await self.tenants.edit_app(app, name=p.name, strategy=p.strategy,
                                              test_email=p.test_email)
        return json_response(app_json(updated))

    async def remove_app(self, req: Request) -> Response:
        app = await self.tenants.remove_app(_path(req, AppPath).idapp)
        return json_response({"idapp": app.idapp, "removed": True})

    # ------------------------------------------------------------ lookups

    async def get_user(self, req: Request) -> Response:
        user = self.relay.store.get_user(_path(req, UserPath).smtp_user_name)
        if user is None:
            raise ApiError(404, "smtp user not found")
        return json_response({"smtp_user_name": user.name, "owner_id": user.owner_id,
                              "idapp": user.idapp, "status": user.status,
                              "total_limit": user.total_limit,
                              "hourly_limit": user.hourly_limit,
                              "created": iso_z(user.created)})

    async def get_smtp(self, req: Request) -> Response:
        store = self.relay.store
        u = await store.get_upstream(_path(req, SmtpPath).idsmtp)
        app = await store.get_app(u.idapp or "")
        return json_response({**upstream_json(u), "owner_id": app.owner_id,
                              "created": iso_z(u.created), "modified": iso_z(u.modified)})

    async def list_domains(self, req: Request) -> Response:
        p = validate(OwnerRef, req.params())
        await self.relay.store.get_owner(p.owner_id)
        return json_response([domain_json(d)
                              for d in await self.relay.store.list_domains(p.owner_id)])

    # ------------------------------------------------------------ lockouts (SPEC 4.6)

    async def list_lockouts(self, req: Request) -> Response:
        validate(Model, req.params())
        # The throttle keeps time.monotonic() instants, which mean nothing on
        # the wall clock: shift each deadline by the clocks' current offset.
        mono, wall = time.monotonic(), time.time()
        return json_response([
            {"ip": lo.ip, "failures": lo.failures,
             "locked_until": iso_z(wall + (lo.until - mono))}
            for lo in self.relay.throttle.lockouts(mono)])

    async def clear_lockout(self, req: Request) -> Response:
        ip = _path(req, LockoutPath).ip
        if not self.relay.throttle.clear(ip, time.monotonic()):
            raise ApiError(404, f"{ip} is not locked out")
        metrics.LOCKOUTS_CLEARED.inc()
        event(log, logging.INFO, "lockout_cleared", ip=ip)
        return json_response({"ip": ip, "cleared": True})


_OWNER = "an unknown owner is a 404"
FAMILY = Family(
    DIALECT, tag="Operator",
    description="Owners, apps, lookups, lockouts and status (SPEC 4.4, 4.6). On the Unix "
                "socket only: the TCP listener answers 404 under /admin/. No credentials: "
                "whoever can open the socket is the operator. Times are ISO 8601 UTC ending "
                "in Z. A 409 is a refused rule (code 3: priority needs the paid plan).",
    error=OperatorError, errors=(400, 413, 415, 500), media=(JSON,), endpoints=(
        Endpoint("GET", "/admin/status", Operator.status, Doc(
            "Listeners with their ports, upstream health, config_generation", Status)),
        Endpoint("GET", "/admin/owners", Operator.list_owners, Doc(
            "List owners (never their tokens)", list[OwnerRecord])),
        Endpoint("POST", "/admin/owners", Operator.create_owner, Doc(
            "Create an owner with a default app; its token is shown here only",
            OwnerCreated, 201, body=NewOwner)),
        Endpoint("GET", "/admin/owners/{owner_id}", Operator.get_owner, Doc(
            "One owner", OwnerRecord, path=OwnerPath, errors=(404,))),
        Endpoint("PATCH", "/admin/owners/{owner_id}", Operator.set_plan, Doc(
            "Set an owner's plan", OwnerRecord, path=OwnerPath, body=PlanChange,
            errors=(404, 409))),
        Endpoint("DELETE", "/admin/owners/{owner_id}", Operator.remove_owner, Doc(
            "Remove an owner with all its records", OwnerRemoved, path=OwnerPath,
            errors=(404,))),
        Endpoint("GET", "/admin/apps", Operator.list_apps, Doc(
            "List apps, of one owner with owner_id", list[AppRecord], query=OwnerFilter,
            errors=(404,), description=_OWNER)),
        Endpoint("POST", "/admin/apps", Operator.create_app, Doc(
            "Create an app", AppRecord, 201, body=NewApp, errors=(404, 409),
            description=_OWNER)),
        Endpoint("GET", "/admin/apps/{idapp}", Operator.get_app, Doc(
            "One app", AppRecord, path=AppPath, errors=(404,))),
        Endpoint("PATCH", "/admin/apps/{idapp}", Operator.edit_app, Doc(
            "Change an app's name, strategy or test_email", AppRecord, path=AppPath,
            body=AppChange, errors=(404, 409))),
        Endpoint("DELETE", "/admin/apps/{idapp}", Operator.remove_app, Doc(
            "Remove an app (not an owner's last)", AppRemoved, path=AppPath,
            errors=(404, 409))),
        Endpoint("GET", "/admin/users/{smtp_user_name}", Operator.get_user, Doc(
            "Find an SMTP user and its owner", UserLookup, path=UserPath, errors=(404,))),
        Endpoint("GET", "/admin/smtps/{idsmtp}", Operator.get_smtp, Doc(
            "Find an upstream SMTP and its owner", SmtpLookup, path=SmtpPath, errors=(404,))),
        Endpoint("GET", "/admin/domains", Operator.list_domains, Doc(
            "List an owner's domain settings", list[DomainRecord], query=OwnerRef,
            errors=(404,), description=_OWNER)),
        Endpoint("GET", "/admin/lockouts", Operator.list_lockouts, Doc(
            "The client addresses locked out after failed AUTHs", list[LockoutRow])),
        Endpoint("DELETE", "/admin/lockouts/{ip}", Operator.clear_lockout, Doc(
            "Lift one lockout", LockoutCleared, path=LockoutPath, errors=(404,),
            description="404 when the address was not locked out.")),
    ))


def routes(relay: Relay, tenants: Tenants) -> list[Route]:
    return bind(Operator(relay, tenants), FAMILY)
