"""Logging: setup, logfmt formatting, and the one line per message.

Every line is logfmt (``key=value``, values quoted when needed) on stderr,
greppable like Postfix's maillog. The per-message line has stable keys:

    ts=... level=info event=message session=ID user=smtp123 client=1.2.3.4
    from=a@b.c rcpts=2 size=1234 upstream=ID upstream_host=h rewrite=no
    result=delivered reply="250 ok" duration=0.012

Secrets never reach a log line: nothing here is given a password or a token,
and the libraries that would log them are capped whatever log_level:
aiosmtpd's protocol logger (client lines) at ERROR, aiosqlite (SQL
parameters) at WARNING.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}

mail = logging.getLogger("relayd.mail")


def _quote(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, float):
        return f"{value:.3f}"
    s = str(value)
    if s and all(c.isprintable() and c not in ' "=\\' for c in s):
        return s
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s) + '"'


def logfmt(**fields: Any) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(),
                                  "logger": record.name}
        extra = getattr(record, "logfmt", None)
        if extra:
            fields.update(extra)
        else:
            fields["msg"] = record.getMessage()
        line = logfmt(**fields)
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def setup(level: str) -> None:
    root = logging.getLogger()
    if not any(isinstance(h.formatter, LogfmtFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
        root.addHandler(handler)
    set_level(level)
    # aiosmtpd warns on every connection of a plain-AUTH loopback listener;
    # that configuration is deliberate and validated, so say it once.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])
    # aiosmtpd puts client input in its records at every level below ERROR:
    # command lines at INFO/DEBUG (AUTH blobs included, unless the client
    # writes "auth" in lower case), replies echoing them at DEBUG, and an
    # unknown command's first word at WARNING ("unrecognised") -- which, after
    # the 538 to an AUTH LOGIN before STARTTLS, is the client's base64 user
    # name and password. relayd logs what it needs itself, by session id.
    # aiosqlite logs every SQL statement with its parameters (upstream
    # passwords) at DEBUG. Neither may follow the root level down. aiosmtpd's
    # PROXY parser warns of each bad header on "mail.debug": relayd logs its
    # own proxy_refused line (proxied.py). asyncpg logs statements nowhere,
    # and its connection errors never carry the password.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    logging.getLogger("mail.debug").setLevel(logging.ERROR)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"logfmt": {"event": event, **fields}})


def message_line(**fields: Any) -> None:
    event(mail, logging.INFO, "message", **fields)
