"""ESMTP parameters of MAIL and RCPT (SPEC 3.15), sans-IO: what a client
asked for, validated, in a form the delivery side relays to an upstream that
advertises the matching extension.

* ``BODY=7BIT|8BITMIME`` (RFC 6152), ``SMTPUTF8`` (RFC 6531),
  ``RET=FULL|HDRS`` and ``ENVID=`` (RFC 3461 4.3, 4.4) on MAIL;
* ``NOTIFY=`` and ``ORCPT=`` (RFC 3461 4.1, 4.2) on RCPT.

The client's side (fed by arguments.py and smtp.py's handler):
``split_params`` takes these out of a MAIL/RCPT argument (aiosmtpd would
refuse them with 555), ``parse_mail`` and ``parse_rcpt`` validate them (bad
syntax or a repeat: 501 5.5.4), and ``check_address``/``utf8_argument`` say
where non-ASCII may appear (only in MAIL/RCPT addresses, only in UTF-8,
only under SMTPUTF8: RFC 6531 3.3).

The upstream's side (upstream.py, per pooled connection, from the keywords
of its EHLO): ``mail_options``/``rcpt_options`` pass each parameter on only
to an upstream that advertises its extension, and ``missing_extension``
says when a message cannot go to an upstream at all (8-bit content without
8BITMIME, a non-ASCII address or header without SMTPUTF8).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import replies


@dataclass(frozen=True)
class MailParams:
    body: str | None = None          # "7BIT" | "8BITMIME" as the client declared it
    smtputf8: bool = False
    ret: str | None = None           # "FULL" | "HDRS"
    envid: str | None = None         # xtext, as received

    @property
    def dsn(self) -> bool:
        return self.ret is not None or self.envid is not None


@dataclass(frozen=True)
class RcptParams:
    notify: str | None = None        # "NEVER" or a comma list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None         # "addr-type;xtext", as received

    @property
    def dsn(self) -> bool:
        return self.notify is not None or self.orcpt is not None


# ---------------------------------------------------------------- the client's side

MAIL_KEYWORDS = frozenset({"BODY", "SMTPUTF8", "RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
KEYWORDS = MAIL_KEYWORDS | RCPT_KEYWORDS
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})            # RFC 6152 2 (no BINARYMIME here)
RET_TYPES = frozenset({"FULL", "HDRS"})                  # RFC 3461 4.3
NOTIFY_TYPES = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 4.1, or NEVER alone
# RFC 3461 4: DSN makes MAIL up to 100 characters longer (ENVID) and RCPT up
# to 500 (ORCPT); relayd bounds the two values so, and arguments.py raises
# aiosmtpd's 512-byte command limits by as much.
ENVID_MAX = 100
ORCPT_MAX = 500
# xtext (RFC 3461 4): "!".."~" except "+" and "=", or "+" and two upper-case
# hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# addr-type (RFC 3461 4.2) is an atom: RFC 5322 atext.
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# "<local@domain>" with a dot-atom local part: nearly every MAIL/RCPT. Anything
# else (quoted local parts, source routes, no brackets, non-ASCII) goes to
# aiosmtpd's RFC 5322 parser (arguments.py's _getaddr).
PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>")


class ParamError(ValueError):
    """A MAIL or RCPT parameter relayd cannot take; ``reply`` is the
    answer (a replies.py constant)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


def split_params(rest: str) -> tuple[list[str], str]:
    """Separate the parameters relayd reads itself (KEYWORDS, as the client
    wrote them: ENVID and ORCPT are case-sensitive xtext) from the rest of a
    MAIL/RCPT argument, which aiosmtpd checks as before (SIZE; unknown
    keywords get its 555). A keyword is ASCII: no Unicode case folding
    ("ſmtputf8".upper() is "SMTPUTF8")."""
    ours: list[str] = []
    others: list[str] = []
    for word in rest.split():
        key = word.partition("=")[0]
        (ours if key.isascii() and key.upper() in KEYWORDS else others).append(word)
    return ours, (" ".join(others) if ours else rest)


def _xtext(value: str, limit: int) -> bool:
    """``value`` is xtext (RFC 3461 4) of at most ``limit`` characters whose
    decoded form is printable US-ASCII (RFC 3461 4.2, 4.4)."""
    if len(value) > limit or not _XTEXT.fullmatch(value):
        return False
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    return all(" " <= c <= "~" for c in decoded)


def _keyed(params: Sequence[str], allowed: frozenset[str], unknown: str
           ) -> dict[str, str | None]:
    """{KEYWORD: value or None} of ``params``; a keyword of the other command
    is unknown here (``unknown``: its 555), a repeated one bad syntax (each
    parameter says one thing once; Postfix refuses repeats likewise)."""
    seen: dict[str, str | None] = {}
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper()
        if key not in allowed:
            raise ParamError(unknown)
        if key in seen:
            raise ParamError(replies.DUPLICATE_PARAMETER.format(keyword=key))
        seen[key] = value if eq else None
    return seen


def _bad(key: str) -> ParamError:
    return ParamError(replies.BAD_PARAMETER.format(keyword=key))


