"""The trace field relayd prepends to every message it relays (SPEC 3.16):
one ``Received:`` field (RFC 5321 4.4), built here from plain data, sans-IO.
delivery.py puts it on top of the message; nothing else in the message
changes. With ``received_header: full`` (the default)::

    Received: from client.test ([192.0.2.1])
    \tby relay.example.com (relayd) with ESMTPSA id 3F2A9C01B7;
    \tTue, 02 Dec 2025 10:00:00 +0100

* ``from``: the EHLO name the client gave. It is client input and is
  trusted for nothing: only the characters of a domain or an address
  literal are kept (RFC 5321 4.1.2, 4.1.3), every other one -- space, '(',
  ';', CR, LF, NUL, 8-bit -- becomes '?', so that a client can neither add a
  clause or a date to its own trace line nor break the header; and it is
  cut to 255 characters (RFC 5321 4.5.3.1.2, a domain's limit).
* The TCP-info (RFC 5321 4.4) is the client's address as an address literal
  (4.1.3): ``[192.0.2.1]``, ``[IPv6:2001:db8::1]`` (an IPv4-mapped IPv6
  address is written as the IPv4 address it is, a zone index is dropped).
  The grammar also allows a domain before the literal, the name reverse DNS
  gave: relayd does no DNS lookups, so it writes the address alone rather
  than a name it never looked up (Postfix writes ``unknown`` there when the
  lookup fails, which reads like a host name).
* ``with``: the protocol word of RFC 3848: ESMTPSA authenticated over TLS,
  ESMTPA authenticated in clear (a loopback listener), ESMTPS and ESMTP
  unauthenticated (AUTH is required before MAIL, so not today).
* ``id``: the session id of the 250 reply (SPEC 3.8), to find the message
  in the mail log. RFC 5321's ID is an Atom or a msg-id; "3F2A9C01B7.2" (a
  session's second message) is neither, so it is written as a quoted-string
  (RFC 5321 4.1.2 String), the same characters between quotes.
* The date: RFC 5322 3.3 date-time, relayd's local time with its offset.
* Folding (RFC 5322 2.2.3): a line break before ``by`` and before the date,
  as Postfix folds its own, and within a clause at a space wherever a line
  would pass 78 characters (RFC 5322 2.1.1); a single word longer than that
  stays whole, since a field can only be folded at white space.

``received_header: hide_client`` writes ``from relayd-submission``: no EHLO
name and no address of the client (privacy of a submitting user's address,
as some providers do); ``off`` writes nothing.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
from datetime import datetime
from typing import Literal

Mode = Literal["full", "hide_client", "off"]

# RFC 5322 2.1.1: a line SHOULD be at most 78 characters, CRLF excluded.
LINE_WIDTH = 78
# RFC 5321 4.5.3.1.2: a domain is at most 255 octets; an EHLO name longer
# than that is cut (aiosmtpd's 512-octet command line bounds it first).
MAX_NAME = 255
# What ``hide_client`` writes instead of the client's name and address.
HIDDEN_CLIENT = "relayd-submission"
# What stands for an EHLO name that is missing (HELO/EHLO always carry one).
NO_NAME = "unknown"

# Anything that is not a domain or address-literal character (RFC 5321
# 4.1.2, 4.1.3; '_' too: widespread in real EHLO names).
_NOT_NAME = re.compile(r"[^A-Za-z0-9._:\[\]-]")
# RFC 5321 4.1.2 Atom: 1*atext (RFC 5322 3.2.3).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


def protocol(*, tls: bool, authenticated: bool) -> str:
    """The ``with`` word (RFC 3848 for the S and A suffixes)."""
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def safe_name(name: str | None) -> str:
    """A client-given (or configured) host name as it may appear in the
    field: domain/address-literal characters only, at most MAX_NAME."""
    if not name:
        return NO_NAME
    name = _NOT_NAME.sub("?", name)
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 3] + "..."


def address_literal(ip: str) -> str | None:
    """RFC 5321 4.1.3: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; None for
    what is not an IP address (the field then carries no TCP-info)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv6Address):
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


def _id(session_id: str) -> str:
    if _ATOM.fullmatch(session_id):
        return session_id
    return '"' + re.sub(r'(["\\])', r"\\\1", session_id) + '"'


def fold(name: str, clauses: list[list[str]], width: int = LINE_WIDTH) -> bytes:
    """``name: word word ...`` as a header field with CRLF line endings: a
    new line (starting with a tab) at each clause after the first, and
    within a clause before a word that would take the line past ``width``."""
    lines: list[str] = []
    line, words = f"{name}:", 0
    for i, clause in enumerate(clauses):
        for j, word in enumerate(clause):
            if words and ((i and not j) or len(line) + 1 + len(word) > width):
                lines.append(line)
                line, words = "\t" + word, 1
            else:
                line, words = f"{line} {word}", words + 1
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def received(mode: Mode, *, ehlo_name: str | None, client_ip: str, hostname: str,
             tls: bool, authenticated: bool, session_id: str, when: datetime) -> bytes:
    """The whole ``Received:`` field, CRLF-terminated ASCII; b"" for ``off``.
    ``when`` is timezone-aware (RFC 5322 3.3 wants the zone offset)."""
    if mode == "off":
        return b""
    if mode == "hide_client":
        origin = ["from", HIDDEN_CLIENT]
    else:
        origin = ["from", safe_name(ehlo_name)]
        literal = address_literal(client_ip)
        if literal is not None:
            origin.append(f"({literal})")
    by = ["by", safe_name(hostname), "(relayd)",
          "with", protocol(tls=tls, authenticated=authenticated),
          "id", _id(session_id) + ";"]
    return fold("Received", [origin, by, email.utils.format_datetime(when).split()])
