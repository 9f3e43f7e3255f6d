"""Redis Pub/Sub: PUBLISH on the backend instance's pool, one PSUBSCRIBE connection per
adapter (taken from that pool) carrying every subscription of this gateway process.

    subject a.b.c of namespace ns ──► channel  prism:ps:<ns>:a.b.c
    pattern a.*.>                 ──► glob     prism:ps:<ns>:a.*.?*   then matched exactly here
    message                       ──► ["<id>", <unix time>, {headers}] JSON, "\\n", the data

A glob cannot say "one token" (its ``*`` also matches dots), so each pattern's glob is the
narrowest superset of it and every delivery is checked against the pattern itself
(:func:`adapters.pubsub.subjects.matches`); glob characters in literal tokens (``*?[]\\``) are
escaped, so a subject is never a pattern. Namespace names hold no ``:``, so a namespace's
channels are its own. One PSUBSCRIBE per distinct glob, shared by the subscriptions using it.

Queue groups: every gateway process with members of a group receives the message; the first
to claim it (``SET prism:psc:<ns>:<message id>:<digest of group> NX PX``) hands it to one of its
members (whatever pattern they subscribed with), round robin. The claim is a round trip per
message and group, made in order, so each member still gets its share in publish order.

Redis keeps nothing: messages published while the subscribing connection is down are lost;
it reconnects by itself and subscribes again, and a publish while Redis is down is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from redis import exceptions as rex
from redis.asyncio.client import PubSub

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, Overflow, PubSubAdapter, Start, Subscription
from adapters.pubsub.subjects import matches
from prism.errors import PrismError

if TYPE_CHECKING:
    from adapters.backends.redis import RedisClient

log = logging.getLogger(__name__)

CHANNELS = b"prism:ps:"  # + namespace + b":" + subject
CLAIMS = "prism:psc:"  # + namespace:message id:digest of the group
CLAIM_MS = 30_000  # longer than any two gateways receive one message apart
RECONNECT_SECONDS = 0.5
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def channel(namespace: str, subject: tuple[str, ...]) -> bytes:
    return CHANNELS + f"{namespace}:{'.'.join(subject)}".encode()


def glob(namespace: str, pattern: tuple[str, ...]) -> bytes:
    """The narrowest Redis glob matching every subject of ``pattern`` (and possibly more)."""
    parts = ["*" if t == "*" else "?*" if t == ">" else _GLOB_SPECIAL.sub(r"\\\1", t) for t in pattern]
    return CHANNELS + f"{namespace}:{'.'.join(parts)}".encode()


def envelope(message_id: str, published_at: float, headers: Mapping[str, str], data: bytes) -> bytes:
    return json.dumps([message_id, published_at, dict(headers)]).encode() + b"\n" + data


def _unavailable(why: str) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"redis pubsub unavailable: {why}")


class RedisSubscription(Subscription):
    def __init__(
        self, adapter: RedisPubSub, namespace: str, pattern: tuple[str, ...], group: str, overflow: Overflow
    ) -> None:
        super().__init__(namespace, adapter.buffer_size, overflow)
        self.adapter, self.pattern, self.group = adapter, pattern, group
        self.glob = glob(namespace, pattern)

    async def _detach(self) -> None:
        await self.adapter.leave(self)


class RedisPubSub(PubSubAdapter):
    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED})

    def __init__(self, client: RedisClient, buffer_size: int = 1024) -> None:
        self.client = client
        self.buffer_size = buffer_size
        self.timeout = client.settings.command_timeout
        self._globs: dict[bytes, list[RedisSubscription]] = {}  # glob → subscriptions, in order
        # PSUBSCRIBEs of each glob sent on the current connection, and the confirmations read:
        # Redis answers in order, so the n-th confirmation means the n-th PSUBSCRIBE is in force.
        self._sent: defaultdict[bytes, int] = defaultdict(int)
        self._confirmed: defaultdict[bytes, int] = defaultdict(int)
        self._progress = asyncio.Condition()  # notified on each confirmation and on a lost connection
        self._connection = 0  # which connection: counted up on each loss
        self._turns: defaultdict[tuple[str, str], itertools.count[int]] = defaultdict(itertools.count)
        self._last_grouped = ""  # the message whose group members were last chosen
        self._pubsub: PubSub | None = None  # set while connected
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        message_id = uuid.uuid4().hex
        with self.client.errors():
            await self.client.redis.publish(channel(namespace, subject), envelope(message_id, time.time(), headers, data))
        return message_id

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,  # no history here: the service passes none (no Capability.REPLAY)
    ) -> Subscription:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        try:
            async with asyncio.timeout(self.timeout):
                await self._connected.wait()
        except TimeoutError:
            raise _unavailable(f"no subscriber connection within {self.timeout:g}s") from None
        subscription = RedisSubscription(self, namespace, pattern, queue_group, overflow)
        members = self._globs.setdefault(subscription.glob, [])
        members.append(subscription)
        try:
            await self._listen(subscription.glob, first=len(members) == 1)
        except BaseException:
            await subscription.close()
            raise
        return subscription

    async def _listen(self, pattern: bytes, first: bool) -> None:
        """Until Redis confirmed the PSUBSCRIBE of ``pattern`` (sent now by its first
        subscription) on this connection: from then on the subscription is live."""
        connection = self._connection
        if first:
            assert self._pubsub is not None
            with self.client.errors():
                await self._pubsub.psubscribe(pattern)
            self._sent[pattern] += 1  # confirmations are counted, so one read already is fine
        needed = self._sent[pattern]

        def settled() -> bool:
            return self._confirmed[pattern] >= needed or self._connection != connection

        async with self._progress:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._progress.wait_for(settled)
        if self._connection != connection or self._confirmed[pattern] < needed:
            raise _unavailable(f"PSUBSCRIBE not confirmed within {self.timeout:g}s, or the connection was lost")

    async def leave(self, subscription: RedisSubscription) -> None:
        members = self._globs.get(subscription.glob, [])
        if subscription in members:
            members.remove(subscription)
        if members or subscription.glob not in self._globs:
            return
        del self._globs[subscription.glob]
        if self._pubsub is not None:
            with contextlib.suppress(rex.RedisError, OSError):  # a lost connection forgot it anyway
                await self._pubsub.punsubscribe(subscription.glob)

    async def close(self) -> None:
        for members in list(self._globs.values()):
            for subscription in list(members):
                await subscription.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- The subscriber connection ---------------------------------------------------------------

    async def _run(self) -> None:
        """Hold the subscriber connection, subscribed to every glob; again after a failure."""
        lost = False  # logged once per outage
        while True:
            pubsub = self.client.redis.pubsub()
            try:
                await pubsub.connect()
                if self._globs:  # what the last connection had: confirmations come below
                    await pubsub.psubscribe(*self._globs)
                    self._sent.update(dict.fromkeys(self._globs, 1))
                self._pubsub = pubsub
                self._connected.set()
                if lost:
                    log.info("redis pubsub: subscriber connection back")
                lost = False
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        await self._handle(message)
            except (rex.RedisError, OSError) as exc:
                if not lost:
                    log.warning("redis pubsub: subscriber connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
                lost = True
            finally:
                self._connected.clear()
                self._pubsub = None
                self._connection += 1
                self._sent.clear()
                self._confirmed.clear()
                async with self._progress:  # waiters for a confirmation give up
                    self._progress.notify_all()
                with contextlib.suppress(rex.RedisError, OSError):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "psubscribe":
            self._confirmed[message["channel"]] += 1
            async with self._progress:
                self._progress.notify_all()
        elif kind == "pmessage":
            await self._deliver(message["pattern"], message["channel"], message["data"])

    async def _deliver(self, pattern: bytes, raw_channel: bytes, data: bytes) -> None:
        members = list(self._globs.get(pattern, ()))
        if not members:
            return
        try:
            namespace, _, subject = raw_channel[len(CHANNELS) :].decode().partition(":")
            head, _, body = data.partition(b"\n")
            message_id, published_at, headers = json.loads(head)
            delivery = Delivery(message_id, subject, body, headers, float(published_at))
        except (ValueError, TypeError):
            log.debug("redis pubsub: not a Prism message on %r", raw_channel)
            return
        tokens = tuple(subject.split("."))
        for subscription in members:
            if not subscription.group and matches(subscription.pattern, tokens):
                subscription.offer(delivery)
        # Group members are chosen among every pattern here, once per message: Redis sends one
        # pmessage per matching glob, one after the other, so only the first does this.
        if message_id == self._last_grouped:
            return
        self._last_grouped = message_id
        groups: dict[str, list[RedisSubscription]] = {}
        for subscription in itertools.chain.from_iterable(self._globs.values()):
            if subscription.group and subscription.namespace == namespace and matches(subscription.pattern, tokens):
                groups.setdefault(subscription.group, []).append(subscription)
        for group, candidates in groups.items():
            claim = f"{CLAIMS}{namespace}:{message_id}:{hashlib.sha256(group.encode()).hexdigest()[:32]}"
            try:
                won = await self.client.redis.set(claim, b"", nx=True, px=CLAIM_MS)
            except (rex.RedisError, OSError) as exc:  # nobody here can tell whether it is ours
                log.warning("redis pubsub: cannot claim a message for group %r: %s", group, exc)
                continue
            if won:
                candidates[next(self._turns[(namespace, group)]) % len(candidates)].offer(delivery)
