"""The records of SPEC section 2 as plain dataclasses.

The store returns these; policy, routing and the admin dialects consume them.
No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLANS = ("free", "paid")
STRATEGIES = ("random", "priority")
USER_STATUSES = ("Enable", "Disable")
UPSTREAM_STATUSES = ("A", "D")


def domain_of(address: str | None) -> str | None:
    """The lower-cased domain of ``local@domain``, or None."""
    if not address or "@" not in address:
        return None
    return address.rpartition("@")[2].strip().lower().rstrip(".") or None


@dataclass(frozen=True, slots=True)
class Owner:
    owner_id: str
    plan: str
    created: str


@dataclass(frozen=True, slots=True)
class App:
    idapp: str
    owner_id: str
    name: str
    strategy: str
    test_email: str | None
    created: str


@dataclass(frozen=True, slots=True)
class SmtpUser:
    name: str
    owner_id: str
    idapp: str
    total_limit: int
    hourly_limit: int
    status: str
    created: str

    @property
    def enabled(self) -> bool:
        return self.status == "Enable"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream SMTP server: an app's own (``idsmtp`` 24 hex), a system one
    (``system:<n>``) or a domain-settings route (``domain:<domain>``)."""

    idsmtp: str
    host: str
    port: int
    idapp: str | None = None
    priority: int = 10
    username: str | None = None
    password: str | None = None
    auth: bool = False
    # True: STARTTLS required; False: plain; None: STARTTLS when offered
    # (only domain routes, whose nodemailer-style `secure: false` means that).
    startstls: bool | None = False
    ssltls: bool = False
    verify_tls: bool = True
    debug: bool = False
    defaultfromemail: str | None = None
    defaultfromname: str | None = None
    allowed_domains: tuple[str, ...] | None = None
    numerrors: int = 0
    last_error: float | None = None
    status: str = "A"
    created: str = ""
    modified: str = ""

    @property
    def effective_allowed_domains(self) -> frozenset[str]:
        """SPEC 2: by default the domains of defaultfromemail and of username
        when it is an address."""
        if self.allowed_domains is not None:
            return frozenset(d.lower().rstrip(".") for d in self.allowed_domains)
        return frozenset(
            d for d in (domain_of(self.defaultfromemail), domain_of(self.username)) if d
        )

    @property
    def label(self) -> str:
        return self.idsmtp


@dataclass(frozen=True, slots=True)
class DomainSettings:
    """Webitel-style per-domain settings (seed 004); ``options`` as given."""

    id: str
    owner_id: str
    domain: str
    provider: str
    description: str
    from_: str | None
    options: dict[str, Any] = field(default_factory=dict)

    def as_upstream(self) -> Upstream:
        opts = self.options
        auth = opts.get("auth") or {}
        tls = opts.get("tls") or {}
        secure = bool(opts.get("secure", False))
        return Upstream(
            idsmtp=f"domain:{self.domain}",
            host=opts.get("host", ""),
            port=int(opts.get("port", 465 if secure else 587)),
            username=auth.get("user"),
            password=auth.get("pass"),
            auth=bool(auth.get("user")),
            ssltls=secure,
            startstls=None if not secure else False,
            verify_tls=bool(tls.get("rejectUnauthorized", True)),
            debug=bool(opts.get("debug", False)),
            defaultfromemail=self.from_,
            allowed_domains=(self.domain,) + ((domain_of(self.from_),) if domain_of(self.from_) else ()),
        )
