"""The in-process backend: KeyValue and PubSub in the gateway's memory, lost on restart (dev
mode, tests, one-worker fan-out). Nothing to connect to, so nothing to share either."""

from __future__ import annotations

from typing import Literal

from adapters.backends import BackendSettings, BackendType, NoConnection
from adapters.keyvalue.memory import MemoryKeyValue
from adapters.pubsub.memory import MemoryPubSub


class MemorySettings(BackendSettings):
    type: Literal["memory"] = "memory"


BACKEND = BackendType(
    name="memory",
    settings=MemorySettings,
    connect=lambda settings, environment: NoConnection(),
    adapters={
        "KEY_VALUE": lambda connection, environment: MemoryKeyValue(),
        "PUBSUB": lambda connection, environment: MemoryPubSub(buffer_size=environment.stream_buffer),
    },
)
