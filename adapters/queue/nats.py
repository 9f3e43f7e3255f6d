"""NATS JetStream Queue: a stream per topic, a durable pull consumer per consumer group, and a
record per (group, key) in a JetStream key-value bucket that keeps each key's messages in order.

    topic ──► stream  <prefix>_<namespace>_s<topic>   (file storage, direct get, duplicate window)
              subjects prismq.<stream>.k.<hash of the key> (a key's messages) | prismq.<stream>.n
              one partition: offset = stream sequence − 1, since JetStream numbers a stream, not
              a subject; parallelism comes from keys (rule 4), not from partitions
    group ──► durable pull consumer g<group>_n<generation>: explicit acks, ack_wait = the
              deadline of the member that created it, no max_deliver (dead letters are ours)
              lease = a pending delivery; attempt = num_delivered (less deliveries a consumer
              gave back unseen); position = the ack floor; a Commit or Seek makes the next
              generation at the new position and deletes the old one
    order ──► bucket <prefix>-heads: per (group, key) "H s" (message s is the key's head, leased
              or waiting for redelivery) or "D s" (done up to s): a delivered message of a key is
              handed out only when it is the key's head, else the consumer holds it (sending
              in-progress acks) until an acknowledgement makes it the head
    counts ─► bucket <prefix>-acks (10 minutes): keyless messages acknowledged above the
              ack floor, so a repeated Acknowledge counts 0; deliveries given back unseen
    wake-up ► core subject prismq-ev.<stream>: acknowledgements, negative acknowledgements and new
              generations, so the group's consumers in every process react at once

A message id is ``0-<offset>``: any process acknowledges it by stream sequence, on the group's
consumer (an ack subject ``$JS.ACK.<stream>.<consumer>.…`` names the sequence, so any connection
may send it). Records carry the generation they belong to, so what a Seek left behind is ignored.

A consumer pulls (pull requests of PULL_EXPIRES) only while ``take`` is called and it has
room: when its buffer is empty, and ahead, for a quarter of ``max_in_flight`` or more, once the
buffer is down to half of it; besides its leases it holds at most ``max_in_flight`` messages
waiting for their key's head (beyond that, and when its key stays blocked, it gives them back
for a while). A batch is published with every message sent before any PubAck is awaited, and
an Acknowledge sends every +ACK, then every record, before awaiting their answers. Dead letters are
the adapter's: a delivery past ``max_delivery_attempts`` is copied to the dead-letter topic (with
a ``Nats-Msg-Id``, so a retried copy is stored once), then acknowledged.

What JetStream does not give, and how it shows here:

- A Commit or Seek is a new consumer: leases at or above the new position end (those messages
  are delivered again), and the first delivery of the new generation is attempt 1. A forward
  Commit keeps acknowledgements above the new position (the records); a backward one replays
  everything from the offset, as a Seek does.
- An idempotency token is remembered for the stream's duplicate window (``dedup_window``).
- Acknowledgement counts of keyless messages acknowledged above the floor are exact for 10
  minutes; JetStream itself never redelivers them.
- A pull request cannot be withdrawn, and a 2.9 server miscounts a redelivery it first meant for
  a request nobody listens to any more: a closing consumer's deliveries come back once its
  requests have expired (within PULL_EXPIRES), not at the very moment it closes.
- Keyed messages cost round trips to the bucket (about five per message, delivery and
  acknowledgement together); keyless ones two, overlapped across an Acknowledge's ids.
  Nothing here needs JetStream beyond 2.9.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import nats.errors as nerr
import nats.js.errors as jerr
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

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

if TYPE_CHECKING:
    from adapters.backends.nats import NatsConnection

log = logging.getLogger(__name__)

SUBJECTS = "prismq"  # prismq.<stream>.k.<key hash> | prismq.<stream>.n
EVENTS = "prismq-ev"  # prismq-ev.<stream>: JSON notices to the consumers of every process
PARTITIONS = 1
NAME_LIMIT = 200  # stream and consumer names become file names on the server
KEY_HEADER = "_prism-key"  # the partition key, JSON (user header names start with a letter or digit)
FINGERPRINT_HEADER = "_prism-fp"  # Entry.fingerprint() of a message published with a token
QUOTED = "_prism-q-"  # a user header whose value NATS would not carry as it is, JSON-quoted
HEADS_TTL = 7 * 86400.0  # a key idle this long loses its record (harmless unless the floor is as old)
ACKS_TTL = 600.0
PULL_EXPIRES = 1.0  # seconds a pull request waits at the server
PROBE_SECONDS = 0.5  # a consumer full of held messages looks for a redelivered head this often
TOKENS_CACHED = 65536


# --- Names ----------------------------------------------------------------------------------


def _escape(name: str) -> str:
    """A NAME in the alphabet of stream and consumer names, injectively (no '.' there)."""
    return name.replace("_", "_u").replace(".", "_d")


def _digest(text: str, size: int = 40) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def stream_name(prefix: str, namespace: str, topic: str) -> str:
    readable = f"{prefix}_{_escape(namespace)}_s{_escape(topic)}"
    return readable if len(readable) <= NAME_LIMIT else f"{prefix}_{_escape(namespace)}_h{_digest(topic)}"


def namespace_streams(prefix: str, namespace: str) -> tuple[str, str]:
    """The name prefixes of every stream of ``namespace`` (for cleaning up after tests)."""
    return f"{prefix}_{_escape(namespace)}_s", f"{prefix}_{_escape(namespace)}_h"


def group_name(group: str) -> str:
    """The group's part of its consumers' names and of its records' keys."""
    readable = f"g{_escape(group)}"
    return readable if len(readable) <= NAME_LIMIT - 24 else f"h{_digest(group)}"


def key_token(key: str) -> str:
    return _digest(key, 32)


# --- Headers --------------------------------------------------------------------------------


def _plain(name: str, value: str) -> bool:
    """Whether NATS carries the header as it is: its client strips values and the server
    reads headers named Nats-*."""
    return not name.lower().startswith("nats-") and value == value.strip() and value.isprintable()


def encode_headers(entry: Entry) -> dict[str, str]:
    headers = {n: v for n, v in entry.headers.items() if _plain(n, v)}
    headers.update({QUOTED + n: json.dumps(v) for n, v in entry.headers.items() if not _plain(n, v)})
    if entry.partition_key:
        headers[KEY_HEADER] = json.dumps(entry.partition_key)
    return headers


