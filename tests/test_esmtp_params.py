"""SPEC 3.15: MAIL/RCPT parameters from the client, validated and relayed
to an upstream that can take them; messages an upstream cannot take go
elsewhere or are refused.

Real sessions: relayd in-process, a client writing raw command lines, and
recording upstreams whose EHLO keywords each test chooses and which keep
every command line as it came over the wire (KeywordUpstream; in
helpers_upstream.py). The parsers, sans-IO, are in test_esmtp_parse.py, the
failure texts in test_failure_texts.py.

Every test here failed before SPEC 3.15 was implemented: relayd answered
555 to RET, ENVID, NOTIFY and ORCPT, relayed no parameter at all, 500 to
UTF-8 addresses and sent 8-bit content to any upstream.
"""

from __future__ import annotations

import pytest

from conftest import simple_message
from helpers_records import sent_total
from helpers_smtp import authed, dot_stuff, mail_lines, upstream_by_port
from helpers_upstream import ALL, EIGHT_BIT, MAIL_FROM, RCPT_TO, UTF8_RCPT, route, transaction
from relayd import metrics


def attempts(idsmtp: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "relayd_upstream_attempts_total", {"upstream": idsmtp, "result": result}) or 0.0


# ================================================================ relayed or dropped

# (case, the client's MAIL and RCPT parameters, the keywords of an upstream
#  that advertises the extension and of one that does not, the MAIL and RCPT
#  lines the first must see; the second sees the bare MAIL_FROM and RCPT_TO)
RELAYED = [
    ("body-8bitmime", " BODY=8BITMIME", "", ["8BITMIME"], ["SMTPUTF8", "DSN"],
     f"{MAIL_FROM} BODY=8BITMIME", RCPT_TO),
    ("body-7bit", " body=7bit", "", ["8BITMIME"], ["SMTPUTF8", "DSN"],
     f"{MAIL_FROM} BODY=7BIT", RCPT_TO),
    ("smtputf8", " SMTPUTF8", "", ["SMTPUTF8"], ["8BITMIME", "DSN"],
     f"{MAIL_FROM} SMTPUTF8", RCPT_TO),
    ("ret", " RET=hdrs", "", ["DSN"], ["8BITMIME", "SMTPUTF8"],
     f"{MAIL_FROM} RET=HDRS", RCPT_TO),
    ("envid", " ENVID=QQ+2Bid.1", "", ["DSN"], ["8BITMIME", "SMTPUTF8"],
     f"{MAIL_FROM} ENVID=QQ+2Bid.1", RCPT_TO),
    ("notify", "", " notify=success,delay", ["DSN"], ["8BITMIME", "SMTPUTF8"],
     MAIL_FROM, f"{RCPT_TO} NOTIFY=SUCCESS,DELAY"),
    ("orcpt", "", " ORCPT=rfc822;To+40Example.NET", ["DSN"], ["8BITMIME", "SMTPUTF8"],
     MAIL_FROM, f"{RCPT_TO} ORCPT=rfc822;To+40Example.NET"),
    ("all", " BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=e1", " NOTIFY=FAILURE ORCPT=rfc822;x",
     ALL, [], f"{MAIL_FROM} BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=e1",
     f"{RCPT_TO} NOTIFY=FAILURE ORCPT=rfc822;x"),
]


@pytest.mark.parametrize("case, mail, rcpt, keywords, without, want_mail, want_rcpt", RELAYED,
                         ids=[c[0] for c in RELAYED])
async def test_parameter_relayed_verbatim_or_dropped(relay, provision, upstream, case, mail,
                                                     rcpt, keywords, without, want_mail,
                                                     want_rcpt):
    """The same transaction through an upstream that advertises the
    extension (the parameter as the client wrote it; keyword values in upper
    case) and through one that does not (no trace of it, RFC 3461 4.1 for
    DSN's). The message is 7-bit ASCII: no upstream needs to be skipped."""
    for keys, wants in ((keywords, (want_mail, want_rcpt)), (without, (MAIL_FROM, RCPT_TO))):
        up = await upstream(keys)
        tenant = await provision(relay, **route(up))
        c = await authed(relay, tenant)
        r = await transaction(c, MAIL_FROM + mail, [RCPT_TO + rcpt], simple_message())
        assert (r.code, r.enhanced) == (250, "2.0.0"), r
        assert (up.commands(b"MAIL"), up.commands(b"RCPT")) == (
            [wants[0].encode()], [wants[1].encode()]), keys
        assert len(up.messages) == 1
        await c.close()


