"""Capabilities a backend declares. Shared code asks for a capability, never a backend name."""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    # KeyValue
    TTL = "ttl"
    ETAG = "etag"
    CREATE_ONLY = "create_only"
    SCAN = "scan"
    DURABLE = "durable"  # acknowledged writes survive a restart of the gateway and of the backend server
    SHARED = "shared"  # several gateway processes see the same data
    # PubSub
    WILDCARDS = "wildcards"
    QUEUE_GROUPS = "queue_groups"
