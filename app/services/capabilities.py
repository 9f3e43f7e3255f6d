"""The run-time half of DESIGN.md principle 4, in one place for every service: a request that
needs a capability its backend's adapter does not declare is refused before the adapter is
asked, with FAILED_PRECONDITION naming the field, the backend and the capability. (The other
half, a configuration requiring a capability, is checked at validation: app/configs.py.)"""

from __future__ import annotations

import grpc

from adapters.backends import Adapter
from adapters.capabilities import Capability
from app.pipeline import Call
from prism.errors import PrismError


def require(adapter: Adapter, capability: Capability, call: Call, field: str) -> None:
    """Refuse ``call`` unless ``adapter`` declares ``capability``; ``field`` is the request
    field that needs it, as the client spells it (``entries[2].idempotencyToken``)."""
    if capability not in adapter.capabilities:
        message = f"{field}: backend {call.config.backend.instance!r} lacks {capability.value}"
        raise PrismError(grpc.StatusCode.FAILED_PRECONDITION, message, field=field)
