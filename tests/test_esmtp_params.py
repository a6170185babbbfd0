"""SPEC 3.15 and 3.18: MAIL/RCPT parameters from the client, validated and
relayed to an upstream that can take them; messages an upstream cannot take
go elsewhere or are refused; failure texts in plain words.

* The parsers and the per-upstream decisions of relayd/esmtp.py, sans-IO.
* Real sessions: relayd in-process, a client writing raw command lines, and
  recording upstreams whose EHLO keywords each test chooses and which keep
  every command line as it came over the wire (KeywordUpstream).
* A failure-text table: what the client reads after DATA when an upstream
  cannot be reached, is no SMTP server, or is a system SMTP; the mail-log
  line keeps the technical detail.

Every test here failed before SPEC 3.15/3.18 were implemented: relayd
answered 555 to RET, ENVID, NOTIFY and ORCPT, relayed no parameter at all,
500 to UTF-8 addresses, sent 8-bit content to any upstream, and quoted
aiosmtplib's words ("SMTPConnectError: ... [Errno 111]", "-1 Malformed SMTP
response line: SSH-2.0...") to the client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import simple_message
from helpers_smtp import RawSMTP, Reply, authed, dot_stuff, mail_lines, upstream_by_port
from relayd import esmtp, metrics
from relayd.esmtp import MailParams, ParamError, RcptParams
from helpers_records import sent_total

SENDER = "app@example.com"
RCPT = "to@example.net"
ALL = ["8BITMIME", "SMTPUTF8", "DSN"]
EIGHT_BIT = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: hello\r\n\r\n"
             "Grüße, 日本語\r\n").encode()
UTF8_RCPT = "jörg@bücher.example"


# ================================================================ sans-IO: esmtp.py

@pytest.mark.parametrize("params, expected", [
    ([], MailParams()),
    (["BODY=8BITMIME"], MailParams(body="8BITMIME")),
    (["body=7bit"], MailParams(body="7BIT")),
    (["SMTPUTF8"], MailParams(smtputf8=True)),
    (["smtputf8", "BODY=8BITMIME"], MailParams(body="8BITMIME", smtputf8=True)),
    (["RET=hdrs"], MailParams(ret="HDRS")),
    (["RET=FULL", "ENVID=QQ+2Bid.1"], MailParams(ret="FULL", envid="QQ+2Bid.1")),
    (["ENVID=" + "a" * esmtp.ENVID_MAX], MailParams(envid="a" * esmtp.ENVID_MAX)),
])
def test_parse_mail_accepts(params, expected):
    assert esmtp.parse_mail(params) == expected


@pytest.mark.parametrize("params, reply", [
    (["BODY=BINARYMIME"], "501 5.5.4 Bad BODY parameter syntax"),
    (["BODY"], "501 5.5.4 Bad BODY parameter syntax"),
    (["BODY="], "501 5.5.4 Bad BODY parameter syntax"),
    (["SMTPUTF8=YES"], "501 5.5.4 Bad SMTPUTF8 parameter syntax"),
    (["RET=NONE"], "501 5.5.4 Bad RET parameter syntax"),
    (["ENVID="], "501 5.5.4 Bad ENVID parameter syntax"),
    (["ENVID=a+2b"], "501 5.5.4 Bad ENVID parameter syntax"),       # lower-case hex
    (["ENVID=a=b"], "501 5.5.4 Bad ENVID parameter syntax"),        # "=" is no xchar
    (["ENVID=a+0Db"], "501 5.5.4 Bad ENVID parameter syntax"),      # decodes to a CR
    (["ENVID=" + "a" * (esmtp.ENVID_MAX + 1)], "501 5.5.4 Bad ENVID parameter syntax"),
    (["BODY=7BIT", "body=8bitmime"], "501 5.5.4 Duplicate BODY parameter"),
    (["SMTPUTF8", "SMTPUTF8"], "501 5.5.4 Duplicate SMTPUTF8 parameter"),
    (["RET=FULL", "RET=HDRS"], "501 5.5.4 Duplicate RET parameter"),
    (["ENVID=a", "ENVID=b"], "501 5.5.4 Duplicate ENVID parameter"),
    (["NOTIFY=NEVER"], "555 5.5.4 MAIL FROM parameters not recognized or not implemented"),
])
def test_parse_mail_refuses(params, reply):
    with pytest.raises(ParamError) as err:
        esmtp.parse_mail(params)
    assert err.value.reply == reply
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("params, expected", [
    (["NOTIFY=NEVER"], RcptParams(notify="NEVER")),
    (["notify=success,failure,delay"], RcptParams(notify="SUCCESS,FAILURE,DELAY")),
    (["ORCPT=rfc822;Bob+40Example.org"], RcptParams(orcpt="rfc822;Bob+40Example.org")),
    (["NOTIFY=DELAY", "ORCPT=utf-8;x"], RcptParams(notify="DELAY", orcpt="utf-8;x")),
])
def test_parse_rcpt_accepts(params, expected):
    assert esmtp.parse_rcpt(params) == expected


@pytest.mark.parametrize("params, reply", [
    (["NOTIFY=NEVER,SUCCESS"], "501 5.5.4 Bad NOTIFY parameter syntax"),
    (["NOTIFY=SOMETIMES"], "501 5.5.4 Bad NOTIFY parameter syntax"),
    (["NOTIFY=SUCCESS,SUCCESS"], "501 5.5.4 Bad NOTIFY parameter syntax"),
    (["NOTIFY="], "501 5.5.4 Bad NOTIFY parameter syntax"),
    (["NOTIFY=SUCCESS,"], "501 5.5.4 Bad NOTIFY parameter syntax"),
    (["ORCPT=rfc822"], "501 5.5.4 Bad ORCPT parameter syntax"),
    (["ORCPT=;a@b"], "501 5.5.4 Bad ORCPT parameter syntax"),
    (["ORCPT=rfc822;"], "501 5.5.4 Bad ORCPT parameter syntax"),
    (["ORCPT=rfc(822);a"], "501 5.5.4 Bad ORCPT parameter syntax"),
    (["ORCPT=rfc822;a" + "b" * esmtp.ORCPT_MAX], "501 5.5.4 Bad ORCPT parameter syntax"),
    (["NOTIFY=NEVER", "NOTIFY=NEVER"], "501 5.5.4 Duplicate NOTIFY parameter"),
    (["ORCPT=rfc822;a", "ORCPT=rfc822;b"], "501 5.5.4 Duplicate ORCPT parameter"),
    (["BODY=7BIT"], "555 5.5.4 RCPT TO parameters not recognized or not implemented"),
])
def test_parse_rcpt_refuses(params, reply):
    with pytest.raises(ParamError) as err:
        esmtp.parse_rcpt(params)
    assert err.value.reply == reply


def test_split_params_takes_relayds_keywords_as_written():
    assert esmtp.split_params(" body=8bitmime SIZE=10 ENVID=aB+2Bc X-FOO=1") == (
        ["body=8bitmime", "ENVID=aB+2Bc"], "SIZE=10 X-FOO=1")
    assert esmtp.split_params(" SIZE=10") == ([], " SIZE=10")        # untouched
    # No Unicode case folding: "ſ".upper() is "S".
    assert esmtp.split_params(" ſmtputf8") == ([], " ſmtputf8")


@pytest.mark.parametrize("command, arg, refused", [
    ("MAIL", "FROM:<jörg@example.com>", None),
    ("RCPT", "TO:<jörg@bücher.example>", None),
    ("MAIL", "FROM:<j\udcf6rg@example.com>", "500 5.5.2 Error: bad UTF-8 syntax"),
    ("EHLO", "bücher.example", "500 5.5.2"),
    ("AUTH", "PLAIN ÿþ", "500 5.5.2"),
    ("NOOP", None, None),
])
def test_utf8_only_in_mail_and_rcpt(command, arg, refused):
    got = esmtp.utf8_argument(command, arg)
    assert (got is None) if refused is None else (got or "").startswith(refused)


@pytest.mark.parametrize("address, smtputf8, reply", [
    ("jörg@bücher.example", True, None),
    ("jörg@bücher.example", False, "553 5.6.7"),
    ("a\u00a0b@example.com", True, "553 5.1.3"),       # no-break space: not printable
    ("a\u202eb@example.com", True, "553 5.1.3"),       # bidi override
    ("a b@example.com", True, "553 5.1.3"),
])
def test_check_address(address, smtputf8, reply):
    try:
        esmtp.check_address(address, smtputf8, "553 5.1.3 bad")
    except ParamError as err:
        assert reply and err.reply.startswith(reply)
    else:
        assert reply is None


def has(*keywords: str):
    return lambda name: name.upper() in keywords


def test_options_only_for_the_advertised_extensions():
    p = MailParams(body="8BITMIME", smtputf8=True, ret="HDRS", envid="x+2By")
    assert esmtp.mail_options(p, has(*ALL)) == [
        "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=x+2By"]
    assert esmtp.mail_options(p, has("8BITMIME")) == ["BODY=8BITMIME"]
    assert esmtp.mail_options(p, has("DSN")) == ["RET=HDRS", "ENVID=x+2By"]
    r = RcptParams(notify="SUCCESS,DELAY", orcpt="rfc822;a+40b")
    assert esmtp.rcpt_options(r, has("DSN")) == ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;a+40b"]
    assert esmtp.rcpt_options(r, has("8BITMIME", "SMTPUTF8")) == []


def test_missing_extension_looks_at_the_content_not_only_the_declaration():
    eight, seven = MailParams(body="8BITMIME"), simple_message()
    assert esmtp.missing_extension(eight, [SENDER], EIGHT_BIT, has()) == "8BITMIME"
    assert esmtp.missing_extension(eight, [SENDER], EIGHT_BIT, has("8BITMIME")) is None
    assert esmtp.missing_extension(eight, [SENDER], seven, has()) is None   # only declared
    assert esmtp.missing_extension(MailParams(), [SENDER], EIGHT_BIT, has()) is None
    utf8 = MailParams(smtputf8=True)
    assert esmtp.missing_extension(utf8, [SENDER, UTF8_RCPT], seven, has()) == "SMTPUTF8"
    header = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    assert esmtp.missing_extension(utf8, [SENDER], header, has("8BITMIME")) == "SMTPUTF8"
    assert esmtp.missing_extension(utf8, [SENDER], b"S: x\r\n\r\n\xc3\xa4\r\n",
                                   has("8BITMIME")) is None     # 8-bit body only
    assert esmtp.missing_extension(utf8, [SENDER], seven, has()) is None


# ================================================================ a recording upstream

@dataclass
class KeywordUpstream:
    """What a scripted upstream advertises and does, and what it saw:
    ``lines`` holds every command line (CRLF stripped) byte for byte."""

    keywords: list[str]
    greeting: bytes = b"220 kw.test ESMTP\r\n"
    mail_reply: bytes = b"250 2.1.0 ok\r\n"
    lines: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def commands(self, verb: bytes) -> list[bytes]:
        return [line for line in self.lines if line[:4].upper() == verb]


class _KeywordProtocol(asyncio.Protocol):
    def __init__(self, up: KeywordUpstream):
        self.up = up
        self.buf = b""
        self.data: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.up.connections += 1
        transport.write(self.up.greeting)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.data is not None:
                if line == b".":
                    self.up.messages.append(self.data)
                    self.data = None
                    self.t.write(b"250 2.0.0 queued\r\n")
                else:
                    self.data += line + b"\r\n"
                continue
            self.up.lines.append(line)
            self.command(line[:4].upper())

    def command(self, verb: bytes) -> None:
        if verb == b"EHLO":
            lines = [b"kw.test", *(k.encode() for k in self.up.keywords)]
            self.t.write(b"".join(b"250-" + k + b"\r\n" for k in lines[:-1])
                         + b"250 " + lines[-1] + b"\r\n")
        elif verb == b"MAIL":
            self.t.write(self.up.mail_reply)
        elif verb == b"DATA":
            self.data = b""
            self.t.write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            self.t.write(b"221 bye\r\n")
            self.t.close()
        else:
            self.t.write(b"250 ok\r\n")


@pytest.fixture
async def upstream():
    servers: list[asyncio.AbstractServer] = []

    async def make(keywords: list[str], **script: Any) -> KeywordUpstream:
        up = KeywordUpstream(list(keywords), **script)
        server = await asyncio.get_running_loop().create_server(
            lambda: _KeywordProtocol(up), "127.0.0.1", 0)
        servers.append(server)
        up.port = server.sockets[0].getsockname()[1]
        return up

    yield make
    for s in servers:
        s.close()


def route(*ups: KeywordUpstream) -> dict[str, Any]:
    """provision() arguments: the upstreams tried in the order given."""
    return {"plan": "paid", "strategy": "priority", "upstreams": [
        {"host": "127.0.0.1", "port": u.port, "priority": i} for i, u in enumerate(ups)]}


async def transaction(c: RawSMTP, mail: str, rcpts: list[str], data: bytes) -> Reply:
    """MAIL, RCPTs (each must be accepted) and DATA, raw command lines."""
    r = await c.cmd(mail.encode())
    assert r.code == 250, r
    for rcpt in rcpts:
        r = await c.cmd(rcpt.encode())
        assert r.code == 250, r
    assert (await c.cmd("DATA")).code == 354
    c.write(dot_stuff(data) + b".\r\n")
    await c.writer.drain()
    return await c.reply()


def attempts(idsmtp: str, result: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "relayd_upstream_attempts_total", {"upstream": idsmtp, "result": result}) or 0.0


# ================================================================ relayed or dropped

MAIL_FROM = f"MAIL FROM:<{SENDER}>"
RCPT_TO = f"RCPT TO:<{RCPT}>"

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


# ================================================================ failure texts (SPEC 3.18)

@pytest.fixture
async def servers():
    """servers(handler) -> port of a loopback TCP server running ``handler``."""
    started: list[asyncio.AbstractServer] = []

    async def start(handler: Any) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        started.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for s in started:
        s.close()


def banner(data: bytes) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()
    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()                      # never greets


async def hangs_up_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 x.test ESMTP\r\n")
    while line := await reader.readline():
        if line[:4].upper() == b"EHLO":
            writer.write(b"250 x.test\r\n")
        else:
            writer.close()
            return


FORBIDDEN = ["Error", "Errno", "Exception", "Malformed", "-1 ", "127.0.0.1", "SSH"]


async def failure_case(kind: str, closed_port: int, sink_factory: Any, servers: Any,
                       upstream: Any) -> tuple[dict[str, Any], str, str, int]:
    """(upstream record fields, the client's plain words, a piece of the
    log's detail, the port the client must never see) for one kind."""
    if kind == "refused":
        return {"port": closed_port}, "connection refused", "ConnectionRefusedError", closed_port
    if kind == "tls-untrusted":
        sink = await sink_factory(tls="implicit")          # a CA relayd does not trust
        return ({"port": sink.port, "ssltls": True, "verify_tls": True},
                "TLS certificate not trusted", "SSLCertVerificationError", sink.port)
    if kind == "timeout":
        port = await servers(silent)
        return {"port": port}, "timed out after 1 s", "SMTPConnectTimeoutError", port
    if kind == "not-smtp":
        port = await servers(banner(b"SSH-2.0-OpenSSH_9.2\r\n"))
        return {"port": port}, "not an SMTP server", "Malformed SMTP response line", port
    if kind == "lost":
        port = await servers(hangs_up_at_mail)
        return {"port": port}, "connection lost", "SMTPServerDisconnected", port
    raise AssertionError(kind)


def assert_plain(r: Reply, words: str, port: int) -> None:
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert f"Delivery failed temporarily: {words}" in r.text, r
    for bad in [*FORBIDDEN, str(port)]:
        assert bad not in r.text, (bad, r)


@pytest.mark.parametrize("kind", ["refused", "tls-untrusted", "timeout", "not-smtp", "lost"])
async def test_failure_texts_in_plain_words(relay_factory, provision, sink_factory, servers,
                                            upstream, closed_port, caplog, kind):
    relay = await relay_factory(timeouts={"connect": 1})
    fields, words, detail, port = await failure_case(kind, closed_port, sink_factory,
                                                     servers, upstream)
    tenant = await provision(relay, upstreams=[{"host": "127.0.0.1", **fields}])
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert_plain(r, words, port)
    # The mail log keeps what happened technically, for the operator.
    line = mail_lines(caplog.records)[-1]
    assert line["result"] == "deferred" and detail in line["reply"], line
    await c.close()


async def test_system_smtp_failures_never_show_its_address(relay_factory, provision,
                                                           upstream, closed_port, caplog):
    """A system SMTP refused, then one whose own 451 names its host and port:
    the client reads neither (SPEC 3.18); the log has both."""
    talkative = await upstream([], mail_reply=b"451 4.3.0 127.0.0.1:%d busy, try later\r\n")
    talkative.mail_reply = talkative.mail_reply % talkative.port
    relay = await relay_factory(system_smtps=[
        {"host": "127.0.0.1", "port": closed_port, "priority": 0},
        {"host": "127.0.0.1", "port": talkative.port, "priority": 1}])
    tenant = await provision(relay, plan="paid", strategy="priority")
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert (r.code, r.enhanced) == (451, "4.4.1"), r
    assert r.text.endswith("451 4.3.0 [system SMTP] busy, try later"), r
    for bad in [*FORBIDDEN, str(closed_port), str(talkative.port)]:
        assert bad not in r.text, (bad, r)
    line = mail_lines(caplog.records)[-1]
    assert line["upstream"] == "system:1" and f"127.0.0.1:{talkative.port}" in line["reply"]
    await c.close()


async def test_system_smtp_refused_in_plain_words(relay_factory, provision, closed_port,
                                                  caplog):
    relay = await relay_factory(system_smtps=[{"host": "127.0.0.1", "port": closed_port}])
    tenant = await provision(relay, plan="paid")
    c = await authed(relay, tenant)
    r = await transaction(c, MAIL_FROM, [RCPT_TO], simple_message())
    assert_plain(r, "connection refused", closed_port)
    assert "ConnectionRefusedError" in mail_lines(caplog.records)[-1]["reply"]
    await c.close()
