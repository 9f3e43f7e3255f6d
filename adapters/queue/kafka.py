"""Kafka Queue: a Kafka topic per Prism topic, and the groups' per-message state (leases,
acknowledgements, attempts, key order, idempotency tokens) in a ledger: a one-partition Kafka
topic of commands that every adapter replays into the same state.

    topic ──► Kafka topic  <prefix>.n<namespace>.<topic>  (or a digest when the name is too long)
              partitions and offsets are Kafka's; the partition key is the record key (Kafka's
              partitioner: one key, one partition); message id ``<partition>-<offset>``;
              headers as record headers, plus ``_prism-ns`` (the publish time in nanoseconds;
              the record's timestamp holds it in milliseconds, for offsets_for_times)
    ledger ─► Kafka topic  <prefix>-queue-ledger, one partition, JSON commands:
              topic · join · take · ack · nack · leave · commit · seek · claim · stored · release
              and <prefix>-queue-snapshots: the state after every SNAPSHOT_EVERY commands

Why a ledger. Kafka gives a group one committed offset per partition; the contract wants a
lease per message with a deadline, a delivery count, acknowledgements out of order, a key held
back while an earlier message of it is leased, and all of it shared by every gateway process
(another process may acknowledge, commit or seek what this one delivered). Kafka has no
compare-and-set to build that from, but it has a totally ordered log: every change is appended
to the ledger as a command, and each adapter applies the commands in log order to the same
deterministic state machine (:class:`Ledger`), so every process computes the same outcome for
every command — whether a take won a lease, how many ids an acknowledgement counted. The
process that appended a command reads the ledger up to it at once (a broker may hold a waiting
fetch until ``fetch_wait`` runs out), applies it and answers with the outcome; what other
processes append reaches it through a reader that follows the ledger. Time inside the ledger is
the largest wall-clock time any command carried, so a lease deadline means the same to every
process.

How the contract maps onto the ledger, per group and partition:

- **position** and **cursor**: every offset below the position is done; offsets from the
  position up to the cursor have a mark (waiting, leased, acknowledged); offsets from the cursor
  on have never been handed out. Acknowledging the mark at the position moves it over the
  acknowledged marks at its head. Commit and seek set it (seek also forgets the marks).
- **take**: a consumer with room asks for the redeliverable marks it saw (waiting, or leased
  past its deadline, and first of their key) and for the records it read from the cursor on;
  the ledger leases what is still allowed (attempt + 1; past ``max_delivery_attempts`` the lease
  is for dead-lettering instead) and registers records whose key is held back as waiting.
- **order per key**: a mark is leased only when no earlier mark of its key is pending, across
  the group's consumers and redeliveries; keyless marks have no order.
- **consumers** hand out the leases the ledger gave them (what a cancelled ``take`` left
  leased is handed out by the next one). Leaving releases its leases at once; leases it never
  handed out do not count as deliveries.
- **idempotency tokens**: ``claim`` before the record is produced and ``stored`` after, per
  topic, for ``dedup_window``; a retry finds the stored offset. A claim whose producer vanished
  is taken over after ``TOKEN_CLAIM_MS``.
- **seek by time**: ``offsets_for_times`` on the millisecond, then forward over the records of
  that millisecond by their ``_prism-ns``.

Limits, said plainly:

- Every queue operation costs a ledger append and a read of it (a few milliseconds); all
  groups of all topics share the one ledger partition, which bounds throughput.
- Every ``SNAPSHOT_EVERY`` records, the process whose command ends the stretch writes the state
  to ``<prefix>-queue-snapshots`` (compacted); an adapter starts from the latest snapshot and
  replays only the ledger after it. The ledger must keep its records longer than one stretch
  takes to append (its retention is the cluster's default: Prism does not truncate it), and the
  state must fit in ``max_message_bytes`` (else no snapshot is written, and startup replays
  more). Every adapter keeps the state of every group in memory (bounded per group and
  partition by ``WINDOW`` marks, and per topic by ``TOKENS_MAX`` tokens).
- Kafka's committed offsets (group ``<prefix>.n<namespace>.<group>``) mirror the positions for
  Kafka's own tools, committed by the process that moved them a moment later (``MIRROR_DELAY``),
  from outside the group protocol; the ledger, not the mirror, is what Prism reads.
- A group waiting behind one key for longer than ``WINDOW`` messages of its partition stops
  taking new messages of that partition until the key moves on.
- Lease deadlines are wall-clock times: the gateway hosts' clocks must agree to well within
  the shortest ack deadline.
- A topic's partition count is the one the ledger recorded when the topic was first used:
  partitions added to the Kafka topic later are not read.
- Not ``durable`` here: that depends on the cluster (Apache Kafka keeps acknowledged records
  on disk; the Tansu broker the tests run keeps them in memory).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiokafka.errors as kerr
import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.client import CoordinationType
from aiokafka.protocol.commit import OffsetCommitRequest
from aiokafka.structs import ConsumerRecord

from adapters.capabilities import Capability
from adapters.queue.base import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTERED,
    AtOffset,
    AtTime,
    ConsumeOptions,
    Consumer,
    Delivery,
    Entry,
    PartitionInfo,
    Published,
    QueueAdapter,
    SeekTarget,
    Start,
    message_id,
    no_partition,
    offset_out_of_range,
    parse_message_id,
    token_reused,
    unknown_topic,
)
from prism.errors import PrismError

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.kafka import KafkaConnection

log = logging.getLogger(__name__)

NAME_LIMIT = 249  # Kafka's topic name length
NS_HEADER = "_prism-ns"  # publish time, unix nanoseconds (user header names start with a letter or digit)
WINDOW = 10_000  # marks a group keeps per partition between its position and its cursor
NEW_PER_TAKE = 256  # records past the cursor one take may register
SKIP_READING = 4096  # records a consumer reads on (and drops) to reach a cursor, rather than seek
TOKEN_CLAIM_MS = 30_000  # a token claimed this long ago and never stored may be claimed again
TOKENS_MAX = 100_000  # tokens remembered per topic, whatever the window
RECHECK = 1.0  # seconds: an idle consumer looks again this often whatever it was told
RETRY = 0.5  # seconds a consumer waits after a failed step
MIRROR_DELAY = 0.1  # seconds position changes gather before they are committed to Kafka
SNAPSHOT_EVERY = 10_000  # ledger records between two snapshots of the state
CATCH_UP_RECORDS = 500  # ledger records one catch-up read asks for, at least

WAITING, LEASED, ACKED = 0, 1, 2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(text: str, size: int = 40) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def key_token(key: bytes | None) -> str | None:
    """What the ledger knows of a partition key: a digest (None: no key, no order)."""
    return hashlib.blake2b(key, digest_size=8).hexdigest() if key else None


def _space(namespace: str) -> str:
    """A namespace in Kafka's name alphabet, without '.': as it is when it can be (marked 'n'),
    else a digest (marked 'h')."""
    return f"n{namespace}" if re.fullmatch(r"[A-Za-z0-9-]{1,64}", namespace) else f"h{_digest(namespace, 32)}"


def topic_name(prefix: str, namespace: str, topic: str) -> str:
    """The Kafka topic of a namespace's topic, injectively (the namespace part has no '.')."""
    name = f"{prefix}.{_space(namespace)}.{topic}"
    return name if len(name) <= NAME_LIMIT else f"{prefix}.x{_digest(namespace + chr(0) + topic, 64)}"


