"""Every SMTP reply relayd writes itself, as a named constant with its
enhanced status code (RFC 3463). Handlers return these; nothing else in the
code base spells a reply string.

Codes follow SPEC section 3; where it is silent, RFC 5321 / RFC 3463 and
Postfix's choices.
"""

from __future__ import annotations

import re

BANNER_IDENT = "ESMTP relayd"

# AUTH (RFC 4954)
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_DISABLED = "525 5.7.13 User account disabled"
# 538 and 530 are written by aiosmtpd itself (auth_require_tls and
# auth_required), with exactly the codes SPEC 3.1 and 3.3 ask for:
#   538 5.7.11 Encryption required for requested authentication mechanism
#   530 5.7.0 Authentication required
AUTH_LOCKED_OUT = "421 4.7.0 Too many failed authentications from your address, try again later"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_CANNOT_SPLIT = "501 5.5.2 Cannot split AUTH PLAIN value"
# RFC 4954 4: a SASL response longer than the server accepts.
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"

# Envelope
OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Sender ok"
RCPT_OK = "250 2.1.5 Recipient ok"
HOURLY_LIMIT = "451 4.7.1 Hourly sending limit reached, try again later"
TOTAL_LIMIT = "550 5.7.1 Total sending limit reached"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
NO_UPSTREAM = "451 4.3.5 No upstream SMTP configured"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
BAD_SENDER_ADDRESS = "553 5.1.7 Sender address contains characters that are not allowed"
BAD_RCPT_ADDRESS = "553 5.1.3 Recipient address contains characters that are not allowed"

# DATA
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
QUEUED = "250 2.0.0 Ok: queued as {id}"
DELIVERY_DEFERRED = "451 4.4.1 Delivery failed temporarily: {reply}"
DELIVERY_REFUSED = "554 5.0.0 Upstream refused the message: {reply}"
# SPEC 3.8: the upstream had the whole message, then dropped the connection
# or did not answer; relayd does not fail over (that would duplicate it).
DELIVERY_UNCONFIRMED = ("451 4.4.2 Delivery unconfirmed, the message may have been "
                        "delivered: {reply}")
# rewrite.MAX_HEADER: a header section relayd will not read to its end.
HEADER_TOO_BIG = "552 5.3.4 Message header exceeds fixed maximum size"
# Postfix's smtpd_forbid_bare_newline answer to "DATA<LF>" (then disconnect).
BARE_LF = "500 5.5.2 Error: bare <LF> received"

# Session
BYE = "221 2.0.0 Bye"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
DATA_TIMEOUT = "421 4.4.2 DATA took too long, closing connection"
# SPEC 9: the database is gone, replaced or unwritable (storewatch.py).
STORE_UNAVAILABLE = "451 4.3.0 Mail system temporarily unavailable, try again later"

# RFC 2034 4 (relayd offers ENHANCEDSTATUSCODES): every 2xx, 4xx and 5xx line
# but the greeting's and HELO's/EHLO's carries an RFC 3463 code. The constants
# above have theirs; replywire.py gives the lines aiosmtpd writes itself
# ("250 OK" to NOOP, "503 Error: need MAIL command", "501 Syntax: HELO
# hostname"...) the code Postfix answers them with, by reply code; any other
# code gets X.0.0 (RFC 3463 3.1, "other undefined status").
DEFAULT_ENHANCED = {
    220: "2.0.0", 221: "2.0.0", 250: "2.0.0", 252: "2.0.0",
    454: "4.7.0",                     # TLS not available
    500: "5.5.2", 501: "5.5.4",       # syntax error; bad arguments
    502: "5.5.1", 503: "5.5.1",       # not implemented; bad sequence of commands
    504: "5.5.4", 530: "5.7.0", 552: "5.3.4", 554: "5.7.0",
    555: "5.5.4",                     # MAIL/RCPT parameter not recognised
}


# MAIL/RCPT parameters (SPEC 3.15, esmtp.py). {keyword} is one of esmtp.KEYWORDS,
# never client text. Unknown parameters: aiosmtpd's 555, with its code.
BAD_PARAMETER = "501 5.5.4 Bad {keyword} parameter syntax"
DUPLICATE_PARAMETER = "501 5.5.4 Duplicate {keyword} parameter"
MAIL_PARAMS_UNKNOWN = "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
RCPT_PARAMS_UNKNOWN = "555 5.5.4 RCPT TO parameters not recognized or not implemented"
# RFC 6531 3.5: a non-ASCII address without MAIL's SMTPUTF8 (Postfix's words).
NON_ASCII_ADDRESS = "553 5.6.7 Must declare SMTPUTF8 to send a non-ASCII address"
# Non-ASCII outside a MAIL/RCPT address, or bytes that are not UTF-8 in one:
# the strict-ASCII 500 aiosmtpd answered before relayd offered SMTPUTF8.
NOT_ASCII = "500 5.5.2 Error: non-ASCII characters are only allowed in addresses"
BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"
# After DATA: no candidate upstream can take the message (SPEC 3.15; RFC 6152
# 3, RFC 6531 3.7.4.1). Permanent: no upstream of this route will change.
NEEDS_8BITMIME = ("554 5.6.3 Message has 8-bit content and no upstream SMTP server "
                  "for it accepts 8BITMIME")
NEEDS_SMTPUTF8 = ("553 5.6.7 Message has non-ASCII addresses or headers and no upstream "
                  "SMTP server for it accepts SMTPUTF8")


# What may not appear in a reply line (RFC 5321 4.2: printable US-ASCII);
# also what relayd keeps out of its debug log lines (protolog.py).
NOT_REPLY_TEXT = re.compile(r"[^\x20-\x7e]")


def one_line(text: str, limit: int = 400) -> str:
    """Flatten an upstream's (possibly multi-line) reply so that it can be
    quoted inside one reply line: bounded, free of CR/LF, and printable
    US-ASCII (RFC 5321 4.2 reply text). An upstream's 8-bit or control bytes
    used to reach aiosmtpd's ASCII encoder and raise, so that a permanent
    554 reached the client as 451 4.3.0 (and the client retried)."""
    flat = NOT_REPLY_TEXT.sub("?", " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
