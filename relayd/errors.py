"""One exception hierarchy for relayd, each carrying structured fields.

Nothing here is ever shown verbatim to an SMTP client: the SMTP layer maps
these to reply constants (replies.py), the admin layer to its dialect's JSON
error shape.
"""

from __future__ import annotations


class RelaydError(Exception):
    """Base of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """The config file is unreadable or invalid. ``problems`` are
    ``"yaml.path: what is wrong"`` strings, one per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class StoreError(RelaydError):
    """The database could not be read or written (disk full, read-only, ...)."""


class NotFound(RelaydError):
    """A record does not exist, or belongs to another owner (same answer)."""

    def __init__(self, kind: str, key: str = ""):
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} not found")


class RecordError(RelaydError):
    """A record change refused by a rule of tenants.py. ``rule``: which one
    (a tenants.py constant, stable for dialects to map); ``message``: the
    reason in the store's field names, which a dialect may re-word in its
    own spellings; ``field``: the field at fault, where there is one;
    ``ids``: the records the rule concerns (an owner, apps)."""

    def __init__(self, rule: str, message: str, *, field: str | None = None,
                 ids: tuple[str, ...] = ()):
        super().__init__(message)
        self.rule, self.message, self.field, self.ids = rule, message, field, ids


class UpstreamError(RelaydError):
    """One upstream attempt failed. ``permanent`` is True only for a 5xx reply
    (SPEC 3.7-3.8): the next upstream would refuse the message too.
    ``unconfirmed``: the upstream had the whole message and then dropped the
    connection or did not reply; it may have delivered it (SPEC 3.8).
    ``reply`` is what an SMTP or API client may read (SPEC 3.18): the
    upstream's own reply, or what happened in plain words; ``detail`` is the
    technical account for the log (exception, errno, the library's words),
    ``reply`` when not given. ``skipped``: the upstream was not tried because
    it lacks an extension this message needs ("8BITMIME" or "SMTPUTF8",
    SPEC 3.15): no error of the upstream's."""

    def __init__(self, reply: str, *, permanent: bool = False, code: int | None = None,
                 unconfirmed: bool = False, detail: str | None = None,
                 skipped: str | None = None):
        self.reply = reply
        self.permanent = permanent
        self.code = code
        self.unconfirmed = unconfirmed
        self.detail = detail if detail is not None else reply
        self.skipped = skipped
        super().__init__(reply)


class HeaderTooLarge(RelaydError):
    """A message's header section is longer than relayd inspects (rewrite.py)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"header section longer than {limit} bytes")
