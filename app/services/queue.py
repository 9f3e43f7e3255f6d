"""QueueService: requests checked here (names, sizes, options, capabilities), delivery by any
Queue adapter (``adapters/queue/base.py`` says what every backend guarantees).

Each RPC maps to one adapter call. Subscribe is a consumer of the session's namespace for as
long as the stream is open: the client leaving, or its session ending, closes the consumer,
and its unacknowledged deliveries go straight back to the group. Acknowledge, Nack, Commit and Seek
name the group and the message ids, not the stream, so any worker process may serve them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from adapters.capabilities import Capability
from adapters.queue.base import (
    NAME,
    NO_HEADERS,
    AtOffset,
    ConsumeOptions,
    Consumer,
    Delivery,
    Entry,
    Published,
    QueueAdapter,
    SeekTarget,
    Start,
    at_time,
)
from app import metrics
from app.pipeline import Call
from app.services.capabilities import require
from app.settings import Limits
from app.tracing import Tracing
from prism.errors import PrismError, invalid_argument, prefixed, too_large
from prism.v1 import config_pb2
from prism.v1 import queue_pb2 as q

# The adapter behind a session's configuration (``Backends.for_queue``).
QueueAdapters = Callable[[config_pb2.ClientConfig], QueueAdapter]

MAX_KEY_BYTES = 1024
MAX_TOKEN_CHARS = 256
MAX_MESSAGE_ID_CHARS = 256
MAX_HEADERS = 64
MAX_HEADER_BYTES = 64 * 1024  # names and values of one entry together
MAX_WATCHED = 256  # (namespace, topic, group) triples a worker samples for the queue gauges
# Header names every backend carries as they are (NATS headers are HTTP-like: no ':' or space).
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")
DEFAULT_ACK_DEADLINE, MIN_ACK_DEADLINE, MAX_ACK_DEADLINE = 30.0, 0.1, 3600.0
# The same range as the JSON mapping spells a Duration, for the OpenAPI document.
ACK_DEADLINE_PATTERN = (
    r"^(?:0\.[1-9][0-9]{0,8}|[1-9][0-9]{0,2}(?:\.[0-9]{1,9})?|[12][0-9]{3}(?:\.[0-9]{1,9})?"
    r"|3[0-5][0-9]{2}(?:\.[0-9]{1,9})?|3600(?:\.0{1,9})?)s$"
)
DEFAULT_MAX_IN_FLIGHT = 100
DEFAULT_MAX_BATCH = 100  # SubscribeBatches: messages in one response, at most
MAX_LINGER_MS = 1000  # SubscribeBatches: the longest a deliverable message waits for others
START = {
    q.START_POSITION_UNSPECIFIED: Start.COMMITTED,
    q.START_POSITION_COMMITTED: Start.COMMITTED,
    q.START_POSITION_EARLIEST: Start.EARLIEST,
    q.START_POSITION_LATEST: Start.LATEST,
}


def check_name(name: str, field: str) -> str:
    if not NAME.fullmatch(name):
        raise invalid_argument(field, "must be 1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return name


def _fill(message: q.QueueMessage, delivery: Delivery) -> q.QueueMessage:
    """``message`` (new, or a batch's next entry) set to ``delivery``, once per delivered
    message: field by field, the map and the timestamp too, which costs half of passing them to
    the constructor and ``FromNanoseconds``."""
    message.message_id, message.topic, message.payload = delivery.message_id, delivery.topic, delivery.payload
    message.partition, message.offset, message.partition_key = delivery.partition, delivery.offset, delivery.partition_key
    message.delivery_attempt = delivery.delivery_attempt
    if delivery.headers:
        message.headers.update(delivery.headers)
    published = message.published_at
    published.seconds, published.nanos = divmod(delivery.published_ns, 1_000_000_000)
    return message


async def _lingered(consumer: Consumer, wanted: int, linger: float) -> list[Delivery]:
    """Up to ``wanted`` more deliveries that ``consumer`` hands out within ``linger`` seconds.
    A take cut short by the timeout hands out nothing (``Consumer.take``)."""
    more: list[Delivery] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(linger):
            while len(more) < wanted and (taken := await consumer.take(wanted - len(more))):
                more += taken
    return more


class QueueService:
    SERVICE = "prism.v1.QueueService"

    def __init__(self, queues: QueueAdapters, limits: Limits, tracing: Tracing | None = None) -> None:
        self.queues = queues
        self.limits = limits
        self.tracing = tracing  # on: a published message carries the trace to its consumers
        # Topics (and groups) used through this worker lately, for the depth and lag gauges.
        self.watched: OrderedDict[tuple[str, str, str], QueueAdapter] = OrderedDict()

    def _watch(self, queue: QueueAdapter, namespace: str, topic: str, group: str) -> None:
        """Remember a (namespace, topic, group) for app/gauges.py; the least recently used
        goes beyond MAX_WATCHED, so clients cannot grow the gauges' label sets without bound."""
        key = (namespace, topic, group)
        if key in self.watched:
            self.watched.move_to_end(key)
            return
        self.watched[key] = queue
        if len(self.watched) > MAX_WATCHED:
            self.watched.popitem(last=False)

    def _traced(self, entry: Entry) -> Entry:
        """The entry with the current trace in its headers (a client's own trace headers win)."""
        if self.tracing is None:
            return entry
        headers = dict(entry.headers)
        self.tracing.inject(headers)
        return dataclasses.replace(entry, headers=headers)

    def _queue(self, call: Call) -> tuple[QueueAdapter, str]:
        return self.queues(call.config), call.config.namespace

    def _entry(self, queue: QueueAdapter, call: Call, entry: q.QueueEntry, at: str | int) -> Entry:
        """The entry as the adapter takes it; refusals name the field as ``at`` + its name
        (an int: the entry's index in a batch, ``entries[2].``)."""
        payload, key = entry.payload, entry.partition_key
        # Once per published message: the usual entry (no headers, no token, a key short
        # enough in characters to be short enough in bytes) needs no more looking at, and
        # shares one empty header mapping.
        if (
            len(payload) <= self.limits.max_value_bytes
            and len(key) <= MAX_KEY_BYTES // 4
            and not entry.headers
            and not entry.idempotency_token
        ):
            plain = Entry(payload, key, NO_HEADERS)
            return plain if self.tracing is None else self._traced(plain)
        if isinstance(at, int):
            at = f"entries[{at}]."
        if len(entry.payload) > self.limits.max_value_bytes:
            raise too_large(f"{at}payload", len(entry.payload), self.limits.max_value_bytes)
        if len(entry.partition_key.encode()) > MAX_KEY_BYTES:
            raise invalid_argument(f"{at}partitionKey", f"longer than {MAX_KEY_BYTES} bytes")
        if len(entry.headers) > MAX_HEADERS:
            raise invalid_argument(f"{at}headers", f"{len(entry.headers)} headers, above the maximum of {MAX_HEADERS}")
        size = 0
        for name, value in sorted(entry.headers.items()):
            if not HEADER_NAME.fullmatch(name):
                raise invalid_argument(f"{at}headers[{name}]", "a header name is 1 to 256 of A-Z a-z 0-9 . _ -")
            if any(c in value for c in "\r\n\x00"):
                raise invalid_argument(f"{at}headers[{name}]", "a header value cannot hold CR, LF or NUL")
            size += len(name) + len(value.encode())
        if size > MAX_HEADER_BYTES:
            raise invalid_argument(f"{at}headers", f"{size} bytes, above the maximum of {MAX_HEADER_BYTES}")
        if entry.idempotency_token:
            if len(entry.idempotency_token) > MAX_TOKEN_CHARS:
                raise invalid_argument(f"{at}idempotencyToken", f"longer than {MAX_TOKEN_CHARS} characters")
            require(queue, Capability.IDEMPOTENT_PUBLISH, call, f"{at}idempotencyToken")
        return self._traced(Entry(entry.payload, entry.partition_key, dict(entry.headers), entry.idempotency_token))

    async def Publish(self, request: q.QueuePublishRequest, call: Call) -> q.QueuePublishResponse:
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        entry = self._entry(queue, call, request.entry, "entry.")
        try:
            published = await queue.publish_one(namespace, topic, entry)
        except PrismError as exc:
            raise prefixed(exc, "entry.") from None
        metrics.PUBLISHED.labels("queue", namespace).inc()
        self._watch(queue, namespace, topic, "")
        return q.QueuePublishResponse(
            message_id=published.message_id, partition=published.partition, offset=published.offset
        )

    async def PublishBatch(self, request: q.PublishBatchRequest, call: Call) -> q.PublishBatchResponse:
        """One result per entry, in order; an entry refused (bad field, reused token) fails on
        its own and the others are stored. A backend outage fails the call."""
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        if len(request.entries) > self.limits.max_batch_keys:
            raise invalid_argument(
                "entries", f"{len(request.entries)} entries, above the maximum of {self.limits.max_batch_keys}"
            )
        refused: dict[int, PrismError] = {}
        valid: list[Entry] = []
        for i, raw in enumerate(request.entries):
            try:
                valid.append(self._entry(queue, call, raw, i))
            except PrismError as exc:
                refused[i] = exc
        stored = iter(await queue.publish(namespace, topic, valid) if valid else [])
        response = q.PublishBatchResponse()
        add, stored_count = response.results.add, 0
        for i in range(len(valid) + len(refused)):
            outcome = refused[i] if i in refused else next(stored)
            if isinstance(outcome, Published):
                stored_count += 1
                add(message_id=outcome.message_id, partition=outcome.partition, offset=outcome.offset)
            else:
                failed = outcome if i in refused else prefixed(outcome, f"entries[{i}].")
                add().status.CopyFrom(failed.to_status())
        metrics.PUBLISHED.labels("queue", namespace).inc(stored_count)
        self._watch(queue, namespace, topic, "")
        return response

    def _options(self, queue: QueueAdapter, call: Call, request: q.QueueSubscribeRequest) -> ConsumeOptions:
        ack_deadline = DEFAULT_ACK_DEADLINE
        if request.HasField("ack_deadline"):
            ack_deadline = request.ack_deadline.ToNanoseconds() / 1e9
            if not MIN_ACK_DEADLINE <= ack_deadline <= MAX_ACK_DEADLINE:
                raise invalid_argument(
                    "ackDeadline", f"must be between {MIN_ACK_DEADLINE:g}s and {MAX_ACK_DEADLINE:g}s"
                )
        cap = self.limits.stream_buffer
        max_in_flight = request.max_in_flight or min(DEFAULT_MAX_IN_FLIGHT, cap)
        if not 0 < max_in_flight <= cap:
            raise invalid_argument("maxInFlight", f"must be between 1 and {cap} (0: {min(DEFAULT_MAX_IN_FLIGHT, cap)})")
        if request.start not in START:
            raise invalid_argument("start", f"unknown start position {request.start}")
        attempts, dead_letter_topic = request.max_delivery_attempts, request.dead_letter_topic
        if attempts < 0:
            raise invalid_argument("maxDeliveryAttempts", "must not be negative (0: redeliver without limit)")
        if attempts and not dead_letter_topic:
            raise invalid_argument("deadLetterTopic", "is required with maxDeliveryAttempts")
        if dead_letter_topic and not attempts:
            raise invalid_argument("maxDeliveryAttempts", "is required with deadLetterTopic")
        if dead_letter_topic:
            check_name(dead_letter_topic, "deadLetterTopic")
            if dead_letter_topic == request.topic:
                raise invalid_argument("deadLetterTopic", "must differ from the topic")
            require(queue, Capability.DEAD_LETTER, call, "maxDeliveryAttempts")
        return ConsumeOptions(
            group=check_name(request.consumer_group, "consumerGroup"),
            start=START[request.start],
            ack_deadline=ack_deadline,
            max_in_flight=max_in_flight,
            max_delivery_attempts=attempts,
            dead_letter_topic=dead_letter_topic,
        )

    async def Subscribe(self, request: q.QueueSubscribeRequest, call: Call) -> AsyncIterator[q.QueueMessage]:
        if request.max_batch:
            raise invalid_argument("maxBatch", "is for SubscribeBatches; Subscribe sends one message a response")
        if request.linger_ms:
            raise invalid_argument("lingerMs", "is for SubscribeBatches; Subscribe sends each message at once")
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        options = self._options(queue, call, request)
        async with aclosing(self._deliveries(queue, namespace, topic, options, call, 1)) as deliveries:
            async for (delivery,) in deliveries:
                yield _fill(q.QueueMessage(), delivery)

    async def SubscribeBatches(
        self, request: q.QueueSubscribeRequest, call: Call
    ) -> AsyncIterator[q.QueueMessageBatch]:
        """Subscribe's deliveries, what is ready together in one response: a consumer that is
        behind reads a backlog at a client's cost per response, not per message."""
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        options = self._options(queue, call, request)
        cap = self.limits.stream_buffer
        if not 0 <= request.max_batch <= cap:
            raise invalid_argument("maxBatch", f"must be between 1 and {cap} (0: {DEFAULT_MAX_BATCH})")
        if not 0 <= request.linger_ms <= MAX_LINGER_MS:
            raise invalid_argument("lingerMs", f"must be between 0 and {MAX_LINGER_MS}")
        limit = min(request.max_batch or DEFAULT_MAX_BATCH, options.max_in_flight)
        linger = request.linger_ms / 1000
        async with aclosing(self._deliveries(queue, namespace, topic, options, call, limit, linger)) as deliveries:
            async for taken in deliveries:
                batch = q.QueueMessageBatch()
                add = batch.messages.add
                for delivery in taken:
                    _fill(add(), delivery)
                yield batch

    async def _deliveries(
        self,
        queue: QueueAdapter,
        namespace: str,
        topic: str,
        options: ConsumeOptions,
        call: Call,
        most: int,
        linger: float = 0.0,
    ) -> AsyncIterator[list[Delivery]]:
        """A consumer in ``options.group`` for as long as the stream is read: what it has ready,
        up to ``most`` at a time (with ``linger`` seconds, also what it hands out that much
        longer). Closing this (the client left) closes the consumer at once, so its
        unacknowledged deliveries go back to the group now."""
        assert call.session is not None
        consumer = await queue.consume(namespace, topic, options)
        ended_by: list[PrismError] = []  # the session's status, when closing or expiring it ended this

        async def end(status: PrismError | None) -> None:
            if status is not None:
                ended_by.append(status)
            await consumer.close()

        call.session.hold_stream(consumer.id, end)
        delivered, redelivered = metrics.DELIVERED.labels("queue", namespace), metrics.REDELIVERED.labels(namespace)
        self._watch(queue, namespace, topic, options.group)
        try:
            while taken := await consumer.take(most):
                if linger and len(taken) < most:
                    taken += await _lingered(consumer, most - len(taken), linger)
                delivered.inc(len(taken))
                if again := sum(delivery.delivery_attempt > 1 for delivery in taken):
                    redelivered.inc(again)
                if self.tracing is not None:  # a CONSUMER span in the publisher's trace
                    for delivery in taken:
                        self.tracing.consumed(f"{topic} receive", delivery.headers, {
                            "messaging.system": "prism", "messaging.destination.name": topic,
                            "messaging.message.id": delivery.message_id,
                        })  # fmt: skip
                yield taken
            if ended_by:  # not a clean end: the client must open a new session
                raise ended_by[0]
        finally:
            call.session.release_stream(consumer.id)
            # Even when the client's cancellation is what ends this: the group gets its
            # unacknowledged messages back now, not after their deadlines.
            await asyncio.shield(consumer.close())

    def _message_ids(self, ids: list[str]) -> list[str]:
        if len(ids) > self.limits.max_batch_keys:
            raise invalid_argument("messageIds", f"{len(ids)} ids, above the maximum of {self.limits.max_batch_keys}")
        for i, message_id in enumerate(ids):
            if not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS:
                raise invalid_argument(f"messageIds[{i}]", f"must be 1 to {MAX_MESSAGE_ID_CHARS} characters")
        return ids

    async def Acknowledge(self, request: q.AcknowledgeRequest, call: Call) -> q.AcknowledgeResponse:
        """``acknowledged``: how many of the ids were delivered to the group and not yet
        acknowledged; unknown or already acknowledged ids are no error (a retry is harmless)."""
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        group = check_name(request.consumer_group, "consumerGroup")
        count = await queue.acknowledge(namespace, topic, group, self._message_ids(list(request.message_ids)))
        metrics.ACKNOWLEDGED.labels(namespace).inc(count)
        return q.AcknowledgeResponse(acknowledged=count)

    async def Nack(self, request: q.NackRequest, call: Call) -> q.NackResponse:
        """``nacked``: how many of the ids were delivered to the group and not yet
        acknowledged; each is deliverable again now, with the next delivery attempt (counting
        toward ``maxDeliveryAttempts``). Unknown or acknowledged ids are no error."""
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        group = check_name(request.consumer_group, "consumerGroup")
        ids = self._message_ids(list(request.message_ids))
        return q.NackResponse(nacked=await queue.negative_acknowledge(namespace, topic, group, ids))

    @staticmethod
    def _partition(partition: int) -> int:
        if partition < 0:
            raise invalid_argument("partition", "must not be negative")
        return partition

    async def Commit(self, request: q.CommitRequest, call: Call) -> q.CommitResponse:
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        group = check_name(request.consumer_group, "consumerGroup")
        if request.offset < 0:
            raise invalid_argument("offset", "must not be negative")
        await queue.commit(namespace, topic, group, self._partition(request.partition), request.offset)
        return q.CommitResponse()

    async def Seek(self, request: q.SeekRequest, call: Call) -> q.SeekResponse:
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        group = check_name(request.consumer_group, "consumerGroup")
        partition = self._partition(request.partition)
        target: SeekTarget
        match request.WhichOneof("target"):
            case "offset":
                if request.offset < 0:
                    raise invalid_argument("offset", "must not be negative")
                target = AtOffset(request.offset)
            case "timestamp":
                require(queue, Capability.SEEK_TIMESTAMP, call, "timestamp")
                target = at_time(request.timestamp.ToNanoseconds())
            case "position":
                if request.position not in START or request.position == q.START_POSITION_UNSPECIFIED:
                    raise invalid_argument("position", "must be EARLIEST, LATEST or COMMITTED")
                target = START[request.position]
            case _:
                raise invalid_argument("target", "one of offset, timestamp or position is required")
        offset = await queue.seek(namespace, topic, group, partition, target)
        return q.SeekResponse(offset=offset)

    async def GetTopicInfo(self, request: q.GetTopicInfoRequest, call: Call) -> q.GetTopicInfoResponse:
        queue, namespace = self._queue(call)
        topic = check_name(request.topic, "topic")
        group = check_name(request.consumer_group, "consumerGroup") if request.consumer_group else ""
        response = q.GetTopicInfoResponse(topic=topic)
        for info in await queue.topic_info(namespace, topic, group):
            response.partitions.add(
                partition=info.partition,
                low_offset=info.low_offset,
                high_offset=info.high_offset,
                committed_offset=info.committed_offset,
                lag=info.lag,
            )
        return response
