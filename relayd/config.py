"""The configuration schema: every key, its default and its bounds, in one place.

relayd reads one YAML file. Loading is strict (chasquid's rule, not hypercorn's):
an unknown key or a value of the wrong type is an error that names its YAML
path and quotes the value, e.g. ``limits.bogus_key: unknown key``. The same
loader serves start-up, ``--check`` and SIGHUP, so the three can never disagree.

Durations are numbers of seconds; addresses are ``"host:port"`` strings
(``"[::1]:587"`` for IPv6).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import dsn
from .errors import ConfigError, RecordError
from .yamlconf import format_errors, read_yaml, yaml_type
from .tenants import check_upstream

DEFAULT_PATH = "/etc/relayd/relayd.yaml"
ENV_VAR = "RELAYD_CONFIG"

PositiveInt = Annotated[int, Field(gt=0, lt=2**63)]
Seconds = Annotated[float, Field(gt=0)]


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` / ``"[v6]:port"``; raise ValueError with a reason."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if not m:
        raise ValueError(f'expected "host:port", got {value!r}')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


HostPort = Annotated[str, Field(description='"host:port"')]


class Strict(BaseModel):
    # strict: YAML "587" is not a port, "yes" is not silently a bool.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_hostport(value: str | None) -> str | None:
    if value is not None:
        parse_hostport(value)
    return value


class Listener(Strict):
    address: HostPort
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    auth_require_tls: bool = True
    # Behind a load balancer (SPEC 8): a PROXY protocol header (v1 or v2)
    # from a trusted_proxies address opens every connection; SO_REUSEPORT
    # lets several relayd processes on one host share the address.
    proxy_protocol: bool = False
    reuse_port: bool = False

    _addr = field_validator("address")(_check_hostport)

    @property
    def host(self) -> str:
        return parse_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.address)[1]

    @model_validator(mode="after")
    def _plain_auth_only_on_loopback(self) -> Listener:
        # SPEC 3.1: AUTH without TLS is allowed only on loopback listeners.
        if not self.auth_require_tls and self.tls != "implicit" and not is_loopback(self.host):
            raise ValueError(
                "auth_require_tls: false is only allowed on a loopback address "
                f"(got {self.address!r}); passwords would cross the network in clear"
            )
        return self


class TLSFiles(Strict):
    cert: str
    key: str


class Admin(Strict):
    socket: str = "./relayd-data/admin.sock"
    mode: str = "0660"
    listen: HostPort | None = None

    _addr = field_validator("listen")(_check_hostport)

    @field_validator("mode")
    @classmethod
    def _octal(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f'expected an octal mode string like "0660", got {v!r}')
        return v

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class Metrics(Strict):
    listen: HostPort | None = "127.0.0.1:9587"

    _addr = field_validator("listen")(_check_hostport)


class Limits(Strict):
    max_message_size: PositiveInt = 26_214_400     # 25 MiB, as most providers
    max_recipients: PositiveInt = 100              # RFC 5321 4.5.3.1.8 minimum
    # Abuse bounds (Postfix has the same knobs; see README "SMTP behaviour").
    max_sessions: PositiveInt = 1000               # concurrent SMTP sessions
    max_sessions_per_ip: PositiveInt = 50          # concurrent sessions per client IP
    max_errors: PositiveInt = 20                   # like smtpd_hard_error_limit
    # Longest command line or AUTH answer buffered, CRLF included (RFC 5321
    # 4.5.3.1.6: 1000 octets per text line; 512 per command line).
    max_line_length: Annotated[int, Field(ge=512, le=65536)] = 1001


class AuthFailures(Strict):
    max: PositiveInt = 5
    window: Seconds = 600


# RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to its final
# dot. A delivery that runs longer is answered to nobody, and the client
# sends the message again: a duplicate once the first attempt succeeds.
CLIENT_DATA_PATIENCE = 600


class Failover(Strict):
    max_errors: PositiveInt = 5
    cooldown: Annotated[float, Field(ge=0)] = 300
    max_attempts: PositiveInt = 3
    deadline: Seconds = 60          # bounds a whole delivery, all attempts together

    @field_validator("deadline")
    @classmethod
    def _within_client_patience(cls, v: float) -> float:
        if v >= CLIENT_DATA_PATIENCE:
            raise ValueError(
                f"must be below {CLIENT_DATA_PATIENCE} s: clients stop waiting for the "
                "reply to DATA after 10 minutes (RFC 5321 4.5.3.2.6) and send the "
                "message again")
        return v


class Timeouts(Strict):
    connect: Seconds = 10     # upstream TCP connect + TLS + greeting
    command: Seconds = 30     # each upstream reply
    session: Seconds = 300    # idle client (RFC 5321 4.5.3.2.7 says 5 minutes)
    data: Seconds = 600       # a whole DATA phase, however slowly the client sends
    tls_handshake: Seconds = 10  # a client's TLS handshake, implicit or after STARTTLS (SPEC 9)
    proxy: Seconds = 5        # the PROXY header on a proxy_protocol listener (SPEC 8)


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected an IP address or a CIDR network such as 10.0.0.0/8") from None
    return value


Network = Annotated[str, AfterValidator(_check_network)]


def _no_crlf(v: str | None) -> str | None:
    if v is not None and ("\r" in v or "\n" in v or "\0" in v):
        raise ValueError("must not contain CR, LF or NUL")
    return v


class UpstreamSpec(Strict):
    """An upstream SMTP server: the fields of SPEC 2, as YAML spells them."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    username: str | None = None
    password: str | None = None
    auth: bool = False
    startstls: bool = False
    ssltls: bool = False
    verify_tls: bool = True
    debug: bool = False
    priority: Annotated[int, Field(ge=0, lt=2**63)] = 10
    defaultfromemail: str | None = None
    defaultfromname: str | None = None
    allowed_domains: list[str] | None = None

    _crlf = field_validator(
        "host", "username", "password", "defaultfromemail", "defaultfromname"
    )(_no_crlf)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _one_tls_mode(self) -> UpstreamSpec:
        try:
            check_upstream(self.model_dump())     # the admin dialects' rules too
        except RecordError as exc:
            raise ValueError(exc.message) from None
        return self