def decode_headers(raw: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """The partition key and the user's headers of a stored message."""
    key, headers = "", {}
    for name, value in (raw or {}).items():
        if name.startswith(QUOTED):
            headers[name[len(QUOTED) :]] = json.loads(value)
        elif name == KEY_HEADER:
            key = json.loads(value)
        elif not (name.startswith("_") or name.lower().startswith("nats-")):
            headers[name] = value
    return key, headers


# --- Generations and ack subjects -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    """What a process knows of a group's current consumer (one generation)."""

    consumer: str  # its name
    gen: str  # the generation its records belong to
    base: int  # the first stream sequence it delivers
    replay: int  # sequences up to this may have been acknowledged before (a forward commit)
    done: int  # every sequence up to this is done for the group (ack floor, at least base − 1)
    delivered: int  # the highest stream sequence it delivered
    delivered_cseq: int  # its delivery sequence (a forged negative acknowledgement names one)
    ack_wait: float

    @classmethod
    def of(cls, info: api.ConsumerInfo) -> Binding:
        described = (info.config.description or "").removeprefix("prism ")
        try:
            meta = json.loads(described)
        except ValueError:
            meta = {}
        base = int(meta.get("base") or info.config.opt_start_seq or 1)
        created = info.created.timestamp() if isinstance(info.created, datetime.datetime) else 0
        return cls(
            consumer=info.name,
            gen=str(meta.get("gen") or f"{info.name}@{created:.6f}"),
            base=base,
            replay=int(meta.get("replay") or 0),
            done=max(info.ack_floor.stream_seq if info.ack_floor else 0, base - 1),
            delivered=info.delivered.stream_seq if info.delivered else 0,
            delivered_cseq=info.delivered.consumer_seq if info.delivered else 0,
            ack_wait=info.config.ack_wait or 30.0,
        )


def _generation(consumer: str) -> int:
    _, _, number = consumer.rpartition("_n")
    return int(number) if number.isdigit() else 0


def _ack_subject(stream: str, consumer: str, seq: int, cseq: int) -> str:
    """The subject acknowledging stream sequence ``seq`` on ``consumer``: the server finds the
    pending delivery by ``seq``; a negative acknowledgement also wants a delivery sequence in
    range, so the consumer's latest (``cseq``) is named."""
    return f"$JS.ACK.{stream}.{consumer}.1.{seq}.{max(cseq, 1)}.0.0"


@dataclass(slots=True)
class Pulled:
    """One delivery from the group's consumer, until it is handed out or given back."""

    msg: Msg
    consumer: str
    seq: int
    delivered: int  # JetStream's num_delivered
    published_ns: int
    token: str  # the key's hash; "" without a key
    touched: float  # when JetStream's ack timer last started (monotonic)
    attempt: int = 0
    revision: int = 0  # of its key's record, when it became the head here

    @classmethod
    def of(cls, msg: Msg) -> Pulled | None:
        parts = (msg.reply or "").split(".")
        if len(parts) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<ns>.<pending>
            consumer, delivered, seq, ns = parts[3], parts[4], parts[5], parts[7]
        elif len(parts) >= 12:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<ns>…
            consumer, delivered, seq, ns = parts[5], parts[6], parts[7], parts[9]
        else:
            return None
        subject = msg.subject.split(".")
        token = subject[3] if len(subject) == 4 and subject[2] == "k" else ""
        return cls(msg, consumer, int(seq), int(delivered), int(ns), token, time.monotonic())


@dataclass(slots=True)
class Lease:
    pulled: Pulled
    deadline: float  # monotonic


@dataclass(slots=True)
class Request:
    """A pull request: its deliveries come to a subscription of its own (the server sends a
    message with its own subject, so only the subscription tells which request it answers)."""

    name: str
    consumer: str
    remaining: int
    expires: float  # monotonic
    subscription: Subscription | None = None


DELIVER, HOLD, DONE = "deliver", "hold", "done"
ADOPTED = "adopted"  # the request name of a delivery taken over from a closed consumer


def _stored(answer: Msg) -> bool:
    """Whether a JetStream publish was stored (its answer a PubAck, not an error)."""
    try:
        reply = json.loads(answer.data)
    except ValueError:
        return False
    return isinstance(reply, dict) and "error" not in reply and "seq" in reply


def _tick(ack_wait: float) -> float:
    """How often a consumer renews, at the server, the timers of what it holds."""
    return min(max(ack_wait / 3, 0.05), 5.0)


def _nak(delay: float) -> bytes:
    return b'-NAK {"delay": %d}' % int(delay * 1e9) if delay > 0 else b"-NAK"


def _rfc3339(unix_ns: int) -> str:
    seconds, fraction = divmod(unix_ns, 10**9)
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=seconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def _bounds(info: api.StreamInfo) -> tuple[int, int]:
    state = info.state
    high = state.last_seq
    return (state.first_seq - 1 if state.messages else high), high


class Replies:
    """Many requests in flight on one connection, answered through one wildcard reply
    subscription. ``nc.request`` arms a timer per request and is awaited one by one; an
    Acknowledge of a hundred ids sends two hundred requests, so here they all go out first and
    their answers are awaited together, under one timeout."""

    def __init__(self, nc: Client, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout  # seconds for every answer of one gather
        self._prefix = ""
        self._serial = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscription: Subscription | None = None

    async def send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> asyncio.Future[Msg]:
        if self._subscription is None:
            self._prefix = self.nc.new_inbox()
            self._subscription = await self.nc.subscribe(f"{self._prefix}.*", cb=self._answered)
        token = str(next(self._serial))
        future = self._waiting[token] = asyncio.get_running_loop().create_future()
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return future

    async def gather(self, futures: list[asyncio.Future[Msg]]) -> list[Msg]:
        """Every answer; ``NoRespondersError`` if a request reached nobody; ``TimeoutError``."""
        try:
            async with asyncio.timeout(self.timeout):
                answers = [await future for future in futures]
        finally:
            for future in futures:
                future.cancel()  # a no-op once answered; else forgotten by _answered's map below
            self._waiting = {token: f for token, f in self._waiting.items() if not f.done()}
        for answer in answers:
            if not answer.data and (answer.headers or {}).get("Status") == "503":
                raise nerr.NoRespondersError
        return answers

    async def _answered(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(nerr.Error, OSError):
                await self._subscription.unsubscribe()
            self._subscription = None


# --- The adapter ------------------------------------------------------------------------------


class NatsQueue(QueueAdapter):
    capabilities = frozenset(
        {
            Capability.DURABLE,
            Capability.SHARED,
            Capability.SEEK_TIMESTAMP,
            Capability.DEAD_LETTER,
            Capability.IDEMPOTENT_PUBLISH,
        }
    )

    def __init__(self, connection: NatsConnection) -> None:
        self.connection = connection  # the backend's, shared with its other patterns
        self.prefix = connection.settings.prefix
        self.dedup_window = connection.settings.dedup_window
        self.timeout = connection.settings.command_timeout
        self.buckets = (f"{self.prefix}-heads", f"{self.prefix}-acks")
        self._heads: KeyValue | None = None
        self._acks: KeyValue | None = None
        self._streams: set[str] = set()  # known to exist
        self._current: dict[tuple[str, str], str] = {}  # (stream, group) → its consumer's name
        self._tokens: OrderedDict[tuple[str, int], str] = OrderedDict()  # (stream, seq) → key hash
        self._consumers: set[NatsConsumer] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._replies: Replies | None = None
        # Deliveries that requests of closed consumers got: (stream, group) → (closed consumer, delivery)
        self._orphans: dict[tuple[str, str], list[tuple[NatsConsumer, Msg, Pulled]]] = {}

    @property
    def nc(self) -> Client:
        return self.connection.nc

    @property
    def js(self) -> JetStreamContext:
        return self.connection.js

    @property
    def heads(self) -> KeyValue:
        assert self._heads is not None, "NatsQueue used before start()"
        return self._heads

    @property
    def acks(self) -> KeyValue:
        assert self._acks is not None, "NatsQueue used before start()"
        return self._acks

    async def start(self) -> None:
        with self.connection.errors():
            self._heads = await self._bucket(self.buckets[0], HEADS_TTL, api.StorageType.FILE)
            self._acks = await self._bucket(self.buckets[1], ACKS_TTL, api.StorageType.FILE)

    async def _bucket(self, name: str, ttl: float, storage: api.StorageType) -> KeyValue:
        try:
            return await self.js.create_key_value(bucket=name, history=1, ttl=ttl, storage=storage)
        except jerr.BadRequestError:  # made before with other settings: use it as it is
            return await self.js.key_value(name)

    async def close(self) -> None:
        await asyncio.gather(*(consumer.close() for consumer in list(self._consumers)))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._replies is not None:
            await self._replies.close()

    @property
    def replies(self) -> Replies:
        """Of the backend's current client (a new one after the backend restarts)."""
        if self._replies is None or self._replies.nc is not self.nc:
            self._replies = Replies(self.nc, self.timeout)
        return self._replies

    # Deliveries to closed consumers.

    def _orphaned(self, closed: NatsConsumer, msg: Msg, pulled: Pulled) -> None:
        """A delivery to a request of a closed consumer: to a consumer of the group with room,
        else kept for the next one to join (or for ``closed`` to give back)."""
        key = (closed.stream, closed.options.group)
        for consumer in list(self._consumers):
            if (consumer.stream, consumer.options.group) == key and consumer.adopt(msg, pulled):
                return
        self._orphans.setdefault(key, []).append((closed, msg, pulled))

    def _adopt_orphans(self, consumer: NatsConsumer) -> None:
        """A consumer joined: it takes the deliveries kept for its group, as far as it has room."""
        key = (consumer.stream, consumer.options.group)
        waiting = self._orphans.pop(key, [])
        kept = [(closed, msg, pulled) for closed, msg, pulled in waiting if not consumer.adopt(msg, pulled)]
        if kept:
            self._orphans[key] = kept

    def _unclaimed(self, closed: NatsConsumer) -> list[Pulled]:
        """The deliveries kept from ``closed`` that no consumer took; forgotten here."""
        key = (closed.stream, closed.options.group)
        waiting = self._orphans.pop(key, [])
        kept = [item for item in waiting if item[0] is not closed]
        if kept:
            self._orphans[key] = kept
        return [pulled for owner, _, pulled in waiting if owner is closed]

    # Names and small helpers.

    def stream(self, namespace: str, topic: str) -> str:
        return stream_name(self.prefix, namespace, topic)

    def _fire(self, subject: str, body: bytes) -> None:
        """Publish without waiting (from code that must not be interrupted half-way)."""
        self._background_call(self._publish_quietly(subject, body))

    def _background_call(self, call: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(call)
        self._background.add(task)
        task.add_done_callback(self._done_in_background)

    def _done_in_background(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("nats queue: background call failed: %s: %s", type(exc).__name__, exc)

    async def _publish_quietly(self, subject: str, body: bytes) -> None:
        try:
            await self.nc.publish(subject, body)
        except (nerr.Error, OSError) as exc:  # the ack timer or the next tick makes up for it
            log.debug("nats queue: cannot publish to %s: %s", subject, exc)

    async def _announce(self, stream: str, notice: dict[str, Any]) -> None:
        await self.nc.publish(f"{EVENTS}.{stream}", json.dumps(notice).encode())

    def _remember_token(self, stream: str, seq: int, token: str) -> None:
        self._tokens[(stream, seq)] = token
        if len(self._tokens) > TOKENS_CACHED:
            self._tokens.popitem(last=False)

    async def _token(self, stream: str, seq: int) -> str | None:
        """The key hash of message ``seq`` ("" without a key); None when it does not exist."""
        if (found := self._tokens.get((stream, seq))) is not None:
            return found
        try:
            stored = await self.js.get_msg(stream, seq=seq, direct=True)
        except jerr.NotFoundError:
            return None
        parts = (stored.subject or "").split(".")
        token = parts[3] if len(parts) == 4 and parts[2] == "k" else ""
        self._remember_token(stream, seq, token)
        return token

    async def _first_of(self, stream: str, token: str, seq: int) -> int | None:
        """The sequence of the key's first message at or after ``seq``."""
        try:
            found = await self.js.get_msg(stream, seq=seq, subject=f"{SUBJECTS}.{stream}.k.{token}", next=True, direct=True)
        except jerr.NotFoundError:
            return None
        return found.seq

    # Streams.

    async def _stream_info(self, stream: str) -> api.StreamInfo | None:
        try:
            info = await self.js.stream_info(stream)
        except jerr.NotFoundError:
            self._streams.discard(stream)
            return None
        self._streams.add(stream)
        return info

    async def _ensure_stream(self, stream: str, namespace: str, topic: str) -> None:
        if stream in self._streams:
            return
        config = api.StreamConfig(
            name=stream,
            description=f"prism queue: namespace {namespace}, topic {topic}",
            subjects=[f"{SUBJECTS}.{stream}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            duplicate_window=self.dedup_window,
            allow_direct=True,
        )
        try:
            await self.js.add_stream(config)
        except jerr.BadRequestError as exc:  # made meanwhile, or before with another duplicate window
            if await self._stream_info(stream) is None:
                raise PrismError(grpc.StatusCode.INTERNAL, f"nats: cannot create stream {stream}") from exc
        self._streams.add(stream)

    # Publish.

    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            return await self._publish_many(stream, namespace, topic, list(entries))

    async def _publish(
        self, stream: str, namespace: str, topic: str, entry: Entry, msg_id: str = ""
    ) -> Published | PrismError:
        (result,) = await self._publish_many(stream, namespace, topic, [entry], msg_id)
        return result

    async def _publish_many(
        self, stream: str, namespace: str, topic: str, entries: list[Entry], msg_id: str = ""
    ) -> list[Published | PrismError]:
        """Every entry sent before any answer is awaited (``publish_async``: one connection,
        so the stream stores them in this order), then every PubAck: a batch costs about one
        round trip, not one per entry. ``msg_id``: the Nats-Msg-Id of a lone entry.

        A stream not known to exist gets the first entry alone: were the stream made by another
        process amid the batch, the entries before that moment would be refused and sent again
        after the later ones, out of order."""
        if stream not in self._streams and len(entries) > 1:
            first = await self._publish_many(stream, namespace, topic, entries[:1])
            return first + await self._publish_many(stream, namespace, topic, entries[1:])
        prepared = [self._prepared(stream, entry, msg_id) for entry in entries]
        results: list[Published | PrismError | None] = [None] * len(entries)
        pending = list(range(len(entries)))
        for attempt in range(2):
            sent: list[tuple[int, asyncio.Future[api.PubAck]]] = []
            for i in pending:
                subject, headers = prepared[i]
                # Checked here, as the client would (it counts the payload alone): an entry the
                # client refuses inside publish_async leaves its future pending for ever.
                if len(entries[i].payload) > self.nc.max_payload:
                    results[i] = PrismError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"payload: above the NATS server's max_payload ({self.nc.max_payload} bytes)",
                        field="payload",
                    )
                    continue
                # No Nats-Expected-Stream header: the subjects are the stream's alone (NATS refuses
                # overlapping streams) and a missing stream answers "no responders" anyway, while
                # the header would be stored with every message and parsed at every delivery.
                try:
                    future = await self.js.publish_async(subject, entries[i].payload, headers=headers or None)
                except BaseException:
                    for _, earlier in sent:
                        earlier.cancel()
                    raise
                sent.append((i, future))
            try:
                async with asyncio.timeout(self.timeout):
                    acks = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
            except TimeoutError:
                for _, future in sent:
                    future.cancel()
                raise
            pending = []
            for (i, _), ack in zip(sent, acks, strict=True):
                if isinstance(ack, jerr.NoStreamResponseError) and attempt == 0:
                    pending.append(i)  # the topic's first message: nothing was stored
                elif isinstance(ack, BaseException):
                    raise ack
                else:
                    self._streams.add(stream)
                    results[i] = await self._published(stream, entries[i], prepared[i][1], ack)
            if not pending:
                break
            self._streams.discard(stream)
            await self._ensure_stream(stream, namespace, topic)
        done = [result for result in results if result is not None]
        assert len(done) == len(entries), "every entry has its result"
        return done

    def _prepared(self, stream: str, entry: Entry, msg_id: str) -> tuple[str, dict[str, str]]:
        """The subject and headers an entry is published with."""
        token = key_token(entry.partition_key) if entry.partition_key else ""
        subject = f"{SUBJECTS}.{stream}.k.{token}" if token else f"{SUBJECTS}.{stream}.n"
        headers = encode_headers(entry)
        if entry.idempotency_token:
            headers[FINGERPRINT_HEADER] = entry.fingerprint().hex()
            msg_id = "t-" + _digest(entry.idempotency_token, 64)
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        return subject, headers

    async def _published(self, stream: str, entry: Entry, headers: dict[str, str], ack: api.PubAck) -> Published | PrismError:
        """The result of an entry JetStream acknowledged: a token stored before by another
        entry is refused."""
        token = key_token(entry.partition_key) if entry.partition_key else ""
        self._remember_token(stream, ack.seq, token)
        published = Published(message_id(0, ack.seq - 1), 0, ack.seq - 1)
        if ack.duplicate and entry.idempotency_token:
            try:
                stored = await self.js.get_msg(stream, seq=ack.seq, direct=True)
            except jerr.NotFoundError:  # gone since (retention): it was stored once
                return published
            if (stored.headers or {}).get(FINGERPRINT_HEADER) != headers[FINGERPRINT_HEADER]:
                return token_reused()
        return published

    # Groups: the current generation's consumer.

    async def _consumer_info(self, stream: str, group: str) -> api.ConsumerInfo | None:
        """The group's current consumer; None without one (or without the stream)."""
        key = (stream, group)
        for _ in range(3):
            name = self._current.get(key) or await self._latest(stream, group)
            if name is None:
                return None
            try:
                return await self.js.consumer_info(stream, name)
            # TypeError: a NATS 2.9 server may answer for a consumer being deleted with an empty
            # info, which the client cannot read
            except (jerr.NotFoundError, TypeError):
                self._current.pop(key, None)  # replaced by a later generation, or gone
        return None

    async def _latest(self, stream: str, group: str) -> str | None:
        prefix, names, offset = group_name(group) + "_n", [], 0
        while True:
            try:
                answer = await self.nc.request(
                    f"$JS.API.CONSUMER.NAMES.{stream}", json.dumps({"offset": offset}).encode(), timeout=self.timeout
                )
            except nerr.NoRespondersError:
                return None
            page = json.loads(answer.data)
            if "error" in page:
                if page["error"].get("err_code") == 10059:  # stream not found
                    self._streams.discard(stream)
                    return None
                raise jerr.APIError.from_error(page["error"])
            found = page.get("consumers") or []
            names += [n for n in found if n.startswith(prefix) and _generation(n)]
            offset += len(found)
            if not found or offset >= page.get("total", 0):
                break
        if not names:
            return None
        latest = max(names, key=_generation)
        for superseded in names:  # left by a Commit or Seek interrupted between create and delete
            if superseded != latest:
                with contextlib.suppress(jerr.NotFoundError):
                    await self.js.delete_consumer(stream, superseded)
        self._current[(stream, group)] = latest
        return latest

    async def _create(
        self, stream: str, group: str, generation: int, base: int, ack_wait: float, replay: int = 0, gen: str = ""
    ) -> api.ConsumerInfo:
        meta = {"group": group, "base": base, "replay": replay} | ({"gen": gen} if gen else {})
        config = api.ConsumerConfig(
            durable_name=f"{group_name(group)}_n{generation}",
            description="prism " + json.dumps(meta),
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=base,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=-1,
        )
        info = await self.js.add_consumer(stream, config)
        self._current[(stream, group)] = info.name
        return info

    async def _join(self, stream: str, group: str, options: ConsumeOptions) -> Binding:
        for _ in range(3):
            info = await self._consumer_info(stream, group)
            if info is not None:
                return Binding.of(info)
            stream_info = await self._stream_info(stream)
            if stream_info is None:
                raise unknown_topic(stream)
            low, high = _bounds(stream_info)
            base = (low if options.start is Start.EARLIEST else high) + 1
            try:
                return Binding.of(await self._create(stream, group, 1, base, options.ack_deadline))
            except jerr.BadRequestError:  # another process made it meanwhile, at another position
                continue
        raise PrismError(grpc.StatusCode.UNAVAILABLE, f"nats: cannot join group {group!r}: it keeps changing")

    async def _regenerate(
        self, stream: str, group: str, old: api.ConsumerInfo | None, base: int, *, keep_records: bool
    ) -> Binding:
        """The group's next generation, delivering from ``base``; the old one is deleted and
        this process's consumers of the group move to the new one before this returns."""
        previous = Binding.of(old) if old is not None else None
        generation = (_generation(old.name) if old is not None else 0) + 1
        genc = group_name(group)
        if previous is not None and keep_records:
            replay = max(previous.replay, previous.delivered)
            info = await self._create(stream, group, generation, base, previous.ack_wait, replay, previous.gen)
        else:
            for bucket in self.buckets:  # what the old generations recorded
                await self.js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{stream}.{genc}.>")
            ack_wait = previous.ack_wait if previous is not None else 30.0
            info = await self._create(stream, group, generation, base, ack_wait)
        if old is not None:
            with contextlib.suppress(jerr.NotFoundError):
                await self.js.delete_consumer(stream, old.name)
        binding = Binding.of(info)
        for consumer in [c for c in self._consumers if c.stream == stream and c.options.group == group]:
            await consumer.rebind(binding)
        await self._announce(stream, {"g": genc, "seek": binding.consumer})
        return binding

    # The contract.

    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            await self._ensure_stream(stream, namespace, topic)
            binding = await self._join(stream, options.group, options)
            consumer = NatsConsumer(self, namespace, topic, stream, options, binding)
            await consumer.start()
        self._consumers.add(consumer)
        self._adopt_orphans(consumer)
        return consumer

    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        return await self._settle(namespace, topic, group, message_ids, acknowledge=True)

    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        return await self._settle(namespace, topic, group, message_ids, acknowledge=False)

    async def _settle(self, namespace: str, topic: str, group: str, ids: Sequence[str], *, acknowledge: bool) -> int:
        seqs = sorted({p[1] + 1 for i in ids if (p := parse_message_id(i)) is not None and p[0] == 0})
        if not seqs:
            return 0
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            here = self._leases_here(stream, group, seqs)
            if here is not None:  # a consumer of this process holds them: it knows the generation
                holder, binding, held = here
            else:
                info = await self._consumer_info(stream, group)
                if info is None:
                    return 0
                holder, binding, held = None, Binding.of(info), {}
            # Done already, or never delivered to the group: nothing to settle.
            seqs = [seq for seq in seqs if seq in held or binding.done < seq <= binding.delivered]
            tokens = await asyncio.gather(*(self._token(stream, seq) for seq in seqs))
            by_key: dict[str, list[int]] = {}
            for seq, token in zip(seqs, tokens, strict=True):
                if token is not None:  # else not in the stream any more
                    by_key.setdefault(token, []).append(seq)

            def subject(seq: int) -> str:
                return held[seq].msg.reply if seq in held else _ack_subject(stream, binding.consumer, seq, binding.delivered_cseq)

            async def keyless(seq: int) -> bool:  # a negative acknowledgement
                if not await self._unmarked(stream, group, binding, seq):
                    return False
                await self.nc.request(subject(seq), b"-NAK", timeout=self.timeout)
                return True

            async def keyed(token: str, key_seqs: list[int]) -> list[int]:
                done = []
                for seq in key_seqs:  # a key's messages one after the other: each makes the next its head
                    if acknowledge:
                        ok = await self._release(stream, group, binding, token, seq, held[seq].revision if seq in held else 0)
                    else:
                        ok = await self._is_head(stream, group, binding, token, seq)
                    if ok:
                        await self.nc.request(subject(seq), b"+ACK" if acknowledge else b"-NAK", timeout=self.timeout)
                        done.append(seq)
                return done

            # Keyless messages and keys all at once: their round trips overlap on the connection.
            plain = by_key.pop("", [])
            first = (
                [self._acknowledge_keyless(stream, group, binding, plain, subject)]
                if acknowledge
                else [asyncio.gather(*(keyless(seq) for seq in plain))]
            )
            outcomes = await asyncio.gather(*first, *(keyed(token, key_seqs) for token, key_seqs in by_key.items()))
            settled = [[seq, ""] for seq, ok in zip(plain, outcomes[0], strict=True) if ok]
            for token, done in zip(by_key, outcomes[1:], strict=True):
                settled += [[seq, token] for seq in done]
            if settled:
                if holder is not None:  # room for the consumer now, not when the notice comes back
                    holder.settled(seq for seq, _ in settled)
                await self._announce(stream, {"g": group_name(group), "ack" if acknowledge else "nak": settled})
        return len(settled)

    async def _acknowledge_keyless(
        self, stream: str, group: str, binding: Binding, seqs: list[int], subject: Callable[[int], str]
    ) -> list[bool]:
        """Acknowledge keyless messages: every +ACK sent, then every answer awaited; then every
        record created blind, in one go too. Which of them were not acknowledged before: those
        whose record this made. JetStream first, then the record: a failure between them
        leaves a message acknowledged (never redelivered), where the other order could leave it
        recorded and redelivered for ever."""
        if not seqs:
            return []
        replies = self.replies
        acks = [await replies.send(subject(seq), b"+ACK") for seq in seqs]
        await replies.gather(acks)
        prefix, gen = f"$KV.{self.buckets[1]}.{stream}.{group_name(group)}.a.", binding.gen.encode()
        created = [await replies.send(f"{prefix}{seq}", gen, {"Nats-Expected-Last-Subject-Sequence": "0"}) for seq in seqs]
        try:
            made = [_stored(answer) for answer in await replies.gather(created)]
        except nerr.NoRespondersError:  # the bucket is gone: the one-by-one path makes it again
            made = [False] * len(seqs)
        # Not made: the record exists (a repeated Acknowledge, or one of an older generation),
        # or the bucket is gone; the one-by-one path reads it and tells.
        again = [seq for seq, ok in zip(seqs, made, strict=True) if not ok]
        marked = dict(zip(again, await asyncio.gather(*(self._mark(stream, group, binding, seq) for seq in again)), strict=True))
        return [ok or marked[seq] for seq, ok in zip(seqs, made, strict=True)]

    def _leases_here(
        self, stream: str, group: str, seqs: Sequence[int]
    ) -> tuple[NatsConsumer, Binding, dict[int, Pulled]] | None:
        """A consumer of this process leasing every one of ``seqs``, its binding, and those
        deliveries (their ack subjects, their head records' revisions)."""
        for consumer in self._consumers:
            if consumer.stream == stream and consumer.options.group == group:
                leases = consumer.leases
                if all(seq in leases for seq in seqs):
                    return consumer, consumer.binding, {seq: leases[seq].pulled for seq in seqs}
        return None

    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            low, high = await self._partition(stream, topic, partition)
            if not low <= offset <= high:
                raise offset_out_of_range(partition, offset, low, high)
            old = await self._consumer_info(stream, group)
            forward = old is not None and offset >= Binding.of(old).done
            await self._regenerate(stream, group, old, offset + 1, keep_records=forward)

    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            low, high = await self._partition(stream, topic, partition)
            old = await self._consumer_info(stream, group)
            if isinstance(target, AtOffset):
                if not low <= target.offset <= high:
                    raise offset_out_of_range(partition, target.offset, low, high)
                offset = target.offset
            elif isinstance(target, AtTime):
                offset = min(max(await self._offset_at(stream, target.unix_ns), low), high)
            elif target is Start.EARLIEST:
                offset = low
            elif target is Start.LATEST:
                offset = high
            else:
                offset = high if old is None else min(max(Binding.of(old).done, low), high)
            await self._regenerate(stream, group, old, offset + 1, keep_records=False)
        return offset

    async def _partition(self, stream: str, topic: str, partition: int) -> tuple[int, int]:
        info = await self._stream_info(stream)
        if info is None:
            raise unknown_topic(topic)
        if partition != 0:
            raise no_partition(topic, partition, PARTITIONS)
        return _bounds(info)

    async def _offset_at(self, stream: str, unix_ns: int) -> int:
        """The offset of the first message stored at or after ``unix_ns``: the server answers
        for an ephemeral consumer starting there (JetStream 2.9 has no get by time)."""
        request = {
            "stream_name": stream,
            "config": {
                "deliver_policy": "by_start_time",
                "opt_start_time": _rfc3339(unix_ns),
                "ack_policy": "none",
                "inactive_threshold": 5 * 10**9,
            },
        }
        answer = json.loads(
            (await self.nc.request(f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps(request).encode(), timeout=self.timeout)).data
        )
        if "error" in answer:
            raise jerr.APIError.from_error(answer["error"])
        with contextlib.suppress(jerr.NotFoundError):
            await self.js.delete_consumer(stream, answer["name"])
        return int(answer["delivered"]["stream_seq"])  # the sequence before the first = its offset

    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        stream = self.stream(namespace, topic)
        with self.connection.errors():
            info = await self._stream_info(stream)
            if info is None:
                raise unknown_topic(topic)
            low, high = _bounds(info)
            consumer = await self._consumer_info(stream, group) if group else None
        if consumer is None:
            return [PartitionInfo(0, low, high, -1, high - low if group else 0)]
        position = min(max(Binding.of(consumer).done, low), high)
        return [PartitionInfo(0, low, high, position, high - position)]

    # Records: a key's head, a keyless message's acknowledgement, deliveries given back unseen.

    @staticmethod
    def _head_key(stream: str, group: str, token: str) -> str:
        return f"{stream}.{group_name(group)}.{token}"

    async def _read(self, bucket: KeyValue, key: str) -> tuple[bytes | None, int]:
        for attempt in range(2):
            try:
                entry = await bucket.get(key)
            except jerr.NotFoundError:
                return None, 0
            except (nerr.NoRespondersError, jerr.NoStreamResponseError):  # the bucket is gone
                if attempt:
                    raise
                await self.start()
                continue
            return entry.value, entry.revision or 0
        raise AssertionError("unreachable")

    async def _write(self, bucket: KeyValue, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: the record's new revision; 0 when someone changed it since ``revision``."""
        for attempt in range(2):
            try:
                if revision:
                    return await bucket.update(key, value, last=revision)
                return await bucket.create(key, value)
            except jerr.KeyWrongLastSequenceError:
                return 0
            except (nerr.NoRespondersError, jerr.NoStreamResponseError):  # the bucket is gone: again
                if attempt:
                    raise
                await self.start()
        raise AssertionError("unreachable")

    @staticmethod
    def head_state(value: bytes | None, binding: Binding) -> tuple[str, int]:
        """("H", s): message s is the key's head; ("D", s): every message of the key up to s
        is done, its head is the first one after s."""
        if value:
            gen, kind, seq_text = value.decode().rsplit(" ", 2)
            seq = int(seq_text)
            if gen == binding.gen:
                if kind == "H" and seq >= binding.base:
                    return "H", seq
                return "D", max(seq if kind == "D" else binding.base - 1, binding.base - 1)
        return "D", binding.done

    async def _release(self, stream: str, group: str, binding: Binding, token: str, seq: int, revision: int = 0) -> bool:
        """Acknowledge the key's head ``seq``: its next message becomes the head. ``revision``:
        the record's when this process made ``seq`` the head (spares reading it)."""
        key = self._head_key(stream, group, token)
        done = f"{binding.gen} D {seq}".encode()
        if revision and await self._write(self.heads, key, done, revision):
            return True
        for _ in range(5):
            value, revision = await self._read(self.heads, key)
            if self.head_state(value, binding) != ("H", seq):
                return False
            if await self._write(self.heads, key, done, revision):
                return True
        return False

    async def _is_head(self, stream: str, group: str, binding: Binding, token: str, seq: int) -> bool:
        value, _ = await self._read(self.heads, self._head_key(stream, group, token))
        return self.head_state(value, binding) == ("H", seq)

    async def _mark(self, stream: str, group: str, binding: Binding, seq: int) -> bool:
        """Record a keyless message's acknowledgement; False when it was recorded already.
        Created blind first (one round trip in the usual case), read only when it exists."""
        key = f"{stream}.{group_name(group)}.a.{seq}"
        revision = 0
        for _ in range(5):
            if await self._write(self.acks, key, binding.gen.encode(), revision):
                return True
            value, revision = await self._read(self.acks, key)
            if value is not None and value.decode() == binding.gen:
                return False
        return False

    async def _unmarked(self, stream: str, group: str, binding: Binding, seq: int) -> bool:
        value, _ = await self._read(self.acks, f"{stream}.{group_name(group)}.a.{seq}")
        return value is None or value.decode() != binding.gen

    async def _skips(self, stream: str, group: str, binding: Binding, seq: int) -> int:
        value, _ = await self._read(self.acks, f"{stream}.{group_name(group)}.x.{seq}")
        if value is None:
            return 0
        gen, _, count = value.decode().rpartition(" ")
        return int(count) if gen == binding.gen else 0

    async def _skip(self, stream: str, group: str, binding: Binding, seq: int) -> None:
        """Count a delivery that a consumer gives back without handing it out, so that its
        next delivery has the attempt number it would have had."""
        key = f"{stream}.{group_name(group)}.x.{seq}"
        for _ in range(5):
            value, revision = await self._read(self.acks, key)
            count = 0
            if value is not None:
                gen, _, text = value.decode().rpartition(" ")
                count = int(text) if gen == binding.gen else 0
            if await self._write(self.acks, key, f"{binding.gen} {count + 1}".encode(), revision):
                return

    async def _dead_letter(self, consumer: NatsConsumer, pulled: Pulled) -> None:
        """Instead of delivering ``pulled`` once more: a copy to the dead-letter topic, then
        done for the group."""
        options, binding, stream = consumer.options, consumer.binding, consumer.stream
        key, headers = decode_headers(pulled.msg.headers)
        attempts = pulled.attempt - 1
        reason = f"not acknowledged after {attempts} deliveries (max_delivery_attempts {options.max_delivery_attempts})"
        values = (reason, consumer.topic, options.group, message_id(0, pulled.seq - 1), "0", str(pulled.seq - 1), str(attempts))
        copy = Entry(pulled.msg.data, key, {**headers, **dict(zip(DEAD_LETTER_HEADERS, values, strict=True))})
        target = self.stream(consumer.namespace, options.dead_letter_topic)
        result = await self._publish(
            target, consumer.namespace, options.dead_letter_topic, copy, msg_id=f"dl-{stream}-{binding.gen}-{pulled.seq}"
        )
        if isinstance(result, PrismError):
            raise result
        if pulled.token:
            await self._release(stream, options.group, binding, pulled.token, pulled.seq)
        else:
            await self._mark(stream, options.group, binding, pulled.seq)
        await self.nc.request(pulled.msg.reply, b"+ACK", timeout=self.timeout)
        DEAD_LETTERED.labels(consumer.namespace).inc()
        await self._announce(stream, {"g": group_name(options.group), "ack": [[pulled.seq, pulled.token]]})


# --- A consumer -------------------------------------------------------------------------------


class NatsConsumer(Consumer):
    """Pulls from the group's consumer only while ``take`` waits and it has room: at most
    ``max_in_flight`` leases and buffered deliveries, and besides them at most as many messages
    held back behind their key's head. One task (the pump) handles, in order, what the server
    sends (deliveries, pull statuses) and the group's notices; another (the keeper) ends leases
    at their deadline and keeps held and buffered messages leased at the server."""

    def __init__(
        self, queue: NatsQueue, namespace: str, topic: str, stream: str, options: ConsumeOptions, binding: Binding
    ) -> None:
        self.id = uuid.uuid4().hex
        self.queue, self.namespace, self.topic, self.stream, self.options = queue, namespace, topic, stream, options
        self.binding = binding
        self._genc = group_name(options.group)
        self._buffer: deque[Pulled] = deque()  # deliverable, in order
        self._held: dict[str, list[Pulled]] = {}  # key hash → messages waiting for their head, by sequence
        self._unsorted: list[Pulled] = []  # not yet judged (the judging failed: tried again each tick)
        self._returning: list[Pulled] = []  # arrived while closing
        self._leases: dict[int, Lease] = {}  # seq → handed out
        self._requests: dict[str, Request] = {}
        self._serial = itertools.count(1)
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._keeper_wake = asyncio.Event()
        self._keeper_due = 0.0  # when the keeper wakes by itself (0: it is awake)
        self._lingering = False  # closed, with requests still open at the server
        self._adopting = 0  # deliveries taken over from a closed consumer, not yet placed
        self._refill_below = max(1, options.max_in_flight // 2)  # buffer size that lets take pull ahead
        self._refill_min = max(1, options.max_in_flight // 4)  # room worth a pull ahead
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._last_probe = 0.0
        self._inbox = queue.nc.new_inbox()
        self._notices: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._notices = await self.queue.nc.subscribe(f"{EVENTS}.{self.stream}", cb=self._on_notice)
        self._tasks = [
            asyncio.create_task(self._pump(), name=f"nats-queue-pump-{self.id[:8]}"),
            asyncio.create_task(self._keep(), name=f"nats-queue-keeper-{self.id[:8]}"),
        ]

    async def _on_delivery(self, name: str, msg: Msg) -> None:
        if not self._lingering:
            self._events.put_nowait(("delivery", (name, msg)))
            return
        # Closed, the pump gone: a request of this consumer still open at the server sent this
        # (a message published while it closed, say). To another consumer of the group here
        # with room for it, now or once one joins (a client that reconnects); what none takes
        # goes back to the group when the requests have expired (at once, the server could
        # send it here again).
        pulled = Pulled.of(msg)
        if pulled is not None and pulled.consumer == self.binding.consumer:
            self.queue._orphaned(self, msg, pulled)

    def adopt(self, msg: Msg, pulled: Pulled) -> bool:
        """Take a delivery a closed consumer of this group still got, if there is room for it."""
        if self._closed or pulled.consumer != self.binding.consumer:
            return False
        if self._room() <= 0:
            return False
        self._adopting += 1
        self._events.put_nowait(("delivery", (ADOPTED, msg)))
        return True

    def _room(self) -> int:
        """Deliveries this consumer may still ask for or take."""
        outstanding = sum(r.remaining for r in self._requests.values())
        return self.options.max_in_flight - len(self._leases) - len(self._buffer) - outstanding - self._adopting

    async def _on_notice(self, msg: Msg) -> None:
        self._events.put_nowait(("notice", msg))

    @property
    def leases(self) -> dict[int, Lease]:
        return self._leases

    def settled(self, seqs: Iterable[int]) -> None:
        """Acknowledged or given back through this process: their room is free at once (the
        group's notice, which every process gets, also rechecks their keys)."""
        for seq in seqs:
            self._leases.pop(seq, None)
        self._changed.set()

    @property
    def _held_count(self) -> int:
        return sum(map(len, self._held.values())) + len(self._unsorted)

    # Handing out.

    async def take(self, limit: int) -> list[Delivery]:
        while True:
            self._changed.clear()  # before looking, so that a change while requesting is seen
            if self._closed:
                return []
            now = time.monotonic()
            if self._buffer and len(self._buffer) < self._refill_below:
                await self._refill(now)
            taken: list[Delivery] = []
            while self._buffer and len(taken) < limit:
                pulled = self._buffer.popleft()
                if now - pulled.touched < self.binding.ack_wait:  # else JetStream took it back
                    taken.append(self._hand_out(pulled, now))
            if taken:
                return taken
            with self.queue.connection.errors():
                await self._request(now)
            if not (self._buffer or self._closed):
                await self._changed.wait()

    def _hand_out(self, pulled: Pulled, now: float) -> Delivery:
        """Synchronous, so a caller that stops waiting never strands a lease half-made. The
        keeper renews every waiting and leased message at the server each tick, so only one
        whose timer there would run out before the next tick is renewed here (a round trip per
        delivery otherwise: a full buffer keeps messages waiting tens of milliseconds)."""
        ack_wait = self.binding.ack_wait
        if now - pulled.touched > ack_wait - 1.5 * _tick(ack_wait):
            self.queue._fire(pulled.msg.reply, b"+WPI")
            pulled.touched = now
        deadline = now + self.options.ack_deadline
        self._leases[pulled.seq] = Lease(pulled, deadline)
        if not self._keeper_due or deadline < self._keeper_due:  # else the keeper wakes in time anyway
            self._keeper_wake.set()
        key, headers = decode_headers(pulled.msg.headers)
        offset = pulled.seq - 1
        return Delivery(
            message_id(0, offset), self.topic, 0, offset, pulled.msg.data, key, headers, pulled.attempt, pulled.published_ns
        )

    async def _refill(self, now: float) -> None:
        """Pull more while the buffer still has messages to hand out (a pull is a round trip
        away), once there is room for a quarter of ``max_in_flight``: a few large requests,
        not one per acknowledgement. A failure here is left to the pull made when the buffer
        runs dry, which reports it."""
        try:
            with self.queue.connection.errors():
                await self._request(now, self._refill_min)
        except PrismError as exc:
            log.debug("nats queue consumer %s: cannot pull ahead: %s", self.id[:8], exc.message)

    async def _request(self, now: float, least: int = 1) -> None:
        """Ask the server for as many deliveries as there is room for (if at least ``least``)."""
        for name, request in list(self._requests.items()):
            if request.expires + 1.0 < now:  # no status came: a reconnection, or its consumer is gone
                await self._end(name)
                self._events.put_nowait(("binding", None))
        outstanding = sum(r.remaining for r in self._requests.values())
        room = self._room()
        if room < least:
            return
        batch = min(room, self.options.max_in_flight - self._held_count - outstanding)
        if batch <= 0:  # full of held messages: a redelivered head may be waiting at the server
            if outstanding or now - self._last_probe < PROBE_SECONDS:
                return
            batch, self._last_probe = 1, now
        name, nc = str(next(self._serial)), self.queue.nc
        request = self._requests[name] = Request(name, self.binding.consumer, batch, now + PULL_EXPIRES)
        inbox = f"{self._inbox}.{name}"
        request.subscription = await nc.subscribe(inbox, cb=functools.partial(self._on_delivery, name))
        if name not in self._requests:  # the group moved to another generation meanwhile
            await request.subscription.unsubscribe()
            return
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{request.consumer}",
            json.dumps({"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}).encode(),
            reply=inbox,
        )

    async def _end(self, name: str) -> None:
        """Forget a request the server will send nothing more for."""
        request = self._requests.pop(name, None)
        if request is not None and request.subscription is not None:
            with contextlib.suppress(nerr.Error, OSError):
                await request.subscription.unsubscribe()

    # The pump: everything that changes what this consumer holds, one at a time.

    async def _pump(self) -> None:
        while True:
            kind, item = await self._events.get()
            if kind == "stop":
                return
            try:
                if kind == "delivery":
                    await self._on_message(*item)
                elif kind == "notice":
                    await self._on_group_notice(item)
                elif kind == "recheck":
                    await self._recheck(None)
                elif kind == "binding":
                    await self._find_binding()
                elif kind == "rebind":
                    binding, done = item
                    self._rebind(binding)
                    done.set_result(None)
            except PrismError as exc:
                log.warning("nats queue consumer %s: %s", self.id[:8], exc.message)
            except (nerr.Error, OSError) as exc:  # the server is away: the next notice or tick tries again
                log.warning("nats queue consumer %s: %s: %s", self.id[:8], type(exc).__name__, exc)
            except Exception:  # a bug, or an answer the client cannot read: never the end of the pump
                log.exception("nats queue consumer %s: handling %s failed", self.id[:8], kind)
            self._changed.set()

    async def _on_message(self, name: str, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status") if not msg.data and not msg.reply else None
        if status is not None:
            if status != "100":  # 404, 408: the request ended; 409: so did it (maybe its consumer)
                await self._end(name)
            description = (msg.headers or {}).get("Description", "")
            if (status == "409" and "Deleted" in description) or status == "503":
                await self._find_binding()
            return
        pulled = Pulled.of(msg)
        if pulled is None:
            return
        if name == ADOPTED:
            self._adopting -= 1
        request = self._requests.get(name)
        if request is not None:
            request.remaining -= 1
            if request.remaining <= 0:
                await self._end(name)
        if pulled.consumer != self.binding.consumer:
            return  # a replaced generation's: forgotten with it
        if self._closed:
            self._returning.append(pulled)  # given back once no request of ours is left
            return
        self.queue._remember_token(self.stream, pulled.seq, pulled.token)
        try:
            await self._place(pulled)
        except Exception:
            self._unsorted.append(pulled)  # judged again at the next tick
            raise

    async def _place(self, pulled: Pulled) -> None:
        queue, binding, group = self.queue, self.binding, self.options.group
        if not pulled.token:
            if pulled.seq <= binding.replay and not await queue._unmarked(self.stream, group, binding, pulled.seq):
                await queue._publish_quietly(pulled.msg.reply, b"+ACK")  # acknowledged before a forward commit
                return
            await self._deliverable(pulled)
            return
        verdict = await self._judge(pulled)
        if verdict is DONE:
            await queue._publish_quietly(pulled.msg.reply, b"+ACK")
        elif verdict is HOLD:
            await self._hold(pulled)
        else:
            await self._deliverable(pulled)

    async def _judge(self, pulled: Pulled) -> str:
        """DELIVER when ``pulled`` is its key's head (making it so if it is next), HOLD while
        an earlier message of the key is not done, DONE when it is done already."""
        queue, binding = self.queue, self.binding
        key = queue._head_key(self.stream, self.options.group, pulled.token)
        for _ in range(5):
            value, revision = await queue._read(queue.heads, key)
            kind, seq = queue.head_state(value, binding)
            if kind == "H":
                if seq == pulled.seq:
                    pulled.revision = revision
                    if pulled.delivered > 1 and value is not None:  # a redelivery: the record lives on
                        pulled.revision = await queue._write(queue.heads, key, value, revision)
                    return DELIVER
                return HOLD if seq < pulled.seq else DONE
            if pulled.seq <= seq:
                return DONE
            first = await queue._first_of(self.stream, pulled.token, seq + 1)
            if first is None or first > pulled.seq:
                return DONE  # not in the stream any more
            if first < pulled.seq:
                return HOLD
            pulled.revision = await queue._write(queue.heads, key, f"{binding.gen} H {pulled.seq}".encode(), revision)
            if pulled.revision:
                return DELIVER
        return HOLD  # contended: judged again on the next notice or tick

    async def _deliverable(self, pulled: Pulled) -> None:
        skipped = await self.queue._skips(self.stream, self.options.group, self.binding, pulled.seq) if pulled.delivered > 1 else 0
        pulled.attempt = max(1, pulled.delivered - skipped)
        limit = self.options.max_delivery_attempts
        if limit and pulled.attempt > limit:
            await self.queue._dead_letter(self, pulled)
            return
        self._buffer.append(pulled)

    async def _hold(self, pulled: Pulled) -> None:
        if self._held_count >= self.options.max_in_flight:  # no room to hold it: back, for a while
            await self._give_back(pulled, delay=PROBE_SECONDS * 2)
            return
        waiting = self._held.setdefault(pulled.token, [])
        waiting.append(pulled)
        waiting.sort(key=lambda p: p.seq)

    async def _recheck(self, tokens: Iterable[str] | None) -> None:
        """Hand on what waited for a head that is done now."""
        unsorted, self._unsorted = self._unsorted, []
        for pulled in unsorted:
            try:
                await self._place(pulled)
            except Exception:
                self._unsorted.append(pulled)
                raise
        for token in list(self._held if tokens is None else tokens):
            waiting = self._held.get(token, [])
            while waiting:
                pulled = waiting[0]
                verdict = await self._judge(pulled)
                if verdict is HOLD:
                    break
                if verdict is DONE:
                    await self.queue._publish_quietly(pulled.msg.reply, b"+ACK")
                else:
                    await self._deliverable(pulled)
                waiting.pop(0)  # only now: a failure above leaves it held, judged again later
            if not waiting:
                self._held.pop(token, None)

    async def _on_group_notice(self, msg: Msg) -> None:
        notice = json.loads(msg.data)
        if notice.get("g") != self._genc:
            return
        if "seek" in notice:
            if notice["seek"] != self.binding.consumer:
                await self._find_binding()
            return
        tokens = set()
        for seq, token in notice.get("ack", []):
            self._leases.pop(seq, None)
            if token:
                tokens.add(token)
        for seq, _ in notice.get("nak", []):
            self._leases.pop(seq, None)
        if tokens:
            await self._recheck(tokens)

    async def _find_binding(self) -> None:
        """The group has a new generation (or lost its consumer): bind to the current one."""
        queue = self.queue
        for _ in range(40):
            info = await queue._consumer_info(self.stream, self.options.group)
            if info is not None:
                if info.name != self.binding.consumer:
                    self._rebind(Binding.of(info))
                return
            await asyncio.sleep(0.05)  # between a Seek's delete and create, or gone for good
        self._rebind(await queue._join(self.stream, self.options.group, self.options))

    def _rebind(self, binding: Binding) -> None:
        """What the old generation delivered is forgotten with it (its consumer is deleted, so
        nothing is sent back to it)."""
        self.binding = binding
        self._buffer.clear()
        self._held.clear()
        self._unsorted.clear()
        self._leases.clear()
        for name in list(self._requests):  # their deliveries, if any still come, are dropped
            request = self._requests.pop(name)
            if request.subscription is not None:
                self.queue._background_call(request.subscription.unsubscribe())
        self._keeper_wake.set()

    async def rebind(self, binding: Binding) -> None:
        """Move to ``binding`` (this process made it), in order with what the pump handles."""
        if self._closed or binding.consumer == self.binding.consumer:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(("rebind", (binding, done)))
        async with asyncio.timeout(10):
            await asyncio.shield(done)

    async def _give_back(self, pulled: Pulled, delay: float = 0.0) -> None:
        """Return a delivery never handed out: redelivered at once (or after ``delay``),
        with the attempt number it would have had."""
        with contextlib.suppress(PrismError, nerr.Error, OSError):
            await self.queue._skip(self.stream, self.options.group, self.binding, pulled.seq)
        await self.queue._publish_quietly(pulled.msg.reply, _nak(delay))

    # The keeper: lease deadlines and in-progress acknowledgements.

    async def _keep(self) -> None:
        next_tick = 0.0
        while not self._closed:
            try:
                now = time.monotonic()
                ack_wait = self.binding.ack_wait
                tick = _tick(ack_wait)
                due = now + (min(tick, PROBE_SECONDS) if self._held_count else tick)
                for seq, lease in list(self._leases.items()):
                    if lease.deadline <= now:  # its lease ran out: deliverable again at once
                        del self._leases[seq]
                        await self.queue._publish_quietly(lease.pulled.msg.reply, b"-NAK")
                        self._changed.set()
                    else:
                        due = min(due, lease.deadline)
                if now >= next_tick:
                    next_tick = now + tick
                    waiting = [*self._buffer, *self._unsorted, *(p for held in self._held.values() for p in held)]
                    waiting += [
                        lease.pulled for lease in self._leases.values() if lease.pulled.touched + ack_wait - 2 * tick < lease.deadline
                    ]
                    for pulled in waiting:
                        await self.queue._publish_quietly(pulled.msg.reply, b"+WPI")
                        pulled.touched = now
                    if self._held or self._unsorted:
                        self._events.put_nowait(("recheck", None))
                    self._changed.set()  # a waiting take may re-request
                if self._held_count:
                    self._changed.set()  # … or probe for a redelivered head
            except Exception:  # never the end of the keeper: leases must still run out
                log.exception("nats queue consumer %s: keeping leases failed", self.id[:8])
                due = time.monotonic() + 0.5
            self._keeper_wake.clear()
            self._keeper_due = due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._keeper_wake.wait()
            self._keeper_due = 0.0  # awake: a lease handed out now wakes it again

    # Leaving.

    async def close(self) -> None:
        # Shielded: a cancelled caller must not cancel NATS round trips half-way (the client
        # then fails on the late answer), nor leave deliveries neither returned nor handed out.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        self._changed.set()
        self._keeper_wake.set()
        try:
            # A pull request cannot be withdrawn: the server forgets it when it expires, or when
            # it next has a message for it and finds nobody subscribed; a redelivery it meant for
            # such a request comes out with its delivery count one short. So what this consumer
            # gives back is redelivered once its requests have expired (PULL_EXPIRES at most).
            #
            # Nor can it be left unheard: the server checks that a request's inbox is
            # subscribed when it picks the request, but sends after, so a message it picked as
            # this consumer unsubscribed was lost until its ack wait (30 s by default) ran out,
            # and messages published while a consumer closes are picked so. So the requests
            # stay subscribed until they expire (``_linger``), giving back what comes.
            now = time.monotonic()
            delay = max((r.expires - now + 0.05 for r in self._requests.values()), default=0.0)
            lingering = [r for r in self._requests.values() if r.subscription is not None]
            self._requests.clear()
            self._events.put_nowait(("stop", None))
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._lingering = True  # synchronously after the pump ended: no delivery falls between
            if lingering:
                self.queue._background_call(self._linger(lingering))
            for kind, item in self._drain_events():
                if kind == "delivery" and (pulled := Pulled.of(item[1])) is not None:
                    if pulled.consumer == self.binding.consumer:
                        self._returning.append(pulled)
            unseen = [*self._returning, *self._buffer, *self._unsorted, *(p for held in self._held.values() for p in held)]
            for pulled in unseen:
                await self._give_back(pulled, delay)
            for lease in self._leases.values():  # acknowledged ones are ignored by the server
                await self.queue._publish_quietly(lease.pulled.msg.reply, _nak(delay))
            for waiting in (self._returning, self._buffer, self._unsorted, self._held, self._leases):
                waiting.clear()
            with contextlib.suppress(nerr.Error, OSError):
                await self.queue.nc.flush(timeout=self.queue.timeout)
            if self._notices is not None:
                with contextlib.suppress(nerr.Error, OSError):
                    await self._notices.unsubscribe()
        finally:
            self.queue._consumers.discard(self)

    async def _linger(self, requests: list[Request]) -> None:
        """Listen on requests the server still holds until they have expired (a second more:
        the server counts from when it read the request, later than it was sent), then give
        back what no other consumer took."""
        try:
            await asyncio.sleep(max(r.expires for r in requests) - time.monotonic() + 1.0)
        finally:
            for request in requests:
                if request.subscription is not None:
                    with contextlib.suppress(nerr.Error, OSError):
                        await request.subscription.unsubscribe()
            for pulled in self.queue._unclaimed(self):
                await self._give_back(pulled)

    def _drain_events(self) -> list[tuple[str, Any]]:
        items = []
        while not self._events.empty():
            items.append(self._events.get_nowait())
        return items
