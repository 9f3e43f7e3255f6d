"""PubSub deliveries encoded once, however many subscribers they reach.

A fan-out offers one :class:`Delivery` to every subscription of the pattern (adapters/pubsub).
Built the obvious way, each subscriber's stream turned it into a ``PubSubMessage`` and
serialized it again: 100 subscribers, 100 encodings of the same message. Here a delivery's
``PubSubMessage`` bytes and JSON are made the first time a subscriber needs them and kept on the
delivery (``Delivery.memo``) for the others, and a ``PubSubMessageBatch`` is its subscription id
and those pieces joined: what protobuf and ``json_codec`` would print for the same message
(``tests/test_pubsub_batches.py`` checks both against them).

An :class:`EncodedBatch` stands for a ``pubsub_pb2.PubSubMessageBatch``: the transports call
``SerializeToString`` (gRPC, gRPC-Web, Connect) or ``to_json`` (SSE, Connect JSON) on it as on a
message, and :meth:`EncodedBatch.as_message` is the message itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from adapters.pubsub.base import Delivery
from app.services.protowire import varint
from app.transports import json_codec
from prism.v1 import pubsub_pb2 as ps

_PROTO, _JSON = "pubsub.proto", "pubsub.json"
_MESSAGES_TAG = b"\x12"  # PubSubMessageBatch.messages: field 2, length-delimited


def fill(message: ps.PubSubMessage, delivery: Delivery) -> None:
    """``message`` set to ``delivery``: what a subscriber receives."""
    message.message_id, message.subject, message.data = delivery.message_id, delivery.subject, delivery.data
    message.headers.update(delivery.headers)
    message.published_at.FromNanoseconds(int(delivery.published_at * 1e9))


def _message(delivery: Delivery) -> ps.PubSubMessage:
    message = ps.PubSubMessage()
    fill(message, delivery)
    return message


def proto_entry(delivery: Delivery) -> bytes:
    """The delivery as one ``messages`` entry of a batch: tag, length, ``PubSubMessage`` bytes."""
    entry = delivery.memo.get(_PROTO)
    if entry is None:
        body = _message(delivery).SerializeToString()
        entry = delivery.memo[_PROTO] = _MESSAGES_TAG + varint(len(body)) + body
    return entry  # type: ignore[no-any-return]


def json_entry(delivery: Delivery) -> bytes:
    """The delivery's ``PubSubMessage`` as ``json_codec`` prints it."""
    entry = delivery.memo.get(_JSON)
    if entry is None:
        entry = delivery.memo[_JSON] = json_codec.to_json(_message(delivery))
    return entry  # type: ignore[no-any-return]


class EncodedBatch:
    """A ``PubSubMessageBatch`` of ``subscription_id`` and ``deliveries``, encoded when a
    transport asks (its message entries shared with every other subscriber's batches)."""

    __slots__ = ("deliveries", "subscription_id")
    DESCRIPTOR = ps.PubSubMessageBatch.DESCRIPTOR

    def __init__(self, subscription_id: str, deliveries: Sequence[Delivery]) -> None:
        self.subscription_id, self.deliveries = subscription_id, deliveries

    @property
    def messages(self) -> Sequence[Delivery]:
        """What the batch holds (each has the ``message_id`` SSE names its event by)."""
        return self.deliveries

    def SerializeToString(self, **_options: Any) -> bytes:
        head = self.subscription_id.encode()
        parts = [b"\x0a", varint(len(head)), head] if head else []  # field 1 (proto3: omitted when empty)
        parts += map(proto_entry, self.deliveries)
        return b"".join(parts)

    def ByteSize(self) -> int:
        return len(self.SerializeToString())

    def to_json(self) -> bytes:
        """Canonical JSON, as ``json_codec.to_json`` prints the batch."""
        head = json.dumps(self.subscription_id, ensure_ascii=False).encode()  # (json_codec prints empty fields too)
        return b'{"subscriptionId":' + head + b',"messages":[' + b",".join(map(json_entry, self.deliveries)) + b"]}"

    def as_message(self) -> ps.PubSubMessageBatch:
        return ps.PubSubMessageBatch.FromString(self.SerializeToString())
