"""Backend instances named in the server configuration, created and closed with the gateway.

Each instance opens its type's one connection, then builds on it the adapter of every access
pattern its type serves (the registry says which: ``adapters/registry.py``). Nothing here
knows a backend type by name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from adapters.backends import Adapter, BackendSettings, BackendType, Connection, Environment
from adapters.keyvalue.base import KeyValueAdapter
from adapters.pubsub.base import PubSubAdapter
from adapters.queue.base import QueueAdapter
from adapters.reader.base import ReaderAdapter
from adapters.registry import lookup
from adapters.transact.base import TransactAdapter
from app.settings import Settings
from prism.errors import PrismError, failed_precondition
from prism.v1 import config_pb2


@dataclass
class Instance:
    """One configured backend: its settings, its type, its connection and its adapters."""

    name: str
    settings: BackendSettings
    kind: BackendType[Any, Any]
    connection: Connection
    adapters: dict[str, Adapter] = field(default_factory=dict)  # pattern → adapter


class Backends:
    """Every backend instance of the settings, and their adapters per access pattern."""

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers  # processes serving this instance: in-process backends may relay
        self.instances: dict[str, Instance] = {}
        self.started = False

    def serves(self, name: str, pattern: str) -> bool:
        """Whether backend ``name``'s type has an adapter for ``pattern`` (running or not)."""
        return pattern in lookup(self.settings.backends[name].type).patterns

    async def start(self) -> None:
        """Open every declared backend and build the adapter of every pattern its type serves
        (inline configs may use any). On failure what was opened stays listed, for ``close``."""
        for name, spec in self.settings.backends.items():
            kind = lookup(spec.type)
            environment = Environment(name, self.settings.data_dir, self.settings.limits.stream_buffer, self.workers)
            instance = Instance(name, spec, kind, kind.connect(spec, environment))
            await instance.connection.start()
            self.instances[name] = instance
            for pattern, build in kind.adapters.items():
                adapter = build(instance.connection, environment)
                await adapter.start()
                instance.adapters[pattern] = adapter
        self.started = True

    async def close(self) -> None:
        """Adapters first (they use the connection), then each connection."""
        self.started = False
        for instance in self.instances.values():
            for adapter in instance.adapters.values():
                await adapter.close()
            await instance.connection.close()

    async def probe(self, name: str, seconds: float) -> str | None:
        """None when backend ``name`` answers a trivial request within ``seconds``, else why
        not, in a few words."""
        try:
            async with asyncio.timeout(seconds):
                await self.instances[name].connection.ping()
        except TimeoutError:
            return f"no answer within {seconds:g}s"
        except PrismError as exc:
            return exc.message
        except Exception as exc:  # a driver error the connection did not map: still "down"
            return f"{type(exc).__name__}: {exc}"
        return None

    def adapters(self, pattern: str) -> dict[str, Adapter]:
        """The running adapters of ``pattern``, by backend name."""
        return {name: i.adapters[pattern] for name, i in self.instances.items() if pattern in i.adapters}

    def adapter(self, pattern: str, config: config_pb2.ClientConfig) -> Adapter:
        """The adapter a session's configuration uses (FAILED_PRECONDITION if none runs)."""
        try:
            return self.instances[config.backend.instance].adapters[pattern]
        except KeyError:
            raise failed_precondition(f"backend {config.backend.instance!r} serves no {pattern}") from None

    def for_keyvalue(self, config: config_pb2.ClientConfig) -> KeyValueAdapter:
        return cast(KeyValueAdapter, self.adapter("KEY_VALUE", config))

    def for_pubsub(self, config: config_pb2.ClientConfig) -> PubSubAdapter:
        return cast(PubSubAdapter, self.adapter("PUBSUB", config))

    def for_queue(self, config: config_pb2.ClientConfig) -> QueueAdapter:
        return cast(QueueAdapter, self.adapter("QUEUE", config))

    def for_reader(self, config: config_pb2.ClientConfig) -> ReaderAdapter:
        return cast(ReaderAdapter, self.adapter("READER", config))

    def for_transact(self, config: config_pb2.ClientConfig) -> TransactAdapter:
        return cast(TransactAdapter, self.adapter("TRANSACT", config))
