"""QueueService refuses what its backend does not declare: FAILED_PRECONDITION naming the
capability and the field that needs it, before the adapter is asked.

The conformance suite (tests/conformance/test_queue.py) checks the same refusals on any real
backend that lacks a capability; every built-in queue backend declares them all, so this runs
the service over a SQLite adapter declaring none of them.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from adapters.backends.sqlite import PRAGMAS
from adapters.capabilities import Capability
from adapters.queue.sqlite import SqliteQueue
from adapters.sqlite_worker import SqliteWorker
from app.services.queue import ACK_DEADLINE_PATTERN, QueueService
from app.settings import Limits
from prism.errors import PrismError
from prism.v1 import config_pb2
from prism.v1 import queue_pb2 as q


class BareQueue(SqliteQueue):
    """SQLite storage, declaring only what every queue backend must do."""

    capabilities = frozenset({Capability.DURABLE, Capability.SHARED})


@pytest.fixture
async def service(tmp_path: pathlib.Path) -> AsyncIterator[tuple[QueueService, Any]]:
    worker = SqliteWorker(tmp_path / "bare.db", PRAGMAS)
    await worker.start()
    queue = BareQueue(worker)
    await queue.start()
    call = SimpleNamespace(
        config=config_pb2.ClientConfig(namespace="n", backend=config_pb2.BackendConfig(instance="bare")), session=None
    )
    yield QueueService(lambda config: queue, Limits()), call
    await queue.close()
    await worker.close()


def assert_refused_for(error: PrismError, capability: str, field: str) -> None:
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
    assert error.message == f"{field}: backend 'bare' lacks {capability}", error.message


async def test_an_idempotency_token_needs_idempotent_publish(service: tuple[QueueService, Any]) -> None:
    queues, call = service
    entry = q.QueueEntry(payload=b"x", idempotency_token="t")
    with pytest.raises(PrismError) as caught:
        await queues.Publish(q.QueuePublishRequest(topic="t", entry=entry), call)
    assert_refused_for(caught.value, "idempotent_publish", "entry.idempotencyToken")
    batch = await queues.PublishBatch(q.PublishBatchRequest(topic="t", entries=[q.QueueEntry(payload=b"ok"), entry]), call)
    assert batch.results[0].status.code == 0 and batch.results[0].message_id, "the other entry is stored"
    assert batch.results[1].status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert batch.results[1].status.message == "entries[1].idempotencyToken: backend 'bare' lacks idempotent_publish"


async def test_a_dead_letter_topic_needs_dead_letter(service: tuple[QueueService, Any]) -> None:
    queues, call = service
    request = q.QueueSubscribeRequest(topic="t", consumer_group="g", max_delivery_attempts=3, dead_letter_topic="t.dead")
    with pytest.raises(PrismError) as caught:
        await anext(queues.Subscribe(request, call))
    assert_refused_for(caught.value, "dead_letter", "maxDeliveryAttempts")


async def test_seeking_to_a_time_needs_seek_timestamp(service: tuple[QueueService, Any]) -> None:
    queues, call = service
    await queues.Publish(q.QueuePublishRequest(topic="t", entry=q.QueueEntry(payload=b"x")), call)
    request = q.SeekRequest(topic="t", consumer_group="g", timestamp=timestamp_pb2.Timestamp(seconds=1))
    with pytest.raises(PrismError) as caught:
        await queues.Seek(request, call)
    assert_refused_for(caught.value, "seek_timestamp", "timestamp")
    offset = await queues.Seek(q.SeekRequest(topic="t", consumer_group="g", position=q.START_POSITION_EARLIEST), call)
    assert offset.offset == 0, "seeking to an offset or a position needs no capability"


@pytest.mark.parametrize(
    "text",
    ["0.1s", "0.100s", "0.09s", "0.099999999s", "0s", "1s", "1.5s", "30s", "999.999s", "1000s", "3599.999999999s",
     "3600s", "3600.000s", "3600.001s", "3601s", "10000s", "-1s"],
)
async def test_the_ack_deadline_pattern_is_the_check(service: tuple[QueueService, Any], text: str) -> None:
    """The OpenAPI document's pattern for ackDeadline accepts exactly what Subscribe accepts."""
    queues, call = service
    deadline = json_format.Parse(json.dumps(text), duration_pb2.Duration())
    request = q.QueueSubscribeRequest(topic="t", consumer_group="g", ack_deadline=deadline)
    try:
        queues._options(queues.queues(call.config), call, request)
        accepted = True
    except PrismError as error:
        assert error.field == "ackDeadline", error
        accepted = False
    assert bool(re.match(ACK_DEADLINE_PATTERN, text)) == accepted, text
