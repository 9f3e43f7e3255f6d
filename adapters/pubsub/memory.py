"""In-process PubSub broker: the embedded default. Delivery is immediate and in order per
subscriber; nothing is kept for subscribers that were not there."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping

import grpc

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, PubSubAdapter, Subscription
from adapters.pubsub.subjects import matches
from prism.errors import PrismError

_CLOSED = object()


class MemorySubscription(Subscription):
    def __init__(self, broker: MemoryPubSub, namespace: str, pattern: tuple[str, ...], group: str) -> None:
        self.id = uuid.uuid4().hex
        self.namespace, self.pattern, self.group = namespace, pattern, group
        self._broker = broker
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=broker.buffer_size + 1)

    def offer(self, delivery: Delivery) -> None:
        """Called by the publisher; never waits. A full buffer ends this subscription only."""
        if self._queue.qsize() >= self._broker.buffer_size:
            self._broker.remove(self)
            self._drain()
            self._queue.put_nowait(
                PrismError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"subscriber too slow: more than {self._broker.buffer_size} messages waiting",
                )
            )
            return
        self._queue.put_nowait(delivery)

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    async def __anext__(self) -> Delivery:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # stay closed for later calls
            raise StopAsyncIteration
        if isinstance(item, PrismError):
            raise item
        return item  # type: ignore[return-value]

    async def close(self) -> None:
        if self._broker.remove(self):
            self._drain()
            self._queue.put_nowait(_CLOSED)


class MemoryPubSub(PubSubAdapter):
    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS})

    def __init__(self, buffer_size: int = 1024) -> None:
        self.buffer_size = buffer_size
        self._subscriptions: dict[str, MemorySubscription] = {}
        self._round_robin: defaultdict[tuple[str, str], itertools.count[int]] = defaultdict(itertools.count)

    def remove(self, subscription: MemorySubscription) -> bool:
        return self._subscriptions.pop(subscription.id, None) is not None

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        delivery = Delivery(uuid.uuid4().hex, ".".join(subject), data, dict(headers), time.time())
        groups: dict[str, list[MemorySubscription]] = {}
        for sub in list(self._subscriptions.values()):
            if sub.namespace != namespace or not matches(sub.pattern, subject):
                continue
            if sub.group:
                groups.setdefault(sub.group, []).append(sub)
            else:
                sub.offer(delivery)
        for group, members in groups.items():
            members[next(self._round_robin[(namespace, group)]) % len(members)].offer(delivery)
        return delivery.message_id

    async def subscribe(
        self, namespace: str, pattern: tuple[str, ...], queue_group: str = ""
    ) -> Subscription:
        sub = MemorySubscription(self, namespace, pattern, queue_group)
        self._subscriptions[sub.id] = sub
        return sub

    async def close(self) -> None:
        for sub in list(self._subscriptions.values()):
            await sub.close()
