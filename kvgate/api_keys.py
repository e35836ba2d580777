"""API keys: random, high-entropy tokens, of which the catalog stores only the sha256 digest.

Unsalted sha256 is enough for keys this long (256 random bits): no dictionary holds them, and the
gateway compares digests, so a leaked catalog does not leak keys.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "kvg-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key, its sha256 digest): the key goes to the tenant, the digest into the catalog."""
    key = PREFIX + secrets.token_urlsafe(32)
    return key, key_hash(key)
