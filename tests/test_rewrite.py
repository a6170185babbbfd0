"""SPEC 3.6: the From rewrite, decided per attempted upstream. Unit tests of
relayd.rewrite (raw-bytes header editing) and policy.rewrite_verdict, then
end to end: the upstream sees the rewritten envelope and From:, the
original From: as Reply-To:, and every other byte unchanged.
"""

from __future__ import annotations

import os

import pytest

from conftest import sink_upstream
from helpers_smtp import authed, dot_stuff, mail_lines, rich_message, without_trace
from relayd import rewrite
from relayd.policy import format_from, rewrite_verdict
from relayd.records import Upstream

DEFAULT = "noreply@allowed.test"
NAME = "Relay Sender"
NEW_FROM = b"From: Relay Sender <noreply@allowed.test>\r\n"
ORIG_FROM = b"From: Alice Example <alice@other.test>\r\n"


def upstream(**kw) -> Upstream:
    fields = dict(idsmtp="u1", host="h", port=25, defaultfromemail=DEFAULT,
                  defaultfromname=NAME)
    fields.update(kw)
    return Upstream(**fields)


# ------------------------------------------------------------------ rewrite.py

def test_header_end_and_fields():
    msg = b"A: 1\r\nB: 2\r\n  folded\r\nC:3\r\n\r\nbody\r\nD: not a header\r\n"
    end = rewrite.header_end(msg)
    assert msg[end:].startswith(b"\r\nbody")
    assert [(msg[s:e], n) for s, e, n in rewrite.fields(msg)] == [
        (b"A: 1\r\n", b"a"), (b"B: 2\r\n  folded\r\n", b"b"), (b"C:3\r\n", b"c")]
    assert rewrite.header_end(b"\r\nbody") == 0
    assert rewrite.header_end(b"A: 1\nB: 2\n\nbody\n") == len(b"A: 1\nB: 2\n")
    assert rewrite.header_end(b"A: 1\r\n") == len(b"A: 1\r\n")       # no body


@pytest.mark.parametrize("msg, domain", [
    (b"Subject: x\r\n\r\nFrom: a@body.test\r\n", None),
    (b"From: Alice <alice@Other.TEST>\r\n\r\n", "other.test"),
    (b"from: alice@other.test\r\n\r\n", "other.test"),
    (b"From: \"Alice, A.\"\r\n <alice@folded.test>\r\nTo: b@c\r\n\r\n", "folded.test"),
    (b"From: undisclosed\r\n\r\n", ""),
])
def test_from_domain(msg, domain):
    assert rewrite.from_domain(msg) == domain


def test_rewrite_from_adds_reply_to_and_keeps_every_other_byte():
    msg = rich_message()
    out = rewrite.rewrite_from(msg, "Relay Sender <noreply@allowed.test>")
    assert out == msg.replace(ORIG_FROM, NEW_FROM + b"Reply-To: Alice Example <alice@other.test>\r\n", 1)


def test_rewrite_from_keeps_an_existing_reply_to():
    msg = rich_message(extra_headers=b"Reply-To: help@other.test\r\n")
    out = rewrite.rewrite_from(msg, "Relay Sender <noreply@allowed.test>")
    assert out == msg.replace(ORIG_FROM, NEW_FROM, 1)
    assert out.count(b"Reply-To:") == 1


def test_rewrite_from_keeps_folding_in_reply_to():
    msg = b"To: b@c\r\nFrom: Alice\r\n\t<alice@other.test>\r\nSubject: s\r\n\r\nbody\r\n"
    out = rewrite.rewrite_from(msg, "n@allowed.test")
    assert out == (b"To: b@c\r\nFrom: n@allowed.test\r\nReply-To: Alice\r\n\t<alice@other.test>\r\n"
                   b"Subject: s\r\n\r\nbody\r\n")


def test_rewrite_from_drops_further_from_fields():
    msg = b"From: a@x.test\r\nTo: t@y\r\nFrom: b@x.test\r\n\r\nbody\r\n"
    out = rewrite.rewrite_from(msg, "n@allowed.test")
    assert out == b"From: n@allowed.test\r\nReply-To: a@x.test\r\nTo: t@y\r\n\r\nbody\r\n"


