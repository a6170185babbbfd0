"""ESMTP parameters of MAIL and RCPT (SPEC 3.15), sans-IO: what a client
asked for, validated, in a form the delivery side relays to an upstream that
advertises the matching extension.

* ``BODY=7BIT|8BITMIME`` (RFC 6152), ``SMTPUTF8`` (RFC 6531),
  ``RET=FULL|HDRS`` and ``ENVID=`` (RFC 3461 4.3, 4.4) on MAIL;
* ``NOTIFY=`` and ``ORCPT=`` (RFC 3461 4.1, 4.2) on RCPT.

The smtp.py side fills these from the client's parameters (bad syntax:
501 5.5.4); delivery/upstream pass them on per upstream.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MailParams:
    body: str | None = None          # "7BIT" | "8BITMIME" as the client declared it
    smtputf8: bool = False
    ret: str | None = None           # "FULL" | "HDRS"
    envid: str | None = None         # xtext, as received

    @property
    def dsn(self) -> bool:
        return self.ret is not None or self.envid is not None


@dataclass(frozen=True)
class RcptParams:
    notify: str | None = None        # "NEVER" or a comma list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None         # "addr-type;xtext", as received

    @property
    def dsn(self) -> bool:
        return self.notify is not None or self.orcpt is not None
