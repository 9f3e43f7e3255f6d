"""PubSubService.SubscribeBatches puts what is ready together into one response.

The conformance suite (tests/conformance/test_pubsub.py) runs SubscribeBatches over every
backend and transport, where a subscriber that keeps up gets one message a response; here the
service runs over the in-process broker with messages waiting before the stream is read, which
is what a subscriber that is behind (a burst, a fan-out) sees.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from adapters.pubsub.memory import MemoryPubSub
from app.services.pubsub import PubSubService
from app.settings import Limits
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