def group_id(prefix: str, namespace: str, group: str) -> str:
    """The Kafka consumer group whose committed offsets mirror a Prism group's positions."""
    return f"{prefix}.{_space(namespace)}.{group}"


# --- The ledger: deterministic state every adapter replays -----------------------------------


@dataclass(slots=True)
class Mark:
    """One message between a group's position and its cursor."""

    key: str | None
    state: int = WAITING
    attempts: int = 0  # deliveries to the group so far
    consumer: str = ""
    deadline: int = 0  # unix ms, while leased
    lease: int = -1  # the ledger offset of the take that leased it
    dead: bool = False  # leased for dead-lettering, not for delivery


@dataclass(slots=True)
class Part:
    """A group on one partition."""

    position: int
    cursor: int
    marks: dict[int, Mark] = field(default_factory=dict)
    keys: dict[str, list[int]] = field(default_factory=dict)  # key → pending offsets, ascending
    loose: set[int] = field(default_factory=set)  # pending offsets without a key

    def register(self, offset: int, key: str | None) -> None:
        self.marks[offset] = Mark(key)
        if key is None:
            self.loose.add(offset)
        else:
            bisect.insort(self.keys.setdefault(key, []), offset)

    def _unpend(self, offset: int, mark: Mark) -> None:
        if mark.key is None:
            self.loose.discard(offset)
            return
        pending = self.keys.get(mark.key, [])
        index = bisect.bisect_left(pending, offset)
        if index < len(pending) and pending[index] == offset:
            pending.pop(index)
        if not pending:
            self.keys.pop(mark.key, None)

    def first_of_key(self, offset: int, mark: Mark) -> bool:
        return mark.key is None or self.keys.get(mark.key, [offset])[0] == offset

    def done(self, offset: int) -> None:
        mark = self.marks[offset]
        self._unpend(offset, mark)
        mark.state = ACKED
        while self.position < self.cursor and (head := self.marks.get(self.position)) is not None and head.state == ACKED:
            del self.marks[self.position]
            self.position += 1

    def reset(self, offset: int) -> None:
        self.position = self.cursor = offset
        self.marks.clear()
        self.keys.clear()
        self.loose.clear()

    def commit(self, offset: int) -> None:
        if offset >= self.cursor:
            self.reset(offset)
            return
        for below in [o for o in self.marks if o < offset]:
            self._unpend(below, self.marks.pop(below))
        if offset < self.position:
            self.cursor = offset  # re-registered from there; marks above are kept
        self.position = offset
        while self.position < self.cursor and (head := self.marks.get(self.position)) is not None and head.state == ACKED:
            del self.marks[self.position]
            self.position += 1


def available(mark: Mark, now: int) -> bool:
    return mark.state == WAITING or (mark.state == LEASED and mark.deadline <= now)


@dataclass(slots=True)
class Token:
    fingerprint: str
    at: int  # ledger time of the claim
    by: str  # the claiming command's id
    partition: int = -1  # -1 while claimed and not yet stored
    offset: int = -1


@dataclass(slots=True)
class TopicState:
    partitions: int
    groups: dict[str, dict[int, Part]] = field(default_factory=dict)
    tokens: OrderedDict[str, Token] = field(default_factory=OrderedDict)


