"""Debug logging of the conversations relayd holds, with secrets redacted
(``log_level: debug``; nothing here is logged at info).

* SMTP client side: each command line and each reply (quoted words
  redacted), by session id. What a
  command line may show is decided here (``command_text``): the verb, the
  argument of EHLO/HELO/MAIL/RCPT (names and addresses, cleaned to printable
  ASCII), AUTH's mechanism only; an AUTH answer and any line that is not a
  known command (after a 538 the client's next lines are its base64 user
  name and password) appear as their length alone.
* Upstream side: each command relayd sends and the reply it got, never AUTH
  (aiosmtplib's login is not logged).
* Admin socket: method, path (no query: it may carry a token), status and
  the owner id when the request names one; never a token.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from .maillog import event
from .replies import NOT_REPLY_TEXT

smtp_log = logging.getLogger("relayd.smtp")
upstream_log = logging.getLogger("relayd.upstream")
admin_log = logging.getLogger("relayd.admin")

# Commands whose argument carries no secret (RFC 5321 4.1, RFC 3207).
_SHOW_ARGUMENT = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "VRFY", "EXPN", "HELP", "NOOP"})
_NO_ARGUMENT = frozenset({"DATA", "RSET", "QUIT", "STARTTLS"})
MAX_SHOWN = 300          # characters of an argument shown


def command_text(line: bytes, secret: bool = False) -> str:
    """How a client's command line appears in the debug log."""
    if secret:
        return f"<AUTH answer, {len(line)} bytes>"
    text = line.rstrip(b"\r\n").decode("ascii", "replace")
    verb, _, arg = text.partition(" ")
    upper = verb.upper()
    if upper == "AUTH":
        mechanism = arg.split(" ", 1)[0]
        rest = " <redacted>" if " " in arg.strip() else ""
        return f"AUTH {_clean(mechanism)}{rest}"
    if upper in _NO_ARGUMENT:
        return upper if not arg else f"{upper} <{len(arg)} bytes of argument>"
    if upper in _SHOW_ARGUMENT:
        return f"{upper} {_clean(arg)}".rstrip()
    return f"<unrecognised command, {len(line)} bytes>"


def _clean(text: str) -> str:
    text = NOT_REPLY_TEXT.sub("?", text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def client_line(session: str, line: bytes, secret: bool) -> None:
    if smtp_log.isEnabledFor(logging.DEBUG):
        event(smtp_log, logging.DEBUG, "smtp_command", session=session,
              command=command_text(line, secret))


# A reply quoting the client's words (aiosmtpd's 'command "X" not
# recognized' echoes them: after a 538, the client's base64 password).
_QUOTED = re.compile(r'"[^"]*"')


def client_reply(session: str, reply: bytes) -> None:
    if smtp_log.isEnabledFor(logging.DEBUG):
        text = NOT_REPLY_TEXT.sub(" ", reply.decode("ascii", "replace")).strip()
        text = _QUOTED.sub('"<redacted>"', text)
        event(smtp_log, logging.DEBUG, "smtp_reply", session=session, reply=text)


def upstream_step(upstream: str, command: str, reply: Any) -> None:
    """``reply``: an aiosmtplib SMTPResponse, or a text."""
    if upstream_log.isEnabledFor(logging.DEBUG):
        code = getattr(reply, "code", None)
        text = getattr(reply, "message", reply)
        event(upstream_log, logging.DEBUG, "upstream_dialogue", upstream=upstream,
              command=_clean(command), reply=_clean(f"{code} {text}" if code else str(text)))


def admin_request(server: str, method: str, path: str, status: int, owner: str | None) -> None:
    if admin_log.isEnabledFor(logging.DEBUG):
        event(admin_log, logging.DEBUG, "admin_request", listener=server, method=method,
              path=_clean(path), status=status, owner=_clean(owner) if owner else "")
