"""NATS core PubSub on the backend instance's one connection: NATS subjects, wildcards and
queue groups are Prism's, so the server does the matching and the sharing.

    subject a.b.c of namespace ns  ──►  <prefix>.ps.<ns escaped>.a.b.c
    pattern a.*.>                  ──►  <prefix>.ps.<ns escaped>.a.*.>   (one NATS subscription,
                                        shared by every subscription of this adapter to it)
    queue group g                  ──►  NATS queue group g, one NATS subscription per member (a
                                        name that is not [A-Za-z0-9_.-]{1,64}: "~" and a digest)

Subscriptions to the same pattern outside queue groups share one NATS subscription (a
:class:`_Fan`): the server sends each message to this process once, it is decoded once, and
offered to every member's own buffer — a fan-out to 100 subscribers costs one NATS message, not
100 (each one parsed, queued and decoded by the client). A queue-group member keeps a NATS
subscription of its own, so the server shares the group's messages among all members of every
instance.

The namespace is one token (``.`` and ``_`` escaped), so namespaces, and gateways with another
``prefix``, never see each other's messages; the Queue's JetStream streams capture
``prismq.<stream>.>`` only, so nothing here is stored — unless the backend keeps PubSub
history (``pubsub_history``: :class:`NatsHistoryPubSub` below, which may replay). Headers
travel as NATS headers: the message id in ``_prism-id``, the publish time in ``_prism-t``, and
the user headers NATS would not carry as they are (a name that is no token or starts
``Nats-``, a value with surrounding spaces or control characters) as one JSON object in
``_prism-h``; a plain NATS client sees the data and the ordinary headers unchanged.

Without history core NATS keeps nothing: a subscriber gets what is published while it is
subscribed, and messages published while the connection reconnects are lost (the client
resubscribes by itself).
Each NATS subscription's callback only offers to its members' buffers, so the client's own
per-subscription queue never fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
import nats.errors as nerr
import nats.js.errors as jerr
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js import JetStreamContext, api

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, FromTime, Overflow, PubSubAdapter, Start, Subscription
from prism.errors import PrismError, invalid_argument

if TYPE_CHECKING:
    from adapters.backends.nats import NatsConnection

ID_HEADER, TIME_HEADER = "_prism-id", "_prism-t"
OTHER_HEADERS = "_prism-h"  # user headers NATS would not carry as they are, as a JSON object
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$%&'*+.^_`|~-]*")  # the client's token alphabet
HEADER_OVERHEAD = len("NATS/1.0\r\n\r\n")
# A NATS protocol line (HPUB/HMSG <subject> ...) holds 4096 bytes by default: 1024 characters
# of a subject may be more bytes than that, and the server would close the shared connection.
MAX_SUBJECT_BYTES = 3968
PLAIN_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def queue_name(group: str) -> str:
    """The NATS queue group of ``group``: NATS takes no whitespace, and a long one would not fit
    the protocol line; "~" never starts a plain one, so the mapping stays one-to-one."""
    if not group or PLAIN_GROUP.fullmatch(group):
        return group
    return "~" + hashlib.sha256(group.encode()).hexdigest()[:40]


def _plain(name: str, value: str) -> bool:
    """Whether NATS carries the header as it is: a token name (not Nats-*, which the server
    reads), a value without surrounding spaces (the client strips them) or control characters."""
    plain_name = PLAIN_NAME.fullmatch(name) is not None and not name.lower().startswith("nats-")
    return plain_name and value == value.strip() and value.isprintable()


def encode_headers(message_id: str, published_at: float, headers: Mapping[str, str]) -> dict[str, str]:
    encoded = {ID_HEADER: message_id, TIME_HEADER: repr(published_at)}
    encoded.update((name, value) for name, value in headers.items() if _plain(name, value))
    if others := {name: value for name, value in headers.items() if not _plain(name, value)}:
        encoded[OTHER_HEADERS] = json.dumps(others)
    return encoded


def decode_headers(raw: Mapping[str, str]) -> dict[str, str]:
    headers = {n: v for n, v in raw.items() if not n.startswith("_") and not n.lower().startswith("nats-")}
    if OTHER_HEADERS in raw:
        headers.update(json.loads(raw[OTHER_HEADERS]))
    return headers


def to_delivery(msg: Msg, cut: int) -> Delivery:
    """A NATS message as a delivery; ``cut`` characters of its subject precede the client's."""
    raw = msg.headers or {}
    try:
        headers = decode_headers(raw)
        published_at = float(raw.get(TIME_HEADER, ""))
    except ValueError:  # published by a plain NATS client into Prism's subjects
        headers, published_at = dict(raw), time.time()
    message_id = raw.get(ID_HEADER) or uuid.uuid4().hex
    return Delivery(message_id, msg.subject[cut:], msg.data, headers, published_at)


