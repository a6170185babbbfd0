"""The record rules and removal cascades every admin dialect shares (SPEC 2, 4).

The admin dialects (``admin/*.py``) map a request onto a call here and an
error onto their own shape; what a record may be, and what goes with it when
it is removed, is decided once, in this module:

* plan rules: the free plan uses the random strategy only, so a free owner's
  app cannot be given ``priority`` and an owner with ``priority`` apps cannot
  move to the free plan; and an owner keeps at least one app;
* upstream consistency (``check_upstream``): one TLS mode, and a username
  when ``auth`` is on. config.py's system SMTPs obey the same function;
* the masked secret: answers show ``MASK`` instead of an upstream's or a
  domain's password, and saving ``MASK`` back keeps the stored secret (or its
  absence), so a record read back can be saved again. Where there is no
  record yet, there is no secret to keep: the mask is refused;
* removal cascades: an owner takes its apps, an app its SMTP users and
  upstreams (the store's ON DELETE CASCADE); then the quota state of the
  users and the metrics of the upstreams that went are dropped, so that
  neither grows with records that no longer exist.

A broken rule raises ``RecordError`` whose ``rule`` is one of the constants
below; a missing record, or another owner's, raises the store's ``NotFound``.
Nothing here speaks HTTP. Reads, and writes that no rule concerns (creating
an owner or an SMTP user, editing a user, deleting domain settings), go to
the store directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .errors import RecordError
from .records import App, DomainSettings, Owner, Upstream

if TYPE_CHECKING:
    from .store import RecordStore as Store

MASK = "********"             # what every answer shows instead of a stored password

# RecordError.rule values.
TLS_MODES = "tls_modes"                         # startstls and ssltls both on
AUTH_NEEDS_USERNAME = "auth_needs_username"     # auth on, no username to log in with
MISSING_FIELD = "missing_field"                 # a new upstream without idapp, host or port
MASK_WITHOUT_SECRET = "mask_without_secret"     # the mask sent where nothing is stored
PRIORITY_NEEDS_PAID_PLAN = "priority_needs_paid_plan"
LAST_APP = "last_app"                           # removing an owner's only app

PRIORITY_REFUSED = "The priority strategy needs a paid plan"
NEW_UPSTREAM_NEEDS = ("idapp", "host", "port")


def check_upstream(record: Mapping[str, Any]) -> None:
    """The rules across an upstream's fields (SPEC 2), on the record as it
    would be stored (store field names): STARTTLS on a plain connection or
    TLS from the first byte, not both; and AUTH needs a username."""
    if record.get("startstls") and record.get("ssltls"):
        raise RecordError(TLS_MODES, "startstls and ssltls are mutually exclusive",
                          field="ssltls")
    if record.get("auth") and not record.get("username"):
        raise RecordError(AUTH_NEEDS_USERNAME, "auth: true needs a username", field="username")


def check_strategy(owner: Owner, strategy: str | None) -> None:
    """The free plan uses the random strategy only."""
    if strategy == "priority" and owner.plan != "paid":
        raise RecordError(PRIORITY_NEEDS_PAID_PLAN,
                          f"{PRIORITY_REFUSED}: owner {owner.owner_id} is on the free plan, "
                          "which uses the random strategy only", ids=(owner.owner_id,))


def _mask_refused(field: str) -> RecordError:
    return RecordError(MASK_WITHOUT_SECRET, f"{field}: {MASK} is the mask, not a password",
                       field=field)


class Tenants:
    """The rules above over one ``store``; ``forget_upstreams``: called
    with the ids of removed upstreams (metrics.forget_upstreams)."""

    def __init__(self, store: Store, *, forget_upstreams: Callable[[Iterable[str]], None]):
        self.store = store
        self.forget_upstreams = forget_upstreams

    # ------------------------------------------------------------ owners and apps

    async def set_plan(self, owner_id: str, plan: str) -> Owner:
        if plan != "paid":
            priority = [a.idapp for a in await self.store.list_apps(owner_id)
                        if a.strategy == "priority"]
            if priority:
                raise RecordError(PRIORITY_NEEDS_PAID_PLAN,
                                  f"{PRIORITY_REFUSED}: switch apps {', '.join(priority)} "
                                  "to the random strategy first", ids=tuple(priority))
        return await self.store.set_plan(owner_id, plan)

    async def create_app(self, owner_id: str, name: str, strategy: str,
                         test_email: str | None = None) -> App:
        check_strategy(await self.store.get_owner(owner_id), strategy)
        return await self.store.create_app(owner_id, name, strategy, test_email)

    async def edit_app(self, app: App, *, name: str | None = None, strategy: str | None = None,
                       test_email: str | None = None) -> App:
        """Change the given fields of ``app`` (as just read); None keeps one."""
        check_strategy(await self.store.get_owner(app.owner_id), strategy)
        return await self.store.update_app(app.idapp, strategy=strategy, test_email=test_email,
                                           name=name)

    async def remove_owner(self, owner_id: str) -> None:
        """The owner with its apps, SMTP users, upstreams and domain settings."""
        await self._cascade(lambda: self.store.remove_owner(owner_id), owner_id,
                            await self.store.list_apps(owner_id))

    async def remove_app(self, idapp: str) -> App:
        """The app with its SMTP users and upstreams; not an owner's last."""
        app = await self.store.get_app(idapp)
        if len(await self.store.list_apps(app.owner_id)) <= 1:
            raise RecordError(LAST_APP, "an owner keeps at least one app; remove the owner "
                              "instead", ids=(app.owner_id, app.idapp))
        await self._cascade(lambda: self.store.remove_app(app.idapp), app.owner_id, [app])
        return app

    async def _cascade(self, remove: Callable[[], Awaitable[None]], owner_id: str,
                       apps: list[App]) -> None:
        """Run ``remove`` (of an owner or an app, taking ``apps`` with it),
        then drop the quota state and metrics of what went with it."""
        idapps = {a.idapp for a in apps}
        users = [u.name for u in await self.store.list_users(owner_id) if u.idapp in idapps]
        upstreams = [u.idsmtp for a in apps for u in await self.store.list_upstreams(a.idapp)]
        await remove()
        self._forget_usage(users)
        self.forget_upstreams(upstreams)

    # ------------------------------------------------------------ SMTP users

    async def remove_user(self, name: str, owner_id: str) -> None:
        await self.store.remove_user(name, owner_id)
        self._forget_usage([name])

    def _forget_usage(self, names: list[str]) -> None:
        """Drop the quota state of removed users (store.forget_usage)."""
        for name in names:
            self.store.forget_usage(name)

    # ------------------------------------------------------------ upstreams

    async def save_upstream(self, owner_id: str, fields: dict[str, Any],
                            idsmtp: str | None = None) -> Upstream:
        """Create an upstream for one of ``owner_id``'s apps from ``fields``
        (store.UPSTREAM_FIELDS), or with ``idsmtp`` change just the given
        fields of one; ``password`` ``MASK`` keeps the stored one."""
        fields = dict(fields)
        if fields.get("password") == MASK:
            if idsmtp is None:
                raise _mask_refused("password")
            del fields["password"]
        if idsmtp is None:
            for key in NEW_UPSTREAM_NEEDS:
                if key not in fields:
                    raise RecordError(MISSING_FIELD, f"{key}: is required", field=key)
            await self.store.get_app(fields["idapp"], owner_id)
            check_upstream(fields)
            return await self.store.create_upstream(fields)
        current = await self.store.get_upstream(idsmtp, owner_id)
        if fields.get("idapp", current.idapp) != current.idapp:
            await self.store.get_app(fields["idapp"], owner_id)
        check_upstream({**asdict(current), **fields})
        return await self.store.update_upstream(idsmtp, fields)

    async def remove_upstream(self, idsmtp: str, owner_id: str) -> None:
        upstream = await self.store.get_upstream(idsmtp, owner_id)
        await self.store.remove_upstream(upstream.idsmtp)
        self.forget_upstreams([upstream.idsmtp])

    # ------------------------------------------------------------ domain settings

    async def put_domain(self, owner_id: str, domain: str, *, provider: str, description: str,
                         from_: str | None, options: dict[str, Any]) -> DomainSettings:
        """Create or replace ``owner_id``'s settings of ``domain``;
        ``options.auth.pass`` ``MASK`` keeps the stored password."""
        auth = options.get("auth")
        if isinstance(auth, dict) and auth.get("pass") == MASK:
            current = await self.store.get_domain(owner_id, domain)
            if current is None:
                raise _mask_refused("options.auth.pass")
            stored = (current.options.get("auth") or {}).get("pass")
            options = {**options, "auth": {**auth, "pass": stored}}
        return await self.store.put_domain(owner_id, domain, provider=provider,
                                           description=description, from_=from_,
                                           options=options)