class Ledger:
    """The state machine the ledger's commands drive. ``apply`` depends only on the commands
    and their order, so every adapter that replays the ledger holds the same state."""

    def __init__(self) -> None:
        self.topics: dict[str, TopicState] = {}
        self.clock = 0  # unix ms: the largest time a command carried

    def apply(self, command: dict[str, Any], offset: int) -> Any:
        self.clock = max(self.clock, int(command.get("now", 0)))
        handler = getattr(self, f"_op_{command.get('op')}", None)
        return None if handler is None else handler(command, offset)

    def group(self, topic: str, group: str) -> dict[int, Part] | None:
        state = self.topics.get(topic)
        return None if state is None else state.groups.get(group)

    # Topics and groups.

    def _op_topic(self, c: dict[str, Any], offset: int) -> int:
        return self.topics.setdefault(c["t"], TopicState(int(c["n"]))).partitions

    def _op_join(self, c: dict[str, Any], offset: int) -> bool:
        state = self.topics.get(c["t"])
        if state is None:
            return False
        parts = state.groups.setdefault(c["g"], {})
        for partition, low, high in c["b"]:
            if partition not in parts:
                start = low if c["s"] == "earliest" else high
                parts[partition] = Part(start, start)
        return True

    def _part(self, c: dict[str, Any]) -> Part | None:
        state = self.topics.get(c["t"])
        if state is None:
            return None
        parts = state.groups.setdefault(c["g"], {})
        partition = int(c["p"])
        if partition not in parts:
            parts[partition] = Part(int(c["o"]), int(c["o"]))
        return parts[partition]

    def _op_commit(self, c: dict[str, Any], offset: int) -> bool:
        part = self._part(c)
        if part is not None:
            part.commit(int(c["o"]))
        return part is not None

    def _op_seek(self, c: dict[str, Any], offset: int) -> bool:
        part = self._part(c)
        if part is not None:
            part.reset(int(c["o"]))
        return part is not None

    # Deliveries.

    def _op_take(self, c: dict[str, Any], offset: int) -> dict[str, Any]:
        parts = self.group(c["t"], c["g"])
        granted: list[list[Any]] = []
        moved = False
        if parts is None:
            return {"granted": granted, "moved": moved}
        now, room, limit, consumer = self.clock, int(c["r"]), int(c["m"]), c["c"]
        deadline = now + int(c["ack"])

        def grant(partition: int, at: int, mark: Mark) -> None:
            mark.dead = bool(limit) and mark.attempts >= limit
            if not mark.dead:
                mark.attempts += 1
            mark.state, mark.consumer, mark.deadline, mark.lease = LEASED, consumer, deadline, offset
            granted.append([partition, at, mark.attempts, mark.dead])

        for partition, at in c["re"]:
            if len(granted) >= room:
                break
            part = parts.get(partition)
            mark = part.marks.get(at) if part is not None else None
            if part is not None and mark is not None and available(mark, now) and part.first_of_key(at, mark):
                grant(partition, at, mark)
        for partition, start, records in c["new"]:
            part = parts.get(partition)
            if part is None or start > part.cursor:
                continue  # a seek or commit moved the cursor back since this consumer looked
            # Another take may have moved it on since: the records from ``start`` are all the
            # partition holds there, so the ones from the cursor on still count.
            for at, key in records:
                if at < part.cursor:
                    continue
                if part.cursor - part.position >= WINDOW:
                    break
                if at not in part.marks:
                    free = key is None or key not in part.keys
                    if free and len(granted) >= room:
                        break  # left for a consumer with room
                    part.register(at, key)
                part.cursor = at + 1  # offsets skipped on the way do not exist (Kafka may leave gaps)
                moved = True
                mark = part.marks[at]
                if len(granted) < room and available(mark, now) and part.first_of_key(at, mark):
                    grant(partition, at, mark)
        return {"granted": granted, "moved": moved}

    def _settle(self, c: dict[str, Any], acknowledge: bool) -> int:
        parts = self.group(c["t"], c["g"])
        count = 0
        for partition, at in c["ids"] if parts is not None else []:
            part = parts.get(partition)  # type: ignore[union-attr]
            mark = part.marks.get(at) if part is not None else None
            if part is None or mark is None:
                continue
            if acknowledge and (mark.state == LEASED or (mark.state == WAITING and mark.attempts > 0)):
                part.done(at)
                count += 1
            elif not acknowledge and mark.state == LEASED and not mark.dead:
                mark.state = WAITING
                count += 1
        return count

    def _op_ack(self, c: dict[str, Any], offset: int) -> int:
        return self._settle(c, acknowledge=True)

    def _op_nack(self, c: dict[str, Any], offset: int) -> int:
        return self._settle(c, acknowledge=False)

    def _op_leave(self, c: dict[str, Any], offset: int) -> int:
        parts = self.group(c["t"], c["g"])
        if parts is None:
            return 0
        unseen = {(p, o, lease) for p, o, lease in c["unseen"]}
        released = 0
        for partition, part in parts.items():
            for at, mark in part.marks.items():
                if mark.state == LEASED and mark.consumer == c["c"]:
                    mark.state = WAITING
                    if (partition, at, mark.lease) in unseen and not mark.dead:
                        mark.attempts -= 1  # never handed out: not a delivery
                    released += 1
        return released

    # Idempotency tokens.

    def _op_claim(self, c: dict[str, Any], offset: int) -> dict[str, Any]:
        state = self.topics.get(c["t"])
        if state is None:
            return {"s": "unknown"}
        tokens, oldest = state.tokens, self.clock - int(c["w"])
        while tokens and (next(iter(tokens.values())).at < oldest or len(tokens) > TOKENS_MAX):
            tokens.popitem(last=False)
        token = tokens.get(c["k"])
        if token is not None and token.fingerprint != c["fp"]:
            return {"s": "reused"}
        if token is not None and token.partition >= 0:
            return {"s": "stored", "p": token.partition, "o": token.offset}
        if token is not None and self.clock - token.at < TOKEN_CLAIM_MS:
            return {"s": "busy"}
        tokens.pop(c["k"], None)
        tokens[c["k"]] = Token(c["fp"], self.clock, c["id"])
        return {"s": "mine"}

    def _op_stored(self, c: dict[str, Any], offset: int) -> bool:
        state = self.topics.get(c["t"])
        token = state.tokens.get(c["k"]) if state is not None else None
        if token is None or token.by != c["by"]:
            return False
        token.partition, token.offset = int(c["p"]), int(c["o"])
        return True

    def _op_release(self, c: dict[str, Any], offset: int) -> bool:
        state = self.topics.get(c["t"])
        token = state.tokens.get(c["k"]) if state is not None else None
        if token is not None and token.by == c["by"] and token.partition < 0:
            del state.tokens[c["k"]]  # type: ignore[union-attr]
            return True
        return False

    # Snapshots: the whole state as JSON-ready data, and back.

    def dump(self) -> dict[str, Any]:
        """Everything ``apply`` depends on (key lists follow from the marks)."""
        return {
            "clock": self.clock,
            "topics": {
                name: {
                    "n": state.partitions,
                    "groups": {
                        group: [
                            [
                                p,
                                part.position,
                                part.cursor,
                                [[o, m.key, m.state, m.attempts, m.consumer, m.deadline, m.lease, m.dead] for o, m in part.marks.items()],
                            ]
                            for p, part in parts.items()
                        ]
                        for group, parts in state.groups.items()
                    },
                    "tokens": [[k, t.fingerprint, t.at, t.by, t.partition, t.offset] for k, t in state.tokens.items()],
                }
                for name, state in self.topics.items()
            },
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Ledger:
        ledger = cls()
        ledger.clock = int(data["clock"])
        for name, topic in data["topics"].items():
            state = ledger.topics[name] = TopicState(int(topic["n"]))
            for group, parts in topic["groups"].items():
                state.groups[group] = {}
                for p, position, cursor, marks in parts:
                    part = state.groups[group][p] = Part(position, cursor)
                    for o, key, mark_state, attempts, consumer, deadline, lease, dead in marks:
                        part.register(o, key)
                        part.marks[o] = Mark(key, mark_state, attempts, consumer, deadline, lease, dead)
                        if mark_state == ACKED:
                            part._unpend(o, part.marks[o])
            for k, fingerprint, at, by, partition, offset in topic["tokens"]:
                state.tokens[k] = Token(fingerprint, at, by, partition, offset)
        return ledger

    # Reads (no command: what this process knows so far).

    def leases_of(self, topic: str, group: str, consumer: str, now: int) -> dict[tuple[int, int], Mark]:
        """The live leases of ``consumer``."""
        found: dict[tuple[int, int], Mark] = {}
        for partition, part in (self.group(topic, group) or {}).items():
            for at, mark in part.marks.items():
                if mark.state == LEASED and mark.consumer == consumer and mark.deadline > now:
                    found[(partition, at)] = mark
        return found

    def redeliverable(self, topic: str, group: str, now: int, limit: int) -> list[list[int]]:
        found: list[list[int]] = []
        for partition, part in sorted((self.group(topic, group) or {}).items()):
            offsets = [pending[0] for pending in part.keys.values()] + sorted(part.loose)
            found += [[partition, at] for at in sorted(offsets) if available(part.marks[at], now)]
        found.sort(key=lambda pair: pair[1])
        return found[:limit]

    def next_deadline(self, topic: str, group: str, now: int) -> int | None:
        """When the group's next live lease runs out (one that ran out already is a candidate
        of the next take, not a reason to wake)."""
        deadlines = [
            mark.deadline
            for part in (self.group(topic, group) or {}).values()
            for mark in part.marks.values()
            if mark.state == LEASED and mark.deadline > now
        ]
        return min(deadlines, default=None)


async def stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a Kafka client while closing: nothing to report to anyone. aiokafka may raise the
    CancelledError of its own cancelled task from ``stop()``: swallowed, unless this task is
    the one being cancelled."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:
        log.debug("kafka queue: stopping a client: %s: %s", type(exc).__name__, exc)


# --- Headers ------------------------------------------------------------------------------------


def encode_headers(entry: Entry, published_ns: int) -> list[tuple[str, bytes]]:
    headers = [(name, value.encode()) for name, value in entry.headers.items()]
    headers.append((NS_HEADER, str(published_ns).encode()))
    return headers


def decode_headers(record: ConsumerRecord) -> tuple[dict[str, str], int]:
    """The user's headers of a record and its publish time (unix ns)."""
    headers, published_ns = {}, int(record.timestamp) * 1_000_000
    for name, value in record.headers or ():
        if name == NS_HEADER:
            with contextlib.suppress(ValueError):
                published_ns = int(value)
        elif not name.startswith("_"):
            headers[name] = (value or b"").decode(errors="replace")
    return headers, published_ns


# --- The adapter ----------------------------------------------------------------------------------


class KafkaQueue(QueueAdapter):
    """Queue on a Kafka cluster: records in Kafka topics, group state in the ledger (above).
    Not ``durable`` as declared here: that is the cluster's property, and the broker the tests
    run keeps nothing on disk."""

    capabilities = frozenset(
        {Capability.SHARED, Capability.SEEK_TIMESTAMP, Capability.DEAD_LETTER, Capability.IDEMPOTENT_PUBLISH}
    )

    def __init__(self, connection: KafkaConnection, snapshot_every: int = SNAPSHOT_EVERY) -> None:
        self.connection = connection  # the backend's, shared with its other patterns
        settings = connection.settings
        self.prefix = settings.topic_prefix
        self.timeout = settings.command_timeout
        self.ledger_topic = f"{self.prefix}-queue-ledger"
        self.snapshot_topic = f"{self.prefix}-queue-snapshots"
        self.snapshot_every = snapshot_every
        self._snapshots: set[asyncio.Task[None]] = set()
        self.ledger = Ledger()
        self._me = uuid.uuid4().hex[:12]
        self._numbers = itertools.count()
        self._applied = -1  # the ledger offset applied last
        self._progress = asyncio.Event()  # set (and replaced) whenever the reader applied something
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._watchers: dict[tuple[str, str], set[KafkaConsumer]] = {}
        self._consumers: set[KafkaConsumer] = set()
        self._writer: AIOKafkaProducer | None = None  # the ledger's (records batched)
        self._reader: AIOKafkaConsumer | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._fetcher: AIOKafkaConsumer | None = None  # offsets and reads by offset
        self._fetch_lock = asyncio.Lock()
        self._fetching: set[TopicPartition] = set()
        self._catching_up = asyncio.Lock()
        self._moved: dict[tuple[str, str], str] = {}  # (Kafka topic, group) → its Kafka group id
        self._moved_wake = asyncio.Event()
        self._mirror_task: asyncio.Task[None] | None = None

    @property
    def fetcher(self) -> AIOKafkaConsumer:
        assert self._fetcher is not None, "KafkaQueue used before start()"
        return self._fetcher

    async def start(self) -> None:
        try:
            with self.connection.errors():
                await self._create_topic(self.ledger_topic, 1)
                await self._create_topic(self.snapshot_topic, 1, {"cleanup.policy": "compact"})
                self._writer = self.connection.writer()
                await self._writer.start()
                self._fetcher = self.connection.reader()
                await self._fetcher.start()
                self._reader = self.connection.reader()
                await self._reader.start()
                ledger = TopicPartition(self.ledger_topic, 0)
                self._reader.assign([ledger])
                await self._restore(ledger)
                self._reader_task = asyncio.create_task(self._read_ledger(ledger))
                await self._caught_up()
                self._mirror_task = asyncio.create_task(self._mirror())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(consumer.close() for consumer in list(self._consumers)), return_exceptions=True)
        if self._mirror_task is not None:
            self._mirror_task.cancel()
            await asyncio.gather(self._mirror_task, return_exceptions=True)
            self._mirror_task = None
            with contextlib.suppress(Exception):  # what moved last, once, briefly
                async with asyncio.timeout(self.timeout):
                    await self._mirror_now()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            self._reader_task = None
        for client in (self._reader, self._fetcher, self._writer):
            if client is not None:
                await stop_quietly(client)
        self._reader = self._fetcher = self._writer = None
        for future in self._waiting.values():
            future.cancel()
        for task in list(self._snapshots):
            task.cancel()
        await asyncio.gather(*self._snapshots, return_exceptions=True)

    # The ledger.

    async def _read_ledger(self, partition: TopicPartition) -> None:
        """Apply what any process appends to the ledger (within ``fetch_wait``)."""
        reader = self._reader
        assert reader is not None
        while True:
            try:
                batch = await reader.getmany(partition, timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: try again (commands time out meanwhile)
                log.warning("kafka queue: reading the ledger failed: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(RETRY)
                continue
            self._apply(batch.get(partition, []))

    async def _catch_up(self, offset: int) -> None:
        """Apply the ledger up to ``offset`` now: a broker may hold the reader's fetch for up to
        ``fetch_wait`` before it answers, which a command this process appended need not wait."""
        ledger = TopicPartition(self.ledger_topic, 0)
        async with self._catching_up:
            while self._applied < offset:
                # Past its own command too: commands appended together (the writer batches
                # them) are then applied by one read, not one read each in turn.
                records = await self.read(ledger, self._applied + 1, max(offset - self._applied, CATCH_UP_RECORDS))
                if not records:
                    return  # the reader applies it when it comes
                self._apply(records)

    def _apply(self, records: Sequence[ConsumerRecord]) -> None:
        """Apply ledger records in order, each once (the reader and ``_catch_up`` both call
        this, without awaiting in between)."""
        applied = self._applied
        for record in records:
            if record.offset <= self._applied:
                continue  # applied already, by the other path
            if record.offset > self._applied + 1:
                log.error(
                    "kafka queue: ledger records %d to %d are gone (retention shorter than snapshots need): "
                    "this process's state may differ from the others'",
                    self._applied + 1,
                    record.offset - 1,
                )
            command: dict[str, Any] = {}
            result: Any = None
            try:
                command = json.loads(record.value)
                result = self.ledger.apply(command, record.offset)
            except Exception:  # a bug: every process skips the same record
                log.exception("kafka queue: ledger record %d not applied", record.offset)
            self._applied = record.offset
            if (record.offset + 1) % self.snapshot_every == 0 and str(command.get("id")).startswith(f"{self._me}."):
                self._snapshot(record.offset)  # its writer: the process whose command it was
            future = self._waiting.pop(str(command.get("id")), None)
            if future is not None and not future.done():
                future.set_result(result)
            if "g" in command:
                for consumer in self._watchers.get((command.get("t", ""), command["g"]), ()):
                    consumer.wake()
        if self._applied != applied:
            self._progress.set()
            self._progress = asyncio.Event()

    def _start_over(self) -> None:
        """The ledger was made anew (a broker without storage restarted): forget the state
        and read it from its start."""
        log.error("kafka queue: the ledger starts over: the state of every group is forgotten")
        self.ledger, self._applied = Ledger(), -1
        if self._reader is not None:
            self._reader.seek(TopicPartition(self.ledger_topic, 0), 0)
        for consumer in self._consumers:
            consumer.wake()

    async def _restore(self, ledger: TopicPartition) -> None:
        """Start from the latest snapshot (then the ledger after it), else the ledger's start."""
        snapshots = TopicPartition(self.snapshot_topic, 0)
        latest = (await self.connection.high_offsets(self.fetcher, [snapshots]))[snapshots]
        found = await self.read(snapshots, latest - 1, 1) if latest > 0 else []
        if found:
            try:
                data = json.loads(found[-1].value)
                offset = int(data["offset"])
                there = await self.read(ledger, offset, 1) if offset < (await self.connection.high_offsets(self.fetcher, [ledger]))[ledger] else []
                if there and there[0].offset == offset:  # else the ledger was made anew since: not its state
                    self.ledger, self._applied = Ledger.load(data["ledger"]), offset
            except (ValueError, KeyError, TypeError):
                log.exception("kafka queue: snapshot unreadable: replaying the whole ledger")
                self.ledger, self._applied = Ledger(), -1
        assert self._reader is not None
        self._reader.seek(ledger, self._applied + 1)

    def _snapshot(self, offset: int) -> None:
        """Write the state after ``offset`` (taken now, sent in the background), so adapters
        starting later replay only what follows it."""
        body = json.dumps({"offset": offset, "ledger": self.ledger.dump()}, separators=(",", ":")).encode()
        if len(body) > self.connection.settings.max_message_bytes - 1024:
            log.warning("kafka queue: the state (%d bytes) is above max_message_bytes: no snapshot", len(body))
            return

        async def send() -> None:
            try:
                await self.connection.producer.send_and_wait(self.snapshot_topic, body, key=b"ledger", partition=0)
            except Exception as exc:  # the next one will do
                log.warning("kafka queue: writing a snapshot failed: %s: %s", type(exc).__name__, exc)

        task = asyncio.create_task(send())
        self._snapshots.add(task)
        task.add_done_callback(self._snapshots.discard)

    async def _caught_up(self) -> None:
        """Until this process applied everything appended to the ledger before the call, so
        reads after it see every change any process made before: a barrier command."""
        await self._command({"op": "sync"})

    async def _command(self, command: dict[str, Any]) -> Any:
        """Append ``command`` to the ledger and wait for its outcome."""
        command["id"] = f"{self._me}.{next(self._numbers)}"
        command["now"] = now_ms()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[command["id"]] = future
        try:
            with self.connection.errors():
                if self._writer is None:
                    raise PrismError(grpc.StatusCode.UNAVAILABLE, "kafka queue: closed")
                stored = await self._writer.send_and_wait(
                    self.ledger_topic, json.dumps(command, separators=(",", ":")).encode(), partition=0
                )
                if stored.offset <= self._applied and not future.done():
                    self._start_over()  # an offset this process applied before: a new ledger
                await self._catch_up(stored.offset)
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
                # arrives as the future completes, and a cancelled take must end.
                async with asyncio.timeout(max(self.timeout, 5.0)):
                    return await future
            except TimeoutError as exc:
                raise PrismError(grpc.StatusCode.UNAVAILABLE, "kafka queue: the ledger is not being read in time") from exc
        finally:
            self._waiting.pop(command["id"], None)

    def _watch(self, consumer: KafkaConsumer, on: bool) -> None:
        key = (consumer.kafka_topic, consumer.options.group)
        if on:
            self._watchers.setdefault(key, set()).add(consumer)
            self._consumers.add(consumer)
        else:
            self._watchers.get(key, set()).discard(consumer)
            if not self._watchers.get(key):
                self._watchers.pop(key, None)
            self._consumers.discard(consumer)

    # Kafka's committed offsets: a mirror of the positions, for Kafka's own tools.

    def moved(self, name: str, namespace: str, group: str) -> None:
        """The group's positions on the topic may have changed: commit them to Kafka soon."""
        self._moved[(name, group)] = group_id(self.prefix, namespace, group)
        self._moved_wake.set()

    async def _mirror(self) -> None:
        while True:
            await self._moved_wake.wait()
            await asyncio.sleep(MIRROR_DELAY)  # what moves meanwhile goes in the same commit
            self._moved_wake.clear()
            await self._mirror_now()

    async def _mirror_now(self) -> None:
        moved, self._moved = self._moved, {}
        client = self.connection.producer.client
        for (name, group), kafka_group in moved.items():
            positions = [(p, part.position, "") for p, part in sorted((self.ledger.group(name, group) or {}).items())]
            if not positions:
                continue
            try:
                node = await client.coordinator_lookup(CoordinationType.GROUP, kafka_group)
                # Generation -1, no member: a commit from outside the group protocol.
                answer = await client.send(node, OffsetCommitRequest(kafka_group, -1, "", -1, [(name, positions)]))
                failed = [code for _, partitions in answer.topics for _, code in partitions if code]
                if failed:
                    log.debug("kafka queue: committing %s for %s: error codes %s", name, kafka_group, failed)
            except Exception as exc:  # a mirror: the ledger keeps the positions
                log.debug("kafka queue: committing %s for %s failed: %s: %s", name, kafka_group, type(exc).__name__, exc)

    # Topics.

    def kafka_topic(self, namespace: str, topic: str) -> str:
        return topic_name(self.prefix, namespace, topic)

    async def _create_topic(self, name: str, partitions: int, config: dict[str, str] | None = None) -> None:
        settings = self.connection.settings
        made = NewTopic(name, partitions, settings.replication_factor, topic_configs=config or {})
        answer = await self.connection.admin.create_topics([made])
        for error in getattr(answer, "topic_errors", ()):
            code = error[1]
            if code not in (0, kerr.TopicAlreadyExistsError.errno):
                raise kerr.for_code(code)(f"creating topic {name}: {error[2] if len(error) > 2 else ''}")

    async def _ensure_topic(self, name: str) -> int:
        """The partition count of a topic, creating it (and telling the ledger) if needed."""
        state = self.ledger.topics.get(name)
        if state is not None:
            return state.partitions
        await self._create_topic(name, self.connection.settings.partitions)
        partitions = await self.connection.producer.partitions_for(name)
        return int(await self._command({"op": "topic", "t": name, "n": len(partitions)}))

    async def _partitions(self, name: str, topic: str) -> int:
        """The partition count of a topic that must exist: NOT_FOUND otherwise."""
        state = self.ledger.topics.get(name)
        if state is None:
            await self._caught_up()  # another process may have made it a moment ago
            state = self.ledger.topics.get(name)
            if state is None:
                raise unknown_topic(topic)
        return state.partitions

    async def bounds(self, name: str, partitions: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Low and high offsets of the partitions."""
        tps = [TopicPartition(name, p) for p in partitions]
        low = await self.fetcher.beginning_offsets(tps)
        high = await self.connection.high_offsets(self.fetcher, tps)
        return {tp.partition: (low[tp], high[tp]) for tp in tps}

    async def _partition_bounds(self, name: str, topic: str, partition: int) -> tuple[int, int]:
        partitions = await self._partitions(name, topic)
        if not 0 <= partition < partitions:
            raise no_partition(topic, partition, partitions)
        return (await self.bounds(name, [partition]))[partition]

    async def read(self, tp: TopicPartition, offset: int, count: int) -> list[ConsumerRecord]:
        """Up to ``count`` records from ``offset`` on (fewer at the end of the partition)."""
        async with self._fetch_lock:
            fetcher = self.fetcher
            if tp not in self._fetching:
                self._fetching.add(tp)
                fetcher.assign(list(self._fetching))
                fetcher.pause(*self._fetching)
            fetcher.resume(tp)
            try:
                fetcher.seek(tp, offset)
                # Returns once records are there: the whole timeout passes only past the end.
                batch = await fetcher.getmany(tp, timeout_ms=int(self.timeout * 1000), max_records=count)
            finally:
                fetcher.pause(tp)
                # Drops what the fetch brought beyond ``count``: records left unread hold back
                # every other partition's fetch from the broker for aiokafka's prefetch backoff
                # (100 ms), and the next read seeks anyway.
                fetcher.seek(tp, offset)
        return [r for r in batch.get(tp, []) if r.offset >= offset]

    # Publish.

    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        name = self.kafka_topic(namespace, topic)
        results: list[Published | PrismError | None] = []
        sent: list[tuple[int, asyncio.Future[Any]]] = []
        with self.connection.errors():
            await self._ensure_topic(name)
            for entry in entries:
                if entry.idempotency_token:
                    await self._settle_sends(sent, results)
                    results.append(await self._publish_once(name, entry))
                    continue
                try:
                    sent.append((len(results), await self._send(name, entry)))
                    results.append(None)
                except (kerr.MessageSizeTooLargeError, kerr.RecordTooLargeError):
                    results.append(self._too_large())
            await self._settle_sends(sent, results)
        return [r for r in results if r is not None]

    def _too_large(self) -> PrismError:
        return PrismError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"payload: above the Kafka backend's max_message_bytes ({self.connection.settings.max_message_bytes})",
            field="payload",
        )

    async def _send(self, name: str, entry: Entry) -> asyncio.Future[Any]:
        published_ns = time.time_ns()
        return await self.connection.producer.send(
            name,
            entry.payload,
            key=entry.partition_key.encode() if entry.partition_key else None,
            timestamp_ms=published_ns // 1_000_000,
            headers=encode_headers(entry, published_ns),
        )

    async def _settle_sends(self, sent: list[tuple[int, asyncio.Future[Any]]], results: list[Any]) -> None:
        for index, future in sent:
            try:
                metadata = await future
            except (kerr.MessageSizeTooLargeError, kerr.RecordTooLargeError):
                results[index] = self._too_large()
                continue
            results[index] = Published(message_id(metadata.partition, metadata.offset), metadata.partition, metadata.offset)
        sent.clear()

    async def _publish_once(self, name: str, entry: Entry) -> Published | PrismError:
        """Publish with an idempotency token: claim it in the ledger, produce, record where."""
        token, fingerprint = _digest(entry.idempotency_token, 64), entry.fingerprint().hex()
        window = int(self.connection.settings.dedup_window * 1000)
        deadline = time.monotonic() + TOKEN_CLAIM_MS / 1000 + self.timeout
        while True:
            claim = {"op": "claim", "t": name, "k": token, "fp": fingerprint, "w": window}
            answer = await self._command(claim)
            if answer["s"] == "reused":
                return token_reused()
            if answer["s"] == "stored":
                return Published(message_id(answer["p"], answer["o"]), answer["p"], answer["o"])
            if answer["s"] == "mine":
                break
            if answer["s"] == "unknown":  # the ledger was made anew under this publish
                raise PrismError(grpc.StatusCode.UNAVAILABLE, "kafka queue: the topic is not in the ledger any more")
            if time.monotonic() > deadline:
                raise PrismError(grpc.StatusCode.UNAVAILABLE, "kafka queue: an earlier publish with this token is still going on")
            await asyncio.sleep(0.05)  # another publish with the token is under way
        try:
            metadata = await (await self._send(name, entry))
        except BaseException as exc:
            with contextlib.suppress(Exception):  # else the claim lapses after TOKEN_CLAIM_MS
                await self._command({"op": "release", "t": name, "k": token, "by": claim["id"]})
            if isinstance(exc, kerr.MessageSizeTooLargeError | kerr.RecordTooLargeError):
                return self._too_large()
            raise
        stored = {"op": "stored", "t": name, "k": token, "by": claim["id"], "p": metadata.partition, "o": metadata.offset}
        await self._command(stored)
        return Published(message_id(metadata.partition, metadata.offset), metadata.partition, metadata.offset)

    # Groups.

    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        name = self.kafka_topic(namespace, topic)
        with self.connection.errors():
            partitions = await self._ensure_topic(name)
            bounds = await self.bounds(name, range(partitions))
            start = "earliest" if options.start is Start.EARLIEST else "latest"
            joined = [[p, low, high] for p, (low, high) in sorted(bounds.items())]
            await self._command({"op": "join", "t": name, "g": options.group, "b": joined, "s": start})
            self.moved(name, namespace, options.group)
            consumer = KafkaConsumer(self, namespace, topic, name, partitions, options)
            await consumer.start()
        return consumer

    def _ids(self, message_ids: Sequence[str]) -> list[list[int]]:
        return sorted({parsed for i in message_ids if (parsed := parse_message_id(i)) is not None})  # type: ignore[misc]

    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        ids = [list(pair) for pair in self._ids(message_ids)]
        if not ids:
            return 0
        name = self.kafka_topic(namespace, topic)
        count = int(await self._command({"op": "ack", "t": name, "g": group, "ids": ids}) or 0)
        if count:
            self.moved(name, namespace, group)
        return count

    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        ids = [list(pair) for pair in self._ids(message_ids)]
        if not ids:
            return 0
        return int(await self._command({"op": "nack", "t": self.kafka_topic(namespace, topic), "g": group, "ids": ids}) or 0)

    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        name = self.kafka_topic(namespace, topic)
        with self.connection.errors():
            low, high = await self._partition_bounds(name, topic, partition)
            if not low <= offset <= high:
                raise offset_out_of_range(partition, offset, low, high)
            await self._command({"op": "commit", "t": name, "g": group, "p": partition, "o": offset})
            self.moved(name, namespace, group)

    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        name = self.kafka_topic(namespace, topic)
        with self.connection.errors():
            low, high = await self._partition_bounds(name, topic, partition)
            if isinstance(target, AtOffset):
                if not low <= target.offset <= high:
                    raise offset_out_of_range(partition, target.offset, low, high)
                offset = target.offset
            elif isinstance(target, AtTime):
                offset = await self._offset_at(TopicPartition(name, partition), target.unix_ns, low, high)
            elif target is Start.EARLIEST:
                offset = low
            elif target is Start.LATEST:
                offset = high
            else:
                await self._caught_up()
                part = (self.ledger.group(name, group) or {}).get(partition)
                offset = high if part is None else min(max(part.position, low), high)
            await self._command({"op": "seek", "t": name, "g": group, "p": partition, "o": offset})
            self.moved(name, namespace, group)
        return offset

    async def _offset_at(self, tp: TopicPartition, unix_ns: int, low: int, high: int) -> int:
        """The offset of the first record published at or after ``unix_ns``: Kafka finds the
        millisecond, the records' ``_prism-ns`` the nanosecond within it."""
        if unix_ns <= 0 or low >= high:
            return low
        found = (await self.fetcher.offsets_for_times({tp: unix_ns // 1_000_000})).get(tp)
        if found is None or found.offset < 0 or found.timestamp < 0:  # Tansu answers offset 0, time -1
            return high
        at = max(found.offset, low)
        while at < high:
            records = await self.read(tp, at, 16)
            if not records:
                return high
            for record in records:
                if decode_headers(record)[1] >= unix_ns:
                    return record.offset
            at = records[-1].offset + 1
        return high

    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        name = self.kafka_topic(namespace, topic)
        with self.connection.errors():
            partitions = await self._partitions(name, topic)
            if group:
                await self._caught_up()
            bounds = await self.bounds(name, range(partitions))
        parts = (self.ledger.group(name, group) or {}) if group else {}
        info = []
        for partition in range(partitions):
            low, high = bounds[partition]
            part = parts.get(partition)
            if part is None:  # no group asked: no lag; a group without a position: all retained
                info.append(PartitionInfo(partition, low, high, -1, high - low if group else 0))
            else:
                info.append(PartitionInfo(partition, low, high, part.position, max(high - part.position, 0)))
        return info


# --- Consumers ------------------------------------------------------------------------------------


class KafkaConsumer(Consumer):
    """A member of a group: takes leases through the ledger and reads their records with a
    Kafka consumer of its own (no Kafka group: the ledger says what to read)."""

    def __init__(
        self, queue: KafkaQueue, namespace: str, topic: str, kafka_topic: str, partitions: int, options: ConsumeOptions
    ) -> None:
        self.id = uuid.uuid4().hex
        self.queue = queue
        self.namespace = namespace
        self.topic = topic
        self.kafka_topic = kafka_topic
        self.options = options
        self.tps = [TopicPartition(kafka_topic, p) for p in range(partitions)]
        self._kc = queue.connection.reader()
        self._ahead: dict[int, deque[ConsumerRecord]] = {p: deque() for p in range(partitions)}  # from the cursor on
        self._next: dict[int, int | None] = dict.fromkeys(range(partitions))  # where _kc reads next
        self._records: dict[tuple[int, int], ConsumerRecord] = {}  # of this consumer's leases
        self._handed: set[tuple[int, int, int]] = set()  # (partition, offset, lease) handed out
        # Live leases when take last looked: only this consumer's take (under _lock) adds any,
        # so until the next look it is at least what is held, and room from it never too much.
        self._held = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    async def start(self) -> None:
        try:
            await self._kc.start()
            self._kc.assign(self.tps)
        except BaseException:
            await stop_quietly(self._kc)
            raise
        self.queue._watch(self, True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def _group(self) -> str:
        return self.options.group

    async def take(self, limit: int) -> list[Delivery]:
        async with self._lock:
            while True:
                if self._closed:
                    return []
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A cancellation some await swallowed (Python 3.11's wait_for can, aiokafka
                    # uses it): end here rather than wait on for ever in a cancelled task.
                    raise asyncio.CancelledError
                self._wake.clear()  # a change from here on ends the wait below
                try:
                    with self.queue.connection.errors():
                        taken = await self._handed_out(limit)
                        if taken:
                            return taken
                        if await self._take():
                            continue
                        await self._wait()
                except PrismError as exc:  # the broker is away: wait, as long as it takes
                    log.warning("kafka queue consumer %s: %s", self.id[:8], exc.message)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY):
                            await self._wake.wait()

    def _mine(self) -> dict[tuple[int, int], Mark]:
        leases = self.queue.ledger.leases_of(self.kafka_topic, self._group, self.id, now_ms())
        live = {(p, o, mark.lease) for (p, o), mark in leases.items()}
        self._handed &= live
        for key in [k for k in self._records if k not in leases]:
            del self._records[key]
        return leases

    async def _handed_out(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` leases the ledger gave this consumer that it has not handed out yet.
        Nothing is awaited once one is handed out (a cancelled caller would strand it): a
        lease that needs a write first ends the list, and the next call writes it."""
        leases = self._mine()
        self._held = len(leases)
        fresh = sorted((p, o) for (p, o), mark in leases.items() if (p, o, mark.lease) not in self._handed)
        taken: list[Delivery] = []
        if not fresh:
            return taken
        gone = await self._load(fresh)
        for p, o in fresh:
            if len(taken) >= limit:
                break
            mark = leases[(p, o)]
            record = self._records.get((p, o))
            if (p, o) in gone or (record is not None and mark.dead):
                if taken:
                    break
                if (p, o) in gone:  # no longer in Kafka (retention): nothing to deliver
                    await self._done(p, o)
                else:
                    await self._dead_letter(record, mark.attempts)  # type: ignore[arg-type]
                continue
            if record is None:  # not read this time: tried again on the next round
                continue
            self._handed.add((p, o, mark.lease))
            headers, published_ns = decode_headers(record)
            taken.append(Delivery(
                message_id=message_id(p, o),
                topic=self.topic,
                partition=p,
                offset=o,
                payload=record.value or b"",
                partition_key=record.key.decode(errors="replace") if record.key else "",
                headers=headers,
                delivery_attempt=mark.attempts,
                published_ns=published_ns,
            ))
        return taken

    async def _load(self, wanted: list[tuple[int, int]]) -> set[tuple[int, int]]:
        """Have the records of ``wanted`` leases (from what was read ahead, else read again);
        those Kafka no longer has."""
        missing: dict[int, list[int]] = {}
        gone: set[tuple[int, int]] = set()
        indexed: dict[int, dict[int, ConsumerRecord]] = {}  # partition → what was read ahead, by offset
        for p, o in wanted:
            if (p, o) in self._records:
                continue
            ahead = indexed.get(p)
            if ahead is None:
                ahead = indexed[p] = {r.offset: r for r in self._ahead[p]}
            if o in ahead:
                self._records[(p, o)] = ahead[o]
            else:
                missing.setdefault(p, []).append(o)
        for p, offsets in missing.items():
            at, last = min(offsets), max(offsets)
            while at <= last:
                records = await self.queue.read(self.tps[p], at, last - at + 1)
                if not records:
                    break
                for record in records:
                    if record.offset in offsets:
                        self._records[(p, record.offset)] = record
                # Reading from ``at`` began past these: the log no longer starts before them.
                gone |= {(p, o) for o in offsets if at <= o < records[0].offset}
                at = records[-1].offset + 1
        return gone

    async def _dead_letter(self, record: ConsumerRecord, attempts: int) -> None:
        options = self.options
        p, o = record.partition, record.offset
        headers, _ = decode_headers(record)
        headers.update(
            zip(
                DEAD_LETTER_HEADERS,
                [
                    f"delivered {attempts} times without acknowledgement (max_delivery_attempts {options.max_delivery_attempts})",
                    self.topic,
                    options.group,
                    message_id(p, o),
                    str(p),
                    str(o),
                    str(attempts),
                ],
                strict=True,
            )
        )
        key = record.key.decode(errors="replace") if record.key else ""
        (result,) = await self.queue.publish(self.namespace, options.dead_letter_topic, [Entry(record.value or b"", key, headers)])
        if isinstance(result, PrismError):  # stays leased: tried again when the lease runs out
            log.warning("kafka queue: dead-lettering %s failed: %s", message_id(p, o), result.message)
            return
        await self._done(p, o)
        DEAD_LETTERED.labels(self.namespace).inc()

    async def _done(self, p: int, o: int) -> None:
        """Acknowledge a lease this consumer settled itself (dead-lettered, or gone)."""
        await self.queue._command({"op": "ack", "t": self.kafka_topic, "g": self._group, "ids": [[p, o]]})
        self.queue.moved(self.kafka_topic, self.namespace, self._group)

    def _sync(self, p: int, cursor: int) -> None:
        """Read partition ``p`` from the group's cursor on. A cursor that other consumers move
        on a little is caught up with by reading on (a seek would drop the fetch under way, and
        a consumer seeking at every move of a busy group would never read anything); one that
        moved back, or far, is sought."""
        ahead, reading = self._ahead[p], self._next[p]
        behind = (ahead and cursor < ahead[0].offset) or (not ahead and reading is not None and cursor < reading)
        if reading is None or behind or cursor > reading + SKIP_READING:
            ahead.clear()
            self._kc.seek(self.tps[p], cursor)
            self._next[p] = cursor
            return
        while ahead and ahead[0].offset < cursor:
            ahead.popleft()

    def _absorb(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for tp, records in batch.items():
            p = tp.partition
            for record in records:
                reading = self._next[p]
                if reading is None or record.offset < reading:
                    continue  # from before a seek
                self._ahead[p].append(record)
                self._next[p] = record.offset + 1

    def _parts(self) -> dict[int, Part]:
        return self.queue.ledger.group(self.kafka_topic, self._group) or {}

    async def _take(self) -> bool:
        """Ask the ledger for leases; whether anything changed."""
        now = now_ms()
        room = self.options.max_in_flight - self._held
        if room <= 0:
            return False
        redeliver = self.queue.ledger.redeliverable(self.kafka_topic, self._group, now, room)
        parts = self._parts()
        for p, part in parts.items():
            if p < len(self.tps):
                self._sync(p, part.cursor)
        if sum(map(len, self._ahead.values())) < NEW_PER_TAKE:
            self._absorb(await self._kc.getmany(*self.tps, timeout_ms=0, max_records=NEW_PER_TAKE))
        new = []
        for p, part in sorted(parts.items()):
            ahead = self._ahead.get(p)
            if ahead and ahead[0].offset >= part.cursor and part.cursor - part.position < WINDOW:
                records = list(itertools.islice(ahead, NEW_PER_TAKE))
                new.append([p, part.cursor, [[r.offset, key_token(r.key)] for r in records]])
        if not redeliver and not new:
            return False
        command = {
            "op": "take",
            "t": self.kafka_topic,
            "g": self._group,
            "c": self.id,
            "ack": int(self.options.ack_deadline * 1000),
            "r": room,
            "m": self.options.max_delivery_attempts,
            "re": redeliver,
            "new": new,
        }
        outcome = await self.queue._command(command)
        for p, o, _, _ in outcome["granted"]:
            for record in self._ahead.get(p, ()):
                if record.offset == o:
                    self._records[(p, o)] = record
                    break
        return bool(outcome["granted"] or outcome["moved"])

    async def _wait(self) -> None:
        """Until the group changes, records arrive (when there is room), a lease runs out, or
        RECHECK passed."""
        timeout = RECHECK
        now = now_ms()
        deadline = self.queue.ledger.next_deadline(self.kafka_topic, self._group, now)
        if deadline is not None:
            timeout = min(timeout, (deadline - now) / 1000 + 0.002)
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        reading = self.options.max_in_flight > self._held and sum(map(len, self._ahead.values())) < NEW_PER_TAKE
        if reading:
            waits.append(asyncio.ensure_future(self._kc.getmany(*self.tps, timeout_ms=int(timeout * 1000), max_records=NEW_PER_TAKE)))
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if reading and waits[1] in done and not waits[1].cancelled() and waits[1].exception() is None:
            self._absorb(waits[1].result())

    async def close(self) -> None:
        # Shielded: a cancelled caller must not leave the leases neither released nor delivered.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        self._wake.set()
        try:
            async with self._lock:  # a running take ends first
                leases = self._mine()
                unseen = [[p, o, mark.lease] for (p, o), mark in leases.items() if (p, o, mark.lease) not in self._handed]
                try:
                    await self.queue._command(
                        {"op": "leave", "t": self.kafka_topic, "g": self._group, "c": self.id, "unseen": unseen}
                    )
                except Exception as exc:  # its leases run out at their deadlines instead
                    log.warning("kafka queue consumer %s: leaving: %s: %s", self.id[:8], type(exc).__name__, exc)
        finally:
            self.queue._watch(self, False)
            self._ahead.clear()
            self._records.clear()
            await stop_quietly(self._kc)