async def test_rcpt_parameters_stay_with_their_recipient(relay, provision, upstream):
    """One RcptParams per accepted recipient: a refused RCPT in between (bad
    NOTIFY) shifts nothing, and nothing of a transaction reaches the next."""
    up = await upstream(["DSN"])
    tenant = await provision(relay, **route(up))
    c = await authed(relay, tenant)
    assert (await c.cmd(f"{MAIL_FROM} RET=HDRS ENVID=one")).code == 250
    assert (await c.cmd("RCPT TO:<a@example.net> NOTIFY=SUCCESS")).code == 250
    r = await c.cmd("RCPT TO:<b@example.net> NOTIFY=MAYBE")
    assert (r.code, r.enhanced) == (501, "5.5.4"), r
    assert (await c.cmd("RCPT TO:<c@example.net>")).code == 250
    assert (await c.cmd("RCPT TO:<d@example.net> ORCPT=rfc822;d+40x NOTIFY=NEVER")).code == 250
    assert (await c.cmd("DATA")).code == 354
    c.write(simple_message() + b".\r\n")
    assert (await c.reply()).code == 250
    assert up.commands(b"MAIL") == [f"{MAIL_FROM} RET=HDRS ENVID=one".encode()]
    assert up.commands(b"RCPT") == [
        b"RCPT TO:<a@example.net> NOTIFY=SUCCESS", b"RCPT TO:<c@example.net>",
        b"RCPT TO:<d@example.net> NOTIFY=NEVER ORCPT=rfc822;d+40x"]
    # After DATA, and after RSET, the next transaction starts without them.
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert r.code == 250, r
    assert (await c.cmd(f"{MAIL_FROM} ENVID=two")).code == 250
    assert (await c.cmd("RCPT TO:<e@example.net> NOTIFY=DELAY")).code == 250
    assert (await c.cmd("RSET")).code == 250
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert r.code == 250, r
    assert up.commands(b"MAIL")[1:] == [MAIL_FROM.encode()] * 2
    assert up.commands(b"RCPT")[3:] == [RCPT_TO.encode()] * 2
    await c.close()


# ================================================================ which upstream can take it

async def test_8bit_message_skips_an_upstream_without_8bitmime(relay, provision, upstream):
    seven, eight = await upstream([]), await upstream(["8BITMIME"])
    tenant = await provision(relay, **route(seven, eight))
    skipped = await upstream_by_port(relay, tenant.idapp, seven.port)
    c = await authed(relay, tenant)
    r = await transaction(c, f"{MAIL_FROM} BODY=8BITMIME", [RCPT_TO], EIGHT_BIT)
    assert (r.code, r.enhanced) == (250, "2.0.0"), r
    # Not one command of the transaction went to the 7-bit upstream...
    assert seven.commands(b"MAIL") == [] and seven.messages == []
    assert eight.commands(b"MAIL") == [f"{MAIL_FROM} BODY=8BITMIME".encode()]
    assert eight.messages[0].endswith(dot_stuff(EIGHT_BIT))
    # ... and it is no error of its own: numerrors unchanged, counted as skipped.
    assert (await upstream_by_port(relay, tenant.idapp, seven.port)).numerrors == 0
    assert attempts(skipped.idsmtp, "skipped") == 1 and attempts(skipped.idsmtp, "error") == 0
    # Its connection (opened to read its EHLO) stays pooled for other mail:
    # a 7-bit message goes there, on that connection.
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert r.code == 250, r
    assert seven.connections == 1 and len(seven.messages) == 1
    # Declared 8BITMIME but all 7-bit: the 7-bit upstream takes it, without BODY.
    r = await transaction(c, f"{MAIL_FROM} BODY=8BITMIME", [RCPT_TO], simple_message())
    assert r.code == 250, r
    assert seven.connections == 1 and seven.commands(b"MAIL")[-1] == MAIL_FROM.encode()
    await c.close()