def test_rewrite_from_without_from_header_adds_one():
    msg = b"Subject: s\r\n\r\nbody\r\n"
    assert rewrite.rewrite_from(msg, "n@allowed.test") == b"From: n@allowed.test\r\n" + msg


def test_rewrite_from_uses_the_message_line_ending():
    msg = b"From: a@x.test\nSubject: s\n\nbody\r\n"
    assert rewrite.rewrite_from(msg, "n@allowed.test") == (
        b"From: n@allowed.test\nReply-To: a@x.test\nSubject: s\n\nbody\r\n")
    # No header fields: the separator line decides, not the body (regression).
    assert rewrite.rewrite_from(b"\nbody\r\n", "n@allowed.test") == (
        b"From: n@allowed.test\n\nbody\r\n")
    assert rewrite.rewrite_from(b"\r\nbody\n", "n@allowed.test") == (
        b"From: n@allowed.test\r\n\r\nbody\n")


# ------------------------------------------------------------------ policy

def test_format_from():
    assert format_from(None, DEFAULT) == DEFAULT
    assert format_from("", DEFAULT) == DEFAULT
    assert format_from(NAME, DEFAULT) == "Relay Sender <noreply@allowed.test>"
    assert format_from("Doe, John", DEFAULT) == '"Doe, John" <noreply@allowed.test>'
    assert format_from('Say "hi"', DEFAULT) == '"Say \\"hi\\"" <noreply@allowed.test>'
    encoded = format_from("Grüße", DEFAULT)
    assert encoded.isascii() and encoded.startswith("=?utf-8?")


@pytest.mark.parametrize("name", ["Evil\r\nBcc: victim@example.org", "Evil\nBcc: x", "A\0B",
                                  "Ä" * 80])
def test_format_from_is_always_one_header_line(name):
    """Regression: a CR/LF in a stored name used to inject header fields, and
    a long non-ASCII name was folded with a bare LF."""
    value = format_from(name, DEFAULT)
    assert not any(c in value for c in "\r\n\0")
    assert value.endswith(" <noreply@allowed.test>")


def test_verdict_sender_outside_allowed_domains_is_rewritten():
    v = rewrite_verdict(upstream(), "alice@other.test", "other.test")
    assert v.rewrite and v.envelope_sender == DEFAULT
    assert v.from_header == "Relay Sender <noreply@allowed.test>"


@pytest.mark.parametrize("sender, header_domain, rewritten", [
    ("a@allowed.test", "allowed.test", False),
    ("a@ALLOWED.test", None, False),              # no From: header: envelope decides
    ("a@allowed.test", "other.test", True),       # the From: header alone is enough
    ("a@other.test", "allowed.test", True),       # so is the envelope alone
    ("a@allowed.test", "", True),                 # unreadable From: counts as foreign
    ("a@sub.allowed.test", "sub.allowed.test", True),   # no subdomain matching
])
def test_verdict_checks_envelope_and_header(sender, header_domain, rewritten):
    v = rewrite_verdict(upstream(), sender, header_domain)
    assert v.rewrite is rewritten
    assert v.envelope_sender == (DEFAULT if rewritten else sender)


def test_verdict_without_default_sender_never_rewrites():
    v = rewrite_verdict(upstream(defaultfromemail=None), "a@other.test", "other.test")
    assert not v.rewrite and v.envelope_sender == "a@other.test"


def test_allowed_domains_default_and_override():
    u = upstream(username="mailer@Corp.Test")
    assert u.effective_allowed_domains == {"allowed.test", "corp.test"}
    assert upstream(username="apikey").effective_allowed_domains == {"allowed.test"}
    assert not rewrite_verdict(u, "x@corp.test", "corp.test").rewrite
    explicit = upstream(username="mailer@corp.test", allowed_domains=("Other.test",))
    assert explicit.effective_allowed_domains == {"other.test"}
    assert not rewrite_verdict(explicit, "a@other.test", "other.test").rewrite
    assert rewrite_verdict(explicit, "a@allowed.test", "allowed.test").rewrite


# ------------------------------------------------------------------ end to end

async def send_raw(relay, tenant, sender: str, data: bytes):
    c = await authed(relay, tenant)
    r = await c.send_message(sender, ["bob@example.net"], dot_stuff(data))
    await c.close()
    return r


