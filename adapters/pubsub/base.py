"""The PubSub adapter contract: publish to a subject, subscribe to a pattern.

Subjects and patterns arrive already parsed by :mod:`adapters.pubsub.subjects`, so every
backend gives wildcards the same meaning. A subscription is an async iterator of
:class:`Delivery`; a backend must never let one slow subscriber stall the others, so each
subscription has a bounded buffer and is ended with RESOURCE_EXHAUSTED when it overflows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

from adapters.capabilities import Capability


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str
    subject: str  # the concrete subject it was published to
    data: bytes
    headers: Mapping[str, str]
    published_at: float  # unix seconds


class Subscription(ABC, AsyncIterator[Delivery]):
    id: str

    def __aiter__(self) -> Subscription:
        return self

    @abstractmethod
    async def __anext__(self) -> Delivery: ...

    @abstractmethod
    async def close(self) -> None:
        """Stop delivery; a pending ``__anext__`` ends with StopAsyncIteration."""


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
        self, namespace: str, pattern: tuple[str, ...], queue_group: str = ""
    ) -> Subscription:
        """Register a subscription; it receives every message published after this returns."""
