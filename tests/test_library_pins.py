"""The library internals relayd still relies on, one adapter module each,
pinned here so that a library release that changes them fails CI instead of
relayd (pyproject caps the ranges to what CI installs and tests, lowest and
newest):

1. smtp.py subclasses aiosmtpd's SMTP and overrides its underscore hooks
   (there is no public extension point for connection accounting, bulk
   DATA, the idle timer or address parsing).
2. admission.py builds asyncio's SSLProtocol itself for implicit TLS (the
   handshake must run under an admission slot taken at accept; uvloop reads
   before loop.start_tls could take over).
3. upstream.py looks at aiosmtplib's reply buffer to tell that a pooled
   connection's replies are out of step (no public view of it).
4. arguments.py (mixed into smtp.py's class) wraps aiosmtpd's per-instance
   command table and replaces its command length limits (UTF-8 only in
   MAIL/RCPT addresses; DSN's longer commands).
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import aiosmtpd.smtp
import aiosmtplib
import pytest
from asyncio import sslproto
from packaging.version import Version

from relayd.upstream import _in_step

PYPROJECT_RANGES = {"aiosmtpd": ("1.4.6", "1.5"), "aiosmtplib": ("5.1.3", "5.2")}


@pytest.mark.parametrize("dist", sorted(PYPROJECT_RANGES))
def test_installed_version_is_in_the_tested_range(dist):
    low, high = PYPROJECT_RANGES[dist]
    assert Version(low) <= Version(version(dist)) < Version(high)


AIOSMTPD_HOOKS = {
    "_reset_timeout": ["self", "duration"],
    "_timeout_cb": ["self"],
    "_set_post_data_state": ["self"],
    "_set_rset_state": ["self"],
    "_handle_client": ["self"],
    "_create_session": ["self"],
    "_getaddr": ["self", "arg"],
    "_cb_client_connected": ["self", "reader", "writer"],
}


@pytest.mark.parametrize("name", sorted(AIOSMTPD_HOOKS))
def test_aiosmtpd_hooks_relayd_overrides_exist(name):
    method = getattr(aiosmtpd.smtp.SMTP, name)
    assert list(inspect.signature(method).parameters) == AIOSMTPD_HOOKS[name]


def test_aiosmtpd_is_a_stream_reader_protocol():
    # smtp.py hands StreamReaderProtocol.__init__ a wire.ClientReader.
    assert issubclass(aiosmtpd.smtp.SMTP, asyncio.StreamReaderProtocol)


def test_asyncio_ssl_protocol_signature():
    params = inspect.signature(sslproto.SSLProtocol.__init__).parameters
    for name in ("loop", "app_protocol", "sslcontext", "waiter", "server_side",
                 "ssl_handshake_timeout"):
        assert name in params


async def test_aiosmtplib_keeps_an_extra_reply_in_its_buffer():
    """Two replies in one segment: read_response returns the first and keeps
    the second, which _in_step must see."""
    loop = asyncio.get_running_loop()
    protocol = aiosmtplib.protocol.SMTPProtocol(loop=loop)

    class Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):
            return default

        def is_closing(self):
            return False

        def write(self, data):
            pass

    protocol.connection_made(Transport())
    protocol.data_received(b"250 first\r\n250 extra\r\n")
    reply = await protocol.read_response(timeout=1)
    assert (reply.code, reply.message) == (250, "first")

    class Client:
        pass

    client = Client()
    client.protocol = protocol
    assert not _in_step(client)            # type: ignore[arg-type]
    protocol.data_received(b"")            # nothing new
    fresh = aiosmtplib.protocol.SMTPProtocol(loop=loop)
    fresh.connection_made(Transport())
    fresh.data_received(b"250 only\r\n")
    await fresh.read_response(timeout=1)
    client.protocol = fresh
    assert _in_step(client)                # type: ignore[arg-type]


def test_ci_lower_bounds_are_pyprojects():
    """.ci/lower-bounds.txt pins exactly the lower bound of every dependency
    pyproject.toml declares (runtime and test), so CI's second pass tests the
    oldest versions the range admits."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {}
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", spec)
        assert m, f"no lower bound in {spec!r}"
        declared[m.group(1).lower()] = Version(m.group(2))
    pinned = {}
    for line in (root / ".ci" / "lower-bounds.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pinned[name.strip().lower()] = Version(ver.strip())
    assert pinned == declared


def test_aiosmtpd_command_table_and_limits_arguments_py_relies_on():
    """arguments.py wraps each entry of aiosmtpd's per-instance command table
    (``_smtp_methods``, looked up by _handle_client and HELP) and replaces the
    class-level ``command_size_limits`` with its own; with enable_SMTPUTF8
    aiosmtpd decodes arguments as UTF-8 with surrogateescape."""
    src = inspect.getsource(aiosmtpd.smtp.SMTP._handle_client)
    assert "self._smtp_methods.get(command)" in src
    assert "self.command_size_limits[command]" in src
    assert "surrogateescape" in src and "self.enable_SMTPUTF8" in src
    assert aiosmtpd.smtp.SMTP.command_size_limit == 512
    assert "enable_SMTPUTF8" in inspect.signature(aiosmtpd.smtp.SMTP.__init__).parameters
    smtp_mail = inspect.getsource(aiosmtpd.smtp.SMTP.smtp_MAIL)
    assert "self._getaddr(arg)" in smtp_mail and "_call_handler_hook('MAIL'" in smtp_mail


def test_aiosmtplib_ehlo_knowledge_upstream_py_relies_on():
    """upstream.py sends EHLO once per connection when aiosmtplib has not
    (connect() does only for STARTTLS) and reads the keywords publicly."""
    client = aiosmtplib.SMTP()
    assert client.is_ehlo_or_helo_needed
    client.esmtp_extensions = {"8bitmime": ""}
    assert client.supports_extension("8BITMIME") and not client.supports_extension("DSN")
    assert "encoding" in inspect.signature(aiosmtplib.SMTP.mail).parameters
