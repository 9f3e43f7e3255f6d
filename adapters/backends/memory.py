"""The in-process backend: KeyValue and PubSub in the gateway's memory, lost on restart (dev
mode, tests). Nothing to connect to: KeyValue is a copy per worker process, while PubSub with
several workers relays through one of them (``adapters/pubsub/workers.py``), so a message
published on any worker reaches the subscribers of every worker of the instance."""

from __future__ import annotations

from typing import Literal

from adapters.backends import BackendSettings, BackendType, Environment, NoConnection
from adapters.keyvalue.memory import MemoryKeyValue
from adapters.pubsub.base import PubSubAdapter
from adapters.pubsub.memory import MemoryPubSub
from adapters.pubsub.workers import WorkersPubSub, hub_address


class MemorySettings(BackendSettings):
    type: Literal["memory"] = "memory"


def pubsub(environment: Environment) -> PubSubAdapter:
    if environment.workers == 1:
        return MemoryPubSub(environment.stream_buffer)
    address = hub_address(str(environment.data_dir), environment.name)
    return WorkersPubSub(environment.stream_buffer, address, environment.name)


BACKEND = BackendType(
    name="memory",
    settings=MemorySettings,
    connect=lambda settings, environment: NoConnection(),
    adapters={
        "KEY_VALUE": lambda connection, environment: MemoryKeyValue(),
        "PUBSUB": lambda connection, environment: pubsub(environment),
    },
)
