"""SPEC 3.9: one logfmt line per message with stable keys, whose session id
is the one in the 250 reply; and no secret in any log record, even at
debug, for whole sessions including AUTH PLAIN and AUTH LOGIN.
"""

from __future__ import annotations

import base64
import logging
import re

import pytest

from conftest import simple_message, sink_upstream
from helpers_smtp import RawSMTP, authed, b64, mail_lines, plain_blob
from relayd import maillog
from relayd.maillog import LogfmtFormatter, logfmt

SENDER = "app@example.com"
MSG = simple_message()
KEYS = ["session", "user", "client", "from", "rcpts", "size", "upstream", "upstream_host",
        "rewrite", "result", "reply", "duration"]


async def test_one_line_per_delivered_message(relay, sink_factory, provision, caplog):
    caplog.set_level(logging.INFO, logger="relayd.mail")
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    upstream = (await relay.store.list_upstreams(tenant.idapp))[0]
    c = await authed(relay, tenant)
    replies = [await c.send_message(SENDER, ["a@example.net", "b@example.net"], MSG)
               for _ in range(2)]
    await c.close()
    ids = [re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", r.text).group(1) for r in replies]

    lines = mail_lines(caplog.records)
    assert len(lines) == 2
    for line, msg_id in zip(lines, ids):
        assert [k for k in KEYS if k not in line] == []
        assert line["session"] == msg_id
        assert line["user"] == tenant.user
        assert line["client"] == "127.0.0.1"
        assert line["from"] == SENDER
        assert line["rcpts"] == "2"
        assert line["size"] == str(len(MSG))
        assert line["upstream"] == upstream.idsmtp
        assert line["upstream_host"] == "127.0.0.1"
        assert line["rewrite"] == "no"
        assert line["result"] == "delivered"
        assert line["reply"].startswith("250")
        assert float(line["duration"]) >= 0
    # The formatted record is a single line.
    fmt = LogfmtFormatter()
    assert all("\n" not in fmt.format(r) for r in caplog.records if r.name == "relayd.mail")


@pytest.mark.parametrize("mode, result, code, upstream_reply", [
    ("tempfail", "deferred", 451, "451 4.3.0 Sink is having a bad day"),
    ("permfail", "bounced", 554, "550 5.7.1 Sink refuses this message")],
    ids=["tempfail", "permfail"])
async def test_failed_message_is_logged_once_with_its_result(relay, sink_factory, provision,
                                                             caplog, mode, result, code,
                                                             upstream_reply):
    sink = await sink_factory(mode)
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    r = await c.send_message(SENDER, ["a@example.net"], MSG)
    await c.close()
    assert r.code == code
    lines = mail_lines(caplog.records)
    assert len(lines) == 1
    assert lines[0]["result"] == result
    assert lines[0]["upstream_host"] == "127.0.0.1"
    assert lines[0]["reply"] == upstream_reply       # the upstream's own words (SPEC 3.9)


async def test_hostile_sender_cannot_forge_log_fields(relay, sink_factory, provision, caplog):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    c = await authed(relay, tenant)
    sender = '"a\\"result=bounced"@example.com'      # quotes, backslash and '='
    r = await c.send_message(sender, ["a@example.net"], MSG)
    await c.close()
    assert r.code == 250, r
    records = [rec for rec in caplog.records if rec.name == "relayd.mail"]
    assert len(records) == 1
    raw = LogfmtFormatter().format(records[0])
    assert raw.count(" result=") == 1 and raw.count(" from=") == 1, raw
    line = mail_lines(records)[0]
    assert (line["from"], line["result"]) == (sender, "delivered")


def test_logfmt_quotes_what_needs_quoting():
    assert logfmt(a="plain", b="two words", c='q"uote', d="new\nline", e=None, f=1.5) == (
        'a=plain b="two words" c="q\\"uote" d="new\\x0aline" e="" f=1.500')


def _secret_forms(*secrets: str) -> list[str]:
    out = []
    for s in secrets:
        out += [s, base64.b64encode(s.encode()).decode()]
    return out


async def test_secrets_never_logged_even_at_debug(relay, sink_factory, provision, caplog):
    maillog.set_level("debug")             # what log_level: debug does
    caplog.set_level(logging.DEBUG)        # root at DEBUG: every record relayd emits
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    secrets = _secret_forms(tenant.password, tenant.token) + [
        plain_blob(tenant.user, tenant.password).decode(),
        plain_blob(tenant.user, tenant.password + "x").decode()]

    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    # Failed attempts carry a near-miss of the password too.
    assert (await c.cmd(b"AUTH PLAIN " + plain_blob(tenant.user, tenant.password + "x"))).code == 535
    # (lower case: aiosmtpd only sanitises "AUTH" for its command log.)
    # Mechanism names are case-insensitive (RFC 4422 3.1), so this is the
    # same failed AUTH PLAIN, not an unknown mechanism (504).
    r = await c.cmd(b"auth plain " + plain_blob(tenant.user, tenant.password + "x"))
    assert (r.code, r.enhanced) == (535, "5.7.8"), r
    # AUTH PLAIN with an initial response, then a whole transaction.
    await c.login(tenant.user, tenant.password)
    assert (await c.send_message(SENDER, ["a@example.net"], MSG)).code == 250
    await c.cmd("QUIT")
    await c.close()
    # AUTH PLAIN, challenge form.
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    assert (await c.cmd("AUTH PLAIN")).code == 334
    assert (await c.cmd(plain_blob(tenant.user, tenant.password))).code == 235
    await c.close()
    # AUTH LOGIN, challenge form.
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    assert (await c.cmd("AUTH LOGIN")).code == 334
    assert (await c.cmd(b64(tenant.user))).code == 334
    assert (await c.cmd(b64(tenant.password))).code == 235
    assert (await c.send_message(SENDER, ["a@example.net"], MSG)).code == 250
    await c.close()
    # AUTH LOGIN with the user name as initial response.
    c = await RawSMTP.open(relay.smtp_ports[0])
    await c.ehlo()
    assert (await c.cmd(b"AUTH LOGIN " + b64(tenant.user))).code == 334
    assert (await c.cmd(b64(tenant.password))).code == 235
    await c.close()

    assert caplog.records, "nothing captured: the test would prove nothing"
    assert logging.getLogger("relayd.smtp").isEnabledFor(logging.DEBUG)
    fmt = LogfmtFormatter()
    for record in caplog.records:
        texts = [fmt.format(record), record.getMessage(), repr(record.args),
                 repr(getattr(record, "logfmt", None))]
        for text in texts:
            for secret in secrets:
                assert secret not in text, (record.name, text)
