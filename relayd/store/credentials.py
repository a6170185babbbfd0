"""Generated identifiers and secrets, and how secrets are kept.

SMTP-user passwords and owner tokens are generated with ``secrets`` (192
bits) and only their SHA-256 digests are stored. A fast hash is right for
random secrets of that size (there is no dictionary to attack, as with API
tokens); comparison is constant time. Upstream passwords must be usable, so
they are stored as given, in a file of mode 0600 (files.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timezone
from collections.abc import Container

from ..errors import StoreError


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def new_id() -> str:
    """24 hex digits, the shape of the seed's ``_id``/``idapp``/``idsmtp``."""
    return secrets.token_hex(12)


def new_secret() -> str:
    """An SMTP password or owner token: 192 random bits, URL-safe base64."""
    return secrets.token_urlsafe(24)


def new_user_name(taken: Container[str]) -> str:
    """"smtp" + 10 digits: unguessable enough that names are not enumerable,
    short enough to type."""
    for _ in range(20):
        name = "smtp" + str(secrets.randbelow(9 * 10**9) + 10**9)
        if name not in taken:
            return name
    raise StoreError("could not generate a unique SMTP user name")  # 20 collisions in 9e9


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def secret_matches(secret: str, stored_digest: str | None) -> bool:
    # Compare digests of equal length in constant time; an unknown name is
    # compared against a dummy so timing does not tell names apart.
    return hmac.compare_digest(digest(secret), stored_digest or "0" * 64) and stored_digest is not None