class _Fan:
    """One NATS subscription and the subscriptions it feeds. Opening it is a task of its own,
    so a member that gives up while it opens (a cancelled call) neither cancels it for the
    others nor leaves it behind: the last member to leave unsubscribes once it has opened."""

    def __init__(self, adapter: NatsPubSub, key: str | None, subject: str, queue: str, cut: int) -> None:
        self.adapter, self.key, self.cut = adapter, key, cut
        self.members: dict[str, NatsSubscription] = {}
        self.nats: NatsSub | None = None
        self.opening = asyncio.get_running_loop().create_task(self._open(subject, queue))

    @property
    def failed(self) -> bool:
        return self.opening.done() and (self.opening.cancelled() or self.opening.exception() is not None)

    async def _open(self, subject: str, queue: str) -> None:
        connection = self.adapter.connection
        with connection.errors():
            self.nats = await connection.nc.subscribe(subject, queue=queue, cb=self.receive)
            await connection.nc.flush(connection.settings.command_timeout)  # the server has it: live

    async def join(self, member: NatsSubscription) -> None:
        """Feed ``member`` from now on; returns once the NATS subscription is live."""
        self.members[member.id] = member
        await asyncio.shield(self.opening)

    async def leave(self, member: NatsSubscription) -> None:
        self.members.pop(member.id, None)
        if self.members:
            return
        if self.key is not None and self.adapter.fans.get(self.key) is self:
            del self.adapter.fans[self.key]  # the next subscriber opens a new one
        await asyncio.wait([self.opening])
        if self.nats is not None:
            try:
                await self.nats.unsubscribe()
            except nerr.Error:  # closed connection or subscription: nothing left to leave
                pass

    async def receive(self, msg: Msg) -> None:
        """The NATS client's callback: never waits, so its queue for this subscription stays empty."""
        delivery = self.adapter.delivery(msg, self.cut)
        for member in tuple(self.members.values()):
            member.offer(delivery)


class NatsSubscription(Subscription):
    def __init__(self, adapter: NatsPubSub, namespace: str, overflow: Overflow, fan: _Fan) -> None:
        super().__init__(namespace, adapter.buffer_size, overflow)
        self._adapter = adapter
        self._fan = fan

    async def _detach(self) -> None:
        self._adapter.opened.pop(self.id, None)
        await self._fan.leave(self)


class NatsPubSub(PubSubAdapter):
    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED})

    def __init__(self, connection: NatsConnection, buffer_size: int = 1024) -> None:
        self.connection = connection
        self.buffer_size = buffer_size
        self.root = f"{connection.settings.prefix}.ps"  # what is published to
        self.live_root = self.root  # what subscribers listen to
        self.opened: dict[str, Subscription] = {}  # to end them when the adapter closes
        self.fans: dict[str, _Fan] = {}  # NATS subject → the shared subscription (no queue group)

    def _namespace_root(self, namespace: str, root: str | None = None) -> str:
        return f"{root or self.root}.{namespace.replace('_', '_u').replace('.', '_d')}"

    def delivery(self, msg: Msg, cut: int) -> Delivery:
        """A live NATS message as a delivery; ``cut`` characters of its subject precede the client's."""
        return to_delivery(msg, cut)

    def _subject(self, root: str, tokens: tuple[str, ...]) -> str:
        subject = f"{root}.{'.'.join(tokens)}"
        if len(subject.encode()) > MAX_SUBJECT_BYTES:
            raise invalid_argument("subject", f"more UTF-8 bytes than a NATS protocol line carries ({MAX_SUBJECT_BYTES})")
        return subject

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        target = self._subject(self._namespace_root(namespace), subject)
        message_id = uuid.uuid4().hex
        encoded = encode_headers(message_id, time.time(), headers)
        self._check_size(data, encoded)
        with self.connection.errors():
            await self.connection.nc.publish(target, data, headers=encoded)
        return message_id

    def _check_size(self, data: bytes, encoded: Mapping[str, str]) -> None:
        nc = self.connection.nc
        size = len(data) + HEADER_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in encoded.items())
        if size > nc.max_payload:  # the server would close the connection over it
            raise PrismError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"data: above the NATS server's max_payload ({nc.max_payload} bytes with headers)",
                field="data",
                http_status=413,
            )

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,  # no history here: the service passes none (no Capability.REPLAY)
    ) -> Subscription:
        root = self._namespace_root(namespace, self.live_root)
        subject = self._subject(root, pattern)
        key = None if queue_group else subject
        fan = self.fans.get(key) if key is not None else None
        if fan is None or fan.failed:
            fan = _Fan(self, key, subject, queue_name(queue_group), len(root) + 1)
            if key is not None:
                self.fans[key] = fan
        subscription = NatsSubscription(self, namespace, overflow, fan)
        try:
            await fan.join(subscription)
        except BaseException:
            await subscription.close()
            raise
        self.opened[subscription.id] = subscription
        return subscription

    async def close(self) -> None:
        for subscription in list(self.opened.values()):
            await subscription.close()


