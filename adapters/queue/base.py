"""The Queue adapter contract: durable, partitioned topics read by consumer groups, with
at-least-once delivery acknowledged per message.

    publish ──► topic (a fixed number of partitions; a partition key always picks the same one)
                  │   each partition: offsets 0, 1, 2 … in publish order
                  ▼
    group ───► per partition, a position (the committed offset: every message below it is done)
                  │   and per message at or above it: acknowledged, or leased to one consumer
                  │   until a deadline, with the number of deliveries so far
                  ▼
    consumers of the group ──► each message leased to one of them at a time

Every backend gives these the same meaning; ``tests/conformance/test_queue_adapter.py`` checks
them against an adapter directly (the contract a remote plugin adapter must pass too), and
``tests/conformance/test_queue.py`` through the gateway's transports.

1. **Publish.** A message gets the next offset of the partition its key maps to; an empty key
   means any partition. ``publish`` reports each entry on its own (:class:`Published` or the
   :class:`~prism.errors.PrismError` refusing it); a backend outage fails the whole call.
   A returned :class:`Published` is stored (``durable``: across a restart). An entry carrying an
   idempotency token that the topic has already stored is not stored again: its first
   :class:`Published` comes back (the same token with another entry is ``token_reused``).
2. **Groups.** Every group gets every message; within a group each message goes to one
   consumer at a time. A group that has no position on a partition yet begins at the partition's
   high offset (``LATEST``, and ``COMMITTED``) or its low offset (``EARLIEST``); a group that has
   one continues from it, whatever a consumer asks (moving it is ``seek``).
3. **Leases.** A delivery leases the message to the consumer until ``ack_deadline`` from now;
   ``delivery_attempt`` is 1 + the group's earlier deliveries of it. An acknowledged message is
   never delivered to the group again (unless a ``seek`` or backward ``commit`` replays it). A
   lease that runs out, a negative acknowledgement, or its consumer closing (at once, not after
   the deadline) makes the message deliverable again. Acknowledging a message moves the group's
   position over the acknowledged messages at its head. Acknowledgements and leases live in
   the backend, so any process may acknowledge what another process's consumer delivered.
4. **Order.** A group receives the messages of one partition key in publish order, one at a
   time: a message is not delivered while an earlier message with its key is leased or waiting
   for redelivery — across the group's consumers and across redeliveries. Keys are the unit of
   order and messages without a key have none, so parallelism comes from many keys.
5. **Flow.** A consumer holds at most ``max_in_flight`` live leases; it buffers only what it
   has leased, so its buffer is bounded by ``max_in_flight``.
6. **Dead letters** (capability ``dead_letter``). With ``max_delivery_attempts`` N, a message
   delivered N times without acknowledgement is, instead of an N+1th delivery, appended to
   ``dead_letter_topic`` (same payload, key and headers, plus ``DEAD_LETTER_HEADERS``, the
   reason in ``prism-dead-letter-reason``) and counts as acknowledged for the group.
7. **Commit** sets a group's position on a partition: messages below it are done; messages at
   or above it not yet acknowledged are delivered (so a backward commit replays). **Seek** sets
   it too, to an offset, the first message published at or after a time (capability
   ``seek_timestamp``), the low or high offset, or the committed one, and forgets the group's
   acknowledgements and leases from there: everything from the new position is delivered again.
8. **Topic info**: per partition, the low and high offsets (high: the offset the next message
   will get) and, for a group, its position (``committed_offset``; -1 when it has none) and
   lag (high − position; high − low without a position).

Names arrive checked (``NAME``), so adapters need not quote or escape them. Topics exist once
something is published to them or a consumer joins them. Adapters report failures as
:class:`~prism.errors.PrismError`, so no driver exception crosses the contract:
``unknown_topic`` (NOT_FOUND: ``commit``, ``seek``, ``topic_info`` on a topic that does not
exist), ``no_partition`` (NOT_FOUND), ``offset_out_of_range`` (OUT_OF_RANGE), ``token_reused``
(ALREADY_EXISTS), ``unavailable`` (UNAVAILABLE: the backend cannot be reached). A capability the
adapter does not declare is refused by the service before the adapter is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import grpc
from prometheus_client import Counter

from adapters.capabilities import Capability
from prism.errors import PrismError

# Topic and group names: Kafka's topic alphabet and length, starting with a letter or digit, so
# every backend can use them as they are (a NATS adapter maps the dots of stream names).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,248}$")

# Headers a dead-lettered copy carries (the rest are the original message's).
DEAD_LETTER_REASON = "prism-dead-letter-reason"
DEAD_LETTER_HEADERS = (
    DEAD_LETTER_REASON,
    "prism-dead-letter-topic",  # where it came from
    "prism-dead-letter-group",  # the group that failed it
    "prism-dead-letter-message-id",
    "prism-dead-letter-partition",
    "prism-dead-letter-offset",
    "prism-dead-letter-attempts",
)

# Counted where each backend moves a message to its dead-letter topic.
DEAD_LETTERED = Counter(
    "prism_messages_dead_lettered", "Queue messages moved to a dead-letter topic after max_delivery_attempts", ["namespace"]
)


# The headers of every entry published without any: one read-only mapping, shared.
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True)  # not frozen: one is made per published message, and frozen doubles __init__'s cost
class Entry:
    """One message to publish."""

    payload: bytes
    partition_key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotency_token: str = ""
    _fingerprint: bytes = field(default=b"", init=False, repr=False, compare=False)

    def fingerprint(self) -> bytes:
        """What a retry with the same idempotency token must repeat exactly. Computed once: a
        publish with tokens asks for it several times (an entry is not changed once made)."""
        if not self._fingerprint:
            text = json.dumps([self.partition_key, sorted(self.headers.items())]).encode()
            self._fingerprint = hashlib.sha256(len(text).to_bytes(8, "big") + text + self.payload).digest()
        return self._fingerprint


@dataclass(slots=True)  # not frozen, as Entry
class Published:
    message_id: str  # unique within the topic; opaque to clients
    partition: int
    offset: int


@dataclass(slots=True)  # not frozen: one is made per message, and frozen doubles __init__'s cost
class Delivery:
    message_id: str
    topic: str
    partition: int
    offset: int
    payload: bytes
    partition_key: str
    headers: Mapping[str, str]
    delivery_attempt: int  # 1 on the first delivery to the group
    published_ns: int  # unix nanoseconds


class Start(StrEnum):
    """Where a new group begins (``ConsumeOptions``), or a ``seek`` target."""

    EARLIEST = "earliest"  # the low offset
    LATEST = "latest"  # the high offset: only messages published from now on
    COMMITTED = "committed"  # the group's position; a group without one: LATEST


@dataclass(frozen=True, slots=True)
class AtOffset:
    offset: int


@dataclass(frozen=True, slots=True)
class AtTime:
    """The first message published at or after this time (unix nanoseconds, within int64:
    ``at_time`` clamps); the high offset when there is none."""

    unix_ns: int


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def at_time(unix_ns: int) -> AtTime:
    """Any time, as an AtTime: one beyond int64 nanoseconds (before 1678, after 2262) is
    clamped, which finds the same message."""
    return AtTime(min(max(unix_ns, INT64_MIN), INT64_MAX))


SeekTarget = AtOffset | AtTime | Start


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    group: str
    start: Start = Start.COMMITTED
    ack_deadline: float = 30.0  # seconds a delivery stays leased without an acknowledgement
    max_in_flight: int = 100  # live leases this consumer may hold
    max_delivery_attempts: int = 0  # 0: redeliver for ever; else dead-letter after this many
    dead_letter_topic: str = ""  # required with max_delivery_attempts


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    low_offset: int
    high_offset: int  # the offset the next message will get
    committed_offset: int  # the group's position; -1: none (or no group asked)
    lag: int


class Consumer(ABC, AsyncIterator[Delivery]):
    """One member of a consumer group on one topic, until closed."""

    id: str

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        """The next delivery leased to this consumer, waiting as long as it takes;
        StopAsyncIteration once closed."""
        taken = await self.take(1)
        if not taken:
            raise StopAsyncIteration
        return taken[0]

    @abstractmethod
    async def take(self, limit: int) -> list[Delivery]:
        """The next deliveries leased to this consumer, 1 to ``limit`` of them: those ready
        now, waiting as long as it takes for the first; empty once closed. A caller that stops
        waiting never strands a delivery: none is handed out before this returns."""

    @abstractmethod
    async def close(self) -> None:
        """Leave the group: a pending ``take`` ends, and every unacknowledged delivery
        of this consumer is deliverable to the group again at once. Idempotent."""


class Leased(NamedTuple):
    """A delivery in a consumer's buffer, with when its lease ends (``time.monotonic()``) and
    what the backend needs to give it back unsent."""

    delivery: Delivery
    lease_end: float
    ref: object = None


class LeasingConsumer(Consumer):
    """Claims leases only while the stream asks for more, so a slow reader holds at most
    ``max_in_flight`` messages (its leases, buffered or handed out) and leases nothing beyond
    them.

    A claim runs as its own task: a caller that stops waiting for ``take`` (a timeout,
    a cancelled stream) never strands leased messages between the backend and the buffer.
    While the reader takes messages from the buffer, a change (an acknowledgement freeing
    room, a publish) starts the next claim once the buffer is down to half of
    ``max_in_flight``, so the buffer is refilled while the stream still sends, rather than
    claim → deliver everything → wait for acknowledgements → claim. Half, not at once after
    every acknowledgement: a claim costs about the same whatever it takes, so fewer, larger
    claims. Only while claims bring something: one that came back empty (no room, nothing
    deliverable) leaves the next to the buffer running dry, so a reader that holds all its
    leases is not claimed for on every wake-up. A backend says how to claim (``_claim``) and
    how to give leases back (``_release``); its adapter calls :meth:`wake` when something may
    have become deliverable."""

    def __init__(self, options: ConsumeOptions) -> None:
        self.id = uuid.uuid4().hex
        self.options = options
        self._buffer: deque[Leased] = deque()
        self._handed_out: set[tuple[int, int]] = set()  # (partition, offset) of leases take returned
        self._turn = itertools.count()  # which partition a claim looks at first
        self._woken = asyncio.Event()  # set: something changed since the last claim started
        self._claiming: asyncio.Task[float | None] | None = None
        self._refill_below = max(1, options.max_in_flight // 2)  # buffer size that lets a wake-up claim
        self._popped = 0  # deliveries taken from the buffer, ever: with its length, what claims added
        self._productive = True  # the last claim added to the buffer
        self._closed = False

    @abstractmethod
    async def _claim(self) -> float | None:
        """Lease what this consumer may take into ``_buffer``; seconds until looking again if
        nothing wakes it (None: only a wake-up can change anything)."""

    @abstractmethod
    async def _release(self, unsent: list[Leased]) -> None:
        """Give back the leases of this consumer: those handed out and not acknowledged
        (``_handed_out``) and ``unsent``, which never left the buffer."""

    async def _leave(self) -> None:
        """Unregister from the adapter's wake-ups; runs last on close, even after a failure."""

    def wake(self) -> None:
        self._woken.set()

    def _start_claim(self) -> asyncio.Task[float | None]:
        """The claim under way, or a new one."""
        if self._claiming is None or self._claiming.done():
            self._woken.clear()  # before claiming, so a change during the claim is not missed
            self._claiming = asyncio.create_task(self._counted_claim())
            self._claiming.add_done_callback(_retrieve)
        return self._claiming

    async def _counted_claim(self) -> float | None:
        before = len(self._buffer) + self._popped
        try:
            return await self._claim()
        finally:
            self._productive = len(self._buffer) + self._popped > before

    async def take(self, limit: int) -> list[Delivery]:
        buffer, handed_out = self._buffer, self._handed_out
        while not self._closed:
            now = time.monotonic()
            taken: list[Delivery] = []
            while buffer and len(taken) < limit:
                leased = buffer.popleft()
                self._popped += 1
                if leased.lease_end > now:  # else its lease ran out while it waited here: maybe redelivered
                    delivery = leased.delivery
                    handed_out.add((delivery.partition, delivery.offset))
                    taken.append(delivery)
            if taken:
                if self._woken.is_set() and self._productive and len(buffer) < self._refill_below:
                    self._start_claim()  # in the background: its leases join the buffer's end
                return taken
            wait = await asyncio.shield(self._start_claim())
            if self._buffer or self._closed:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that comes as the event is set, and this loop would then run on after its reader left.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._woken.wait()
        return []

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._woken.set()
        try:
            if self._claiming is not None:  # a claim under way lands first, so its leases are released too
                await asyncio.gather(self._claiming, return_exceptions=True)
            unsent = list(self._buffer)
            self._buffer.clear()
            await self._release(unsent)
        finally:
            await self._leave()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a claim's failure seen: the ``take`` awaiting it raises it, or none is left."""
    if not task.cancelled():
        task.exception()