async def test_utf8_address_skips_an_upstream_without_smtputf8(relay, provision, upstream):
    plain, intl = await upstream(["8BITMIME", "DSN"]), await upstream(["8BITMIME", "SMTPUTF8"])
    tenant = await provision(relay, **route(plain, intl))
    c = await authed(relay, tenant)
    r = await transaction(c, "MAIL FROM:<jörg@example.com> SMTPUTF8 BODY=8BITMIME",
                          [f"RCPT TO:<{UTF8_RCPT}>"], EIGHT_BIT)
    assert (r.code, r.enhanced) == (250, "2.0.0"), r
    assert plain.commands(b"MAIL") == []
    # Parameters in relayd's order, the address in UTF-8 (RFC 6531 3.4).
    assert intl.commands(b"MAIL") == [
        "MAIL FROM:<jörg@example.com> BODY=8BITMIME SMTPUTF8".encode()]
    assert intl.commands(b"RCPT") == [f"RCPT TO:<{UTF8_RCPT}>".encode()]
    assert (await upstream_by_port(relay, tenant.idapp, plain.port)).numerrors == 0
    await c.close()


@pytest.mark.parametrize("need, mail, rcpt, data, keywords, reply", [
    ("8bit", f"{MAIL_FROM} BODY=8BITMIME", RCPT_TO, EIGHT_BIT, ["SMTPUTF8", "DSN"],
     (554, "5.6.3")),
    ("utf8", f"{MAIL_FROM} SMTPUTF8", f"RCPT TO:<{UTF8_RCPT}>", simple_message(),
     ["8BITMIME", "DSN"], (553, "5.6.7")),
])
async def test_no_upstream_can_take_it(relay, provision, upstream, caplog, need, mail, rcpt,
                                       data, keywords, reply):
    first, second = await upstream(keywords), await upstream(keywords)
    tenant = await provision(relay, **route(first, second))
    c = await authed(relay, tenant)
    r = await transaction(c, mail, [rcpt], data)
    assert (r.code, r.enhanced) == reply, r
    assert ("8BITMIME" if need == "8bit" else "SMTPUTF8") in r.text
    assert first.commands(b"MAIL") == second.commands(b"MAIL") == []
    # The quota units go back; nobody's numerrors grows.
    assert relay.store.held(tenant.user) == 0
    assert await sent_total(relay, tenant.user) == 0
    for up in (first, second):
        assert (await upstream_by_port(relay, tenant.idapp, up.port)).numerrors == 0
    assert mail_lines(caplog.records)[-1]["result"] == "rejected"
    # The session goes on: the next message (7-bit, ASCII) is delivered.
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert r.code == 250, r
    await c.close()


# ================================================================ refused at MAIL / RCPT

BAD = [
    ("MAIL", " BODY=BINARYMIME"), ("MAIL", " BODY="), ("MAIL", " SMTPUTF8=yes"),
    ("MAIL", " RET=NONE"), ("MAIL", " ENVID=lower+2bhex"), ("MAIL", " ENVID=a=b"),
    ("MAIL", " ENVID=" + "x" * 101), ("MAIL", " BODY=7BIT BODY=8BITMIME"),
    ("MAIL", " SMTPUTF8 smtputf8"), ("MAIL", " RET=FULL RET=FULL"),
    ("MAIL", " ENVID=a ENVID=a"),
    ("RCPT", " NOTIFY=NEVER,SUCCESS"), ("RCPT", " NOTIFY=SOMETIMES"),
    ("RCPT", " NOTIFY=DELAY,DELAY"), ("RCPT", " ORCPT=rfc822"), ("RCPT", " ORCPT=;x"),
    ("RCPT", " ORCPT=rfc822;a=b"), ("RCPT", " NOTIFY=NEVER NOTIFY=NEVER"),
    ("RCPT", " ORCPT=rfc822;a ORCPT=rfc822;b"),
]


