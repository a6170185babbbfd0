"""An asyncio HTTP/1.1 client for the admin socket (Unix or TCP), built on h11,
plus raw-bytes helpers for hostile-input tests, small record helpers the
admin test files share, and a scraper for the metrics listener."""

from __future__ import annotations

import asyncio
import json as jsonlib
import urllib.parse
from dataclasses import dataclass
from typing import Any

import h11
from prometheus_client.parser import text_string_to_metric_families

from relayd.daemon import Relay


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class AdminClient:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, path: str | None = None, *, host: str | None = None,
                 port: int | None = None):
        self.path, self.host, self.port = path, host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn: h11.Connection | None = None

    async def _connect(self) -> None:
        if self.path:
            self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        else:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.conn = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.writer = self.reader = self.conn = None

    async def request(self, method: str, target: str, *, json: Any = None,
                      form: dict[str, Any] | None = None, body: bytes | None = None,
                      query: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        if self.conn is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            await self._connect()
        assert self.conn is not None and self.writer is not None and self.reader is not None
        hdrs = {"Host": "relayd"}
        if query:
            target += "?" + urllib.parse.urlencode(query)
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs["Content-Type"] = "application/json"
        elif form is not None:
            body = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        body = body or b""
        hdrs["Content-Length"] = str(len(body))
        hdrs.update(headers or {})
        out = self.conn.send(h11.Request(method=method, target=target,
                                         headers=list(hdrs.items())))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.writer.write(out)
        await self.writer.drain()
        status, rheaders, rbody = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 30))
            elif isinstance(event, h11.Response):
                status = event.status_code
                rheaders = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                rbody += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            await self.close()
        return Reply(status, rheaders, bytes(rbody))

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def unix_client(relay: Relay) -> AdminClient:
    return AdminClient(relay.config.admin.socket)


async def raw_exchange(relay: Relay, data: bytes | list[bytes], *, timeout: float = 10,
                       half_close: bool = False, tcp_port: int | None = None) -> bytes:
    """Send raw bytes to the admin socket, return everything read until the
    server closes (or ``timeout``)."""
    if tcp_port is not None:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    else:
        reader, writer = await asyncio.open_unix_connection(relay.config.admin.socket)
    try:
        for chunk in data if isinstance(data, list) else [data]:
            writer.write(chunk)
            await writer.drain()
        if half_close:
            writer.write_eof()
        out = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return bytes(out)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    """The status code of the first response in raw bytes (0 when none)."""
    if not raw.startswith(b"HTTP/1.1 "):
        return 0
    return int(raw[9:12])


# ------------------------------------------------------------ records via the API

@dataclass
class Owner:
    owner_id: str
    token: str
    idapp: str
    plan: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Key": self.owner_id, "X-Access-Token": self.token}

    @property
    def creds(self) -> dict[str, str]:
        return {"owner_id": self.owner_id, "token": self.token}


async def new_owner(client: AdminClient, plan: str = "free") -> Owner:
    r = await client.request("POST", "/admin/owners", json={"plan": plan})
    assert r.status == 201, r.body
    d = r.json()
    return Owner(d["owner_id"], d["token"], d["idapp"], d["plan"])


# ------------------------------------------------------------ records through the API

async def new_app(client: AdminClient, owner: Owner, *, strategy: str = "random",
                  test_email: str | None = None, name: str = "app") -> str:
    body: dict[str, Any] = {"owner_id": owner.owner_id, "name": name, "strategy": strategy}
    if test_email:
        body["test_email"] = test_email
    r = await client.request("POST", "/admin/apps", json=body)
    assert r.status == 201, r.body
    return str(r.json()["idapp"])


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET over TCP on 127.0.0.1 (the metrics listener): (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """Every sample of the metrics listener's /metrics, by (name, labels)."""
    status, body = await http_get(port, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How far one sample moved between two scrapes. Counters live in one
    process-wide registry (every in-process relay of the test run adds to
    them), so tests assert deltas, never absolute values."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)