def monotonic_of(unix_ns: int) -> float:
    """A wall-clock time (a lease end stored in a database) on the ``time.monotonic()`` clock."""
    return time.monotonic() + (unix_ns - time.time_ns()) / 1e9


class QueueAdapter(ABC):
    """Partitioned topics and consumer groups, isolated by namespace."""

    capabilities: ClassVar[frozenset[Capability]]

    async def start(self) -> None:
        """Create the schema on the backend's connection; called once before the first call."""

    async def close(self) -> None:
        """End every open consumer; release what ``start`` made (never the shared connection)."""

    @abstractmethod
    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        """Store the entries in order, creating the topic if needed; one result per entry."""

    async def publish_one(self, namespace: str, topic: str, entry: Entry) -> Published:
        (result,) = await self.publish(namespace, topic, [entry])
        if isinstance(result, PrismError):
            raise result
        return result

    @abstractmethod
    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        """Join ``options.group`` on the topic (creating both if needed); once this returns,
        the group has a position on every partition."""

    @abstractmethod
    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        """Mark delivered messages done for the group; how many of ``message_ids`` were
        delivered and not yet acknowledged (others, unknown ids included, are ignored)."""

    @abstractmethod
    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        """End the leases of delivered, unacknowledged messages now, so they are delivered
        again (to any consumer of the group, with the next attempt number); how many."""

    @abstractmethod
    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        """Set the group's position on the partition (low ≤ offset ≤ high)."""

    @abstractmethod
    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        """Move the group's position on the partition to ``target`` and replay from there;
        the new position."""

    @abstractmethod
    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        """Every partition of the topic, in order; positions and lag of ``group`` if given."""


