"""The From/Reply-To edit of SPEC 3.6, done on the raw message bytes.

The message is never parsed into a MIME tree and re-serialised: only the
header fields named here are replaced, and every other byte (other headers,
their folding, the body, 8-bit text, binary parts) is passed through as is.

The header section (RFC 5322 2.1) runs from the first line to the empty
line before the body, or, as Postfix's cleanup reads it, to the first line
that is neither a header field (a field name of printable ASCII but ':',
obsolete white space before the colon allowed, 4.5) nor a continuation
line (2.2.3 folding). A field is a line that starts with a name plus its
continuation lines.

Every piece of work here is bounded, whatever the message (SPEC 9: one
message must not stall the other sessions). Lines are never split into
Python objects: the header section is found and searched with compiled
regular expressions over at most ``MAX_HEADER`` bytes, a section that runs
longer is refused (``HeaderTooLarge``), and the From: address is read by an
iterative scanner over at most ``MAX_ADDRESS_FIELD`` characters.
(``email.utils.getaddresses`` recursed once per nested comment: a From:
field of a few thousand '(' made it raise RecursionError.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .errors import HeaderTooLarge
from .records import domain_of

# The largest header section inspected: 256 KiB, 2.5 times Postfix's
# header_size_limit for a single field (real mail, DKIM and Received chains
# included, stays under 64 KiB). Scanning it costs at most ~15 ms. What is
# larger is refused (552) rather than half-read, so that no From: field can
# hide past the part relayd looks at.
MAX_HEADER = 256 * 1024
# The longest From: value whose address is parsed (RFC 5322 2.1.1 asks for
# lines of at most 998 characters). A longer one counts as unreadable: the
# rewrite verdict then treats its domain as not allowed.
MAX_ADDRESS_FIELD = 16 * 1024

# The start of the first line that ends the header section.
_HEADER_END = re.compile(rb"(?m)^(?![ \t]|[!-9;-~]+[ \t]*:)")
_HEADER_LINE = re.compile(rb"[ \t]|[!-9;-~]+[ \t]*:")
MAX_NAME = 1000         # a field name is part of a line (RFC 5322 2.1.1: 998 octets)
_FIELD_START = re.compile(rb"(?m)^(?![ \t])")
_NEXT_FIELD = re.compile(rb"\n(?![ \t])")
_FROM = re.compile(rb"(?mi)^from[ \t]*:")
_REPLY_TO = re.compile(rb"(?mi)^reply-to[ \t]*:")
# A whole From: field with its continuation lines (for dropping extra ones).
_FROM_FIELD = re.compile(rb"(?mi)^from[ \t]*:.*(?:\n[ \t].*)*(?:\n|\Z)")
_FOLD = re.compile(r"\r?\n([ \t])")


def header_end(msg: bytes) -> int:
    """Offset just past the header section's last line ending (the line that
    ends it is not included): 0 when the message starts with an empty line
    or a body line, len(msg) when it is all header. Raises HeaderTooLarge
    when the section is longer than MAX_HEADER."""
    if msg[:1] in (b" ", b"\t"):       # a continuation of no field: no header
        return 0
    limit = min(len(msg), MAX_HEADER)
    m = _HEADER_END.search(msg, 0, limit)
    if limit == len(msg):
        return m.start() if m is not None else limit
    # The search sees the message as ending at ``limit``: the line cut there
    # may look like no header line only for want of its colon. Judged whole,
    # a header line means the section goes on past what relayd reads.
    if m is not None and not _HEADER_LINE.match(msg, m.start(), m.start() + MAX_NAME):
        return m.start()
    raise HeaderTooLarge(MAX_HEADER)


def fields(msg: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, lower-cased name) of each header field, end exclusive and
    including the field's line ending; lazily, for inspection and tests."""
    end = header_end(msg)
    starts = (m.start() for m in _FIELD_START.finditer(msg, 0, end) if m.start() < end)
    s = next(starts, None)
    while s is not None:
        e = next(starts, end)
        yield s, e, msg[s:e].split(b":", 1)[0].strip().lower()
        s = e if e < end else None


def _field_end(msg: bytes, pos: int, end: int) -> int:
    m = _NEXT_FIELD.search(msg, pos, end)
    return m.end() if m else end


def from_domain(msg: bytes) -> str | None:
    """The domain of the first From: address; None when there is no From:
    field, "" when there is one whose address has no readable domain.
    Raises HeaderTooLarge (see header_end)."""
    end = header_end(msg)
    m = _FROM.search(msg, 0, end)
    if m is None:
        return None
    stop = _field_end(msg, m.end(), end)
    if stop - m.end() > MAX_ADDRESS_FIELD:
        return ""
    value = _FOLD.sub(r"\1", msg[m.end():stop].decode("utf-8", "surrogateescape"))
    return domain_of(first_address(value)) or ""


def _without_comments(text: str) -> str | None:
    """``text`` without its RFC 5322 3.2.2 comments (nested, with quoted
    pairs), in one pass with a depth counter; None when unbalanced."""
    out: list[str] = []
    depth, quoted, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and (quoted or depth):
            if not depth:
                out.append(text[i:i + 2])
            i += 2
            continue
        if depth:
            depth += (c == "(") - (c == ")")
        elif quoted:
            quoted = c != '"'
            out.append(c)
        elif c == "(":
            depth = 1
        else:
            quoted = c == '"'
            out.append(c)
        i += 1
    return None if depth or quoted else "".join(out)


def first_address(value: str) -> str:
    """The addr-spec of the first mailbox of an address list (RFC 5322
    3.4): inside <...> when there is an angle address, else the first
    comma-separated item (a group's display name skipped); "" if none."""
    text = _without_comments(value)
    if text is None:
        return ""
    start, quoted, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "<":
            close = text.find(">", i)
            return text[i + 1:close if close >= 0 else len(text)].strip()
        elif c == ":":
            start = i + 1                 # "group-name: a@b, c@d;"
        elif c in ",;":
            if text[start:i].strip():
                break
            start = i + 1
        i += 1
    return text[start:i].strip()


def rewrite_from(msg: bytes, new_from: str) -> bytes:
    """Replace From: with ``new_from``; keep the original From: as Reply-To:
    unless the message has one. Every other byte is unchanged. Raises
    HeaderTooLarge (see header_end)."""
    end = header_end(msg)
    head = msg[:end]
    # The header section's line ending, judged on it plus the line after it
    # (the separator): a message with no header fields at all used to be
    # judged on its whole body (hypothesis found "\n" + a CRLF body getting
    # a CRLF From:). No line ending at all: CRLF, SMTP's canonical form.
    around = msg[:end + 2]
    newline = b"\r\n" if b"\r\n" in around or b"\n" not in around else b"\n"
    new_field = b"From: " + new_from.encode("utf-8") + newline
    first = _FROM.search(head)
    if first is None:
        return new_field + msg
    s, e = first.start(), _field_end(head, first.end(), end)
    replacement = new_field
    if _REPLY_TO.search(head) is None:
        value = head[first.end():e]
        if not value.endswith(b"\n"):      # header section ended without a newline
            value += newline
        replacement += b"Reply-To:" + value
    # Any further From: fields go (RFC 5322 3.6: one From: per message).
    return b"".join((head[:s], replacement, _FROM_FIELD.sub(b"", head[e:]), msg[end:]))
