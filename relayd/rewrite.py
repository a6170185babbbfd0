"""The From/Reply-To edit of SPEC 3.6, done on the raw message bytes.

The message is never parsed into a MIME tree and re-serialised: only the
header fields named here are replaced, and every other byte (other headers,
their folding, the body, 8-bit text, binary parts) is passed through as is.

A header block is the bytes up to the first empty line (RFC 5322 2.1); a
field is a line that does not start with white space plus its continuation
lines (2.2.3 folding).
"""

from __future__ import annotations

import re
from email.utils import getaddresses

from .records import domain_of

_FIELD_START = re.compile(rb"(?m)^(?![ \t])")


def header_end(msg: bytes) -> int:
    """Offset just past the header block's last line ending (the empty line
    separating the body is not included). 0 when the message starts with an
    empty line; len(msg) when there is no body separator."""
    if msg.startswith(b"\r\n") or msg.startswith(b"\n"):
        return 0
    m = re.search(rb"\r?\n\r?\n", msg)
    return m.start() + (2 if msg[m.start()] == 13 else 1) if m else len(msg)


def fields(msg: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, lower-cased name) of each header field, end exclusive and
    including the field's line ending."""
    end = header_end(msg)
    starts = [m.start() for m in _FIELD_START.finditer(msg, 0, end) if m.start() < end]
    out = []
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else end
        name = msg[s:e].split(b":", 1)[0].strip().lower()
        out.append((s, e, name))
    return out


def _value(field: bytes) -> bytes:
    """The field's raw value: after the colon, up to and including its line end."""
    return field.split(b":", 1)[1] if b":" in field else b"\r\n"


def _unfold(value: bytes) -> str:
    return re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "surrogateescape")).strip()


def from_domain(msg: bytes) -> str | None:
    """The domain of the first From: address; None when there is no From:
    field, "" when there is one whose address has no readable domain."""
    for s, e, name in fields(msg):
        if name == b"from":
            addrs = getaddresses([_unfold(_value(msg[s:e]))])
            return (domain_of(addrs[0][1]) if addrs else None) or ""
    return None


def rewrite_from(msg: bytes, new_from: str) -> bytes:
    """Replace From: with ``new_from``; keep the original From: as Reply-To:
    unless the message has one. Every other byte is unchanged."""
    fs = fields(msg)
    froms = [(s, e) for s, e, n in fs if n == b"from"]
    has_reply_to = any(n == b"reply-to" for _, _, n in fs)
    # The header block's line ending, judged on the block plus the separator
    # line after it: a message with no header fields at all used to be judged
    # on its whole body (hypothesis found "\n" + a CRLF body getting a CRLF
    # From:). No line ending at all: CRLF, SMTP's canonical form.
    head = msg[:header_end(msg) + 2]
    newline = b"\r\n" if b"\r\n" in head or b"\n" not in head else b"\n"
    new_field = b"From: " + new_from.encode("utf-8") + newline
    if not froms:
        return new_field + msg
    s, e = froms[0]
    replacement = new_field
    if not has_reply_to:
        value = _value(msg[s:e])
        if not value.endswith(b"\n"):      # header block ended without a newline
            value += newline
        replacement += b"Reply-To:" + value
    out = [msg[:s], replacement]
    pos = e
    for s2, e2 in froms[1:]:               # drop any further From: fields
        out.append(msg[pos:s2])
        pos = e2
    out.append(msg[pos:])
    return b"".join(out)
