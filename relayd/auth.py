"""AUTH for the SMTP front-end (RFC 4954; PLAIN, RFC 4616; LOGIN), as
mixins for smtp.py's aiosmtpd classes.

* ``AuthCommands`` (the server side): SASL mechanism names are
  case-insensitive, a second AUTH is refused, and the client's answer to a
  challenge is read with a bound and never logged.
* ``AuthMechanisms`` (the handler side): PLAIN and LOGIN are relayd's own,
  async, so credentials are checked against the store without blocking and
  a failure always gets its 535 (aiosmtpd's AuthResult(success=False)
  default would send nothing). Failures count towards the client IP's
  lockout (SPEC 3.2, 3.11); a session remembers its password's stamp, so a
  reset ends it (SPEC 3.3).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from base64 import b64decode, b64encode
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, AuthResult, syntax

from . import metrics, replies
from .maillog import event

if TYPE_CHECKING:
    from .daemon import Relay
    from .smtp import RelaySMTP, Session

log = logging.getLogger("relayd.smtp")


class AuthCommands:
    """Mixed into RelaySMTP (an aiosmtpd SMTP)."""

    session: Session | None
    client_reader: asyncio.StreamReader

    # aiosmtpd's HELP lists only commands whose method has its @syntax: an
    # override without it drops the command from HELP's list.
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        # SASL mechanism names are case-insensitive (RFC 4422 3.1); aiosmtpd
        # matches them exactly, so "auth plain" would get 504.
        if arg:
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest
        if self.session is not None and self.session.authenticated:
            # RFC 4954 4: no AUTH after a successful one (aiosmtpd's 503 has
            # no enhanced code).
            await self.push(replies.AUTH_ALREADY)
            return
        await super().smtp_AUTH(arg)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, with the client's answer read with a bound. Its
        readline() turned an answer longer than the reader's limit into a
        ValueError (answered 451 4.3.0 and logged as an internal error) and,
        when the line was longer than the buffer, left the rest of it to be
        read as commands. Now: the whole line is discarded and the reply is
        RFC 4954's 500 5.5.6. The client's answer is never logged."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        reader = self.client_reader
        reader.secret = True                     # never logged (protolog.py)
        try:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as error:
                await reader.readexactly(error.consumed)
                while True:                     # up to the end of the line
                    try:
                        await reader.readuntil(b"\n")
                        break
                    except asyncio.LimitOverrunError as more:
                        await reader.readexactly(more.consumed)
                await self.push(replies.AUTH_LINE_TOO_LONG)
                return MISSING
        except asyncio.IncompleteReadError:    # the client hung up mid-AUTH
            self.close()
            return MISSING
        finally:
            reader.secret = False
        blob = line.strip()
        if blob == b"*":                         # RFC 4954 4: the client cancels
            await self.push(replies.AUTH_ABORTED)
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(replies.AUTH_BAD_BASE64)
            return MISSING


class AuthMechanisms:
    """Mixed into RelayHandler; aiosmtpd finds auth_* methods on the handler."""

    relay: Relay

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._b64(server, args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push(replies.AUTH_CANNOT_SPLIT)
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
        else:
            login = await self._b64(server, args[1])
        if login is MISSING or login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    @staticmethod
    async def _b64(server: RelaySMTP, text: str) -> bytes | None:
        try:
            return b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            await server.push(replies.AUTH_BAD_BASE64)
            return None

    async def _check(self, server: RelaySMTP, login: bytes, password: bytes) -> AuthResult:
        session: Session = server.session
        relay = self.relay
        now = time.monotonic()
        if relay.throttle.locked(session.ip, now):
            metrics.AUTH_ATTEMPTS.labels("locked_out").inc()
            await server.push(replies.AUTH_LOCKED_OUT)
            server.close()
            return AuthResult(success=False, handled=True)
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            name, secret = "", ""
        user = relay.store.check_password(name, secret) if name and secret else None
        if user is None:
            metrics.AUTH_ATTEMPTS.labels("failure").inc()
            # locked() was False just above, so True here is the moment of locking.
            locked = relay.throttle.failure(session.ip, now)
            if locked:
                metrics.LOCKOUTS.inc()
            # Only a real user name is logged: what a client typed into the
            # user field may be its password.
            known = relay.store.get_user(name) is not None
            event(log, logging.INFO, "auth_failed", session=session.id, client=session.ip,
                  user=name if known else "(unknown)", locked=locked)
            return AuthResult(success=False, handled=False, message=replies.AUTH_INVALID)
        if not user.enabled:
            metrics.AUTH_ATTEMPTS.labels("disabled").inc()
            return AuthResult(success=False, handled=False, message=replies.AUTH_DISABLED)
        metrics.AUTH_ATTEMPTS.labels("success").inc()
        session.user = user.name
        session.auth_stamp = relay.store.credential_stamp(user.name)
        return AuthResult(success=True, auth_data=user.name, message=replies.AUTH_OK)
