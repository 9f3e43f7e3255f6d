"""Sessions: an opaque token per CreateSession, stored only as its SHA-256 hash.

The store is in-process for now; a shared store (SQLite, Redis) arrives with the sessions
issue. Each session tracks what it holds open (stream subscriptions) so CloseSession can
end those streams.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prism.v1 import config_pb2, session_pb2

from app.errors import unauthenticated

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
        session = session_pb2.Session(
            session_id=self.session_id, identity=self.identity, config=self.config
        )
        session.created_at.FromNanoseconds(int(self.created_at * 1e9))
        session.expires_at.FromNanoseconds(int(self.expires_at * 1e9))
        session.last_activity_at.FromNanoseconds(int(self.last_activity_at * 1e9))
        return session


class SessionStore:
    def __init__(self, lifetime: float, clock: Clock = time.time) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._by_hash: dict[str, SessionRecord] = {}

    def create(self, identity: str, config: config_pb2.ClientConfig) -> tuple[str, SessionRecord]:
        token = secrets.token_urlsafe(32)  # 256 random bits
        now = self.clock()
        record = SessionRecord(uuid.uuid4().hex, identity, config, now, now + self.lifetime, now)
        self._by_hash[_hash(token)] = record
        return token, record

    def resolve(self, token: str) -> SessionRecord:
        record = self._by_hash.get(_hash(token))
        now = self.clock()
        if record is None:
            raise unauthenticated("unknown or closed session token")
        if record.expires_at <= now:
            del self._by_hash[_hash(token)]
            raise unauthenticated("session expired; create a new one")
        record.last_activity_at = now
        return record

    def heartbeat(self, record: SessionRecord) -> float:
        record.expires_at = self.clock() + self.lifetime
        return record.expires_at

    async def close(self, token: str) -> None:
        record = self._by_hash.pop(_hash(token), None)
        if record is not None:
            for closer in list(record.open_streams.values()):
                await closer()
            record.open_streams.clear()