# --- History: replay from a JetStream stream (the backend's ``pubsub_history``) -------------

STREAM_SUFFIX = "_pubsub"  # the stream <prefix>_pubsub (queue streams are <prefix>_<ns>_s|h…)
SEQUENCE_HEADER = "Nats-Sequence"  # set on what the stream republishes: the stored sequence
TOKEN = re.compile(r"[0-9a-f]{8}")  # what ``_prism-id`` holds with history: the id's check
HISTORY_ID = re.compile(r"(\d{1,20})(?:-([0-9a-f]{8}))?")  # <stream sequence>[-<token>]
HEARTBEAT = 5.0  # seconds: a replay consumer silent twice as long is made again where it was


def history_id(sequence: int, raw: Mapping[str, str]) -> str:
    """A stored message's id: its stream sequence, and the token its publisher gave it (none
    when a plain NATS client published it)."""
    token = raw.get(ID_HEADER, "")
    return f"{sequence}-{token}" if TOKEN.fullmatch(token) else str(sequence)


def history_delivery(msg: Msg, cut: int, sequence: int | None) -> Delivery:
    raw = msg.headers or {}
    try:
        headers = decode_headers(raw)
        published_at = float(raw.get(TIME_HEADER, ""))
    except ValueError:  # published by a plain NATS client into Prism's subjects
        headers = {n: v for n, v in raw.items() if not n.lower().startswith("nats-")}
        published_at = time.time()
    message_id = history_id(sequence, raw) if sequence is not None else uuid.uuid4().hex
    return Delivery(message_id, msg.subject[cut:], msg.data, headers, published_at)