class Config(Strict):
    listen: list[Listener] = Field(
        default_factory=lambda: [
            Listener(address="127.0.0.1:2587", tls="none", auth_require_tls=False)
        ],
        min_length=1,
    )
    tls: TLSFiles | None = None
    hostname: str | None = None   # EHLO/banner name; default: this machine's name
    state_dir: str = "./relayd-data"
    database: str | None = None
    admin: Admin = Field(default_factory=Admin)
    metrics: Metrics = Field(default_factory=Metrics)
    limits: Limits = Field(default_factory=Limits)
    auth_failures: AuthFailures = Field(default_factory=AuthFailures)
    # Who may send a PROXY header to a proxy_protocol listener (SPEC 8).
    trusted_proxies: list[Network] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    failover: Failover = Field(default_factory=Failover)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    drain_timeout: Annotated[float, Field(ge=0)] = 30
    system_smtps: list[UpstreamSpec] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The Received: field prepended to each relayed message (SPEC 3.16,
    # RFC 5321 4.4; built by trace.py).
    received_header: Literal["full", "hide_client", "off"] = "full"

    _crlf = field_validator("hostname")(_no_crlf)

    @field_validator("database")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        return None if v is None else dsn.check_database(v)

    @field_validator("received_header", mode="before")
    @classmethod
    def _quoted_off(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted off (or no) as false: say so rather
        # than only that false is not one of the choices.
        if v is False:
            raise ValueError('write "off" in quotes: unquoted off is YAML\'s false (got false)')
        return v

    @property
    def database_dsn(self) -> str | None:
        """The PostgreSQL DSN when ``database`` is one (SPEC 8), else None."""
        return self.database if self.database and dsn.is_dsn(self.database) else None

    @property
    def database_path(self) -> Path:
        """The SQLite file (when ``database`` is not a DSN)."""
        return Path(self.database) if self.database else Path(self.state_dir) / "relayd.db"


# --------------------------------------------------------------------------
# Loading


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, got {yaml_type(data)}"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(exc)) from None
    problems = cross_checks(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def cross_checks(cfg: Config) -> list[str]:
    """Rules between keys, reported at the path an operator must edit."""
    problems = []
    needs_tls = [f"listen[{i}] uses tls: {lst.tls}" for i, lst in enumerate(cfg.listen)
                 if lst.tls != "none"]
    if needs_tls and cfg.tls is None:
        problems.append(f"tls: required because {needs_tls[0]} (add tls.cert and tls.key)")
    seen: dict[tuple[str, int], int] = {}
    for i, lst in enumerate(cfg.listen):
        key = (lst.host, lst.port)
        if lst.port != 0 and key in seen:
            problems.append(f"listen[{i}].address: {lst.address!r} is already used by "
                            f"listen[{seen[key]}]")
        seen.setdefault(key, i)
    return problems


def load_file(path: str | os.PathLike[str]) -> Config:
    path = str(path)
    data = read_yaml(path)
    cfg = parse(data, path)
    check_files(cfg, path)
    return cfg


def check_files(cfg: Config, source: str) -> None:
    """What the schema cannot see: do the TLS files load? (like ``nginx -t``)."""
    if cfg.tls is None:
        return
    problems = []
    for key, marker, what in (("cert", b"-----BEGIN CERTIFICATE-----", "certificate"),
                              ("key", b"PRIVATE KEY-----", "private key")):
        path = getattr(cfg.tls, key)
        try:
            with open(path, "rb") as f:
                pem = f.read(1 << 20)
        except OSError as exc:
            problems.append(f"tls.{key}: cannot read {path!r}: {exc.strerror}")
            continue
        if marker not in pem:
            problems.append(f"tls.{key}: {path!r} holds no PEM {what}")
    if not problems:
        try:
            server_tls_context(cfg.tls)
        except ssl.SSLError:
            problems.append("tls: the private key does not match the certificate, "
                            "or a PEM block is damaged")
    if problems:
        raise ConfigError(source, problems)


def embedded_default() -> Config:
    return parse(yaml.safe_load(resources.files("relayd").joinpath("default.yaml").read_text()),
                 "<embedded default>")


@dataclass(frozen=True)
class Source:
    path: str | None  # None: the embedded default

    def load(self) -> Config:
        return load_file(self.path) if self.path else embedded_default()

    def __str__(self) -> str:
        return self.path or "<embedded default>"


def locate(cli_path: str | None) -> Source:
    """SPEC 1: -c, else $RELAYD_CONFIG, else /etc/relayd/relayd.yaml, else embedded."""
    if cli_path:
        return Source(cli_path)
    if os.environ.get(ENV_VAR):
        return Source(os.environ[ENV_VAR])
    if os.path.exists(DEFAULT_PATH):
        return Source(DEFAULT_PATH)
    return Source(None)


def server_tls_context(files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"limits": {"max_recipients": 100}} -> {"limits.max_recipients": 100}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and isinstance(data[0], dict):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def effective(cfg: Config) -> dict[str, Any]:
    """The running config as a dict with secrets masked, for the start-up log."""
    data = cfg.model_dump(mode="json")
    data["database"] = dsn.masked(data["database"])
    for s in data.get("system_smtps", []):
        if s.get("password"):
            s["password"] = "********"
    return data
