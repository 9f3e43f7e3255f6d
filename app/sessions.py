"""Sessions: an opaque token per CreateSession, stored only as its SHA-256 hash.

Two stores implement the same contract: in-process (one worker) and SQLite (several worker
processes on one machine share the file). Streams a session holds open are tracked per
process, so CloseSession ends the streams served by the process that receives it.
"""

from __future__ import annotations

import hashlib
import pathlib
import secrets
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.sqlite_worker import SqliteWorker
from app.errors import unauthenticated
from prism.v1 import config_pb2, session_pb2

Clock = Callable[[], float]
Closer = Callable[[], Awaitable[None]]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    identity: str
    config: config_pb2.ClientConfig
    created_at: float
    expires_at: float
    last_activity_at: float
    open_streams: dict[str, Closer] = field(default_factory=dict)

    def to_proto(self) -> session_pb2.Session:
        session = session_pb2.Session(session_id=self.session_id, identity=self.identity, config=self.config)
        session.created_at.FromNanoseconds(int(self.created_at * 1e9))
        session.expires_at.FromNanoseconds(int(self.expires_at * 1e9))
        session.last_activity_at.FromNanoseconds(int(self.last_activity_at * 1e9))
        return session


class SessionStore(ABC):
    def __init__(self, lifetime: float, clock: Clock = time.time) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._streams: dict[str, dict[str, Closer]] = {}  # session id → this process's streams

    async def start(self) -> None: ...

    async def close_store(self) -> None: ...

    async def create(self, identity: str, config: config_pb2.ClientConfig) -> tuple[str, SessionRecord]:
        token = secrets.token_urlsafe(32)  # 256 random bits
        now = self.clock()
        record = SessionRecord(uuid.uuid4().hex, identity, config, now, now + self.lifetime, now)
        await self._save(_hash(token), record)
        record.open_streams = self._streams.setdefault(record.session_id, {})
        return token, record

    async def resolve(self, token: str) -> SessionRecord:
        digest, now = _hash(token), self.clock()
        record = await self._load(digest, now)
        if record is None:
            raise unauthenticated("unknown or closed session token")
        if record.expires_at <= now:
            await self._delete(digest)
            raise unauthenticated("session expired; create a new one")
        record.open_streams = self._streams.setdefault(record.session_id, {})
        return record

    async def heartbeat(self, token: str, record: SessionRecord) -> float:
        record.expires_at = self.clock() + self.lifetime
        await self._save(_hash(token), record)
        return record.expires_at

    async def close(self, token: str, record: SessionRecord) -> None:
        await self._delete(_hash(token))
        for closer in list(self._streams.pop(record.session_id, {}).values()):
            await closer()

    @abstractmethod
    async def _save(self, digest: str, record: SessionRecord) -> None: ...

    @abstractmethod
    async def _load(self, digest: str, now: float) -> SessionRecord | None:
        """The record, with last activity updated to ``now``."""

    @abstractmethod
    async def _delete(self, digest: str) -> None: ...


class MemorySessionStore(SessionStore):
    def __init__(self, lifetime: float, clock: Clock = time.time) -> None:
        super().__init__(lifetime, clock)
        self._by_hash: dict[str, SessionRecord] = {}

    async def _save(self, digest: str, record: SessionRecord) -> None:
        self._by_hash[digest] = record

    async def _load(self, digest: str, now: float) -> SessionRecord | None:
        record = self._by_hash.get(digest)
        if record is not None:
            record.last_activity_at = now
        return record

    async def _delete(self, digest: str) -> None:
        self._by_hash.pop(digest, None)


class SqliteSessionStore(SessionStore):
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS prism_sessions (
        token_hash TEXT PRIMARY KEY, session_id TEXT NOT NULL, identity TEXT NOT NULL,
        config BLOB NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
        last_activity_at REAL NOT NULL
    )"""

    def __init__(self, path: pathlib.Path, lifetime: float, clock: Clock = time.time) -> None:
        super().__init__(lifetime, clock)
        self.worker = SqliteWorker(path, ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=5000"])

    async def start(self) -> None:
        await self.worker.start()
        await self._rows(self.SCHEMA)

    async def close_store(self) -> None:
        await self.worker.close()

    async def _rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        return await self.worker.run(lambda connection: connection.execute(sql, params).fetchall())

    async def _save(self, digest: str, r: SessionRecord) -> None:
        await self._rows(
            "INSERT OR REPLACE INTO prism_sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
            digest, r.session_id, r.identity, r.config.SerializeToString(), r.created_at, r.expires_at, r.last_activity_at,
        )

    async def _load(self, digest: str, now: float) -> SessionRecord | None:
        rows = await self._rows(
            "UPDATE prism_sessions SET last_activity_at=? WHERE token_hash=? "
            "RETURNING session_id, identity, config, created_at, expires_at, last_activity_at",
            now, digest,
        )
        if not rows:
            return None
        row = rows[0]
        return SessionRecord(row[0], row[1], config_pb2.ClientConfig.FromString(row[2]), row[3], row[4], row[5])

    async def _delete(self, digest: str) -> None:
        await self._rows("DELETE FROM prism_sessions WHERE token_hash=?", digest)
