"""Replies as they go on the wire (RFC 5321 4.2): every line RelaySMTP.push
writes, relayd's constants and the lines aiosmtpd writes itself, passes
through a ReplyBuffer first.

* One write per reply (SPEC 3.14): the continuation lines of a multi-line
  reply ("250-...") wait for its last line ("250 ..."), then the whole reply
  goes out in one transport write: one TCP segment (relayd's sockets have
  TCP_NODELAY), one TLS record. aiosmtpd wrote each line on its own, so one
  EHLO reply took a segment per line.
* Printable US-ASCII text (RFC 5321 4.2): aiosmtpd echoes an unknown command
  name as received (NUL, bare CR, ESC...) and upstream replies may be 8-bit;
  any other character becomes "?" (a non-ASCII one would also make
  aiosmtpd's ASCII encoder raise).
* Enhanced status codes (RFC 2034 4): a 2xx, 4xx or 5xx line without one
  gets replies.DEFAULT_ENHANCED's. The greeting and the replies to HELO and
  EHLO are exempt (EHLO's keyword lines must stay bare); they are the
  replies whose text starts with relayd's host name (RFC 5321 4.1.1.1,
  4.3.1), which is how they are told apart here.
"""

from __future__ import annotations

import re

from . import replies

# An RFC 3463 status code at the start of a reply's text.
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced(line: str) -> str:
    """``line`` with an enhanced status code, unless it has one or needs none
    (3xx: RFC 2034 4)."""
    code, sep, text = line[:3], line[3:4] or " ", line[4:]
    if not code.isdigit() or code[0] not in "245" or _ENHANCED.match(text):
        return line
    status = replies.DEFAULT_ENHANCED.get(int(code), f"{code[0]}.0.0")
    return f"{code}{sep}{status} {text}" if text else f"{code}{sep}{status}"


class ReplyBuffer:
    """One connection's reply in progress."""

    def __init__(self, hostname: str):
        self.hostname = hostname
        self._lines: list[str] = []

    def add(self, status: str | bytes) -> bytes | None:
        """Take one reply line. Once it is the reply's last line, return the
        whole reply, lines joined by CRLF, without the final CRLF (aiosmtpd's
        push adds it); until then None."""
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if not (text.isascii() and text.isprintable()):
            text = replies.NOT_REPLY_TEXT.sub("?", text)
        if self._lines and text[:3] != self._lines[0][:3]:
            # Never merge two replies (RFC 5321 4.2.1: one code per reply):
            # a reply left without its last line cannot be sent as it is.
            self._lines = []
        self._lines.append(text)
        if text[3:4] == "-":              # RFC 5321 4.2.1: "NNN-" is not the last line
            return None
        lines, self._lines = self._lines, []
        if lines[0][4:].split(" ", 1)[0] != self.hostname:
            lines = [with_enhanced(line) for line in lines]
        return "\r\n".join(lines).encode("ascii")
