"""In-process PubSub broker: the embedded default. Delivery is immediate and in order per
subscriber; nothing is kept for subscribers that were not there.

:class:`Router` decides who gets a message; it is also the broker of the worker hub
(:mod:`adapters.pubsub.workers`), where some subscriptions live in other processes. A route's
``sink`` is whoever holds the subscription, so one publish hands each process one batch.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, Overflow, PubSubAdapter, Start, Subscription
from adapters.pubsub.subjects import matches


class Sink(Protocol):
    """Where a route's deliveries go: this process's subscriptions, or another process's."""

    def deliver(self, ids: Sequence[str], delivery: Delivery) -> None:
        """Hand ``delivery`` to the subscriptions ``ids``; never waits."""


@dataclass(frozen=True, eq=False)
class Route:
    id: str  # the subscription's
    namespace: str
    pattern: tuple[str, ...]
    group: str
    sink: Sink


class Router:
    """Every matching subscription outside queue groups gets a message; each queue group
    (per namespace) gives it to one matching member, round robin."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._turns: defaultdict[tuple[str, str], itertools.count[int]] = defaultdict(itertools.count)

    def add(self, route: Route) -> None:
        self.routes[route.id] = route

    def remove(self, route_id: str) -> Route | None:
        return self.routes.pop(route_id, None)

    def route(self, namespace: str, subject: tuple[str, ...], delivery: Delivery) -> None:
        groups: dict[str, list[Route]] = {}
        chosen: list[Route] = []
        for route in self.routes.values():
            if route.namespace != namespace or not matches(route.pattern, subject):
                continue
            if route.group:
                groups.setdefault(route.group, []).append(route)
            else:
                chosen.append(route)
        for group, members in groups.items():
            chosen.append(members[next(self._turns[(namespace, group)]) % len(members)])
        batches: dict[Sink, list[str]] = {}
        for route in chosen:
            batches.setdefault(route.sink, []).append(route.id)
        for sink, ids in batches.items():
            sink.deliver(ids, delivery)


def new_delivery(subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]) -> Delivery:
    return Delivery(uuid.uuid4().hex, ".".join(subject), data, dict(headers), time.time())


class LocalSubscription(Subscription):
    def __init__(self, broker: MemoryPubSub, namespace: str, overflow: Overflow) -> None:
        super().__init__(namespace, broker.buffer_size, overflow)
        self._broker = broker

    async def _detach(self) -> None:
        await self._broker.forget(self)


class MemoryPubSub(PubSubAdapter):
    """One process's subscriptions (``local``) behind a :class:`Router`."""

    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS})

    def __init__(self, buffer_size: int = 1024) -> None:
        self.buffer_size = buffer_size
        self.router = Router()
        self.local: dict[str, Subscription] = {}

    def deliver(self, ids: Sequence[str], delivery: Delivery) -> None:
        for subscription_id in ids:
            if (subscription := self.local.get(subscription_id)) is not None:
                subscription.offer(delivery)

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        delivery = new_delivery(subject, data, headers)
        self.router.route(namespace, subject, delivery)
        return delivery.message_id

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,  # no history here: the service passes none (no Capability.REPLAY)
    ) -> Subscription:
        subscription = LocalSubscription(self, namespace, overflow)
        self.local[subscription.id] = subscription
        self.router.add(Route(subscription.id, namespace, pattern, queue_group, self))
        return subscription

    async def forget(self, subscription: Subscription) -> None:
        self.local.pop(subscription.id, None)
        self.router.remove(subscription.id)

    async def close(self) -> None:
        for subscription in list(self.local.values()):
            await subscription.close()
