"""Packaging (SPEC 7): the systemd units (the container image:
test_dockerfile.py).

* systemd/relayd.service passes ``systemd-analyze verify`` and ``systemd-analyze
  security --offline=true`` rates it "OK" or better (exposure <= 4.0). Both
  need systemd-analyze (Debian package ``systemd``), which this machine kind
  and CI have: its absence is a failure, not a skip, so that a CI image
  without it cannot pass these checks silently.
* The unit's promises hold for the real daemon: READY=1 on $NOTIFY_SOCKET once
  the listeners are bound, SIGHUP reloads, SIGTERM drains and exits 0 with
  STOPPING=1, and all of it under the kernel's memory-deny-write-execute
  (MemoryDenyWriteExecute=yes), TLS handshakes included.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest
import trustme
import yaml

from helpers_docker import healthcheck_argv
from helpers_ports import free_port
from relayd import config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relayd.service"
EXAMPLE = ROOT / "config" / "relayd.yaml"
MAX_EXPOSURE = 4.0          # "OK" or better in systemd-analyze's scale


# ---------------------------------------------------------------- systemd

def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed: the unit file cannot be verified. "
                    "Install the Debian package `systemd` (apt-get install -y systemd).")
    return path


def installed_relayd() -> str:
    script = Path(sysconfig.get_path("scripts")) / "relayd"
    assert script.exists(), f"{script} missing: is the package pip-installed?"
    return str(script)


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given, across sections (units repeat keys)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart points at the relayd
    pip installed here: on the real unit it only reports that
    /usr/local/bin/relayd does not exist on this machine, which hides nothing
    else but is not a pass either. Any other message (unknown key, bad
    value) fails the test, even the ones verify itself calls warnings."""
    text = UNIT.read_text()
    assert "/usr/local/bin/relayd" in text
    copy = tmp_path / "relayd.service"      # verify names the unit after the file
    copy.write_text(text.replace("/usr/local/bin/relayd", installed_relayd()))
    r = subprocess.run([systemd_analyze(), "verify", str(copy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_unit_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above is not vacuous: verify does report a typo'd key."""
    copy = tmp_path / "relayd.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/relayd", installed_relayd())
                    .replace("ProtectHome=yes", "ProtectHom=yes"))
    r = subprocess.run([systemd_analyze(), "verify", str(copy)],
                       capture_output=True, text=True, timeout=60)
    assert "Unknown key" in r.stderr and "ProtectHom" in r.stderr


def test_unit_security_exposure() -> None:
    r = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for relayd\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure, rating = float(m.group(1)), m.group(2)
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} {rating}:\n{r.stdout}"
    assert rating in ("OK", "SAFE", "PERFECT"), rating


TEMPLATE = ROOT / "systemd" / "relayd@.service"


def template_of(unit: str) -> str:
    """relayd.service from [Unit] on, as the template must read: the lines
    marked "instance" added, nothing else changed."""
    body = unit[unit.index("[Unit]"):]
    for old, new in (
            ("Description=relayd SMTP submission relay\n",
             "Description=relayd SMTP submission relay, instance %i\n"),
            ("ExecStart=/usr/local/bin/relayd -c /etc/relayd/relayd.yaml\n",
             "ExecStart=/usr/local/bin/relayd -c /etc/relayd/relayd.yaml\n"
             "# instance: admin-N.sock, metrics port + N (relayd --help)\n"
             "Environment=RELAYD_INSTANCE=%i\n"),
            ("RuntimeDirectoryMode=0750\n",
             "RuntimeDirectoryMode=0750\n"
             "# instance: /run/relayd is every instance's; one stopping must not remove it\n"
             "RuntimeDirectoryPreserve=yes\n")):
        assert body.count(old) == 1, old
        body = body.replace(old, new)
    return body


def test_template_unit_follows_the_single_unit() -> None:
    """Hardening, limits and signals are relayd.service's, line for line."""
    text = TEMPLATE.read_text()
    assert text[text.index("[Unit]"):] == template_of(UNIT.read_text())


