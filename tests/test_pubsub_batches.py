"""PubSubService.SubscribeBatches puts what is ready together into one response.

The conformance suite (tests/conformance/test_pubsub.py) runs SubscribeBatches over every
backend and transport, where a subscriber that keeps up gets one message a response; here the
service runs over the in-process broker with messages waiting before the stream is read, which
is what a subscriber that is behind (a burst, a fan-out) sees.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.pubsub.base import Delivery
from adapters.pubsub.memory import MemoryPubSub
from app.services.pubsub import PubSubService
from app.services.pubsub_batches import EncodedBatch, fill
from app.settings import Limits
from app.transports import json_codec
from prism.v1 import config_pb2
from prism.v1 import pubsub_pb2 as ps


class _Sessions:
    async def stream_opened(self, stream_id: str, session_id: str) -> None: ...

    async def stream_closed(self, stream_id: str) -> None: ...


def _call() -> Any:
    session = SimpleNamespace(session_id="s", hold_stream=lambda stream_id, closer: None, release_stream=lambda stream_id: None)
    return SimpleNamespace(config=config_pb2.ClientConfig(namespace="n"), session=session)


async def test_waiting_messages_come_in_batches_of_at_most_max_batch_in_order() -> None:
    broker = MemoryPubSub()
    service = PubSubService(SimpleNamespace(for_pubsub=lambda config: broker), Limits(), _Sessions())  # type: ignore[arg-type]
    stream = service.SubscribeBatches(ps.PubSubSubscribeRequest(subject="orders.>", max_batch=16), _call())
    try:
        first = await anext(stream)
        assert first.subscription_id and not first.messages  # live
        ids = [await broker.publish("n", ("orders", str(i)), str(i).encode(), {"h": "v"}) for i in range(50)]
        batches = [await anext(stream) for _ in range(4)]
    finally:
        await stream.aclose()
    assert [len(b.messages) for b in batches] == [16, 16, 16, 2]
    got = [m for b in batches for m in b.messages]
    assert [m.message_id for m in got] == ids
    assert [(m.subject, m.data, dict(m.headers)) for m in got[:2]] == [("orders.0", b"0", {"h": "v"}), ("orders.1", b"1", {"h": "v"})]
    assert {b.subscription_id for b in batches} == {first.subscription_id}


_text = st.text(max_size=12)
_deliveries = st.builds(
    Delivery,
    message_id=_text,
    subject=_text,
    data=st.binary(max_size=24),
    headers=st.dictionaries(_text, _text, max_size=3),
    published_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(subscription_id=_text, deliveries=st.lists(_deliveries, max_size=5), again=st.integers(0, 2))
def test_an_encoded_batch_is_what_protobuf_and_json_codec_print(subscription_id: str, deliveries: list[Delivery], again: int) -> None:
    """Each delivery is encoded once and shared: the batch's bytes and JSON are the message's,
    for the first subscriber and for those after it (``again``: batches encoded before)."""
    expected = ps.PubSubMessageBatch(subscription_id=subscription_id)
    for delivery in deliveries:
        fill(expected.messages.add(), delivery)
    for _ in range(again + 1):
        batch = EncodedBatch(subscription_id, deliveries)
        assert batch.SerializeToString() == expected.SerializeToString()
        assert batch.as_message() == expected
        assert batch.to_json() == json_codec.to_json(expected)
        assert len({id(d.memo.get("pubsub.proto")) for d in deliveries}) == len(deliveries)  # one encoding each, kept
