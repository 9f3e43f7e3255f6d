"""API keys for machine clients, kept in the configuration only as SHA-256 hex digests.

A key arrives as ``x-api-key: <key>`` or ``authorization: ApiKey <key>``. The presented key is
hashed once and compared with every configured digest by :func:`hmac.compare_digest`, without
stopping at a match, so the time taken says nothing about which entry (if any) matched. A key is
revoked by removing its entry. The key itself is never logged nor echoed to the client.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from app.auth.identity import Identity
from app.settings import ApiKey
from prism.errors import unauthenticated

API_KEY_HEADER = "x-api-key"
MAX_KEY_CHARS = 1024  # longer is not a key we issued; refused before hashing


def hash_key(key: str) -> str:
    """The SHA-256 hex digest to put in ``auth.api_keys[].sha256``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits) for an operator to hand out; store only its hash."""
    return "prism_" + secrets.token_urlsafe(32)


class ApiKeys:
    """The configured keys, checked in constant time per entry."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        seen: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key.sha256 in seen:
                raise ValueError(
                    f"auth.api_keys[{index}].sha256: the same key as auth.api_keys[{seen[key.sha256]}] "
                    f"({keys[seen[key.sha256]].identity!r})"
                )
            seen[key.sha256] = index
        self._entries = [
            (bytes.fromhex(key.sha256), Identity(key.identity, frozenset(key.roles), "api_key"))
            for key in keys
        ]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def verify(self, key: str) -> Identity:
        """The identity the key belongs to, else UNAUTHENTICATED "unknown API key"."""
        if not key:
            raise unauthenticated("empty API key")
        if len(key) > MAX_KEY_CHARS:
            raise unauthenticated("unknown API key")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Identity | None = None
        for expected, identity in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = identity
        if found is None:
            raise unauthenticated("unknown API key")
        return found