@pytest.mark.parametrize("command, params", BAD, ids=[f"{c}{p}"[:40] for c, p in BAD])
async def test_bad_parameters_501(relay, provision, upstream, command, params):
    up = await upstream(ALL)
    tenant = await provision(relay, **route(up))
    c = await authed(relay, tenant)
    if command == "RCPT":
        assert (await c.cmd(MAIL_FROM)).code == 250
    r = await c.cmd((MAIL_FROM if command == "MAIL" else RCPT_TO) + params)
    assert (r.code, r.enhanced) == (501, "5.5.4"), r
    assert relay.store.held(tenant.user) == 0
    await c.close()


@pytest.mark.parametrize("unknown, known", [
    (f"{MAIL_FROM} XUNKNOWN=1", f"{MAIL_FROM} RET=HDRS"),
    (f"{MAIL_FROM} NOTIFY=NEVER", f"{MAIL_FROM} ENVID=x"),           # RCPT's, on MAIL
    (f"{RCPT_TO} BODY=7BIT", f"{RCPT_TO} NOTIFY=NEVER"),             # MAIL's, on RCPT
])
async def test_unknown_parameters_keep_their_555(relay, provision, upstream, unknown, known):
    """Only what is unknown to the command gets aiosmtpd's 555; the known
    parameter on the same command is taken."""
    tenant = await provision(relay, **route(await upstream(ALL)))
    c = await authed(relay, tenant)
    if unknown.startswith("RCPT"):
        assert (await c.cmd(MAIL_FROM)).code == 250
    assert (await c.cmd(unknown)).code == 555
    assert (await c.cmd(known)).code == 250
    await c.close()


NON_ASCII = [
    ("MAIL FROM:<jörg@example.com>", "553 5.6.7"),                 # no SMTPUTF8
    ("MAIL FROM:<jörg@example.com> ſmtputf8", "553 5.6.7"),         # no case folding
    ("MAIL FROM:<a\u00a0b@example.com> SMTPUTF8", "553 5.1.7"),     # not printable
    (b"MAIL FROM:<j\xf6rg@example.com> SMTPUTF8", "500 5.5.2"),     # Latin-1, not UTF-8
    ("EHLO bücher.example", "500 5.5.2"),                           # ASCII elsewhere...
    ("NOOP ü", "500 5.5.2"),
    ("MAIL FROM:<jörg@example.com> SMTPUTF8", "250"),               # ... but here
]


async def test_non_ascii_only_in_addresses_and_under_smtputf8(relay, provision, upstream):
    """RFC 6531 3.3: UTF-8 in a MAIL/RCPT address of a transaction that said
    SMTPUTF8, nowhere else; offering SMTPUTF8 makes aiosmtpd decode every
    argument as UTF-8, which must not let 8-bit text into other commands."""
    tenant = await provision(relay, **route(await upstream(ALL)))
    c = await authed(relay, tenant)
    for line, code in NON_ASCII:
        r = await c.cmd(line.encode() if isinstance(line, str) else line)
        assert str(r).startswith(code), (line, r)
    await c.close()


async def test_non_ascii_recipient_needs_smtputf8_on_mail(relay, provision, upstream):
    tenant = await provision(relay, **route(await upstream(ALL)))
    c = await authed(relay, tenant)
    assert (await c.cmd(MAIL_FROM)).code == 250
    r = await c.cmd(f"RCPT TO:<{UTF8_RCPT}>")
    assert (r.code, r.enhanced) == (553, "5.6.7"), r
    assert relay.store.held(tenant.user) == 0
    await c.close()


async def test_long_orcpt_fits_the_rcpt_command(relay, provision, upstream):
    """RFC 3461 4: ORCPT makes RCPT up to 500 characters longer than the
    512 of RFC 5321; aiosmtpd's limit alone answered 500 "line too long"."""
    up = await upstream(["DSN"])
    tenant = await provision(relay, **route(up))
    c = await authed(relay, tenant)
    orcpt = "ORCPT=rfc822;" + "o" * 480
    r = await transaction(c, MAIL_FROM, [f"{RCPT_TO} {orcpt}"], simple_message())
    assert r.code == 250, r
    assert up.commands(b"RCPT") == [f"{RCPT_TO} {orcpt}".encode()]
    await c.close()
