"""Continuation cursors: opaque to clients, signed with the server key, bound to their query.

A cursor carries a position (the last key or row a page ended on), a hash of the query it
continues and, optionally, an expiry, all under an HMAC of the scope it was issued in (a
namespace). A client can neither forge nor alter one, nor reuse it with another query (another
prefix, filter or sort) or in another namespace: each is refused with INVALID_ARGUMENT naming
the field. Every worker and instance sharing the server key accepts the others' cursors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from prism.errors import invalid_argument


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def query_hash(query: Any) -> str:
    """A short digest of a JSON-able description of the query (canonical key order)."""
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


class Cursors:
    def __init__(self, key: bytes, ttl_seconds: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.ttl = ttl_seconds
        self.clock = clock

    def _sign(self, scope: str, payload: bytes) -> bytes:
        return hmac.new(self.key, scope.encode() + b"\x00" + payload, hashlib.sha256).digest()[:16]

    def issue(self, scope: str, query: Any, position: Any) -> str:
        expires = None if self.ttl is None else round(self.clock() + self.ttl, 3)
        payload = json.dumps([query_hash(query), position, expires], separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._sign(scope, payload))}"

    def redeem(self, token: str, scope: str, query: Any, field: str = "pageToken") -> Any:
        """The position ``token`` continues from; INVALID_ARGUMENT naming ``field`` otherwise."""
        try:
            encoded, signature = token.split(".")
            payload = _unb64(encoded)
            valid = hmac.compare_digest(_unb64(signature), self._sign(scope, payload))
            digest, position, expires = json.loads(payload) if valid else (None, None, None)
        except (ValueError, TypeError, binascii.Error):
            valid = False
        if not valid:
            raise invalid_argument(field, "is not a cursor this gateway issued for this namespace")
        if digest != query_hash(query):
            raise invalid_argument(field, "belongs to another query (its filter, sort or prefix differ)")
        if expires is not None and self.clock() > expires:
            raise invalid_argument(field, "has expired; start again without it")
        return position
