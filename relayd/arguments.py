"""Command arguments as relayd reads them: a mixin for smtp.py's aiosmtpd
SMTP class, the server side of esmtp.py (which decides; this only feeds
aiosmtpd's hooks, pinned by tests/test_library_pins.py).

* Addresses: a fast path for ``<local@domain>`` before aiosmtpd's RFC 5322
  parser (``_getaddr``).
* MAIL/RCPT parameters (SPEC 3.15): BODY, SMTPUTF8, RET, ENVID, NOTIFY and
  ORCPT are taken out of the argument as the client wrote them (aiosmtpd
  upper-cases parameters and answers 555 to all but the first two) and left
  on the session for the handler's MAIL/RCPT hooks; they go with the
  envelope (after DATA, RSET, HELO/EHLO, STARTTLS).
* UTF-8 (RFC 6531 3.3): relayd offers SMTPUTF8, so aiosmtpd decodes every
  argument as UTF-8; non-ASCII stays refused everywhere but in a MAIL/RCPT
  address, and bytes that are not UTF-8 everywhere, as aiosmtpd's strict
  ASCII mode refused them before.
* Command length: DSN makes MAIL and RCPT longer (RFC 3461 4).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from . import esmtp
from .esmtp import MailParams

if TYPE_CHECKING:
    from .smtp import Session

Command = Callable[[str | None], Awaitable[None]]


class ArgumentCommands:
    """Mixed into RelaySMTP (an aiosmtpd SMTP) ahead of SMTP itself."""

    session: Session | None
    _smtp_methods: dict[str, Any]

    def guard_arguments(self) -> None:
        """Called once aiosmtpd's __init__ has built this connection's command
        table: each command behind esmtp.utf8_argument; and this connection's
        own command limits (aiosmtpd's are one class-level dict that every
        new connection clears and every EHLO raises)."""
        base = SMTP.command_size_limit
        self.command_size_limits = collections.defaultdict(
            lambda: base, {"MAIL": base + esmtp.ENVID_MAX, "RCPT": base + esmtp.ORCPT_MAX})
        for name, method in self._smtp_methods.items():
            self._smtp_methods[name] = self._guarded(name, method)

    def _guarded(self, command: str, method: Command) -> Command:
        @functools.wraps(method)
        async def guarded(arg: str | None) -> None:
            refusal = esmtp.utf8_argument(command, arg)
            if refusal:
                await self.push(refusal)  # type: ignore[attr-defined]
                return
            await method(arg)
        return guarded

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's version defines a typing.Protocol class on every call
        # (tens of microseconds per MAIL and RCPT); same result, fast path first.
        m = esmtp.PLAIN_PATH.match(arg) if arg else None
        if m:
            address, rest = m.group(1), arg[m.end():]
        else:
            address, rest = super()._getaddr(arg)  # type: ignore[misc]
        if self.session is not None:
            # handle_MAIL/handle_RCPT, called next by aiosmtpd's smtp_MAIL or
            # smtp_RCPT, take relayd's parameters from the session.
            ours: list[str] = []
            if rest and self.session.extended_smtp:
                ours, rest = esmtp.split_params(rest)
            self.session.esmtp_args = ours
        return address, rest

    def _set_post_data_state(self) -> None:
        # The envelope's ESMTP parameters go with it: after DATA, and on
        # RSET, HELO/EHLO and STARTTLS (aiosmtpd's _set_rset_state calls this).
        if self.session is not None:
            self.session.mail_params, self.session.rcpt_params = MailParams(), []
        super()._set_post_data_state()  # type: ignore[misc]
