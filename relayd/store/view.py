"""The in-memory view of the records: where every read is served from.

Everything read on the hot path (SMTP users on every MAIL and RCPT; owners,
apps, upstreams and domain settings for routing) and by the admin API comes
from here, never from a second copy. It is exact, not a cache: the process
that holds it is the store's only writer, and every write refreshes the
view before it returns (the users one row at a time, the routing tables
wholesale: admin writes are rare). A backend shared by several processes
will have to invalidate it from outside; that is the one place to change.

Rows are anything indexable by column name (sqlite3.Row, a driver's record).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import NotFound
from ..records import App, DomainSettings, Owner, SmtpUser, Upstream
from ..routing import ErrorBook, FailoverRules
from .credentials import secret_matches

Row = Mapping[str, Any]


def owner_from(r: Row) -> Owner:
    return Owner(r["owner_id"], r["plan"], r["created"])


def app_from(r: Row) -> App:
    return App(r["idapp"], r["owner_id"], r["name"], r["strategy"], r["test_email"], r["created"])


def user_from(r: Row) -> SmtpUser:
    return SmtpUser(r["name"], r["owner_id"], r["idapp"], r["total_limit"],
                    r["hourly_limit"], r["status"], r["created"])


def upstream_from(r: Row) -> Upstream:
    allowed = r["allowed_domains"]
    return Upstream(
        idsmtp=r["idsmtp"], idapp=r["idapp"], priority=r["priority"], host=r["host"],
        port=r["port"], username=r["username"], password=r["password"], auth=bool(r["auth"]),
        startstls=bool(r["startstls"]), ssltls=bool(r["ssltls"]),
        verify_tls=bool(r["verify_tls"]), debug=bool(r["debug"]),
        defaultfromemail=r["defaultfromemail"], defaultfromname=r["defaultfromname"],
        allowed_domains=tuple(json.loads(allowed)) if allowed is not None else None,
        numerrors=r["numerrors"], last_error=r["last_error"], status=r["status"],
        created=r["created"], modified=r["modified"])


# The writable columns of an upstream record, and their values as stored.
UPSTREAM_FIELDS = ("idapp", "priority", "host", "port", "username", "password", "auth",
                   "startstls", "ssltls", "verify_tls", "debug", "defaultfromemail",
                   "defaultfromname", "allowed_domains", "status")


def upstream_columns(fields: dict[str, Any]) -> dict[str, Any]:
    """The inverse of upstream_from for the given fields; ValueError for a
    field that is not a column."""
    unknown = set(fields) - set(UPSTREAM_FIELDS)
    if unknown:
        raise ValueError(f"unknown upstream fields: {sorted(unknown)}")
    out = dict(fields)
    if "allowed_domains" in out and out["allowed_domains"] is not None:
        out["allowed_domains"] = json.dumps(list(out["allowed_domains"]))
    for k in ("auth", "startstls", "ssltls", "verify_tls", "debug"):
        if k in out:
            out[k] = int(bool(out[k]))
    return out


def domain_from(r: Row) -> DomainSettings:
    return DomainSettings(r["id"], r["owner_id"], r["domain"], r["provider"],
                          r["description"], r["from_addr"], json.loads(r["options"]))


class View:
    def __init__(self) -> None:
        self.users: dict[str, tuple[SmtpUser, str]] = {}    # name -> (user, password digest)
        self.owners: dict[str, tuple[Owner, str]] = {}      # owner_id -> (owner, token digest)
        self.apps: dict[str, App] = {}                      # in creation (rowid) order
        self.upstreams: dict[str, Upstream] = {}
        self.app_upstreams: dict[str, list[str]] = {}       # idapp -> idsmtp, in priority order
        self.domains: dict[tuple[str, str], DomainSettings] = {}
        # Upstream health, the one place it is kept (SPEC 3.7): idsmtp ->
        # (numerrors, last error time) for every upstream that has one, own
        # (persisted in their rows too), domain routes and system SMTPs alike.
        self.health = ErrorBook()
        # Bumped by every reload of the routing records: a route decided
        # under an older generation may name records since changed.
        self.generation = 0

    # ------------------------------------------------------------ loading

    def load_users(self, rows: Iterable[Row]) -> None:
        self.users = {r["name"]: (user_from(r), r["password_hash"]) for r in rows}

    def put_user(self, name: str, row: Row | None) -> None:
        if row is None:
            self.users.pop(name, None)
        else:
            self.users[name] = (user_from(row), row["password_hash"])

    def load_routing(self, owners: Iterable[Row], apps: Iterable[Row],
                     upstreams: list[Row], domains: Iterable[Row]) -> None:
        """``apps`` in creation order, ``upstreams`` by priority, created, id."""
        self.owners = {r["owner_id"]: (owner_from(r), r["token_hash"]) for r in owners}
        self.apps = {r["idapp"]: app_from(r) for r in apps}
        self.generation += 1
        stale = set(self.upstreams)
        self.upstreams = {r["idsmtp"]: upstream_from(r) for r in upstreams}
        self.health.forget(stale)
        for r in upstreams:
            reason = r["last_error_reason"] if "last_error_reason" in r.keys() else None
            self.health.set(r["idsmtp"], r["numerrors"], r["last_error"], reason)
        self.app_upstreams = {}
        for r in upstreams:
            self.app_upstreams.setdefault(r["idapp"], []).append(r["idsmtp"])
        self.domains = {(r["owner_id"], r["domain"]): domain_from(r) for r in domains}

    def note_upstream_result(self, idsmtp: str, ok: bool, ts: float,
                             reason: str | None = None) -> bool:
        """Count an error (with its reason) or reset the count; False when
        nothing changed."""
        if ok and not self.health.get(idsmtp)[0]:
            return False
        self.health.record(idsmtp, ok, ts, reason)
        return True

    def with_health(self, u: Upstream) -> Upstream:
        return self.health.apply(u)

    # ------------------------------------------------------------ users

    def get_user(self, name: str) -> SmtpUser | None:
        entry = self.users.get(name)
        return entry[0] if entry else None

    def check_password(self, name: str, password: str) -> SmtpUser | None:
        entry = self.users.get(name)
        ok = secret_matches(password, entry[1] if entry else None)
        return entry[0] if ok and entry else None

    def credential_stamp(self, name: str) -> str | None:
        entry = self.users.get(name)
        return entry[1] if entry else None

    def users_of(self, owner_id: str) -> list[SmtpUser]:
        return sorted((u for u, _ in self.users.values() if u.owner_id == owner_id),
                      key=lambda u: (u.created, u.name))

    # ------------------------------------------------------------ routing records

    def owner(self, owner_id: str) -> Owner:
        entry = self.owners.get(owner_id)
        if entry is None:
            raise NotFound("owner", owner_id)
        return entry[0]

    def check_token(self, owner_id: str, token: str) -> Owner | None:
        entry = self.owners.get(owner_id)
        return entry[0] if secret_matches(token, entry[1] if entry else None) and entry else None

    def all_owners(self) -> list[Owner]:
        return sorted((o for o, _ in self.owners.values()), key=lambda o: (o.created, o.owner_id))

    def app(self, idapp: str, owner_id: str | None = None) -> App:
        app = self.apps.get(idapp)
        if app is None or (owner_id is not None and app.owner_id != owner_id):
            raise NotFound("app", idapp)
        return app

    def apps_of(self, owner_id: str | None) -> list[App]:
        apps = (a for a in self.apps.values() if owner_id is None or a.owner_id == owner_id)
        return sorted(apps, key=lambda a: (a.created, a.idapp))

    def default_app(self, owner_id: str) -> App:
        """The first app created (``created`` has millisecond resolution, so
        creation order decides)."""
        for app in self.apps.values():
            if app.owner_id == owner_id:
                return app
        raise NotFound("app of owner", owner_id)

    def upstream(self, idsmtp: str, owner_id: str | None = None) -> Upstream:
        u = self.upstreams.get(idsmtp)
        app = self.apps.get(u.idapp or "") if u is not None else None
        if u is None or app is None or (owner_id is not None and app.owner_id != owner_id):
            raise NotFound("smtp", idsmtp)
        return self.with_health(u)

    def upstreams_of(self, idapp: str, *, active_only: bool = False) -> list[Upstream]:
        ups = [self.with_health(self.upstreams[i]) for i in self.app_upstreams.get(idapp, ())]
        return [u for u in ups if u.status == "A"] if active_only else ups

    def domain(self, owner_id: str, domain: str) -> DomainSettings | None:
        return self.domains.get((owner_id, domain.lower()))

    def domains_of(self, owner_id: str) -> list[DomainSettings]:
        return sorted((d for (o, _), d in self.domains.items() if o == owner_id),
                      key=lambda d: d.domain)

    def route_view(self, user: SmtpUser, sender_domain: str | None
                   ) -> tuple[Owner, App, DomainSettings | None, list[Upstream]]:
        """Everything routing needs for one message."""
        owner = self.owners.get(user.owner_id)
        app = self.apps.get(user.idapp)
        if owner is None or app is None:
            raise NotFound("owner or app of user", user.name)
        dom = self.domains.get((user.owner_id, sender_domain)) if sender_domain else None
        return owner[0], app, dom, self.upstreams_of(user.idapp, active_only=True)

    def upstream_health(self, now: float, rules: FailoverRules) -> list[dict[str, Any]]:
        """Own upstreams' health (SPEC 4.6); ``last_error_at`` a Unix time."""
        return [{"idsmtp": u.idsmtp, "host": u.host, "port": u.port, "status": u.status,
                 **self.health.health(u, now, rules)}
                for u in sorted(self.upstreams.values(), key=lambda u: u.idsmtp)]

    def domain_route_health(self, now: float, rules: FailoverRules) -> list[dict[str, Any]]:
        """Domain routes' health (SPEC 4.6), by domain and owner."""
        out = []
        for (owner_id, domain), d in sorted(self.domains.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            u = d.as_upstream()
            out.append({"idsmtp": u.idsmtp, "owner_id": owner_id, "domain": domain,
                        "host": u.host, "port": u.port, **self.health.health(u, now, rules)})
        return out

    def upstream_error_counts(self) -> list[tuple[str, int]]:
        """numerrors of every own upstream and of every other one that has
        been tried (domain routes, system SMTPs)."""
        counts = dict.fromkeys(self.upstreams, 0)
        counts.update(self.health.counts())
        return list(counts.items())
