"""Records as the JSON the dialects answer with, where more than one dialect
shows the same record. Stored passwords never appear: ``MASK`` stands in
for them (tenants.py keeps the secret when the mask is saved back).
"""

from __future__ import annotations

from typing import Any

from ..records import DomainSettings, Upstream
from ..tenants import MASK


def upstream_json(u: Upstream) -> dict[str, Any]:
    """An upstream with the seed-000 keys (SPEC 4.2), ``password`` masked
    whether one is stored or not; the SMTPs dialect and the operator API."""
    return {
        "_id": u.idsmtp, "idapp": u.idapp, "priority": u.priority, "host": u.host,
        "port": u.port, "username": u.username, "password": MASK,
        "auth": u.auth, "startstls": bool(u.startstls), "sslTls": u.ssltls, "debug": u.debug,
        "defaultfromemail": u.defaultfromemail, "defaultfromname": u.defaultfromname,
        "numerrors": u.numerrors, "created": u.created, "modified": u.modified,
        "status": u.status, "verify_tls": u.verify_tls,
        "allowed_domains": list(u.allowed_domains) if u.allowed_domains is not None else None,
    }


def domain_json(d: DomainSettings) -> dict[str, Any]:
    """Domain settings as seed 004 shows them (SPEC 4.3), ``options.auth.pass``
    masked; the Webitel dialect and the operator API."""
    options = dict(d.options)
    if isinstance(options.get("auth"), dict):
        options["auth"] = {**options["auth"], "pass": MASK}
    return {"_id": d.id, "provider": d.provider, "description": d.description,
            "from": d.from_, "options": options, "domain": d.domain}
