"""Personal data the contract tags with the ``prism.v1.pii`` field option never reaches the
streams operators read — process logs, traces, audit records — in clear.

The tagged fields are read from the descriptors, so tagging another field in ``proto/`` is
all it takes to declare it. Today the contract tags ``Session.identity``: the caller's name
(an API key's identity, a JWT subject, a certificate's common name). Where the gateway writes
one, it writes a keyed pseudonym instead — ``pii:`` and 16 hex digits of
HMAC-SHA256(key, value) — so one caller's lines still correlate, a log holding them gives
no name away, and an operator holding the key can find a named caller's records
(``prism pseudonym NAME``). The key derives from the server's secret (``secret_key``, or the
one kept in the data directory), so every worker and restart agrees. ``mask_pii: false``
writes them in clear (development).

Values of PII namespaces are a separate matter: they are never logged at all, and stored
encrypted (``adapters/keyvalue/encrypted.py``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from google.protobuf.descriptor import FileDescriptor

from app.auth.identity import ANONYMOUS
from prism.v1 import options_pb2, session_pb2

PREFIX = "pii:"


def tagged_fields(*files: FileDescriptor) -> dict[str, str]:
    """Every field of these proto files carrying the ``pii`` option: full name → its kind."""
    found: dict[str, str] = {}
    pending = [m for f in files for m in f.message_types_by_name.values()]
    while pending:
        message = pending.pop()
        pending.extend(message.nested_types)
        for field in message.fields:
            kind = field.GetOptions().Extensions[options_pb2.pii]
            if kind:
                found[field.full_name] = kind
    return found


IDENTITY_IS_PII = "prism.v1.Session.identity" in tagged_fields(session_pb2.DESCRIPTOR)

_key: bytes | None = None


def configure(secret: bytes | None) -> None:
    """Mask with a key derived from ``secret``; None writes tagged values in clear."""
    global _key
    _key = None if secret is None else _derive(secret)
    pseudonym.cache_clear()


def _derive(secret: bytes) -> bytes:
    return hmac.digest(secret, b"prism pii pseudonyms", "sha256")


def pseudonym_under(secret: bytes, value: str) -> str:
    """The pseudonym of ``value`` for a gateway whose server secret is ``secret``."""
    return _mac(_derive(secret), value)


def _mac(key: bytes, value: str) -> str:
    return PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)  # once per caller, not once per call
def pseudonym(value: str) -> str:
    return value if _key is None or not value else _mac(_key, value)


def identity(name: str) -> str:
    """A caller's identity as logs, traces and audit records may carry it (dev mode's
    ``anonymous`` names nobody)."""
    return pseudonym(name) if IDENTITY_IS_PII and name != ANONYMOUS.name else name
