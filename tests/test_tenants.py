"""The record rules and cascades of tenants.py, on a real Store over a
temporary SQLite file: no sockets, no HTTP. The dialects' wording of the
same rules is tested through the admin socket (tests/test_admin_*.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import pydantic
import pytest

from relayd import tenants
from relayd.config import UpstreamSpec
from relayd.errors import NotFound, RecordError
from relayd.store import RecordStore as Store
from relayd.tenants import MASK, Tenants, check_upstream


class Forgotten(list[str]):
    """Stands in for metrics.forget_upstreams: records the ids it is given."""

    def __call__(self, idsmtps: Iterable[str]) -> None:
        self.extend(idsmtps)


@pytest.fixture
def forgotten() -> Forgotten:
    return Forgotten()


@pytest.fixture
def service(store: Store, forgotten: Forgotten) -> Tenants:
    return Tenants(store, forget_upstreams=forgotten)


@contextlib.contextmanager
def refused(rule: str) -> Iterator[pytest.ExceptionInfo[RecordError]]:
    with pytest.raises(RecordError) as info:
        yield info
    assert info.value.rule == rule, info.value.message


UPSTREAM = {"host": "smtp.example.com", "port": 587}


# ---------------------------------------------------------------- plan rules

async def test_priority_strategy_needs_a_paid_plan(service: Tenants, store: Store):
    free, _, _ = await store.create_owner("free")
    with refused(tenants.PRIORITY_NEEDS_PAID_PLAN) as info:
        await service.create_app(free.owner_id, "app", "priority")
    assert info.value.ids == (free.owner_id,)
    assert info.value.message.startswith(tenants.PRIORITY_REFUSED)
    assert len(await store.list_apps(free.owner_id)) == 1, "nothing was created"
    assert (await service.create_app(free.owner_id, "app", "random")).strategy == "random"

    paid, _, _ = await store.create_owner("paid")
    app = await service.create_app(paid.owner_id, "app", "priority", "ops@example.com")
    assert (app.strategy, app.test_email) == ("priority", "ops@example.com")


async def test_editing_an_app_to_priority_on_the_free_plan_is_refused(service: Tenants,
                                                                       store: Store):
    owner, _, app = await store.create_owner("free")
    with refused(tenants.PRIORITY_NEEDS_PAID_PLAN):
        await service.edit_app(app, strategy="priority")
    assert (await store.get_app(app.idapp)).strategy == "random"
    edited = await service.edit_app(app, name="renamed", test_email="t@example.com")
    assert (edited.name, edited.strategy, edited.test_email) == ("renamed", "random",
                                                                 "t@example.com")


async def test_free_plan_only_once_no_app_uses_priority(service: Tenants, store: Store):
    owner, _, default = await store.create_owner("paid")
    app = await service.create_app(owner.owner_id, "app", "priority")
    with refused(tenants.PRIORITY_NEEDS_PAID_PLAN) as info:
        await service.set_plan(owner.owner_id, "free")
    assert info.value.ids == (app.idapp,)
    assert app.idapp in info.value.message
    assert (await store.get_owner(owner.owner_id)).plan == "paid"

    await service.edit_app(app, strategy="random")
    assert (await service.set_plan(owner.owner_id, "free")).plan == "free"
    assert (await service.set_plan(owner.owner_id, "paid")).plan == "paid"
    with pytest.raises(NotFound):
        await service.set_plan("0" * 24, "free")


async def test_an_owner_keeps_at_least_one_app(service: Tenants, store: Store):
    owner, _, default = await store.create_owner("free")
    with refused(tenants.LAST_APP):
        await service.remove_app(default.idapp)
    assert await store.get_app(default.idapp) == default
    other = await service.create_app(owner.owner_id, "other", "random")
    assert await service.remove_app(default.idapp) == default
    assert [a.idapp for a in await store.list_apps(owner.owner_id)] == [other.idapp]
    with pytest.raises(NotFound):
        await service.remove_app(default.idapp)


# ---------------------------------------------------------------- upstream consistency

def test_one_tls_mode_and_auth_needs_a_username():
    check_upstream({"startstls": True, "ssltls": False, "auth": True, "username": "u"})
    check_upstream({"startstls": None, "ssltls": True})
    with refused(tenants.TLS_MODES) as info:
        check_upstream({"startstls": True, "ssltls": True})
    assert info.value.field == "ssltls"
    with refused(tenants.AUTH_NEEDS_USERNAME) as info:
        check_upstream({"auth": True, "username": ""})
    assert info.value.field == "username"


def test_system_smtps_in_the_config_obey_the_same_rule():
    UpstreamSpec(host="h", port=465, ssltls=True)
    for fields, rule in (({"startstls": True, "ssltls": True}, tenants.TLS_MODES),
                         ({"auth": True}, tenants.AUTH_NEEDS_USERNAME)):
        with pytest.raises(RecordError) as expected:
            check_upstream(fields)
        assert expected.value.rule == rule
        with pytest.raises(pydantic.ValidationError, match=expected.value.message):
            UpstreamSpec(host="h", port=25, **fields)


async def test_saving_an_upstream_checks_the_record_as_it_would_be_stored(service: Tenants,
                                                                           store: Store):
    owner, _, app = await store.create_owner("free")
    with refused(tenants.TLS_MODES):
        await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp,
                                                     "startstls": True, "ssltls": True})
    assert await store.list_upstreams(app.idapp) == []
    up = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp,
                                                      "startstls": True})
    # ssltls alone is fine, but not beside the stored startstls.
    with refused(tenants.TLS_MODES):
        await service.save_upstream(owner.owner_id, {"ssltls": True}, up.idsmtp)
    with refused(tenants.AUTH_NEEDS_USERNAME):
        await service.save_upstream(owner.owner_id, {"auth": True}, up.idsmtp)
    edited = await service.save_upstream(owner.owner_id, {"startstls": False, "ssltls": True},
                                         up.idsmtp)
    assert (edited.startstls, edited.ssltls, edited.host) == (False, True, UPSTREAM["host"])


async def test_a_new_upstream_needs_an_app_of_its_owner_a_host_and_a_port(service: Tenants,
                                                                           store: Store):
    owner, _, app = await store.create_owner("free")
    other, _, foreign = await store.create_owner("free")
    for missing in tenants.NEW_UPSTREAM_NEEDS:
        fields = {**UPSTREAM, "idapp": app.idapp}
        del fields[missing]
        with refused(tenants.MISSING_FIELD) as info:
            await service.save_upstream(owner.owner_id, fields)
        assert info.value.field == missing
    with pytest.raises(NotFound):
        await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": foreign.idapp})
    up = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp})
    with pytest.raises(NotFound):
        await service.save_upstream(other.owner_id, {"port": 25}, up.idsmtp)
    with pytest.raises(NotFound):       # moved to another owner's app
        await service.save_upstream(owner.owner_id, {"idapp": foreign.idapp}, up.idsmtp)
    assert (await store.get_upstream(up.idsmtp)).idapp == app.idapp


# ---------------------------------------------------------------- the masked secret

async def test_saving_the_mask_back_keeps_an_upstreams_password(service: Tenants,
                                                                store: Store):
    owner, _, app = await store.create_owner("free")
    with refused(tenants.MASK_WITHOUT_SECRET) as info:
        await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp,
                                                     "password": MASK})
    assert info.value.field == "password"
    up = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp,
                                                      "username": "u", "password": "s3cret"})
    again = await service.save_upstream(owner.owner_id, {"password": MASK, "port": 2525},
                                        up.idsmtp)
    assert (again.password, again.port) == ("s3cret", 2525)
    changed = await service.save_upstream(owner.owner_id, {"password": "new"}, up.idsmtp)
    assert changed.password == "new"

    # The absence of a password is kept too.
    bare = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp})
    assert (await service.save_upstream(owner.owner_id, {"password": MASK},
                                        bare.idsmtp)).password is None


async def test_saving_the_mask_back_keeps_a_domains_password(service: Tenants, store: Store):
    owner, _, _ = await store.create_owner("free")

    def options(password: str | None) -> dict[str, object]:
        return {"host": "smtp.example.com", "port": 465, "secure": True,
                "auth": {"user": "u", "pass": password}}

    async def put(password: str | None, domain: str = "example.com"):
        return await service.put_domain(owner.owner_id, domain, provider="smtp",
                                        description="", from_=None, options=options(password))

    with refused(tenants.MASK_WITHOUT_SECRET) as info:
        await put(MASK)
    assert info.value.field == "options.auth.pass"
    assert await store.get_domain(owner.owner_id, "example.com") is None
    await put("s3cret")
    assert (await put(MASK)).options["auth"] == {"user": "u", "pass": "s3cret"}
    assert (await put("new")).options["auth"]["pass"] == "new"
    await put(None, "example.org")
    assert (await put(MASK, "example.org")).options["auth"]["pass"] is None
    other, _, _ = await store.create_owner("free")
    with refused(tenants.MASK_WITHOUT_SECRET):     # another owner's secret is not kept
        await service.put_domain(other.owner_id, "example.com", provider="smtp",
                                 description="", from_=None, options=options(MASK))


# ---------------------------------------------------------------- removal cascades

async def sent_total(store: Store, name: str) -> int:
    return (await store.usage(name, time.time()))[0]


async def _used_user(store: Store, owner_id: str, idapp: str, *,
                     reserved: bool = False) -> str:
    """An SMTP user with one message sent (and one more reserved)."""
    user, _ = await store.create_user(owner_id, idapp, 100, 100)
    now = time.time()
    await store.reserve(user, f"sent-{user.name}", now)     # holds are named per transaction
    await store.count(user.name, f"sent-{user.name}", now, 1)
    if reserved:
        await store.reserve(user, f"pending-{user.name}", now)
    assert await sent_total(store, user.name) == 1
    return user.name


async def test_removing_an_app_takes_its_users_upstreams_usage_and_metrics(
        service: Tenants, store: Store, forgotten: Forgotten):
    owner, _, default = await store.create_owner("free")
    app = await service.create_app(owner.owner_id, "doomed", "random")
    gone = await _used_user(store, owner.owner_id, app.idapp)
    busy = await _used_user(store, owner.owner_id, app.idapp, reserved=True)
    kept = await _used_user(store, owner.owner_id, default.idapp)
    up = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp})
    other = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": default.idapp})

    await service.remove_app(app.idapp)
    assert store.get_user(gone) is None and store.get_user(busy) is None
    assert store.get_user(kept) is not None
    assert await sent_total(store, gone) == 0
    # A session still holds a reservation: it releases it later, so the
    # store keeps its hold until then.
    assert store.held(busy) == 1
    assert await sent_total(store, kept) == 1
    assert forgotten == [up.idsmtp]
    assert [u.idsmtp for u in await store.list_upstreams(default.idapp)] == [other.idsmtp]


async def test_removing_an_owner_takes_everything_of_it(service: Tenants, store: Store,
                                                        forgotten: Forgotten):
    owner, _, default = await store.create_owner("paid")
    app = await service.create_app(owner.owner_id, "second", "priority")
    users = [await _used_user(store, owner.owner_id, a.idapp) for a in (default, app)]
    ups = [await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": a.idapp})
           for a in (default, app)]
    await service.put_domain(owner.owner_id, "example.com", provider="smtp", description="",
                             from_=None, options={"host": "smtp.example.com"})
    bystander, _, theirs = await store.create_owner("free")
    their_user = await _used_user(store, bystander.owner_id, theirs.idapp)

    await service.remove_owner(owner.owner_id)
    with pytest.raises(NotFound):
        await store.get_owner(owner.owner_id)
    assert await store.list_apps(owner.owner_id) == []
    assert all(store.get_user(u) is None for u in users)
    assert [await sent_total(store, u) for u in users] == [0, 0]
    assert sorted(forgotten) == sorted(u.idsmtp for u in ups)
    assert await store.get_domain(owner.owner_id, "example.com") is None
    assert await sent_total(store, their_user) == 1
    with pytest.raises(NotFound):
        await service.remove_owner(owner.owner_id)
    assert sorted(forgotten) == sorted(u.idsmtp for u in ups), "nothing more forgotten"


async def test_removing_a_user_or_an_upstream_alone(service: Tenants, store: Store,
                                                    forgotten: Forgotten):
    owner, _, app = await store.create_owner("free")
    other, _, _ = await store.create_owner("free")
    name = await _used_user(store, owner.owner_id, app.idapp)
    up = await service.save_upstream(owner.owner_id, {**UPSTREAM, "idapp": app.idapp})

    with pytest.raises(NotFound):
        await service.remove_user(name, other.owner_id)
    with pytest.raises(NotFound):
        await service.remove_upstream(up.idsmtp, other.owner_id)
    assert await sent_total(store, name) == 1 and forgotten == []

    await service.remove_user(name, owner.owner_id)
    assert store.get_user(name) is None and await sent_total(store, name) == 0
    await service.remove_upstream(up.idsmtp, owner.owner_id)
    assert await store.list_upstreams(app.idapp) == [] and forgotten == [up.idsmtp]
