"""The bodies the admin routes answer with, as pydantic models: what
openapi.py documents for each route (endpoints.py's ``Doc.answer`` and
``Family.error``), and what tests/test_schemathesis.py holds relayd's real
answers to. The handlers build their JSON themselves (views.py and the
dialect modules); these models describe it, key for key.

Every model forbids keys it does not name, so that a key a handler adds
without documenting it fails the schema tests instead of going unnoticed.
Times are strings: the seeds' own format in the seed dialects, ISO 8601 UTC
ending in ``Z`` in the operator API (SPEC 4.6).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Masked = Literal["********"]      # tenants.MASK: a stored password is never shown
UserStatus = Literal["Enable", "Disable"]
UpstreamStatus = Literal["A", "D"]
Plan = Literal["free", "paid"]
Strategy = Literal["random", "priority"]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- SendClean (SPEC 4.1)

class SendCleanError(Answer):
    status: Literal["error"]
    code: Literal[-1]
    name: Literal["ValidationError", "AuthenticationError", "GeneralError"]
    message: str


class UserCreated(Answer):
    status: Literal["success"]
    message: Literal["SMTP User Created"]
    smtp_user_name: str
    smtp_password: str


class PasswordReset(Answer):
    status: Literal["success"]
    message: Literal["password reseted"]
    smtp_user_name: str
    smtp_password: str


class UserChanged(Answer):
    status: Literal["success"]
    message: Literal["SMTP User Updated", "SMTP User Deleted"]


class SmtpUserRow(Answer):
    smtp_user_name: str
    status: UserStatus
    total_limit: int
    hourly_limit: int
    idapp: str
    sent_total: int
    sent_last_hour: int


class SmtpList(Answer):
    status: Literal["success"]
    smtp_list: list[SmtpUserRow]


# ---------------------------------------------------------------- upstream SMTPs (SPEC 4.2)

class SmtpsError(Answer):
    """``code``: the HTTP status, or for a 406 the seed's specific error
    (1 SMTP not found, 2 App not found, 3 priority needs the paid plan,
    4 the app has no test_email, 5 the check failed)."""

    code: int
    message: str


class UpstreamRecord(Answer):
    id_: str = Field(alias="_id")
    idapp: str | None
    priority: int
    host: str
    port: int
    username: str | None
    password: Masked
    auth: bool
    startstls: bool
    sslTls: bool
    debug: bool
    defaultfromemail: str | None
    defaultfromname: str | None
    numerrors: int
    created: str
    modified: str
    status: UpstreamStatus
    verify_tls: bool
    allowed_domains: list[str] | None


# ---------------------------------------------------------------- domain settings (SPEC 4.3)

class WebitelError(Answer):
    status: Literal["error"]
    info: str


class TlsShown(Answer):
    rejectUnauthorized: bool


class AuthShown(Answer):
    user: str | None
    pass_: Masked = Field(alias="pass")


class OptionsShown(Answer):
    host: str
    port: int
    secure: bool
    debug: bool
    tls: TlsShown
    auth: AuthShown | None = None     # absent when the settings have no credentials


class DomainRecord(Answer):
    id_: str = Field(alias="_id")
    provider: Literal["smtp"]
    description: str
    from_: str | None = Field(alias="from")
    options: OptionsShown
    domain: str


class DomainRemoved(Answer):
    status: Literal["OK"]
    Info: str


# ---------------------------------------------------------------- operator API (SPEC 4.4, 4.6)

class OperatorError(Answer):
    status: Literal["error"]
    message: str
    code: int | None = None           # a plan rule's code (upstreams.REFUSED), when one applies


class OwnerRecord(Answer):
    owner_id: str
    plan: Plan
    created: str
    idapp: str | None                 # the default app
    apps: int


class OwnerCreated(Answer):
    owner_id: str
    token: str                        # shown here only, once
    plan: Plan
    idapp: str


class OwnerRemoved(Answer):
    owner_id: str
    removed: Literal[True]


class AppRecord(Answer):
    idapp: str
    owner_id: str
    name: str
    strategy: Strategy
    test_email: str | None
    created: str


class AppRemoved(Answer):
    idapp: str
    removed: Literal[True]


class UserLookup(Answer):
    smtp_user_name: str
    owner_id: str
    idapp: str
    status: UserStatus
    total_limit: int
    hourly_limit: int
    created: str


class SmtpLookup(UpstreamRecord):
    owner_id: str


class LockoutRow(Answer):
    ip: str
    failures: int
    locked_until: str


class LockoutCleared(Answer):
    ip: str
    cleared: Literal[True]


class Health(Answer):
    numerrors: int
    last_error_at: str | None
    last_error: str | None            # the reason, worded as in SPEC 3.18
    cooling_down: bool


class UpstreamHealth(Health):
    idsmtp: str
    host: str
    port: int
    status: UpstreamStatus


class SystemHealth(Health):
    idsmtp: str
    host: str
    port: int


class DomainRouteHealth(SystemHealth):
    owner_id: str
    domain: str


class SmtpListener(Answer):
    kind: Literal["smtp"]
    address: str
    port: int
    tls: Literal["none", "starttls", "implicit"]
    serving: bool


class AdminListener(Answer):
    kind: Literal["admin"]
    socket: str


class TcpListener(Answer):
    kind: Literal["admin_tcp", "metrics"]
    address: str
    port: int


class InstanceInfo(Answer):
    """One relayd process sharing the store."""

    id: str
    hostname: str
    pid: int
    started: str
    last_seen: str


class Status(Answer):
    version: str
    hostname: str
    config_generation: int
    started: str
    uptime: int
    draining: bool
    sessions: int
    listeners: list[Union[SmtpListener, AdminListener, TcpListener]]
    upstreams: list[UpstreamHealth]
    system_smtps: list[SystemHealth]
    domain_routes: list[DomainRouteHealth]
    instances: list[InstanceInfo] | None = None
