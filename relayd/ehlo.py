"""What relayd's EHLO offers (SPEC 3.1, 3.14), sans-IO: the keyword list,
each keyword once, in one fixed order.

The order is Postfix's, less what relayd does not offer (VRFY, ETRN,
CHUNKING): PIPELINING, SIZE, STARTTLS, AUTH, ENHANCEDSTATUSCODES, 8BITMIME,
DSN, SMTPUTF8. Clients look keywords up by name (RFC 5321 4.1.1.1), so the
order is for people and tests: a reply that reads like Postfix's and never
depends on how aiosmtpd happens to build its list.

* PIPELINING (RFC 2920): aiosmtpd reads commands one at a time from one
  buffer, and relayd's DATA reader gives back what it read past the final
  dot (wire.ClientReader.unread), so a pipelined group gets its replies in
  order.
* SIZE (RFC 1870) with limits.max_message_size, enforced by relayd.
* STARTTLS (RFC 3207) on a starttls listener before TLS, and AUTH PLAIN
  LOGIN (RFC 4954) once TLS is up or on a loopback listener without
  auth_require_tls: when aiosmtpd offers them, which is where the TLS state
  is known; its own AUTH line (its mechanisms, sorted) is not used.
* ENHANCEDSTATUSCODES (RFC 2034): every reply but the greeting and HELO's
  and EHLO's carries an RFC 3463 code (relayd's own constants, and
  replywire.py for the lines aiosmtpd writes itself).
* 8BITMIME (RFC 6152), DSN (RFC 3461) and SMTPUTF8 (RFC 6531): the
  parameters are relayed to an upstream that can take them (SPEC 3.15).
  aiosmtpd adds an SMTPUTF8 line of its own when enable_SMTPUTF8 is set;
  the list here is built afresh, so it appears once either way.

aiosmtpd's HELP line is not offered: HELP is a base command that every
server answers (RFC 5321 4.1.1.8), not an extension a client looks for;
Postfix offers none; aiosmtpd answers it only after AUTH (530 before), so
the line would invite an error. HELP itself is still answered.
"""

from __future__ import annotations


def keywords(max_size: int, *, starttls: bool, auth: bool) -> list[str]:
    """The EHLO keywords (with their parameters), in relayd's order."""
    words = ["PIPELINING", f"SIZE {max_size}"]
    if starttls:
        words.append("STARTTLS")
    if auth:
        words.append("AUTH PLAIN LOGIN")
    return [*words, "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]


def reply(offered: list[str], max_size: int) -> list[str]:
    """relayd's EHLO reply lines from aiosmtpd's (``offered``: its greeting
    line first, then its keyword lines, "250-" or "250 " each). Only the
    greeting and whether STARTTLS and AUTH are offered are taken from it."""
    said = {line[4:].split(" ", 1)[0].upper() for line in offered[1:]}
    lines = [offered[0][4:], *keywords(max_size, starttls="STARTTLS" in said,
                                       auth="AUTH" in said)]
    # RFC 5321 4.2.1: "250-" on every line but the last, which has "250 ".
    return [f"250-{text}" for text in lines[:-1]] + [f"250 {lines[-1]}"]
