"""Packaging (SPEC 7), the container image. There is no Docker engine on
this machine kind, so the Dockerfile gets static checks: slim base,
non-root USER, EXPOSE 587 465 9587, a HEALTHCHECK on /healthz written in
Python (no curl in slim) that is actually run here, a build context
(.dockerignore) holding what the COPY lines need and no more, and the
container config passing ``relayd --check``. The systemd units are in
test_packaging.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
import yaml

from helpers_docker import dockerfile_instructions, healthcheck_argv, instr
from relayd import config

ROOT = Path(__file__).resolve().parent.parent
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_CONFIG = ROOT / "docker" / "relayd.yaml"


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_dockerfile_slim_base() -> None:
    froms = instr("FROM")
    assert froms, "no FROM"
    for args in froms:
        image = args.split()[0]
        assert image == "python:3.11-slim", image


def test_dockerfile_runs_unprivileged() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), user
    # the user exists: created in the final stage with a fixed, non-zero UID
    runs = " ".join(args for word, args in final_stage() if word == "RUN")
    m = re.search(r"useradd [^&]*--uid (\d+)[^&]* %s\b" % re.escape(user), runs)
    assert m and int(m.group(1)) > 0, runs
    # everything after USER runs as that user: nothing may switch back
    ins = final_stage()
    after = ins[max(i for i, (w, _) in enumerate(ins) if w == "USER"):]
    assert [w for w, _ in after].count("USER") == 1


def test_dockerfile_exposes_ports_volume_and_signal() -> None:
    ports = {p for args in instr("EXPOSE") for p in args.split()}
    assert {"587", "465", "9587"} <= ports
    assert any("/var/lib/relayd" in args for args in instr("VOLUME"))
    assert instr("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_entrypoint_uses_the_container_config() -> None:
    cmd = json.loads(instr("ENTRYPOINT")[-1]) + json.loads(instr("CMD")[-1])
    assert cmd == ["relayd", "-c", "/etc/relayd/relayd.yaml"]
    assert "docker/relayd.yaml /etc/relayd/relayd.yaml" in instr("COPY")


def test_dockerfile_healthcheck_is_python_urllib_on_healthz() -> None:
    argv = healthcheck_argv()
    assert argv[0] in ("python", "python3") and argv[1] == "-c"
    assert "urllib" in argv[2] and "http://127.0.0.1:9587/healthz" in argv[2]
    assert not any(tool in " ".join(argv) for tool in ("curl", "wget"))
    # the container config serves /healthz where the check looks
    docker_cfg = yaml.safe_load(DOCKER_CONFIG.read_text())
    assert config.parse_hostport(docker_cfg["metrics"]["listen"])[1] == 9587


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:        # noqa: N802
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status,healthy", [(200, True), (503, False), (None, False)])
def test_dockerfile_healthcheck_command_works(status: int | None, healthy: bool) -> None:
    """Run the HEALTHCHECK's Python against a stand-in /healthz on a free port
    (never 9587 on a shared machine): 0 when healthy, 1 (never 2, which Docker
    reserves) when it answers 503 or nothing listens."""
    argv = healthcheck_argv()
    handler = type("H", (_Health,), {"status": status or 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()                # connection refused
    else:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        code = argv[2].replace("127.0.0.1:9587", f"127.0.0.1:{port}")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert r.returncode == (0 if healthy else 1), r.stderr


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins, '!' re-includes, '*'
    stays within one directory, '**' spans any number, and a pattern that
    matches a directory matches everything inside it."""
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        regex = _ignore_regex(pat.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_copy_needs() -> None:
    for args in instr("COPY"):
        if args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    assert not dockerignored("relayd/config.py")
    assert not dockerignored("relayd/default.yaml")
    assert not dockerignored("relayd/admin/http.py")
    for private in (".git/config", ".venv/bin/python", "relayd-data/relayd.db",
                    "tests/test_config.py", "relayd/__pycache__/cli.cpython-311.pyc",
                    "relayd.egg-info/PKG-INFO", "config/relayd.yaml", ".ci/run"):
        assert dockerignored(private), private


def test_container_config_is_valid(tmp_path: Path) -> None:
    """docker/relayd.yaml passes --check once the mounted TLS files exist."""
    text = DOCKER_CONFIG.read_text()
    leaf = trustme.CA().issue_cert("relay.example.com")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    assert "/etc/relayd/tls/cert.pem" in text and "/etc/relayd/tls/key.pem" in text
    path = tmp_path / "relayd.yaml"
    path.write_text(text.replace("/etc/relayd/tls/cert.pem", str(cert))
                    .replace("/etc/relayd/tls/key.pem", str(key)))
    env = {k: v for k, v in os.environ.items() if k != config.ENV_VAR}
    r = subprocess.run([sys.executable, "-m", "relayd", "-c", str(path), "--check"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    cfg = config.load_file(path)
    assert {lst.port for lst in cfg.listen} == {587, 465}
    assert cfg.state_dir == "/var/lib/relayd"
    assert cfg.admin.socket.startswith("/run/relayd/")
    # docker stop's default grace is 10 s: the drain fits inside it
    assert cfg.drain_timeout < 10
