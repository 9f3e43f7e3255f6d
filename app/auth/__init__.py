"""Authentication: API keys, JWT bearer tokens (JWKS) and client certificates (mTLS), each
turned into one :class:`Identity` by :class:`Authenticator`. Authorization is not here."""

from app.auth.api_keys import hash_key, new_key
from app.auth.authenticator import NO_CREDENTIALS, Authenticator
from app.auth.identity import ALL_ROLES, ANONYMOUS, Identity

__all__ = ["ALL_ROLES", "ANONYMOUS", "NO_CREDENTIALS", "Authenticator", "Identity", "hash_key", "new_key"]
