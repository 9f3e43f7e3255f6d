"""The session lifecycle, written once over a four-method storage contract.

A session ends at whichever comes first:

    idle deadline      last activity + idle_timeout   (every authenticated call and every
                                                        Heartbeat is activity)
    absolute deadline  created_at + max_lifetime      (nothing extends it)

``SessionRecord.expires_at`` is always the effective deadline, the earlier of the two. A token
past it is refused with UNAUTHENTICATED naming the reason; an expired record is remembered
for ``EXPIRED_KEPT_SECONDS`` so later calls get the same answer, then swept. The token is 256
random bits; stores only ever see its SHA-256 digest.

Streams a session holds open are tracked per process (:class:`StreamRegistry`): CloseSession
ends them with UNAUTHENTICATED "session closed", and a watchdog per session that holds a
stream ends them with the expiry status when the session expires (or, with a store shared
between processes, when another process closed it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from prism.errors import PrismError, unauthenticated
from prism.v1 import config_pb2, session_pb2

log = logging.getLogger("prism.sessions")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
# Ends one stream: with this status, or cleanly for None (the client asked, by Unsubscribe).
StreamCloser = Callable[[PrismError | None], Awaitable[None]]

# A call writes its activity back to the store only when last activity moved by more than this
# (the in-memory record is updated in place on every call). Calls are the hot path: a busy
# session costs one store write per second, not one per call, and may expire up to this much
# earlier than idle_timeout after its last call.
TOUCH_INTERVAL = 1.0
EXPIRED_KEPT_SECONDS = 3600.0  # an expired token is answered "expired", not "unknown", this long
SWEEP_INTERVAL = 60.0  # CreateSession drops records expired for EXPIRED_KEPT_SECONDS this often
RECHECK_SECONDS = 5.0  # streams of a shared store notice a close by another process this fast
END_POLL_SECONDS = 0.2  # streams of a shared store notice a request to end them this fast

UNKNOWN = "unknown or closed session token"
IDLE = "session expired (idle)"
LIFETIME = "session reached its maximum lifetime"
CLOSED = "session closed"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def roles_text(roles: frozenset[str]) -> str:
    """Roles as stores keep them: a JSON array, sorted."""
    return json.dumps(sorted(roles), ensure_ascii=False, separators=(",", ":"))


def roles_of(text: str | bytes) -> frozenset[str]:
    return frozenset(json.loads(text))


@dataclass(slots=True, eq=False)
class SessionRecord:
    session_id: str
    identity: str
    config: config_pb2.ClientConfig
    created_at: float
    expires_at: float  # effective deadline: min(idle deadline, absolute deadline)
    last_activity_at: float
    digest: str  # SHA-256 of the token, the key in every store
    roles: frozenset[str] = frozenset()  # the identity's roles when the session was created
    streams: StreamRegistry | None = field(default=None, repr=False)

    def to_proto(self) -> session_pb2.Session:
        session = session_pb2.Session(session_id=self.session_id, identity=self.identity, config=self.config)
        session.created_at.FromNanoseconds(int(self.created_at * 1e9))
        session.expires_at.FromNanoseconds(int(self.expires_at * 1e9))
        session.last_activity_at.FromNanoseconds(int(self.last_activity_at * 1e9))
        return session

    def hold_stream(self, stream_id: str, closer: StreamCloser) -> None:
        """Register a stream this session keeps open; ``closer(status)`` must end it with that
        status when the session is closed or expires."""
        assert self.streams is not None, "records come from a SessionStore"
        self.streams.hold(self, stream_id, closer)

    def release_stream(self, stream_id: str) -> None:
        """The stream ended on its own (or was ended): forget it."""
        assert self.streams is not None, "records come from a SessionStore"
        self.streams.release(self.session_id, stream_id)


class SessionStore(ABC):
    """The lifecycle; subclasses store records by token digest.

    ``shared`` stores are seen by several processes, so a record may change or vanish behind
    this process's back (another worker's Heartbeat or CloseSession).
    """

    shared: ClassVar[bool] = False

    def __init__(
        self,
        *,
        idle_timeout: float,
        max_lifetime: float,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.clock = clock
        self.sleep = sleep  # the stream watchdog's, so tests drive it with their fake clock
        self.streams = StreamRegistry(self)
        self._next_sweep = 0.0
        self._stream_sessions: dict[str, str] = {}
        self._ends_requested: set[str] = set()

    async def start(self) -> None: ...

    async def close_store(self) -> None:
        self.streams.close()

    def deadline(self, created_at: float, active_at: float) -> float:
        return min(active_at + self.idle_timeout, created_at + self.max_lifetime)

    def expired(self, created_at: float, deadline: float) -> PrismError:
        """Why a session whose effective deadline ``deadline`` passed ended."""
        return unauthenticated(LIFETIME if deadline >= created_at + self.max_lifetime else IDLE)

    async def create(
        self, identity: str, config: config_pb2.ClientConfig, roles: frozenset[str] = frozenset()
    ) -> tuple[str, SessionRecord]:
        token = secrets.token_urlsafe(32)  # 256 random bits; only the digest is stored
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            await self._sweep(now - EXPIRED_KEPT_SECONDS)
        record = SessionRecord(
            uuid.uuid4().hex,
            identity,
            config,
            now,
            self.deadline(now, now),
            now,
            token_digest(token),
            roles,
            self.streams,
        )
        await self._insert(record)
        return token, record

    async def resolve(self, token: str) -> SessionRecord:
        """The live session of ``token``, this call counted as its activity; otherwise
        UNAUTHENTICATED saying whether it expired (and how) or is unknown or closed."""
        digest = token_digest(token)
        record = await self._load(digest)
        now = self.clock()
        if record is None:
            raise await self._missing(digest, now) or unauthenticated(UNKNOWN)
        if now >= record.expires_at:
            raise self.expired(record.created_at, record.expires_at)
        moved = now - record.last_activity_at
        record.last_activity_at = now
        record.expires_at = self.deadline(record.created_at, now)
        if moved > TOUCH_INTERVAL:
            await self._touch(record)  # a concurrent close wins; this call still proceeds
        return record

    async def heartbeat(self, record: SessionRecord) -> float:
        """Extend the idle deadline (never past the absolute one); the effective deadline."""
        record.last_activity_at = max(record.last_activity_at, self.clock())
        record.expires_at = self.deadline(record.created_at, record.last_activity_at)
        if not await self._touch(record):
            raise unauthenticated(UNKNOWN)  # closed since this call resolved it
        return record.expires_at

    async def close(self, record: SessionRecord) -> None:
        await self._delete(record.digest)
        await self.streams.end(record.session_id, unauthenticated(CLOSED))

    async def status(self, digest: str) -> tuple[PrismError | None, float]:
        """(None, effective deadline) for a live session, else (why it is over, 0); no activity."""
        record = await self._load(digest)
        now = self.clock()
        if record is None:
            return await self._missing(digest, now) or unauthenticated(CLOSED), 0.0
        if now >= record.expires_at:
            return self.expired(record.created_at, record.expires_at), 0.0
        return None, record.expires_at

    # Storage: records keyed by token digest.

    @abstractmethod
    async def _insert(self, record: SessionRecord) -> None: ...

    @abstractmethod
    async def _load(self, digest: str) -> SessionRecord | None:
        """The stored record (expired or not), with ``digest`` and ``streams`` set."""

    @abstractmethod
    async def _touch(self, record: SessionRecord) -> bool:
        """Store ``last_activity_at`` and ``expires_at`` unless the stored ones are later;
        False when the record is gone."""

    @abstractmethod
    async def _delete(self, digest: str) -> None: ...

    @abstractmethod
    async def _sweep(self, expired_before: float) -> None:
        """Drop records whose effective deadline is before ``expired_before``."""

    @abstractmethod
    async def active_count(self) -> int:
        """Sessions neither closed nor past their effective deadline, for the
        ``prism_sessions_active`` gauge."""

    async def _missing(self, digest: str, now: float) -> PrismError | None:
        """Why a token has no record, when the store knows it expired rather than closed."""
        return None

    # Registered client configurations (ConfigService.RegisterConfig) live beside the sessions
    # that name them, so every worker and instance sharing the sessions shares them too. They
    # are immutable once registered: a name is taken for good.

    @abstractmethod
    async def register_config(self, name: str, config: bytes) -> bool:
        """Store a serialized ClientConfig under ``name``; False when the name is taken."""

    @abstractmethod
    async def registered_config(self, name: str) -> bytes | None: ...

    @abstractmethod
    async def registered_configs(self) -> list[bytes]:
        """Every registered configuration, in name order."""

    # Open streams, as every process sharing the store sees them: which session holds each,
    # and requests to end one. A call that reaches another process than the stream's (an
    # Unsubscribe on another worker) ends it through here; the serving process polls.
    # One process alone needs none of it: this default keeps them in memory.

    async def stream_opened(self, stream_id: str, session_id: str) -> None:
        self._stream_sessions[stream_id] = session_id

    async def stream_closed(self, stream_id: str) -> None:
        self._stream_sessions.pop(stream_id, None)
        self._ends_requested.discard(stream_id)

    async def stream_owner(self, stream_id: str) -> str | None:
        """The session id holding the open stream, or None."""
        return self._stream_sessions.get(stream_id)

    async def request_stream_end(self, stream_id: str) -> None:
        self._ends_requested.add(stream_id)

    async def ends_requested(self, stream_ids: list[str]) -> list[str]:
        """Those of ``stream_ids`` some process asked to end."""
        return [s for s in stream_ids if s in self._ends_requested]


@dataclass(slots=True, eq=False)
class _Held:
    watchdog: asyncio.Task[None]
    closers: dict[str, StreamCloser] = field(default_factory=dict)


class StreamRegistry:
    """Streams served by this process, per session, with one watchdog task per session that
    holds any: it sleeps until the session's deadline, re-reads the record and either sleeps
    again (activity moved the deadline) or ends the streams with the session's status."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._held: dict[str, _Held] = {}
        self._end_poller: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, record: SessionRecord, stream_id: str, closer: StreamCloser) -> None:
        held = self._held.get(record.session_id)
        if held is None:
            watchdog = asyncio.create_task(
                self._watch(record.session_id, record.digest, record.expires_at),
                name=f"session-watchdog-{record.session_id}",
            )
            held = self._held[record.session_id] = _Held(watchdog)
        held.closers[stream_id] = closer
        if self._store.shared and (self._end_poller is None or self._end_poller.done()):
            self._end_poller = asyncio.create_task(self._poll_end_requests(), name="stream-end-requests")

    async def _poll_end_requests(self) -> None:
        """While this process holds streams: end those another process asked to end."""
        while self._held:
            await self._store.sleep(END_POLL_SECONDS)
            closers = {sid: closer for held in self._held.values() for sid, closer in held.closers.items()}
            try:
                ended = await self._store.ends_requested(list(closers))
            except PrismError as exc:  # store unreachable: keep the streams, look again soon
                log.warning("cannot check requests to end streams: %s", exc.message)
                continue
            for stream_id in ended:
                try:
                    await closers[stream_id](None)
                except Exception:
                    log.exception("ending stream %s on request failed", stream_id)

    def release(self, session_id: str, stream_id: str) -> None:
        held = self._held.get(session_id)
        if held is not None and held.closers.pop(stream_id, None) is not None and not held.closers:
            del self._held[session_id]
            held.watchdog.cancel()

    async def end(self, session_id: str, status: PrismError) -> None:
        """End every stream of the session with ``status``."""
        held = self._held.pop(session_id, None)
        if held is None:
            return
        if held.watchdog is not asyncio.current_task():
            held.watchdog.cancel()
        for stream_id, closer in list(held.closers.items()):
            try:
                await closer(status)
            except Exception:  # one broken stream must not keep the others open
                log.exception("ending stream %s of session %s failed", stream_id, session_id)

    async def _watch(self, session_id: str, digest: str, deadline: float) -> None:
        store = self._store
        delay = deadline - store.clock()
        while True:
            if store.shared:
                delay = min(delay, RECHECK_SECONDS)
            await store.sleep(max(delay, 0.0))
            try:
                status, deadline = await store.status(digest)
            except PrismError as exc:  # store unreachable: keep the streams, look again soon
                log.warning("cannot check session %s: %s", session_id, exc.message)
                delay = RECHECK_SECONDS
                continue
            if status is not None:
                await self.end(session_id, status)
                return
            delay = deadline - store.clock()

    def close(self) -> None:
        """Gateway shutdown: stop the watchdogs; the servers end the streams themselves."""
        for held in self._held.values():
            held.watchdog.cancel()
        self._held.clear()
        if self._end_poller is not None:
            self._end_poller.cancel()