def test_template_unit_verify_and_exposure(tmp_path: Path) -> None:
    copy = tmp_path / "relayd@.service"
    copy.write_text(TEMPLATE.read_text().replace("/usr/local/bin/relayd", installed_relayd()))
    instance = tmp_path / "relayd@3.service"
    instance.symlink_to(copy)
    r = subprocess.run([systemd_analyze(), "verify", str(instance)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
    r = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                        str(instance)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for relayd@3\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m and float(m.group(1)) <= MAX_EXPOSURE, r.stdout + r.stderr


def test_unit_contents() -> None:
    d = unit_directives(UNIT.read_text())

    def one(key: str) -> str:
        assert key in d, f"{key}= missing"
        assert len(d[key]) == 1, f"{key}= given {len(d[key])} times"
        return d[key][0]

    assert one("Type") == "notify"          # relayd.daemon.sd_notify("READY=1")
    assert shlex.split(one("ExecStart")) == [
        "/usr/local/bin/relayd", "-c", config.DEFAULT_PATH]
    assert shlex.split(one("ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert one("Restart") == "on-failure"
    assert one("User") == "relayd" and "DynamicUser" not in d
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("NoNewPrivileges") == "yes"
    assert one("UMask") == "0077"
    assert one("StateDirectoryMode") == "0700"
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "@system-service" in d["SystemCallFilter"]
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "LockPersonality", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID"):
        assert one(key) == "yes", key
    # The drain must finish before systemd's SIGKILL.
    stop = one("TimeoutStopSec")
    assert stop.isdigit(), "TimeoutStopSec in plain seconds"
    assert int(stop) > config.Config().drain_timeout + 5
    # The unit's directories are where the example config puts things.
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example["state_dir"] == f"/var/lib/{one('StateDirectory')}"
    assert Path(example["admin"]["socket"]).parent == Path(f"/run/{one('RuntimeDirectory')}")
    assert int(stop) > example["drain_timeout"] + 5


# ---------------------------------------------------------------- the daemon as the unit runs it

# The sandbox the unit asks for, rebuilt without systemd as PID 1 so that the
# real relayd can be run inside it: MemoryDenyWriteExecute=yes through the
# kernel's PR_SET_MDWE (Linux >= 6.3; systemd 252 uses an equivalent seccomp
# rule), and SystemCallFilter= through libseccomp with the unit's own groups
# expanded by systemd-analyze, denied calls failing with EPERM as
# SystemCallErrorNumber=EPERM says. Then exec.
SANDBOX_EXEC = """
import ctypes, errno, json, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7fff0000, 0x00050000
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
if sys.argv[1] != "-":
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO | errno.EPERM)
    for name in json.loads(sys.argv[1]):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr != -1:        # a name this libseccomp does not know
            assert lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0, name
    assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def mdwe_supported() -> bool:
    """Ask a child (the setting cannot be undone in this process)."""
    r = subprocess.run([sys.executable, "-c", SANDBOX_EXEC, "-", "/bin/true"], timeout=30)
    return r.returncode == 0


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run([systemd_analyze(), "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif not line.strip():
            current = None
        elif current and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def unit_syscall_allowlist() -> list[str]:
    """The unit's SystemCallFilter= lines as one allow list, as systemd reads
    them: the first (non-~) line sets the list, ~ lines remove from it."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(m) for m in groups[item]))

    allowed: set[str] = set()
    for value in unit_directives(UNIT.read_text())["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= set().union(*(expand(i) for i in value[1:].split()))
        else:
            allowed |= set().union(*(expand(i) for i in value.split()))
    assert {"read", "epoll_wait", "sendto"} <= allowed and "setpriority" not in allowed
    return sorted(allowed)


def test_sandbox_emulation_denies(tmp_path: Path) -> None:
    """The emulated filter bites: setpriority (@resources) fails with EPERM,
    and writable+executable memory is refused."""
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    probe = ("import mmap, os\n"
             "try:\n    os.setpriority(os.PRIO_PROCESS, 0, 5)\nexcept PermissionError:\n"
             "    print('setpriority: EPERM')\n"
             "try:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except PermissionError:\n    print('wx: EACCES')\n")
    r = subprocess.run([sys.executable, "-c", SANDBOX_EXEC, json.dumps(unit_syscall_allowlist()),
                        sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert r.stdout.split("\n")[:2] == ["setpriority: EPERM", "wx: EACCES"], r.stderr


class Daemon:
    """relayd as a subprocess, its stderr lines in a queue."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: Queue[str] = Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def drain_log(self) -> str:
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except Empty:
                return "\n".join(self.log)

    def failure(self, what: str) -> AssertionError:
        time.sleep(0.2)
        return AssertionError(f"{what} (relayd exit status {self.proc.poll()}); its log:\n"
                              + self.drain_log())

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.log.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise self.failure(f"no {pattern!r} in relayd's log")

    def notification(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(4096)
        except TimeoutError:
            raise self.failure("nothing on $NOTIFY_SOCKET") from None


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def daemon_config(tmp_path: Path, ca: trustme.CA) -> dict[str, Any]:
    """A STARTTLS and an implicit-TLS listener with a cert from ``ca``, a
    metrics listener (for /healthz), state under ``tmp_path``."""
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {
        "listen": [{"address": "127.0.0.1:0", "tls": "starttls"},
                   {"address": "127.0.0.1:0", "tls": "implicit"}],
        "tls": {"cert": str(cert), "key": str(key)},
        "hostname": "relay.test",
        "state_dir": str(tmp_path / "state"),
        "admin": {"socket": str(tmp_path / "state" / "admin.sock")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "drain_timeout": 5,
    }


def assert_tls_listeners(ports: list[int], ca: trustme.CA) -> None:
    """STARTTLS on ``ports[0]`` (AUTH only after it), implicit TLS on ``ports[1]``."""
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    with smtplib.SMTP("127.0.0.1", ports[0], local_hostname="client.test", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth")
        s.starttls(context=client_tls)
        s.ehlo()
        assert "PLAIN" in s.esmtp_features.get("auth", "")
    with smtplib.SMTP_SSL("127.0.0.1", ports[1], local_hostname="client.test",
                          context=client_tls, timeout=10) as s:
        code, _ = s.ehlo()
        assert code == 250


def test_daemon_honours_the_unit_contract(tmp_path: Path,
                                          notify_socket: tuple[socket.socket, str]) -> None:
    """Type=notify, ExecReload=kill -HUP, SIGTERM drain, MemoryDenyWriteExecute=yes
    and the unit's SystemCallFilter=, against the real relayd (uvloop, TLS,
    SQLite, the metrics listener) on loopback; and the Docker HEALTHCHECK
    command against its /healthz."""
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3): cannot emulate "
                    "MemoryDenyWriteExecute=yes")
    ca = trustme.CA()
    cfg_path = tmp_path / "relayd.yaml"
    cfg = daemon_config(tmp_path, ca)
    cfg_path.write_text(yaml.safe_dump(cfg))
    sock, path = notify_socket
    env = {k: v for k, v in os.environ.items() if k != config.ENV_VAR}
    env["NOTIFY_SOCKET"] = path
    daemon = Daemon([sys.executable, "-c", SANDBOX_EXEC, json.dumps(unit_syscall_allowlist()),
                     installed_relayd(), "-c", str(cfg_path)], env)
    try:
        ports = [int(daemon.wait_for(r"event=listening .*tls=%s port=(\d+)" % mode).group(1))
                 for mode in ("starttls", "implicit")]
        assert daemon.notification(sock) == b"READY=1"        # only after every listener is bound
        assert daemon.proc.poll() is None

        assert_tls_listeners(ports, ca)     # the TLS handshakes under MDWE

        # the image's HEALTHCHECK, pointed at this relayd's metrics listener
        probe = healthcheck_argv()[2].replace("127.0.0.1:9587", cfg["metrics"]["listen"])
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr

        cfg["log_level"] = "debug"
        cfg_path.write_text(yaml.safe_dump(cfg))
        daemon.proc.send_signal(signal.SIGHUP)                  # ExecReload
        daemon.wait_for(r"event=reloaded .*generation=2")
        assert daemon.proc.poll() is None

        daemon.proc.send_signal(signal.SIGTERM)                 # systemctl stop
        assert daemon.proc.wait(timeout=10) == 0
        assert daemon.notification(sock) == b"STOPPING=1"
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    assert "Traceback" not in daemon.drain_log()
