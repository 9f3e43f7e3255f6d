"""Kafka PubSub (aiokafka): a Kafka topic per subject, a pattern is the set of topics whose
subject it matches, and Kafka keeps what was published, so a subscription may start in the past.

    subject a.b.c of namespace ns ──► topic  <topic_prefix>-ps.<ns>.<a>.<b>.<c>
        every part escaped alike: [A-Za-z0-9] as it is, any other UTF-8 byte as "-" and two hex
        digits ("." in a namespace "-2e", "-" "-2d", "_" "-5f", "é" "-c3-a9"): one-to-one, so a
        topic name reads back as its namespace and subject; no name holds "_" (Kafka's metrics
        would confuse it with "."); a subject whose name passes 249 characters is refused
    pattern a.*.>                 ──► the topics under <topic_prefix>-ps.<ns>. whose subject
        matches it (adapters.pubsub.subjects.matches), re-evaluated as topics appear: at once
        for the topics this process makes (the first publish to a subject creates its topic,
        with ``partitions`` partitions), and every ``pubsub_refresh`` seconds from the cluster's
        metadata for the topics other processes make
    message                       ──► record: value = data; headers = ("_prism-ns", publish time
        in unix ns) first, then the client's (any name, even one starting "_prism"); the record's
        timestamp is the publish time in ms (for offsets_for_times)
    message id                    ──► "<publish unix ns>-<partition>-<offset>-<topic digest>"

Readers, each one aiokafka consumer (:class:`Reader`):

- every subscription without a start or a queue group, whatever its namespace and pattern,
  is fed by the adapter's one :class:`Live` reader: a consumer outside any Kafka group,
  partitions assigned by hand. A subscription's window (:class:`Window`) says what it gets: of
  each partition it wants when it joins, the offsets from that partition's end then on; of
  partitions found later (read from their beginning), the records published since it joined.
  Each record is decoded once for all the subscriptions wanting its topic, so 100 subscribers
  cost one consumer and one fetch.
- a subscription with a start position (Capability.REPLAY) has a :class:`Replay` reader of
  its own: ``start_time`` from the first record at or after it (offsets_for_times on the
  millisecond, then the nanoseconds of ``_prism-ns``); ``start_after`` a message id from the
  next offset of that message's partition, and on every other partition from the first record
  published after it. What that gives is followed by every new message.
- a queue-group member is a :class:`Group` reader: a consumer of Kafka group
  <topic_prefix>-ps.<ns>.g.<group escaped> (.h.<digest> when long), subscribed to the matching
  topics, so Kafka gives each partition to one member of the group across every gateway
  process. A partition the group never read starts at the records published since its member
  here subscribed; committed positions carry on after that (a group goes on where it left
  off, so it takes no start position). Tansu, the tests' broker, takes a second or more to form
  or re-form a group: a member's first deliveries come that much later, none is lost.

Order: Kafka orders each partition. A reader offers what one fetch brought in publish-time
order, so one publisher's messages arrive in order in practice; across partitions (several
per subject, or several subjects) Kafka promises no order, and a topic another process made
is read from the next refresh on. ``partitions: 1`` keeps a subject in strict order (a queue
group then shares by subject, not by message).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiokafka.errors as kerr
import grpc
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import ConsumerRecord, OffsetAndTimestamp

from adapters.capabilities import Capability
from adapters.pubsub.base import (
    AfterMessage,
    Delivery,
    FromTime,
    Overflow,
    PubSubAdapter,
    Start,
    Subscription,
)
from adapters.pubsub.subjects import matches
from prism.errors import PrismError, invalid_argument

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.kafka import KafkaConnection

log = logging.getLogger(__name__)

NAME_LIMIT = 249  # Kafka's topic name length
TIME_HEADER = "_prism-ns"  # the first header of a record Prism published: publish time, unix ns
RETRY = 0.5  # seconds a reader waits after a failed fetch
FETCH_MS = 1000  # the longest a reader's getmany waits for records
_PLAIN = re.compile(r"[A-Za-z0-9]")
_ESCAPED = re.compile(r"(?:-[0-9a-f]{2})+")
_NAME_PART = re.compile(r"(?:[A-Za-z0-9]|-[0-9a-f]{2})+")  # what escape() writes
_MESSAGE_ID = re.compile(r"(\d{1,20})-(\d{1,10})-(\d{1,20})-([0-9a-f]{12})")


def escape(text: str) -> str:
    """``text`` in Kafka's name alphabet without '.' and '_': one-to-one."""
    return "".join(c if _PLAIN.fullmatch(c) else "".join(f"-{b:02x}" for b in c.encode()) for c in text)


