"""Sessions: an opaque token per CreateSession, stored only as its SHA-256 digest.

    SessionStore  (base.py)     the lifecycle: create, resolve (every call), heartbeat, close,
      │                         idle and absolute expiry, streams a session holds open
      ├─ MemorySessionStore (memory.py)  one worker process; resolve is a dict lookup
      ├─ SqliteSessionStore (sqlite.py)  several worker processes on one machine
      └─ RedisSessionStore  (redis.py)   several gateway instances (imported when configured)

Every store takes ``idle_timeout``, ``max_lifetime`` and an injectable ``clock`` (and the
``sleep`` its stream watchdog uses), so tests drive expiry with a fake clock.
"""

from app.sessions.base import (
    CLOSED,
    IDLE,
    LIFETIME,
    UNKNOWN,
    Clock,
    SessionRecord,
    SessionStore,
    StreamCloser,
    token_digest,
)
from app.sessions.memory import MemorySessionStore
from app.sessions.sqlite import SqliteSessionStore

__all__ = [
    "CLOSED",
    "IDLE",
    "LIFETIME",
    "UNKNOWN",
    "Clock",
    "MemorySessionStore",
    "SessionRecord",
    "SessionStore",
    "SqliteSessionStore",
    "StreamCloser",
    "token_digest",
]
