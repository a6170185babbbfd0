"""relayctl (SPEC 4.4) run as a subprocess against an in-process relayd.

The relay's event loop must keep serving while relayctl runs, hence
asyncio.create_subprocess_exec rather than subprocess.run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


async def relayctl(relay, *args: str, stdin: str | None = None, socket: bool = True,
                   env: dict[str, str] | None = None) -> Run:
    argv = [sys.executable, "-m", "relayd.ctl"]
    if socket:
        argv += ["--socket", relay.config.admin.socket]
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), 60)
    return Run(proc.returncode, out.decode(), err.decode())


async def ok(relay, *args: str, **kw: Any) -> Any:
    run = await relayctl(relay, "--json", *args, **kw)
    assert run.rc == 0, run.err
    return run.json


async def refused(relay, *args: str) -> str:
    run = await relayctl(relay, *args)
    assert run.rc == 1, (run.out, run.err)
    assert run.out == ""
    return run.err


async def test_owner_commands(relay):
    owner = await ok(relay, "owner", "add", "--plan", "paid")
    assert set(owner) == {"owner_id", "token", "plan", "idapp"}
    assert owner["plan"] == "paid"
    assert await relay.store.authenticate_owner(owner["owner_id"], owner["token"]) is not None

    listed = await ok(relay, "owner", "list")
    assert [o["owner_id"] for o in listed] == [owner["owner_id"]]
    assert all("token" not in o for o in listed)
    table = await relayctl(relay, "owner", "list")
    assert table.rc == 0 and owner["owner_id"] in table.out and owner["token"] not in table.out
    assert table.out.startswith("OWNER_ID")

    assert (await ok(relay, "owner", "set-plan", owner["owner_id"], "free"))["plan"] == "free"
    assert (await ok(relay, "owner", "get", owner["owner_id"]))["plan"] == "free"
    assert await ok(relay, "owner", "remove", owner["owner_id"]) == {
        "owner_id": owner["owner_id"], "removed": True}
    assert "owner not found" in await refused(relay, "owner", "remove", owner["owner_id"])


async def test_app_commands_and_plan_refusal(relay):
    free = await ok(relay, "owner", "add", "--plan", "free")
    err = await refused(relay, "app", "add", "--owner", free["owner_id"], "--name", "x",
                        "--strategy", "priority")
    assert "paid plan" in err
    app = await ok(relay, "app", "add", "--owner", free["owner_id"], "--name", "shop",
                   "--strategy", "random", "--test-email", "qa@example.com")
    assert (app["owner_id"], app["name"], app["strategy"], app["test_email"]) == (
        free["owner_id"], "shop", "random", "qa@example.com")
    assert len(app["idapp"]) == 24
    assert "paid plan" in await refused(relay, "app", "edit", app["idapp"],
                                        "--strategy", "priority")
    apps = await ok(relay, "app", "list", "--owner", free["owner_id"])
    assert [a["idapp"] for a in apps] == [free["idapp"], app["idapp"]]
    edited = await ok(relay, "app", "edit", app["idapp"], "--test-email", "ops@example.com")
    assert edited["test_email"] == "ops@example.com"
    assert "not a valid e-mail" in await refused(relay, "app", "edit", app["idapp"],
                                                 "--test-email", "nope")
    await ok(relay, "owner", "set-plan", free["owner_id"], "paid")
    assert (await ok(relay, "app", "edit", app["idapp"], "--strategy",
                     "priority"))["strategy"] == "priority"
    assert "random strategy first" in await refused(relay, "owner", "set-plan",
                                                    free["owner_id"], "free")
    assert (await ok(relay, "app", "remove", app["idapp"]))["removed"] is True
    assert len(await ok(relay, "app", "list")) == 1


async def test_user_commands(relay):
    owner = await ok(relay, "owner", "add")
    added = await ok(relay, "user", "add", "--owner", owner["owner_id"], "--total-limit", "50",
                     "--hourly-limit", "5")
    name, password = added["smtp_user_name"], added["smtp_password"]
    assert relay.store.check_password(name, password) is not None
    users = await ok(relay, "user", "list", "--owner", owner["owner_id"])
    assert users == [{"smtp_user_name": name, "status": "Enable", "total_limit": 50,
                      "hourly_limit": 5, "idapp": owner["idapp"], "sent_total": 0,
                      "sent_last_hour": 0}]
    await ok(relay, "user", "edit", name, "--status", "Disable", "--hourly-limit", "7")
    user = relay.store.get_user(name)
    assert (user.status, user.hourly_limit, user.total_limit) == ("Disable", 7, 50)
    reset = await ok(relay, "user", "reset-password", name)
    assert relay.store.check_password(name, password) is None
    assert relay.store.check_password(name, reset["smtp_password"]) is not None
    human = await relayctl(relay, "user", "list", "--app", owner["idapp"])
    assert human.rc == 0 and name in human.out and reset["smtp_password"] not in human.out
    assert "not found" in await refused(relay, "user", "edit", "smtp1", "--status", "Enable")
    await ok(relay, "user", "remove", name)
    assert relay.store.get_user(name) is None
    # The short spellings of the example: user add --total 100 --hourly 10.
    short = await ok(relay, "user", "add", "--owner", owner["owner_id"], "--total", "100",
                     "--hourly", "10")
    user = relay.store.get_user(short["smtp_user_name"])
    assert (user.total_limit, user.hourly_limit) == (100, 10)


async def test_smtp_commands(relay, sink_factory):
    sink = await sink_factory()
    owner = await ok(relay, "owner", "add")
    idapp = owner["idapp"]
    await ok(relay, "app", "edit", idapp, "--test-email", "qa@example.net")
    rec = await ok(relay, "smtp", "save", "--app", idapp, "--host", "127.0.0.1", "--port",
                   str(sink.port), "--username", "u@example.com", "--password-stdin",
                   "--no-auth", "--priority", "0", "--from-email", "noreply@example.com",
                   stdin="top-secret\n")
    assert rec["password"] == "********" and rec["priority"] == 0
    assert (await relay.store.get_upstream(rec["_id"])).password == "top-secret"
    edited = await ok(relay, "smtp", "save", "--id", rec["_id"], "--status", "D")
    assert edited["status"] == "D" and edited["port"] == sink.port
    assert [x["_id"] for x in await ok(relay, "smtp", "list", "--app", idapp)] == [rec["_id"]]
    got = await relayctl(relay, "smtp", "get", rec["_id"])
    assert got.rc == 0 and "top-secret" not in got.out and "********" in got.out
    assert await ok(relay, "smtp", "check", rec["_id"]) == {"idsmtp": rec["_id"], "check": "ok"}
    assert sink.messages[0].rcpt_tos == ["qa@example.net"]
    sink.mode = "tempfail"
    err = await refused(relay, "smtp", "check", rec["_id"])
    assert "SMTP check failed" in err and "451" in err
    assert "port" in await refused(relay, "smtp", "save", "--id", rec["_id"], "--port", "70000")
    assert await ok(relay, "smtp", "remove", rec["_id"]) == {"idsmtp": rec["_id"],
                                                             "removed": True}
    assert "not found" in await refused(relay, "smtp", "get", rec["_id"])


async def test_domain_commands(relay):
    owner = await ok(relay, "owner", "add")
    o = owner["owner_id"]
    doc = await ok(relay, "domain", "set", "--owner", o, "example.org", "--host",
                   "mx.example.org", "--secure", "--user", "pbx", "--pass-stdin", "--from",
                   "pbx@example.org", "--description", "PBX", stdin="pw\n")
    assert doc["domain"] == "example.org"
    assert doc["options"] == {"host": "mx.example.org", "port": 465, "secure": True,
                              "debug": False, "tls": {"rejectUnauthorized": True},
                              "auth": {"user": "pbx", "pass": "********"}}
    assert (await ok(relay, "domain", "get", "--owner", o, "example.org"))["_id"] == doc["_id"]
    assert [d["domain"] for d in await ok(relay, "domain", "list", "--owner", o)] == [
        "example.org"]
    assert await ok(relay, "domain", "delete", "--owner", o, "example.org") == {
        "status": "OK", "Info": "Removed 1 record."}
    assert "Not found" in await refused(relay, "domain", "get", "--owner", o, "example.org")


async def test_status(relay):
    status = await ok(relay, "status")
    assert status["config_generation"] == relay.generation
    assert {"kind": "smtp", "address": "127.0.0.1:0", "port": relay.smtp_ports[0],
            "tls": "none", "serving": True} in status["listeners"]
    # Embedded store: the cluster is this process alone (SPEC 8.5).
    assert [(i["pid"], i["hostname"]) for i in status["instances"]] == [
        (os.getpid(), relay.store.instance.hostname)]
    human = await relayctl(relay, "status")
    assert human.rc == 0 and "config_generation" in human.out and "listeners:" in human.out
    assert "instances:" in human.out and relay.store.instance.id in human.out


async def test_socket_lookup_and_json_after_subcommand(relay, tmp_path):
    run = await relayctl(relay, "owner", "list", "--json", socket=False,
                         env={"RELAYD_ADMIN_SOCKET": relay.config.admin.socket})
    assert run.rc == 0 and run.json == []
    config = tmp_path / "relayd.yaml"
    config.write_text(f'admin: {{socket: "{relay.config.admin.socket}"}}\n')
    run = await relayctl(relay, "-c", str(config), "status", "--json", socket=False,
                         env={"RELAYD_ADMIN_SOCKET": ""})
    assert run.rc == 0 and run.json["config_generation"] == relay.generation


async def test_missing_socket(relay, tmp_path):
    run = await relayctl(relay, "--socket", str(tmp_path / "nope.sock"), "status", socket=False)
    assert run.rc == 1 and "does not exist" in run.err and run.out == ""


@pytest.mark.parametrize("args", [
    [], ["owner"], ["owner", "add", "--plan", "gold"], ["frobnicate"],
    ["user", "add", "--total-limit", "0", "--hourly-limit", "1", "--owner", "x"],
    ["user", "add", "--total-limit", "1", "--hourly-limit", "1"],
    ["smtp", "save", "--host", "h"],
    ["smtp", "save", "--app", "a", "--password", "p", "--password-stdin"],
])
async def test_usage_errors_exit_2(relay, args):
    run = await relayctl(relay, *args)
    assert run.rc == 2, (run.out, run.err)
    assert run.err


async def test_console_script(relay):
    """The installed entry point, found beside the interpreter running the
    tests (the venv's bin/, which need not be on PATH)."""
    script = Path(sys.executable).parent / "relayctl"
    assert script.exists(), f"{script} missing: pip install -e . installs it"
    proc = await asyncio.create_subprocess_exec(
        str(script), "--socket", relay.config.admin.socket, "--json", "status",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and json.loads(out)["config_generation"] == relay.generation
