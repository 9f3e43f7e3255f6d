"""Sessions in a dict of this process: for a single worker. Resolving a token is one hash and
one dict lookup; activity is recorded on the record itself, with no write at all."""

from __future__ import annotations

from typing import Any

from app.sessions.base import SessionRecord, SessionStore


class MemorySessionStore(SessionStore):
    def __init__(self, **lifecycle: Any) -> None:
        super().__init__(**lifecycle)
        self._by_digest: dict[str, SessionRecord] = {}
        self._configs: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    async def _insert(self, record: SessionRecord) -> None:
        self._by_digest[record.digest] = record

    async def _load(self, digest: str) -> SessionRecord | None:
        return self._by_digest.get(digest)

    async def _touch(self, record: SessionRecord) -> bool:
        return self._by_digest.get(record.digest) is record  # already updated in place

    async def _delete(self, digest: str) -> None:
        self._by_digest.pop(digest, None)

    async def _sweep(self, expired_before: float) -> None:
        gone = [d for d, r in self._by_digest.items() if r.expires_at < expired_before]
        for digest in gone:
            del self._by_digest[digest]

    async def active_count(self) -> int:
        now = self.clock()
        return sum(1 for record in self._by_digest.values() if record.expires_at > now)

    async def register_config(self, name: str, config: bytes) -> bool:
        return self._configs.setdefault(name, config) is config

    async def registered_config(self, name: str) -> bytes | None:
        return self._configs.get(name)

    async def registered_configs(self) -> list[bytes]:
        return [config for _, config in sorted(self._configs.items())]