def rfc3339(unix_ns: int) -> str:
    """``unix_ns`` as JetStream reads a start time (UTC, nanoseconds)."""
    seconds, ns = divmod(unix_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{ns:09d}Z"


class NatsReplay(Subscription):
    """A subscription with a start: an ordered consumer of the history stream of its own,
    filtered by its pattern, from its start on; it goes on with what is stored next, so
    replayed and live messages are one sequence (no gap, no repeat). Opening it is a task of
    its own, so a caller that gives up while it opens leaves nothing behind."""

    def __init__(self, adapter: NatsHistoryPubSub, namespace: str, overflow: Overflow, cut: int) -> None:
        super().__init__(namespace, adapter.buffer_size, overflow)
        self._adapter, self._cut = adapter, cut
        self._consumer: JetStreamContext.PushSubscription | None = None
        self.opening: asyncio.Task[None] | None = None

    async def open(self, subject: str, config: api.ConsumerConfig) -> None:
        self.opening = asyncio.get_running_loop().create_task(self._open(subject, config))
        await asyncio.shield(self.opening)

    async def _open(self, subject: str, config: api.ConsumerConfig) -> None:
        connection = self._adapter.connection
        with connection.errors():
            self._consumer = await connection.js.subscribe(
                subject,
                stream=self._adapter.stream,
                cb=self._receive,
                config=config,
                deliver_policy=config.deliver_policy,
                ordered_consumer=True,
                idle_heartbeat=HEARTBEAT,
            )

    async def _receive(self, msg: Msg) -> None:
        """The NATS client's callback: never waits (flow control paces the consumer)."""
        self.offer(history_delivery(msg, self._cut, msg.metadata.sequence.stream))

    async def _detach(self) -> None:
        self._adapter.opened.pop(self.id, None)
        if self.opening is not None:
            await asyncio.wait([self.opening])
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        with contextlib.suppress(nerr.Error, OSError, TimeoutError):  # closed: the server drops it
            await consumer.unsubscribe()
        with contextlib.suppress(nerr.Error, OSError, TimeoutError):  # gone already, or unreachable
            await self._adapter.connection.js.delete_consumer(self._adapter.stream, consumer._consumer)


class NatsHistoryPubSub(NatsPubSub):
    """NATS PubSub keeping history (the backend's ``pubsub_history``): a JetStream stream
    captures every subject of the prefix, so a subscription may start in the past.

        stream     <prefix>_pubsub: subjects <prefix>.ps.>, file storage, limits pubsub_max_age
                   and pubsub_max_bytes (oldest discarded first), republishing each stored
                   message to <prefix>.psr.<the rest> with its sequence (Nats-Sequence)
        publish    a JetStream publish to <prefix>.ps.<ns>.<subject>: answered once stored
        message id "<stream sequence>-<token>": the token (8 hex digits, also in _prism-id)
                   tells an id from one of a stream of the same name made again later
        live       core NATS subscriptions (shared as without history) to what the stream
                   republishes: the id carries the sequence, as a replayed message's does
        replay     an ordered consumer of the stream per subscription (:class:`NatsReplay`),
                   filtered by the pattern: from a time (the time the stream stored a
                   message), or after a message id (from its sequence + 1); it then goes on
                   with what is stored next, so nothing is missed or repeated at the switch

    An id names a place in the stream: ``startAfter`` an id whose message the stream still
    holds resumes after it if its token matches; one already discarded by the limits starts
    with the oldest message held; one the stream never held (a later sequence, another
    token) cannot be placed.
    """

    capabilities = frozenset({*NatsPubSub.capabilities, Capability.REPLAY})

    def __init__(self, connection: NatsConnection, buffer_size: int = 1024) -> None:
        super().__init__(connection, buffer_size)
        self.live_root = f"{connection.settings.prefix}.psr"
        self.stream = f"{connection.settings.prefix}{STREAM_SUFFIX}"

    async def start(self) -> None:
        await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        settings, js = self.connection.settings, self.connection.js
        config = api.StreamConfig(
            name=self.stream,
            description=f"prism pubsub history of {self.root}.>",
            subjects=[f"{self.root}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=settings.pubsub_max_age,  # 0: no limit
            max_bytes=settings.pubsub_max_bytes or -1,
            allow_direct=True,
            republish=api.RePublish(src=f"{self.root}.>", dest=f"{self.live_root}.>"),
        )
        with self.connection.errors():
            try:
                await js.add_stream(config)
            except jerr.BadRequestError:  # there already, with other settings: these now
                try:
                    await js.update_stream(config)
                except jerr.APIError as exc:
                    if exc.code == 503:
                        raise
                    raise PrismError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"nats: cannot keep PubSub history in stream {self.stream}: {exc.description}",
                    ) from exc

    def delivery(self, msg: Msg, cut: int) -> Delivery:
        sequence = (msg.headers or {}).get(SEQUENCE_HEADER, "")
        return history_delivery(msg, cut, int(sequence) if sequence.isdigit() else None)

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        target = self._subject(self._namespace_root(namespace), subject)
        token = uuid.uuid4().hex[:8]
        encoded = encode_headers(token, time.time(), headers)
        encoded[api.Header.EXPECTED_STREAM] = self.stream  # stored there, or refused
        self._check_size(data, encoded)
        with self.connection.errors():
            try:
                ack = await self.connection.js.publish(target, data, headers=encoded)
            except jerr.NoStreamResponseError:  # the stream was deleted: made again
                await self._ensure_stream()
                ack = await self.connection.js.publish(target, data, headers=encoded)
        return f"{ack.seq}-{token}"

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,
    ) -> Subscription:
        config = await self._consumer_config(start) if start is not None else None
        if config is None:  # live (or a cursor this stream cannot place)
            return await super().subscribe(namespace, pattern, queue_group, overflow)
        root = self._namespace_root(namespace)
        subject = self._subject(root, pattern)
        subscription = NatsReplay(self, namespace, overflow, len(root) + 1)
        try:
            await subscription.open(subject, config)
        except BaseException:
            await subscription.close()
            raise
        self.opened[subscription.id] = subscription
        return subscription

    async def _consumer_config(self, start: Start) -> api.ConsumerConfig | None:
        """Where a replay consumer starts; None: live (a cursor that names no place here)."""
        if isinstance(start, FromTime):
            if start.unix_ns <= 0:
                return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
            return api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME,
                opt_start_time=rfc3339(start.unix_ns),  # type: ignore[arg-type]  # passed as it is
            )
        sequence = await self._place(start.message_id)
        if sequence is None:
            if start.required:
                raise invalid_argument(
                    "startAfter",
                    f"{start.message_id!r} is not a message id of this backend's history (<stream sequence>-<token>)",
                )
            return None
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=sequence + 1)

    async def _place(self, message_id: str) -> int | None:
        """The stream sequence of ``message_id``, or None when it names no message this stream
        held (one it held and discarded since still has its place)."""
        found = HISTORY_ID.fullmatch(message_id)
        if found is None:
            return None
        sequence, token = int(found.group(1)), found.group(2) or ""
        if sequence == 0:
            return None
        js = self.connection.js
        with self.connection.errors():
            try:
                stored = await js.get_msg(self.stream, seq=sequence, direct=True)
            except jerr.NotFoundError:
                state = (await js.stream_info(self.stream)).state
                return sequence if sequence < state.first_seq else None  # discarded, or never
        held = (stored.headers or {}).get(ID_HEADER, "")
        return sequence if (held if TOKEN.fullmatch(held) else "") == token else None