def parse_mail(params: Sequence[str]) -> MailParams:
    """MAIL's parameters (split_params' first part) or ParamError: BODY=
    7BIT|8BITMIME (RFC 6152 2), SMTPUTF8 without a value (RFC 6531 3.4),
    RET=FULL|HDRS and ENVID=xtext (RFC 3461 4.3, 4.4); keyword values in
    upper case, ENVID as received."""
    seen = _keyed(params, MAIL_KEYWORDS, replies.MAIL_PARAMS_UNKNOWN)
    body, ret, envid = seen.get("BODY"), seen.get("RET"), seen.get("ENVID")
    if "BODY" in seen and (body or "").upper() not in BODY_TYPES:
        raise _bad("BODY")
    if seen.get("SMTPUTF8") is not None:
        raise _bad("SMTPUTF8")
    if "RET" in seen and (ret or "").upper() not in RET_TYPES:
        raise _bad("RET")
    if "ENVID" in seen and not _xtext(envid or "", ENVID_MAX):
        raise _bad("ENVID")
    return MailParams(body=body.upper() if body else None, smtputf8="SMTPUTF8" in seen,
                      ret=ret.upper() if ret else None, envid=envid)


def parse_rcpt(params: Sequence[str]) -> RcptParams:
    """RCPT's parameters or ParamError: NOTIFY=NEVER or a list of SUCCESS,
    FAILURE, DELAY, each once (RFC 3461 4.1), and ORCPT=addr-type;xtext
    (RFC 3461 4.2); NOTIFY in upper case, ORCPT as received."""
    seen = _keyed(params, RCPT_KEYWORDS, replies.RCPT_PARAMS_UNKNOWN)
    notify, orcpt = seen.get("NOTIFY"), seen.get("ORCPT")
    if "NOTIFY" in seen:
        notify = (notify or "").upper()
        items = notify.split(",")
        if not (notify == "NEVER" or (len(set(items)) == len(items)
                                      and set(items) <= NOTIFY_TYPES)):
            raise _bad("NOTIFY")
    if "ORCPT" in seen:
        addr_type, semi, xtext = (orcpt or "").partition(";")
        if not (semi and _ATOM.fullmatch(addr_type)
                and _xtext(xtext, ORCPT_MAX - len(addr_type) - 1)):
            raise _bad("ORCPT")
    return RcptParams(notify=notify, orcpt=orcpt)


def bad_address(address: str) -> bool:
    """Characters that must never reach an upstream command or a header:
    controls, spaces, angle brackets, and what is not printable (the
    surrogates of bytes that are not UTF-8 among them). Non-ASCII letters
    are not bad as such; they need SMTPUTF8 (RFC 6531 3.5)."""
    return any(c in address for c in "\r\n\0 \t<>") or not address.isprintable()


def check_address(address: str, smtputf8: bool, bad: str) -> None:
    """ParamError unless ``address`` may be relayed: ``bad`` (the sender's
    or the recipient's 553) for bad_address, NON_ASCII_ADDRESS for a
    non-ASCII one in a transaction whose MAIL did not say SMTPUTF8."""
    if bad_address(address):
        raise ParamError(bad)
    if not (smtputf8 or address.isascii()):
        raise ParamError(replies.NON_ASCII_ADDRESS)


def utf8_argument(command: str, arg: str | None) -> str | None:
    """What is wrong with a command's argument as aiosmtpd decoded it
    (UTF-8, undecodable bytes as surrogates): None, or the 500 for it.
    Only a MAIL or RCPT address may be non-ASCII (RFC 6531 3.3), and only
    in valid UTF-8; every other command is as strictly ASCII as before
    SMTPUTF8 was offered."""
    if not arg or arg.isascii():
        return None
    if command not in ("MAIL", "RCPT"):
        return replies.NOT_ASCII
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return replies.BAD_UTF8
    return None


# ---------------------------------------------------------------- the upstream's side

Supports = Callable[[str], bool]      # an upstream connection's EHLO keyword test


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]


def missing_extension(p: MailParams, addresses: Iterable[str], message: bytes,
                      supports: Supports) -> str | None:
    """The extension this message needs and this upstream lacks: "SMTPUTF8"
    when the client declared SMTPUTF8 and an address or a header field is
    in fact non-ASCII (RFC 6531 3.4, 3.7.4.1), "8BITMIME" when it declared
    BODY=8BITMIME and the content is in fact 8-bit (RFC 6152 3); else None.
    A message that only declared what it does not use goes as 7-bit ASCII
    (as Postfix does)."""
    if (p.smtputf8 and not supports("SMTPUTF8")
            and not (all(a.isascii() for a in addresses)
                     and _header_section(message).isascii())):
        return "SMTPUTF8"
    if p.body == "8BITMIME" and not supports("8BITMIME") and not message.isascii():
        return "8BITMIME"
    return None


def mail_options(p: MailParams, supports: Supports) -> list[str]:
    """The MAIL parameters for an upstream: each only where it advertises
    the extension (RFC 5321 2.2: an extension is used only with a server that
    offered it), values as the client sent them. DSN's are dropped for an upstream
    without DSN (RFC 3461 4.1, 5.2.1): relayd has no queue to issue the
    "relayed" notice from."""
    out = []
    if p.body and supports("8BITMIME"):
        out.append(f"BODY={p.body}")
    if p.smtputf8 and supports("SMTPUTF8"):
        out.append("SMTPUTF8")
    if p.dsn and supports("DSN"):
        out += [f"RET={p.ret}"] if p.ret else []
        out += [f"ENVID={p.envid}"] if p.envid else []
    return out


def rcpt_options(p: RcptParams, supports: Supports) -> list[str]:
    """The RCPT parameters for an upstream: NOTIFY and ORCPT as the client
    gave them, to an upstream that advertises DSN only."""
    if not (p.dsn and supports("DSN")):
        return []
    return ([f"NOTIFY={p.notify}"] if p.notify else []) + (
        [f"ORCPT={p.orcpt}"] if p.orcpt else [])
