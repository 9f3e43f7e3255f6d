"""A backend type declared outside ``adapters/``, as a plugin package would declare one.

``dict-test`` keeps KeyValue records in a dict per backend instance, holding at most
``capacity`` keys. It imports only the adapter contract (``adapters.backends``,
``adapters.keyvalue.base``) and changes no existing module: tests/test_registry.py installs it
as the entry point ``dict-test = tests.dict_backend:BACKEND`` (group ``prism.backends``), the
way ``pip install`` of a plugin package would, and uses it through a real gateway.
"""

from __future__ import annotations

from typing import Any, Literal

import grpc
from pydantic import Field

from adapters.backends import BackendSettings, BackendType, Connection, Environment
from adapters.capabilities import Capability
from adapters.keyvalue.base import KeyValueAdapter, Record, Write, check_conditions, new_etag, reported
from prism.errors import PrismError


class DictSettings(BackendSettings):
    type: Literal["dict-test"] = "dict-test"
    capacity: int = Field(default=1000, gt=0)  # keys, over every namespace


class DictStore(Connection):
    """The instance's one "connection": the dict every pattern's adapter on it shares."""

    def __init__(self, settings: DictSettings) -> None:
        self.capacity = settings.capacity
        self.records: dict[tuple[str, str], Record] = {}  # (namespace, key) → record

    async def ping(self) -> None:
        return None


class DictKeyValue(KeyValueAdapter):
    """Small rather than fast: a scan sorts the namespace's keys each time."""

    capabilities = frozenset({Capability.TTL, Capability.ETAG, Capability.CREATE_ONLY, Capability.SCAN})

    def __init__(self, store: DictStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records = store.records
        self.capacity = store.capacity

    async def get(self, namespace: str, key: str) -> Record | None:
        record = self.records.get((namespace, key))
        return record if record is not None and self.live(record.expires_at) else None

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        current = await self.get(namespace, key)
        check_conditions(key, current, if_match=write.if_match, if_absent=write.if_absent)
        if (namespace, key) not in self.records and len(self.records) >= self.capacity:
            raise PrismError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"dict-test backend full ({self.capacity} keys)")
        self.records[(namespace, key)] = Record(bytes(write.value), new_etag(), write.expires_at)
        return self.records[(namespace, key)].etag, reported(current.value if current else None, write.previous_prefix)

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        current = await self.get(namespace, key)
        check_conditions(key, current, if_match=if_match)
        self.records.pop((namespace, key), None)
        return current is not None, reported(current.value if current else None, previous_prefix)

    async def scan(self, namespace: str, prefix: str, start_after: str, limit: int) -> list[tuple[str, Record]]:
        keys = sorted(k for ns, k in self.records if ns == namespace and k.startswith(prefix) and k > start_after)
        live = [(k, r) for k in keys if (r := await self.get(namespace, k)) is not None]
        return live[:limit]


def connect(settings: DictSettings, environment: Environment) -> DictStore:
    return DictStore(settings)


BACKEND = BackendType(
    name="dict-test",
    settings=DictSettings,
    connect=connect,
    adapters={"KEY_VALUE": lambda store, environment: DictKeyValue(store)},
)
