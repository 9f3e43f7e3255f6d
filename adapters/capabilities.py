"""Capabilities a backend declares. Shared code asks for a capability, never a backend name."""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    # Any pattern
    DURABLE = "durable"  # acknowledged writes survive a restart of the gateway and of the backend server
    SHARED = "shared"  # several gateway processes see the same data (not a copy each)
    # KeyValue
    TTL = "ttl"
    ETAG = "etag"
    CREATE_ONLY = "create_only"
    SCAN = "scan"
    # PubSub
    WILDCARDS = "wildcards"
    QUEUE_GROUPS = "queue_groups"
    REPLAY = "replay"  # a subscription may start in the past: from a time, or after a message id
    # Queue
    SEEK_TIMESTAMP = "seek_timestamp"  # Seek to the first message published at or after a time
    DEAD_LETTER = "dead_letter"  # max_delivery_attempts and a dead-letter topic
    IDEMPOTENT_PUBLISH = "idempotent_publish"  # a retried Publish with the same token is stored once