async def test_rewrite_end_to_end_byte_for_byte(relay, sink_factory, provision, caplog):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail=DEFAULT, defaultfromname=NAME)])
    msg = rich_message(attachment=os.urandom(3000))
    r = await send_raw(relay, tenant, "alice@other.test", msg)
    assert r.code == 250, r
    got = sink.messages[0]
    assert got.mail_from == DEFAULT
    assert got.rcpt_tos == ["bob@example.net"]
    assert b"\r\nFrom: Relay Sender <noreply@allowed.test>\r\n" in got.data
    assert b"\r\nReply-To: Alice Example <alice@other.test>\r\n" in got.data

    def without_from_and_reply_to(data: bytes) -> bytes:
        end = rewrite.header_end(data)
        kept = [data[s:e] for s, e, n in rewrite.fields(data) if n not in (b"from", b"reply-to")]
        return b"".join(kept) + data[end:]

    data = without_trace(got.data)
    assert without_from_and_reply_to(data) == without_from_and_reply_to(msg)
    assert data == msg.replace(
        ORIG_FROM, NEW_FROM + b"Reply-To: Alice Example <alice@other.test>\r\n", 1)
    assert [line["rewrite"] for line in mail_lines(caplog.records)] == ["yes"]


async def test_existing_reply_to_is_kept_end_to_end(relay, sink_factory, provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail=DEFAULT, defaultfromname=NAME)])
    msg = rich_message(extra_headers=b"Reply-To: Help Desk <help@other.test>\r\n")
    assert (await send_raw(relay, tenant, "alice@other.test", msg)).code == 250
    assert without_trace(sink.messages[0].data) == msg.replace(ORIG_FROM, NEW_FROM, 1)


@pytest.mark.parametrize("sender", ["alice@allowed.test", "alice@corp.test"])
async def test_allowed_sender_is_not_rewritten(relay, sink_factory, provision, caplog, sender):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail=DEFAULT, defaultfromname=NAME, username="mailer@corp.test")])
    msg = rich_message(sender=f"Alice <{sender}>")
    assert (await send_raw(relay, tenant, sender, msg)).code == 250
    got = sink.messages[0]
    assert (got.mail_from, without_trace(got.data)) == (sender, msg)
    assert [line["rewrite"] for line in mail_lines(caplog.records)] == ["no"]


async def test_foreign_from_header_with_allowed_envelope_is_rewritten(relay, sink_factory,
                                                                      provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(
        sink, defaultfromemail=DEFAULT, defaultfromname=NAME)])
    msg = rich_message()                  # From: alice@other.test
    assert (await send_raw(relay, tenant, "bounce@allowed.test", msg)).code == 250
    got = sink.messages[0]
    assert got.mail_from == DEFAULT
    assert without_trace(got.data).startswith(b"Return-Path: <ignored@other.test>\r\n" + NEW_FROM)


async def test_upstream_without_default_sender_forwards_unchanged(relay, sink_factory,
                                                                  provision):
    sink = await sink_factory()
    tenant = await provision(relay, upstreams=[sink_upstream(sink)])
    msg = rich_message()
    assert (await send_raw(relay, tenant, "alice@other.test", msg)).code == 250
    got = sink.messages[0]
    assert (got.mail_from, without_trace(got.data)) == ("alice@other.test", msg)


async def test_rewrite_is_decided_per_attempted_upstream(relay, sink_factory, provision):
    rewriting = await sink_factory("tempfail")
    plain = await sink_factory()
    tenant = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(rewriting, priority=0, defaultfromemail=DEFAULT, defaultfromname=NAME),
        sink_upstream(plain, priority=1)])
    msg = rich_message()
    assert (await send_raw(relay, tenant, "alice@other.test", msg)).code == 250
    got = plain.messages[0]
    assert (got.mail_from, without_trace(got.data)) == ("alice@other.test", msg)
    # ...and the other way round.
    rewriting.mode, plain.mode = "accept", "tempfail"
    tenant2 = await provision(relay, plan="paid", strategy="priority", upstreams=[
        sink_upstream(plain, priority=0),
        sink_upstream(rewriting, priority=1, defaultfromemail=DEFAULT, defaultfromname=NAME)])
    assert (await send_raw(relay, tenant2, "alice@other.test", msg)).code == 250
    assert rewriting.messages[0].mail_from == DEFAULT
    assert NEW_FROM in without_trace(rewriting.messages[0].data)
