"""In-process KeyValue store: a real implementation for dev mode and tests, lost on restart."""

from __future__ import annotations

import bisect

from adapters.capabilities import Capability
from adapters.keyvalue.base import KeyValueAdapter, Record, Write, check_conditions, new_etag, reported


class MemoryKeyValue(KeyValueAdapter):
    capabilities = frozenset({Capability.TTL, Capability.ETAG, Capability.CREATE_ONLY, Capability.SCAN})

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self._records: dict[str, dict[str, Record]] = {}
        self._sorted_keys: dict[str, list[str]] = {}  # per namespace, for scans

    def _live(self, namespace: str, key: str) -> Record | None:
        record = self._records.get(namespace, {}).get(key)
        if record is not None and not self.live(record.expires_at):
            self._remove(namespace, key)
            return None
        return record

    def _remove(self, namespace: str, key: str) -> None:
        del self._records[namespace][key]
        keys = self._sorted_keys[namespace]
        del keys[bisect.bisect_left(keys, key)]

    async def get(self, namespace: str, key: str) -> Record | None:
        return self._live(namespace, key)

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        current = self._live(namespace, key)
        check_conditions(key, current, if_match=write.if_match, if_absent=write.if_absent)
        records = self._records.setdefault(namespace, {})
        if current is None:
            bisect.insort(self._sorted_keys.setdefault(namespace, []), key)
        etag = new_etag()
        records[key] = Record(bytes(write.value), etag, write.expires_at)
        return etag, reported(current.value if current else None, write.previous_prefix)

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        current = self._live(namespace, key)
        check_conditions(key, current, if_match=if_match)
        if current is None:
            return False, None
        self._remove(namespace, key)
        return True, reported(current.value, previous_prefix)

    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        keys = self._sorted_keys.get(namespace, [])
        start = max(prefix, start_after)
        index = bisect.bisect_right(keys, start) if start == start_after and start_after else bisect.bisect_left(keys, start)
        found: list[tuple[str, Record]] = []
        for key in keys[index:]:
            if len(found) >= limit or not key.startswith(prefix):
                break
            record = self._records[namespace][key]
            if self.live(record.expires_at):
                found.append((key, record))
        return found
