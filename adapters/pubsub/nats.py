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
``prismq.<stream>.>`` only, so nothing here is stored. Headers travel as NATS headers: the
message id in ``_prism-id``, the publish time in ``_prism-t``, and the user headers NATS would
not carry as they are (a name that is no token or starts ``Nats-``, a value with surrounding
spaces or control characters) as one JSON object in ``_prism-h``; a plain NATS client sees
the data and the ordinary headers unchanged.

Core NATS keeps nothing: a subscriber gets what is published while it is subscribed, and
messages published while the connection reconnects are lost (the client resubscribes by itself).
Each NATS subscription's callback only offers to its members' buffers, so the client's own
per-subscription queue never fills.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
import nats.errors as nerr
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, Overflow, PubSubAdapter, Start, Subscription
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
        delivery = to_delivery(msg, self.cut)
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
        self.root = f"{connection.settings.prefix}.ps"
        self.opened: dict[str, NatsSubscription] = {}  # to end them when the adapter closes
        self.fans: dict[str, _Fan] = {}  # NATS subject → the shared subscription (no queue group)

    def _namespace_root(self, namespace: str) -> str:
        return f"{self.root}.{namespace.replace('_', '_u').replace('.', '_d')}"

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
        nc = self.connection.nc
        size = len(data) + HEADER_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in encoded.items())
        if size > nc.max_payload:  # the server would close the connection over it
            raise PrismError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"data: above the NATS server's max_payload ({nc.max_payload} bytes with headers)",
                field="data",
                http_status=413,
            )
        with self.connection.errors():
            await nc.publish(target, data, headers=encoded)
        return message_id

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,  # no history here: the service passes none (no Capability.REPLAY)
    ) -> Subscription:
        root = self._namespace_root(namespace)
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
