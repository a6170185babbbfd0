"""SPEC 3.15: the MAIL/RCPT parameter parsers and the per-upstream
decisions of relayd/esmtp.py, sans-IO. Real sessions are in
test_esmtp_params.py."""

from __future__ import annotations

import pytest

from conftest import simple_message
from helpers_upstream import ALL, EIGHT_BIT, SENDER, UTF8_RCPT
from relayd import esmtp
from relayd.esmtp import MailParams, ParamError, RcptParams



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