def unescape(text: str) -> str:
    """What :func:`escape` made ``text`` of; ValueError when it made no such thing."""
    if not _NAME_PART.fullmatch(text):
        raise ValueError(f"{text!r} is not an escaped name")
    return _ESCAPED.sub(lambda m: bytes.fromhex(m.group(0).replace("-", "")).decode(), text)


def topic_digest(topic: str) -> str:
    return hashlib.blake2b(topic.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class MessageId:
    """What a Kafka PubSub message id says: enough to resume after it."""

    unix_ns: int
    partition: int
    offset: int
    digest: str  # of its topic's name

    def __str__(self) -> str:
        return f"{self.unix_ns}-{self.partition}-{self.offset}-{self.digest}"

    @classmethod
    def parse(cls, text: str, field: str) -> MessageId:
        found = _MESSAGE_ID.fullmatch(text)
        if found is None:
            raise invalid_argument(field, f"{text!r} is not a message id of this backend (<unix ns>-<partition>-<offset>-<digest>)")
        return cls(int(found.group(1)), int(found.group(2)), int(found.group(3)), found.group(4))


def publish_ns(record: ConsumerRecord) -> int:
    """A record's publish time: its ``_prism-ns`` header, else its timestamp (a record a plain
    Kafka client produced)."""
    headers = record.headers
    if headers and headers[0][0] == TIME_HEADER:
        with contextlib.suppress(ValueError):
            return int(headers[0][1])
    return max(record.timestamp, 0) * 1_000_000


def user_headers(record: ConsumerRecord) -> dict[str, str]:
    headers = record.headers or ()
    if headers and headers[0][0] == TIME_HEADER:
        headers = headers[1:]
    return {name: (value or b"").decode(errors="replace") for name, value in headers}


@dataclass(slots=True)
class Window:
    """Which records a subscription admits. Partitions in ``floors``: offsets from the floor on,
    and below ``dated[tp]`` only those published at or after ``since_ns`` (a start time's first
    records). Partitions it does not know: records published at or after ``since_ns``."""

    since_ns: int
    floors: dict[TopicPartition, int] = field(default_factory=dict)
    dated: dict[TopicPartition, int] = field(default_factory=dict)

    def admits(self, tp: TopicPartition, offset: int, unix_ns: int) -> bool:
        floor = self.floors.get(tp)
        if floor is None:
            return unix_ns >= self.since_ns
        return offset >= floor and (offset >= self.dated.get(tp, 0) or unix_ns >= self.since_ns)


class KafkaSubscription(Subscription):
    reader: Reader  # set by the adapter once it chose one

    def __init__(
        self, adapter: KafkaPubSub, namespace: str, pattern: tuple[str, ...], overflow: Overflow, window: Window
    ) -> None:
        super().__init__(namespace, adapter.buffer_size, overflow)
        self.adapter, self.pattern, self.window = adapter, pattern, window
        self.root = adapter.namespace_root(namespace)

    def wants(self, topic: str) -> bool:
        subject = self.adapter.subject_of(self.root, topic)
        return subject is not None and matches(self.pattern, subject)

    async def _detach(self) -> None:
        self.adapter.subscriptions.pop(self.id, None)
        await self.reader.leave(self)


async def stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer, whatever it says. aiokafka 0.14 lets a CancelledError of its own out
    of ``stop`` when a consumer outside any group stops before its coordinator's task ran
    (it awaits that task, cancelled before it began), skipping the fetcher and the client: that
    must not pass for a cancellation of the caller, and what it skipped is closed here."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        for rest in (consumer._fetcher, consumer._client):
            with contextlib.suppress(Exception):
                await rest.close()
    except Exception as exc:  # leaving: nothing to tell anyone
        log.debug("kafka pubsub: stopping a consumer: %r", exc)


def start_offset(at: OffsetAndTimestamp | None, end: int) -> int:
    """Where offsets_for_times puts a partition: its answer, or the end when no record is that
    recent (Tansu answers offset 0 and time -1 then)."""
    return end if at is None or at.offset < 0 or at.timestamp < 0 else at.offset


class Reader(ABC):
    """One consumer and the subscriptions it feeds. Opening it is a task of its own, so a
    subscriber that gives up while it opens neither cancels it for the others nor leaves it
    behind."""

    def __init__(self, adapter: KafkaPubSub, consumer: AIOKafkaConsumer) -> None:
        self.adapter, self.consumer = adapter, consumer
        self.members: dict[str, KafkaSubscription] = {}
        self.reading = asyncio.Event()  # set while it has partitions to read
        self.task: asyncio.Task[None] | None = None
        self.opening = asyncio.get_running_loop().create_task(self._open())

    @property
    def failed(self) -> bool:
        return self.opening.done() and (self.opening.cancelled() or self.opening.exception() is not None)

    async def _open(self) -> None:
        with self.adapter.connection.errors():
            await self.consumer.start()
            await self._start(await self.adapter.known_topics())
        self.task = asyncio.get_running_loop().create_task(self._run())

    @abstractmethod
    async def _start(self, known: Mapping[str, int]) -> None:
        """Begin reading what the members want of ``known`` (topic → partitions)."""

    @abstractmethod
    def found(self, topics: Mapping[str, int]) -> list[TopicPartition]:
        """Topics that appeared, wanted or not; never waits. Returns the partitions it began
        reading by hand (see :meth:`settle`)."""

    async def settle(self, tps: list[TopicPartition]) -> None:
        """Until the consumer knows where partitions it began reading are (their leaders), so
        its next fetch includes them. Best effort: it only keeps records of several topics in
        publish order."""
        if tps:
            try:
                await self.consumer.end_offsets(tps)
            except (kerr.KafkaError, OSError) as exc:
                log.debug("kafka pubsub: settling %d partitions: %r", len(tps), exc)

    async def join(self, member: KafkaSubscription) -> None:
        """Offer to ``member`` from now on; returns once reading has begun."""
        self.members[member.id] = member
        await asyncio.shield(self.opening)

    async def leave(self, member: KafkaSubscription) -> None:
        self.members.pop(member.id, None)
        if not self.members:
            await self.close()

    async def close(self) -> None:
        self.adapter.forget(self)
        await asyncio.wait([self.opening])
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await stop(self.consumer)

    def targets(self, topic: str) -> Iterable[KafkaSubscription]:
        """The members that may want a record of ``topic``."""
        return tuple(self.members.values())

    async def _run(self) -> None:
        """Fetch and offer until closed; a failed fetch is tried again after RETRY. Anything
        else ends the subscriptions it feeds (UNAVAILABLE), rather than leave them waiting."""
        failing = False
        try:
            while True:
                await self.reading.wait()
                try:
                    batch = await self.consumer.getmany(timeout_ms=FETCH_MS)
                except kerr.ConsumerStoppedError:
                    return
                except (kerr.KafkaError, OSError) as exc:
                    if not failing:
                        log.warning("kafka pubsub: a fetch failed (%s: %s); trying again", type(exc).__name__, exc)
                    failing = True
                    await asyncio.sleep(RETRY)
                    continue
                failing = False
                if batch:
                    self.deliver(batch)
        except Exception as exc:
            log.exception("kafka pubsub: a reader failed")
            for member in tuple(self.members.values()):
                member.end(PrismError(grpc.StatusCode.UNAVAILABLE, f"kafka pubsub: reading failed: {type(exc).__name__}"))

    def deliver(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        """Offer a fetch's records in publish-time order; each decoded once, for every member
        that admits it."""
        records = sorted(((publish_ns(r), tp.partition, r.offset, tp, r) for tp, rs in batch.items() for r in rs), key=lambda e: e[:3])
        for unix_ns, _, offset, tp, record in records:
            self.moved(tp, offset + 1)
            delivery: Delivery | None = None
            for member in self.targets(tp.topic):
                if member.window.admits(tp, offset, unix_ns):
                    if delivery is None:
                        delivery = self.adapter.delivery(member.root, record, unix_ns)
                    member.offer(delivery)

    def moved(self, tp: TopicPartition, position: int) -> None:
        """The next offset to read of ``tp``, once a record was handed on."""


class ByHand(Reader):
    """A consumer outside any Kafka group, partitions assigned by hand. aiokafka's ``assign``
    replaces the whole assignment and forgets positions, so the reader keeps them
    (``positions``) and seeks every partition again when the assignment changes; a fetch
    made for the old assignment is dropped by aiokafka, never handed on twice."""

    def __init__(self, adapter: KafkaPubSub) -> None:
        self.positions: dict[TopicPartition, int] = {}
        self.placing: set[TopicPartition] = set()  # assigned and paused until their start is known
        self.pending: dict[str, int] = {}  # found while opening
        self.opened = False
        super().__init__(adapter, adapter.connection.reader())

    def wanted(self, topics: Mapping[str, int]) -> list[TopicPartition]:
        return [
            TopicPartition(t, p)
            for t, n in topics.items()
            if any(m.wants(t) for m in self.members.values())
            for p in range(n)
        ]

    def reassign(self) -> None:
        self.consumer.assign([*self.positions, *(self.placing - set(self.positions))])
        for tp, offset in self.positions.items():
            self.consumer.seek(tp, offset)
        if placing := self.placing - set(self.positions):
            self.consumer.pause(*placing)
        if self.positions:
            self.reading.set()
        else:
            self.reading.clear()

    def found(self, topics: Mapping[str, int]) -> list[TopicPartition]:
        if not self.opened:
            self.pending.update(topics)
            return []
        # From their beginning: offset 0 past the log start resets to it ("earliest").
        new = [tp for tp in self.wanted(topics) if tp not in self.positions]
        if new:
            self.positions.update(dict.fromkeys(new, 0))
            self.reassign()
        return new

    async def _opened(self) -> None:
        self.opened = True
        pending, self.pending = self.pending, {}
        await self.settle(self.found(pending))

    def moved(self, tp: TopicPartition, position: int) -> None:
        if tp in self.positions:
            self.positions[tp] = position


class Live(ByHand):
    """The adapter's one reader for every subscription without a start or a queue group,
    whatever its namespace and pattern: one consumer however many subscriptions, and each
    record decoded once for all the subscriptions wanting its topic. A partition some
    subscription wants is read from its end when that subscription joins, or from its
    beginning when its topic appears later; it is dropped when none wants it any more."""

    def __init__(self, adapter: KafkaPubSub) -> None:
        self.routes: dict[str, tuple[KafkaSubscription, ...]] = {}  # topic → members wanting it
        super().__init__(adapter)

    async def _start(self, known: Mapping[str, int]) -> None:
        await self._opened()

    def targets(self, topic: str) -> Iterable[KafkaSubscription]:
        route = self.routes.get(topic)
        if route is None:
            route = self.routes[topic] = tuple(m for m in self.members.values() if m.wants(topic))
        return route

    async def join(self, member: KafkaSubscription) -> None:
        """Read what ``member`` wants from here on; its window: of each partition it wants,
        the offsets from the partition's end now on."""
        self.members[member.id] = member
        self.routes.clear()
        await asyncio.shield(self.opening)
        known = await self.adapter.known_topics()
        tps = [TopicPartition(t, p) for t, n in known.items() if member.wants(t) for p in range(n)]
        if not tps:
            return
        new = {tp for tp in tps if tp not in self.positions}
        self.placing |= new
        try:
            if new:
                self.reassign()  # the client learns their leaders; they wait, paused
            with self.adapter.connection.errors():
                ends = await self.adapter.connection.high_offsets(self.consumer, tps)
        finally:
            self.placing -= new
        if new := {tp for tp in new if tp not in self.positions}:  # nobody began them meanwhile
            self.positions.update((tp, ends[tp]) for tp in new)
            self.reassign()
        member.window.floors = dict(ends)

    async def leave(self, member: KafkaSubscription) -> None:
        """Stop reading what no other member wants (the reader itself stays, idle; without
        members it needs no news of topics, and the adapter's watcher may stop)."""
        self.members.pop(member.id, None)
        self.routes.clear()
        if not self.members:
            self.adapter.readers.discard(self)
        if not self.opened:
            return
        others = self.members.values()
        dropped = {t for t in {tp.topic for tp in self.positions} if member.wants(t) and not any(m.wants(t) for m in others)}
        if dropped:
            self.positions = {tp: at for tp, at in self.positions.items() if tp.topic not in dropped}
            self.reassign()


class Replay(ByHand):
    """One subscription starting in the past (Capability.REPLAY): ``start_time`` at the first
    record at or after it (offsets_for_times on the millisecond, then the nanoseconds of
    ``_prism-ns``); ``start_after`` a message id at the next offset of that message's
    partition, and on every other partition at the first record published after it. Topics
    that appear later are read from their beginning.

    The history is merged by publish time: a fetch brings at most ``max_message_bytes`` of a
    partition, and a broker may answer with some partitions only, so until every partition
    with history left (``behind``) has records fetched, what the others brought waits
    (``heads``). A partition with records waiting is paused until they have gone: the reader
    holds at most one fetch of each partition."""

    def __init__(self, adapter: KafkaPubSub, member: KafkaSubscription, start: Start) -> None:
        self.start = start
        self.behind: dict[TopicPartition, int] = {}  # partitions with history left → its end
        self.heads: dict[TopicPartition, deque[tuple[int, ConsumerRecord]]] = {}  # fetched, not handed on
        super().__init__(adapter)
        self.members[member.id] = member

    def reassign(self) -> None:
        self.heads.clear()  # positions are what was handed on: the held records come again
        super().reassign()

    def deliver(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        if not self.behind and not self.heads:
            super().deliver(batch)
            return
        for tp, records in batch.items():
            self.heads.setdefault(tp, deque()).extend((publish_ns(r), r) for r in records)
        (member,) = self.members.values()
        while not any(not self.heads.get(tp) for tp in self.behind):
            ready = [tp for tp, held in self.heads.items() if held]
            if not ready:
                break
            tp = min(ready, key=lambda tp: (self.heads[tp][0][0], tp.partition))
            unix_ns, record = self.heads[tp].popleft()
            self.moved(tp, record.offset + 1)
            if record.offset + 1 >= self.behind.get(tp, 0):
                self.behind.pop(tp, None)
            if member.window.admits(tp, record.offset, unix_ns):
                member.offer(self.adapter.delivery(member.root, record, unix_ns))
        self.heads = {tp: held for tp, held in self.heads.items() if held}
        if self.heads:
            self.consumer.pause(*self.heads)
        self.consumer.resume(*(tp for tp in self.positions if tp not in self.heads))

    async def _start(self, known: Mapping[str, int]) -> None:
        (member,) = self.members.values()
        after = MessageId.parse(self.start.message_id, "startAfter") if isinstance(self.start, AfterMessage) else None
        since = self.start.unix_ns if isinstance(self.start, FromTime) else after.unix_ns + 1  # type: ignore[union-attr]
        member.window = Window(since)
        if tps := self.wanted(known):
            self.consumer.assign(tps)
            ends = await self.adapter.connection.high_offsets(self.consumer, tps)
            member.window.dated = dict(ends)
            exact = None
            if after is not None:  # its own partition: from the next offset, whatever the times
                exact = next((tp for tp in tps if tp.partition == after.partition and topic_digest(tp.topic) == after.digest), None)
            if exact is not None:
                member.window.floors[exact] = min(after.offset + 1, ends[exact])  # type: ignore[union-attr]
                del member.window.dated[exact]
            if timed := [tp for tp in tps if tp != exact]:
                found = await self.consumer.offsets_for_times(dict.fromkeys(timed, since // 1_000_000))
                member.window.floors.update((tp, start_offset(found.get(tp), ends[tp])) for tp in timed)
            self.positions = dict(member.window.floors)
            self.behind = {tp: ends[tp] for tp, at in self.positions.items() if at < ends[tp]}
            self.reassign()
        await self._opened()


class Group(Reader, ConsumerRebalanceListener):
    """One queue-group member: a consumer of the group's Kafka group, subscribed to the
    matching topics (again, and so rejoining the group, whenever more appear)."""

    def __init__(self, adapter: KafkaPubSub, member: KafkaSubscription, group: str, since_ns: int) -> None:
        self.since_ns = since_ns
        self.topics: set[str] = set()
        self.opened = False
        group_id = adapter.group_id(member.namespace, group)
        super().__init__(adapter, adapter.connection.member(group_id))
        self.members[member.id] = member

    async def _start(self, known: Mapping[str, int]) -> None:
        self.opened = True
        self.found({**known, **dict.fromkeys(self.topics, 0)})

    def found(self, topics: Mapping[str, int]) -> list[TopicPartition]:
        (member,) = self.members.values() or (None,)
        if member is None:
            return []
        new = {t for t in topics if t not in self.topics and member.wants(t)}
        self.topics |= new
        if self.opened and (new or not self.reading.is_set()) and self.topics:
            self.consumer.subscribe(topics=sorted(self.topics), listener=self)
            self.reading.set()
        return []

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """A partition the group never read starts at the records published since this member
        subscribed (committed positions carry on otherwise)."""
        tps = list(assigned)
        try:
            committed = await asyncio.gather(*(self.consumer.committed(tp) for tp in tps))
            fresh = [tp for tp, at in zip(tps, committed, strict=True) if at is None]
            if not fresh:
                return
            ends = await self.adapter.connection.high_offsets(self.consumer, fresh)
            found = await self.consumer.offsets_for_times(dict.fromkeys(fresh, self.since_ns // 1_000_000))
        except (kerr.KafkaError, OSError) as exc:  # the group's reset ("latest") stands
            log.warning("kafka pubsub: placing a group's new partitions failed: %s: %s", type(exc).__name__, exc)
            return
        for tp in fresh:
            self.consumer.seek(tp, start_offset(found.get(tp), ends[tp]))


class KafkaPubSub(PubSubAdapter):
    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED, Capability.REPLAY})

    def __init__(self, connection: KafkaConnection, buffer_size: int = 1024) -> None:
        self.connection = connection
        self.buffer_size = buffer_size
        self.root = f"{connection.settings.topic_prefix}-ps."
        self.topics: dict[str, int] = {}  # this prefix's topics → partitions, as last seen
        self.live: Live | None = None  # reads for every subscription without a start or a group
        self.readers: set[Reader] = set()  # every open reader, told of the topics that appear
        self.subscriptions: dict[str, KafkaSubscription] = {}  # to end them when the adapter closes
        self._subjects: dict[str, tuple[str, ...] | None] = {}  # topic → its subject, decoded once
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # --- Names -----------------------------------------------------------------------------------

    def namespace_root(self, namespace: str) -> str:
        return f"{self.root}{escape(namespace)}."

    def topic(self, namespace: str, tokens: tuple[str, ...], field: str = "subject") -> str:
        """The topic of a subject; a pattern's wildcards count as one character."""
        name = self.namespace_root(namespace) + ".".join(t if t in ("*", ">") else escape(t) for t in tokens)
        if len(name) > NAME_LIMIT:
            raise invalid_argument(field, f"too long for a Kafka topic name once escaped ({len(name)} > {NAME_LIMIT} characters)")
        return name

    def subject_of(self, root: str, topic: str) -> tuple[str, ...] | None:
        """The subject of a namespace's topic (root ends with '.'); None for another's."""
        if not topic.startswith(root):
            return None
        if topic not in self._subjects:
            try:
                self._subjects[topic] = tuple(unescape(t) for t in topic[len(root) :].split("."))
            except ValueError:  # not a name Prism made (UnicodeDecodeError is one too)
                self._subjects[topic] = None
        return self._subjects[topic]

    def group_id(self, namespace: str, group: str) -> str:
        plain = escape(group)
        tail = f"g.{plain}" if len(plain) <= 128 else f"h.{hashlib.sha256(group.encode()).hexdigest()[:40]}"
        return self.namespace_root(namespace) + tail

    def delivery(self, root: str, record: ConsumerRecord, unix_ns: int) -> Delivery:
        subject = ".".join(self.subject_of(root, record.topic) or (record.topic,))
        message_id = MessageId(unix_ns, record.partition, record.offset, topic_digest(record.topic))
        return Delivery(str(message_id), subject, record.value or b"", user_headers(record), unix_ns / 1e9)

    # --- Topics ----------------------------------------------------------------------------------

    async def known_topics(self) -> dict[str, int]:
        """This prefix's topics: as the watcher last saw them while it runs, else looked up now."""
        if self._watcher is None or self._watcher.done():
            await self.refresh()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return dict(self.topics)

    async def refresh(self) -> None:
        """Read the cluster's topics; tell every reader of those that appeared."""
        metadata = await self.connection.producer.client.fetch_all_metadata()
        seen = {t: len(metadata.partitions_for_topic(t) or ()) for t in metadata.topics() if t.startswith(self.root)}
        self._found({t: n for t, n in seen.items() if n > self.topics.get(t, 0)})

    def _found(self, topics: Mapping[str, int]) -> list[tuple[Reader, list[TopicPartition]]]:
        """Tell every reader of topics that appeared; what each began reading."""
        if not topics:
            return []
        self.topics.update(topics)
        return [(reader, reader.found(topics)) for reader in tuple(self.readers)]

    async def _watch(self) -> None:
        """Refresh every ``pubsub_refresh`` seconds while any reader is open."""
        failing = False
        while self.readers:
            await asyncio.sleep(self.connection.settings.pubsub_refresh)
            try:
                await self.refresh()
                failing = False
            except (kerr.KafkaError, OSError) as exc:
                if not failing:
                    log.warning("kafka pubsub: reading the cluster's topics failed: %s: %s", type(exc).__name__, exc)
                failing = True

    async def _ensure(self, topic: str) -> None:
        """Create the topic of a first publish, and tell this process's readers of it before
        the record goes out (so they read it from its first record)."""
        if topic in self.topics:
            return
        creating = self._creating.get(topic)
        if creating is None:
            creating = self._creating[topic] = asyncio.get_running_loop().create_task(self._create(topic))
            creating.add_done_callback(lambda _: self._creating.pop(topic, None))
        await asyncio.shield(creating)

    async def _create(self, topic: str) -> None:
        settings = self.connection.settings
        answer = await self.connection.admin.create_topics([NewTopic(topic, settings.partitions, settings.replication_factor)])
        for error in getattr(answer, "topic_errors", ()):
            if error[1] not in (0, kerr.TopicAlreadyExistsError.errno):
                raise kerr.for_code(error[1])(f"creating topic {topic}: {error[2] if len(error) > 2 else ''}")
        partitions = await self.connection.producer.partitions_for(topic)
        began = self._found({topic: len(partitions)})
        await asyncio.gather(*(reader.settle(tps) for reader, tps in began))

    # --- The contract ----------------------------------------------------------------------------

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        topic = self.topic(namespace, subject)
        unix_ns = time.time_ns()
        record_headers = [(TIME_HEADER, str(unix_ns).encode()), *((k, v.encode()) for k, v in headers.items())]
        with self.connection.errors():
            await self._ensure(topic)
            try:
                sent = await self.connection.producer.send_and_wait(
                    topic, data, timestamp_ms=unix_ns // 1_000_000, headers=record_headers
                )
            except kerr.MessageSizeTooLargeError as exc:
                limit = self.connection.settings.max_message_bytes
                raise PrismError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"data: above the Kafka backend's max_message_bytes ({limit} bytes with headers)",
                    field="data",
                    http_status=413,
                ) from exc
        return str(MessageId(unix_ns, sent.partition, sent.offset, topic_digest(topic)))

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,
    ) -> Subscription:
        self.topic(namespace, pattern)  # one that no topic name could hold is refused
        if isinstance(start, AfterMessage):
            try:
                MessageId.parse(start.message_id, "startAfter")
            except PrismError:
                if start.required:
                    raise
                start = None  # a cursor naming no message of this backend: live
        since_ns = time.time_ns()
        # A group member takes whatever its group hands it (the group's positions say what it
        # has not had yet): a window admitting everything.
        subscription = KafkaSubscription(self, namespace, pattern, overflow, Window(0 if queue_group else since_ns))
        reader: Reader
        if queue_group:
            reader = Group(self, subscription, queue_group, since_ns)
        elif start is not None:
            reader = Replay(self, subscription, start)
        else:
            if self.live is None or self.live.failed:
                if self.live is not None:
                    await self.live.close()  # its consumer too; its members were ended when it failed
                self.live = Live(self)
            reader = self.live
        subscription.reader = reader
        self.readers.add(reader)
        try:
            await reader.join(subscription)
        except BaseException:
            await subscription.close()
            raise
        self.subscriptions[subscription.id] = subscription
        return subscription

    def forget(self, reader: Reader) -> None:
        self.readers.discard(reader)
        if reader is self.live:
            self.live = None

    async def close(self) -> None:
        for subscription in list(self.subscriptions.values()):
            await subscription.close()
        idle = [self.live] if self.live is not None and self.live not in self.readers else []
        for reader in [*self.readers, *idle]:  # the live reader stays, idle, without members
            await reader.close()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
