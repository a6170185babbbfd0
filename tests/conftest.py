"""Shared fixtures: real servers on loopback port 0, never fixed ports.

* ``sink_factory`` starts recording aiosmtpd upstreams whose behaviour is set
  per sink (accept, 451, 550, hang, require AUTH, STARTTLS, implicit TLS).
* ``relay_factory`` starts relayd in-process (the real Relay, listeners,
  store and admin socket) on a temporary state dir.
* ``provision`` creates owner/app/user/upstream records through the store
  (helpers_records.py, shared with the subprocess tests).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from helpers_records import Tenant, create_tenant
from helpers_upstream import KeywordUpstream, KeywordProtocol
from relayd import config as config_mod
from relayd import maillog
from relayd.daemon import Relay
from relayd.store import RecordStore, Store, store_for

from admin_client import AdminClient, Owner, new_owner, unix_client

pytest_plugins = ["pg_fixtures"]

maillog.setup("debug")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """asyncio's event loop for every test, plus uvloop -- relayd's loop in
    production (cli.py) -- for tests marked
    ``pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])``. The two
    order events differently: uvloop delivers a new connection's first read
    (its EOF, say) before any task has run, asyncio never does."""
    marker = item.get_closest_marker("asyncio")
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    if marker is not None and "uvloop" in (marker.kwargs.get("loop_factories") or ()):
        import uvloop
        factories["uvloop"] = uvloop.new_event_loop
    return factories


# ---------------------------------------------------------------- TLS material

@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(cert, key) paths for 'localhost'/127.0.0.1, signed by ``ca``."""
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def server_ssl(tls_files: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.fixture(scope="session")
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# ---------------------------------------------------------------- upstream sinks

@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth: str | None = None
    tls: bool = False


@dataclass
class Sink:
    """A recording upstream. ``mode``: accept | tempfail | permfail |
    rcpt_tempfail | rcpt_permfail | rcpt_hang | hang (after the whole
    message). Change it at any time."""

    mode: str = "accept"
    username: str | None = None
    password: str | None = None
    messages: list[Received] = field(default_factory=list)
    port: int = 0
    server: asyncio.AbstractServer | None = None
    connections: int = 0          # TCP connections (relayd pools and reuses them)
    transactions: int = 0         # MAIL commands: one per delivery attempt
    resets: int = 0               # RSET commands
    protocols: list[SMTP] = field(default_factory=list)
    hang_event: asyncio.Event = field(default_factory=asyncio.Event)

    def drop_connections(self) -> None:
        """Close every open connection from the server side, as an upstream
        does to idle clients."""
        for p in self.protocols:
            if p.transport is not None:
                p.transport.close()

    @property
    def open_connections(self) -> int:
        return sum(1 for p in self.protocols if p.transport is not None)

    def make_stale(self) -> None:
        """Every open connection answers its next RSET with 421 and closes,
        as a restarted upstream's idle connections do, yet stays open until
        then (so relayd's pool cannot see it coming)."""
        for p in self.protocols:
            p.stale = True  # type: ignore[attr-defined]

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.resets += 1
        if getattr(server, "stale", False):
            server.loop.call_soon(server.transport.close)
            return "421 4.4.2 sink.test closing idle connection"
        return "250 OK"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self.transactions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.mode == "rcpt_hang":
            await self.hang_event.wait()
        if self.mode == "rcpt_tempfail":
            return "450 4.2.0 Mailbox busy"
        if self.mode == "rcpt_permfail":
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.mode == "hang":
            await self.hang_event.wait()
        if self.mode == "tempfail":
            return "451 4.3.0 Sink is having a bad day"
        if self.mode == "permfail":
            return "550 5.7.1 Sink refuses this message"
        auth = session.auth_data
        self.messages.append(Received(
            envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
            auth=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            # session.ssl is set only by STARTTLS; implicit TLS shows on the transport
            tls=session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None))
        return "250 2.0.0 Ok: sunk"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login.decode() == self.username
              and auth_data.password.decode() == self.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@pytest.fixture
async def sink_factory(server_ssl: ssl.SSLContext) -> AsyncIterator[Callable[..., Any]]:
    sinks: list[Sink] = []

    async def make(mode: str = "accept", *, tls: str = "none", username: str | None = None,
                   password: str | None = None, require_starttls: bool = True) -> Sink:
        """tls: none | starttls | implicit. A starttls sink refuses mail
        before STARTTLS unless ``require_starttls=False`` (it then offers
        STARTTLS and takes plain sessions too). With username, AUTH is
        required."""
        sink = Sink(mode=mode, username=username, password=password)
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            sink.connections += 1
            protocol = SMTP(sink, hostname="sink.test", data_size_limit=None,
                            tls_context=server_ssl if tls == "starttls" else None,
                            require_starttls=tls == "starttls" and require_starttls,
                            authenticator=sink.authenticate if username else None,
                            auth_required=bool(username),
                            auth_require_tls=False, loop=loop)
            sink.protocols.append(protocol)
            return protocol

        sink.server = await loop.create_server(
            factory, "127.0.0.1", 0, ssl=server_ssl if tls == "implicit" else None)
        sink.port = sink.server.sockets[0].getsockname()[1]
        sinks.append(sink)
        return sink

    yield make
    for s in sinks:
        s.hang_event.set()
        assert s.server is not None
        s.server.close()


@pytest.fixture
async def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


# ---------------------------------------------------------------- relayd

def base_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0", "tls": "none", "auth_require_tls": False}],
        "hostname": "relay.test",
        "state_dir": str(tmp_path / "state"),
        "admin": {"socket": str(tmp_path / "state" / "admin.sock"), "mode": "0660"},
        "metrics": {"listen": "127.0.0.1:0"},
        "timeouts": {"connect": 5, "command": 5, "session": 30},
        "failover": {"deadline": 20},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives, once per backend: an SQLite file, or a fresh
    database of the throw-away PostgreSQL cluster (pg_fixtures.py)."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "relayd.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
async def store(database: str) -> AsyncIterator[RecordStore]:
    """A real, open store on each backend in turn (no relayd around it):
    every store behaviour is proven on both."""
    s = store_for(database)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real, open SQLite store, for what only the embedded backend has."""
    s = Store(tmp_path / "state" / "relayd.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def relay_factory(tmp_path: Path, request: pytest.FixtureRequest
                        ) -> AsyncIterator[Callable[..., Any]]:
    """make(**config overrides) -> a started in-process Relay. With
    RELAYD_TEST_BACKEND=postgresql in the environment every relay without a
    ``database`` of its own runs on a fresh PostgreSQL database: the whole
    SMTP suite on the shared backend."""
    relays: list[Relay] = []
    shared = (request.getfixturevalue("pg_dsn")
              if os.environ.get("RELAYD_TEST_BACKEND") == "postgresql" else None)

    async def make(**overrides: Any) -> Relay:
        if shared is not None and "database" not in overrides:
            overrides["database"] = shared
        cfg = config_mod.parse(base_config(tmp_path, **overrides))
        relay = Relay(cfg)
        await relay.start()
        relays.append(relay)
        return relay

    yield make
    for r in relays:
        if not r.stopped.is_set():
            await r.close()


@pytest.fixture
async def relay(relay_factory: Callable[..., Any]) -> Relay:
    return await relay_factory()


@pytest.fixture
def provision() -> Callable[..., Any]:
    """provision(relay, plan=, strategy=, total=, hourly=, upstreams=[dict...])
    -> Tenant, through the relay's store (helpers_records.create_tenant; a
    subprocess relayd gets the same from helpers_records.provision_db).
    Each upstream dict holds store fields; ``idapp`` is filled in."""

    async def make(relay: Relay, **kwargs: Any) -> Tenant:
        return await create_tenant(relay.store, **kwargs)

    return make


def sink_upstream(sink: Sink, **fields: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": sink.port, **fields}


async def smtp_client(relay: Relay, tenant: Tenant | None = None, *,
                      port_index: int = 0, **kwargs: Any) -> aiosmtplib.SMTP:
    """A connected (and, given a tenant, authenticated) client."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[port_index],
                             local_hostname="client.test", start_tls=False, timeout=30,
                             **kwargs)
    await client.connect()
    if tenant is not None:
        await client.login(tenant.user, tenant.password)
    return client


def simple_message(sender: str = "app@example.com", to: str = "rcpt@example.net",
                   subject: str = "hello", body: str = "Hello.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <m1@example.com>\r\n\r\n{body}").encode()


# ---------------------------------------------------------------- admin API clients

@pytest.fixture
async def admin(relay: Relay) -> Any:
    """A keep-alive client on the Unix admin socket."""
    async with unix_client(relay) as client:
        yield client


@pytest.fixture
async def owner(admin: AdminClient) -> Owner:
    return await new_owner(admin)


@pytest.fixture
async def other(admin: AdminClient) -> Owner:
    """A second owner, for tenant isolation."""
    return await new_owner(admin)


@pytest.fixture
async def upstream():
    """upstream(keywords, **script) -> a started KeywordUpstream on loopback."""
    servers: list[asyncio.AbstractServer] = []

    async def make(keywords: list[str], **script: Any) -> KeywordUpstream:
        up = KeywordUpstream(list(keywords), **script)
        server = await asyncio.get_running_loop().create_server(
            lambda: KeywordProtocol(up), "127.0.0.1", 0)
        servers.append(server)
        up.port = server.sockets[0].getsockname()[1]
        return up

    yield make
    for s in servers:
        s.close()
