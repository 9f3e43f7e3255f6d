"""The PubSub adapter contract: publish to a subject, subscribe to a pattern, and the one
subscription buffer every backend delivers through.

Subjects and patterns arrive already parsed by :mod:`adapters.pubsub.subjects`, so every
backend gives wildcards the same meaning. A subscription is an async iterator of
:class:`Delivery`, and whatever the backend, deliveries reach it the same way:

    backend reader (in-process publisher, worker hub, NATS callback, Redis reader task)
        │ offer(delivery): never waits, so neither the publisher, the backend's connection
        ▼ nor any other subscriber waits for this one
    Subscription: a bounded buffer of ``buffer_size`` deliveries
        │ full → Overflow.END: the subscription ends with RESOURCE_EXHAUSTED and leaves the
        │                      backend at once (what it held is dropped with it)
        │      → Overflow.DROP_OLDEST: the oldest waiting delivery makes room
        │ either way counted in prism_pubsub_overflows_total{namespace, overflow}
        ▼
    __anext__, at the pace of the client's stream

A backend subclasses :class:`Subscription` only to say how it leaves the backend
(:meth:`Subscription._detach`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import grpc
from prometheus_client import Counter

from adapters.capabilities import Capability
from prism.errors import PrismError

log = logging.getLogger(__name__)

OVERFLOWS = Counter(
    "prism_pubsub_overflows",
    "PubSub subscribers too slow for their buffer: one per subscription ended (overflow=end), "
    "one per message dropped (overflow=drop_oldest)",
    ["namespace", "overflow"],
)


class Overflow(StrEnum):
    """What a full subscription buffer does with the next delivery (the session's
    ``backend.options.overflow``)."""

    END = "end"  # end the subscription with RESOURCE_EXHAUSTED: the client knows it missed some
    DROP_OLDEST = "drop_oldest"  # drop the oldest waiting delivery: latest values matter most


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str
    subject: str  # the concrete subject it was published to
    data: bytes
    headers: Mapping[str, str]
    published_at: float  # unix seconds
    # Encodings of this delivery, made once for every subscriber it is offered to (a fan-out
    # offers one Delivery to all of them): see app/services/pubsub_batches.py.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class FromTime:
    """Start with the first message published at or after ``unix_ns`` that the backend holds."""

    unix_ns: int


@dataclass(frozen=True, slots=True)
class AfterMessage:
    """Start with the messages published after the one with this id (one this backend gave).
    Not ``required`` (a resumed stream's cursor): an id the backend cannot place starts the
    subscription live instead of refusing it."""

    message_id: str
    required: bool = True


# Where a subscription starts on a backend with history (Capability.REPLAY); None: live.
Start = FromTime | AfterMessage


class Subscription(ABC, AsyncIterator[Delivery]):
    """One subscription's bounded buffer, fed by its backend with :meth:`offer`."""

    def __init__(self, namespace: str, buffer_size: int, overflow: Overflow = Overflow.END) -> None:
        self.id = uuid.uuid4().hex
        self.namespace = namespace
        self.buffer_size, self.overflow = buffer_size, overflow
        self._waiting: deque[Delivery] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._wanted = 1  # deliveries waiting that wake the reader (more while it lingers)
        self._ended = False
        self._error: PrismError | None = None
        self._detached: asyncio.Task[None] | None = None
        # The reader's loop, looked up once: on Python 3.11 each get_running_loop() is a getpid
        # system call, and a fan-out waits once per delivery per subscriber.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    def offer(self, delivery: Delivery) -> None:
        """Queue ``delivery``; never waits. A full buffer overflows as the subscription asked."""
        if self._ended:
            return
        if len(self._waiting) >= self.buffer_size:
            OVERFLOWS.labels(self.namespace, self.overflow.value).inc()
            if self.overflow is Overflow.END:
                self.end(
                    PrismError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"subscriber too slow: more than {self.buffer_size} messages waiting",
                    )
                )
                return
            self._waiting.popleft()
        self._waiting.append(delivery)
        if len(self._waiting) >= self._wanted:
            self._wake()

    def end(self, error: PrismError | None = None) -> None:
        """Stop delivery now: a pending ``__anext__`` raises ``error``, or ends cleanly without
        one. Synchronous, so a backend's reader may call it; leaving the backend runs in the
        background and :meth:`close` waits for it."""
        if self._ended:
            return
        self._ended, self._error = True, error
        self._waiting.clear()
        self._wake()
        self._detached = asyncio.get_running_loop().create_task(self._detach_quietly())

    async def close(self) -> None:
        """End it (if nothing ended it yet) and wait until it left the backend."""
        self.end()
        assert self._detached is not None
        await asyncio.shield(self._detached)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        if not await self._wait():
            raise StopAsyncIteration
        return self._waiting.popleft()

    async def take(self, limit: int, linger: float = 0.0) -> list[Delivery]:
        """Every delivery waiting, up to ``limit``, once there is one; [] when the subscription
        ended cleanly. A reader that is behind takes what piled up in one call. With
        ``linger`` (seconds), once one waits, up to that long more for ``limit`` of them."""
        if not await self._wait():
            return []
        waiting = self._waiting
        if linger > 0 and len(waiting) < limit:
            await self._linger(limit, linger)
            if not await self._wait():  # it ended meanwhile
                return []
        if len(waiting) <= limit:
            taken = list(waiting)
            waiting.clear()
            return taken
        return [waiting.popleft() for _ in range(limit)]

    async def _wait(self) -> bool:
        """True once a delivery waits; False when the subscription ended with none (its error
        raised when it ended with one)."""
        while not self._waiting:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return False
            await self._woken(1)
        return True

    async def _linger(self, count: int, seconds: float) -> None:
        """Until ``count`` deliveries wait, the subscription ends, or ``seconds`` passed."""
        if self._ended:
            return
        loop = self._loop or asyncio.get_running_loop()
        timer = loop.call_later(seconds, self._wake)
        try:
            await self._woken(count)
        finally:
            timer.cancel()

    async def _woken(self, count: int) -> None:
        """Until :meth:`offer` leaves ``count`` waiting, or the subscription ends (or a timer wakes it)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._wanted = count
        self._wakeup = self._loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup, self._wanted = None, 1

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _detach_quietly(self) -> None:
        try:
            await self._detach()
        except Exception as exc:  # the subscription is over either way; the backend forgets it
            log.warning("pubsub subscription %s: leaving the backend failed: %r", self.id, exc)

    @abstractmethod
    async def _detach(self) -> None:
        """Leave the backend: no delivery is offered after this returns."""


class PubSubAdapter(ABC):
    capabilities: ClassVar[frozenset[Capability]]

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @abstractmethod
    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        """Deliver to every live matching subscription (one per queue group); return the id."""

    @abstractmethod
    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,
    ) -> Subscription:
        """Register a subscription; it receives every message published after this returns.
        Only an adapter declaring Capability.REPLAY takes ``start`` (the service passes it to no
        other): it then also receives what the backend holds from there on."""
