"""Who is calling: the one result every authentication method produces.

Authorization (RBAC) and the audit log read only this, never the credential it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AuthMethod = Literal["api_key", "jwt", "mtls", "anonymous", "session"]  # session: resolved from a session token

# A role that grants everything; only dev mode's anonymous caller holds it.
ALL_ROLES = "*"


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    roles: frozenset[str]
    method: AuthMethod  # "api_key" | "jwt" | "mtls" | "anonymous"


# Dev mode (no `auth` configured): every caller, with every permission, on loopback only.
ANONYMOUS = Identity(name="anonymous", roles=frozenset({ALL_ROLES}), method="anonymous")