def message_id(partition: int, offset: int) -> str:
    """The message id of adapters whose messages are addressed by partition and offset."""
    return f"{partition}-{offset}"


def parse_message_id(text: str) -> tuple[int, int] | None:
    """(partition, offset) of a ``message_id``; None for any other string."""
    partition, _, offset = text.partition("-")
    if not (partition.isdigit() and offset.isdigit() and partition.isascii() and offset.isascii()):
        return None
    parsed = int(partition), int(offset)
    return parsed if max(parsed) <= INT64_MAX else None


def unknown_topic(topic: str) -> PrismError:
    return PrismError(grpc.StatusCode.NOT_FOUND, f"topic {topic!r} not found (nothing was published to it)")


def no_partition(topic: str, partition: int, partitions: int) -> PrismError:
    return PrismError(
        grpc.StatusCode.NOT_FOUND,
        f"partition: topic {topic!r} has partitions 0 to {partitions - 1}, not {partition}",
        field="partition",
    )


def offset_out_of_range(partition: int, offset: int, low: int, high: int) -> PrismError:
    return PrismError(
        grpc.StatusCode.OUT_OF_RANGE,
        f"offset: {offset} is outside partition {partition}'s offsets {low} to {high}",
        field="offset",
    )


def token_reused() -> PrismError:
    """409, as KeyValue answers it: the token is taken, by another entry."""
    return PrismError(
        grpc.StatusCode.ALREADY_EXISTS,
        "idempotencyToken: already used by a different entry on this topic",
        field="idempotencyToken",
    )


def unavailable(backend: str, exc: BaseException) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"{backend} backend unavailable: {type(exc).__name__}")
