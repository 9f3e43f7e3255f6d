"""Backend instances named in the server configuration, created and closed with the gateway."""

from __future__ import annotations

from adapters.keyvalue.base import KeyValueAdapter
from adapters.keyvalue.memory import MemoryKeyValue
from adapters.keyvalue.sqlite import SqliteKeyValue
from adapters.pubsub.base import PubSubAdapter
from adapters.pubsub.memory import MemoryPubSub
from app.settings import Backend, Settings
from prism.errors import failed_precondition
from prism.v1 import config_pb2

BACKEND_TYPES = {
    "memory": config_pb2.BACKEND_TYPE_MEMORY,
    "sqlite": config_pb2.BACKEND_TYPE_SQLITE,
    "postgres": config_pb2.BACKEND_TYPE_POSTGRES,
    "redis": config_pb2.BACKEND_TYPE_REDIS,
}


# Which backend types an access pattern can run on (the adapters that exist).
PATTERN_BACKENDS: dict[str, frozenset[str]] = {
    "KEY_VALUE": frozenset({"memory", "sqlite", "postgres", "redis"}),
    "PUBSUB": frozenset({"memory"}),
}


class Backends:
    """Adapters per backend instance and access pattern, built lazily from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keyvalue: dict[str, KeyValueAdapter] = {}
        self.pubsub: dict[str, PubSubAdapter] = {}
        self.started = False

    def _build_keyvalue(self, spec: Backend) -> KeyValueAdapter:
        network = {
            "pool_size": spec.pool_size,
            "connect_timeout": spec.connect_timeout,
            "command_timeout": spec.command_timeout,
        }
        if spec.type == "sqlite":
            return SqliteKeyValue(self.settings.data_dir / spec.path)
        if spec.type == "postgres":
            from adapters.keyvalue.postgres import PostgresKeyValue  # drivers load only when configured

            return PostgresKeyValue(spec.dsn, **network)
        if spec.type == "redis":
            from adapters.keyvalue.redis import RedisKeyValue

            return RedisKeyValue(spec.url, **network)
        return MemoryKeyValue()

    def _build_pubsub(self, spec: Backend) -> PubSubAdapter:
        if spec.type == "memory":
            return MemoryPubSub(buffer_size=self.settings.limits.stream_buffer)
        raise ValueError(f"backend type {spec.type!r} cannot serve PUBSUB")

    async def start(self) -> None:
        """Every declared backend, for every pattern its type serves (inline configs may use any)."""
        for name, spec in self.settings.backends.items():
            if spec.type in PATTERN_BACKENDS["KEY_VALUE"]:
                adapter = self._build_keyvalue(spec)
                await adapter.start()
                self.keyvalue[name] = adapter
            if spec.type in PATTERN_BACKENDS["PUBSUB"]:
                broker = self._build_pubsub(spec)
                await broker.start()
                self.pubsub[name] = broker
        self.started = True

    async def close(self) -> None:
        self.started = False
        for adapter in [*self.keyvalue.values(), *self.pubsub.values()]:
            await adapter.close()

    def for_keyvalue(self, config: config_pb2.ClientConfig) -> KeyValueAdapter:
        try:
            return self.keyvalue[config.backend.instance]
        except KeyError:
            raise failed_precondition(f"backend {config.backend.instance!r} serves no KEY_VALUE") from None

    def for_pubsub(self, config: config_pb2.ClientConfig) -> PubSubAdapter:
        try:
            return self.pubsub[config.backend.instance]
        except KeyError:
            raise failed_precondition(f"backend {config.backend.instance!r} serves no PUBSUB") from None
