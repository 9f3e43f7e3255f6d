"""Issue 11: a gateway killed with SIGKILL in the middle of consumption loses no acknowledged
publish. Per Queue backend of the conformance suite (``BACKENDS`` of
``tests/conformance/test_queue.py``, so a backend added there is crash-tested too), through a
real ``prism serve`` process and grpcio, as an application would use it:

1. PublishBatch 10,000 messages, 100 per call; every entry the gateway reports stored is an
   *acknowledged publish* (its message id is recorded).
2. A member of one consumer group subscribes from the earliest offset and acknowledges what it
   receives in batches, several Acknowledge calls in flight at once.
3. Once ``KILL_AT`` messages have arrived, the process serving the gateway (the one named by
   ``prism_worker_info`` on /metrics) is killed with SIGKILL, the stream open and
   acknowledgements in flight: no shutdown code, no consumer close, no flush.
4. A new gateway starts on the same configuration and data directory; the group subscribes
   again and consumes until every acknowledged publish has been delivered, and every message
   delivered before the kill whose acknowledgement was never sent has been delivered again
   (at-least-once is about the consumer too: it may have failed to process them).

Duplicates are allowed (at-least-once): they are counted, printed (``pytest -s``) and recorded
in the test's report (``user_properties``: ``--junitxml`` writes them with junit_family=legacy).
A message whose Acknowledge was answered before the kill must not come again (contract rule 3).
Why a kill of its own rather than the conformance suite's restart: a SIGTERM runs the adapters'
close, which gives leases back and flushes connections; a crash does none of it, and the
backend must cope on its own.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from adapters.capabilities import Capability
from prism.v1 import queue_pb2 as q
from tests.clients import CallError, GrpcClient
from tests.conformance.test_queue import (
    BACKENDS,
    CONFIG_OF,
    NAMESPACE,
    QS,
    QUEUE_CONFIG,
    SERVERS,
    UNREACHABLE,
    Topic,
    capabilities,
    kafka_running,  # noqa: F401 (autouse: the broker the tests start runs before any gateway does)
    open_topic,
    require,
    seconds,
)
from tests.gateway_process import start_gateway
from tests.kafka_broker import kafka_broker  # noqa: F401 (the fixture kafka_running asks for)
from tests.servers import purge_namespaces

MESSAGES = 10_000
BATCH = 100  # entries per PublishBatch
KILL_AT = 4_000  # deliveries before the kill: 40%, well into consumption
ACK_DEADLINE = 5.0  # seconds; the killed consumer's leases run out this long after its last delivery
MAX_IN_FLIGHT = 500  # unacknowledged deliveries per stream
ACKS_IN_FLIGHT = 4  # concurrent Acknowledge calls
STALL = 20.0  # seconds without a delivery while some are still owed: fail, naming what is missing
PHASE_BUDGET = 45.0  # seconds for each gateway's share of the consumption
GROUP = "crash"


@pytest.fixture(scope="module", autouse=True)
async def purge_afterwards() -> AsyncIterator[None]:
    """This module's topics live in the conformance suite's namespace of this run: remove it."""
    yield
    await purge_namespaces([b for b in SERVERS if b not in UNREACHABLE], [NAMESPACE])


@dataclass
class Ledger:
    """Everything the client knows: what was stored, delivered, and acknowledged."""

    published: set[str] = field(default_factory=set)  # message ids of acknowledged publishes
    deliveries: Counter[str] = field(default_factory=Counter)  # message id → times delivered
    before: set[str] = field(default_factory=set)  # delivered by the killed gateway
    after: set[str] = field(default_factory=set)  # delivered by the restarted one
    acked: set[str] = field(default_factory=set)  # Acknowledge answered
    unanswered: set[str] = field(default_factory=set)  # Acknowledge sent, killed before the answer
    max_attempt: int = 0

    def owed(self) -> set[str]:
        """Delivered before the kill and never acknowledged: must come again."""
        return self.before - self.acked - self.unanswered

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.deliveries.values())


async def publish(topic: Topic, ledger: Ledger) -> None:
    for start in range(0, MESSAGES, BATCH):
        entries = [q.QueueEntry(payload=f"m{i}".encode()) for i in range(start, start + BATCH)]
        response = await topic.call("PublishBatch", q.PublishBatchRequest(topic=topic.name, entries=entries))
        ledger.published.update(r.message_id for r in response.results if r.status.code == 0)


async def consume(
    topic: Topic,
    ledger: Ledger,
    done: Callable[[], bool],
    crash: Callable[[], object] | None = None,
) -> None:
    """One member of the group until ``done()``; with ``crash``, until the stream breaks after
    ``crash()`` has killed the gateway at the KILL_AT-th delivery. Deliveries are acknowledged
    in batches (whatever arrived while the last batch was read), ACKS_IN_FLIGHT calls at once."""
    request = q.QueueSubscribeRequest(
        topic=topic.name,
        consumer_group=GROUP,
        start=q.START_POSITION_EARLIEST,
        ack_deadline=seconds(ACK_DEADLINE),
        max_in_flight=MAX_IN_FLIGHT,
    )
    phase = ledger.before if crash else ledger.after
    inbox: asyncio.Queue[q.QueueMessage | BaseException] = asyncio.Queue()

    async def read() -> None:
        try:
            async for message in topic.client.stream(QS + "Subscribe", request, topic.token):
                inbox.put_nowait(message)  # type: ignore[arg-type]
            inbox.put_nowait(EOFError("the stream ended"))
        except Exception as exc:
            inbox.put_nowait(exc)

    crashed = False

    async def acknowledge(ids: list[str]) -> None:
        try:
            await topic.call(
                "Acknowledge", q.AcknowledgeRequest(topic=topic.name, consumer_group=GROUP, message_ids=ids)
            )
        except CallError:
            if not crashed:
                raise
            ledger.unanswered.update(ids)
        else:
            ledger.acked.update(ids)

    reader = asyncio.create_task(read())
    acks: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + PHASE_BUDGET
    try:
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not done after {PHASE_BUDGET}s: {progress(ledger)}")
            try:
                first = await asyncio.wait_for(inbox.get(), STALL)
            except TimeoutError:
                raise AssertionError(f"no delivery for {STALL}s: {progress(ledger)}") from None
            batch = [first] + [inbox.get_nowait() for _ in range(inbox.qsize())]
            messages = [m for m in batch if isinstance(m, q.QueueMessage)]
            for message in messages:
                ledger.deliveries[message.message_id] += 1
                ledger.max_attempt = max(ledger.max_attempt, message.delivery_attempt)
                phase.add(message.message_id)
            if messages and not crashed:
                while len(acks) >= ACKS_IN_FLIGHT:
                    await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(acknowledge([m.message_id for m in messages]))
                acks.add(task)
                task.add_done_callback(acks.discard)
            if crash is not None and not crashed and len(ledger.before) >= KILL_AT:
                await asyncio.sleep(0)  # the acknowledgement just made is on the wire
                crashed = True
                crash()  # nothing is acknowledged after this: those deliveries are owed
            if errors := [e for e in batch if isinstance(e, BaseException)]:
                if crashed:
                    return  # the stream broke with its gateway: expected
                raise AssertionError(f"the stream failed before the kill: {errors[0]!r}")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        results = await asyncio.gather(*acks, return_exceptions=True)
        if failed := [r for r in results if isinstance(r, BaseException)]:
            raise failed[0]


def progress(ledger: Ledger) -> str:
    missing = ledger.published - ledger.deliveries.keys()
    owed = ledger.owed() - ledger.after
    return (
        f"{len(ledger.deliveries)} of {len(ledger.published)} delivered; missing e.g. {sorted(missing)[:5]} "
        f"({len(missing)}); owed again e.g. {sorted(owed)[:5]} ({len(owed)})"
    )


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_sigkill_mid_consumption_loses_no_acknowledged_publish(
    backend: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    require(CONFIG_OF[backend])
    ledger, name = Ledger(), f"crash-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()

    gateway = start_gateway(tmp_path, config_yaml=QUEUE_CONFIG)
    client = GrpcClient(gateway.grpc_target)
    try:
        topic = (await open_topic(client, CONFIG_OF[backend])).topic(name)
        claims = await capabilities(client, topic.backend)
        async with asyncio.timeout(PHASE_BUDGET):
            await publish(topic, ledger)
        published_s = time.monotonic() - started
        assert len(ledger.published) == MESSAGES, "every entry of a healthy gateway is stored"
        pid = gateway.serving_pid()
        await consume(topic, ledger, done=lambda: False, crash=functools.partial(gateway.crash, pid))
    finally:
        await client.close()
        gateway.stop()  # nothing left to stop unless the test failed before the kill
    killed_s = time.monotonic() - started

    gateway = start_gateway(tmp_path, config_yaml=QUEUE_CONFIG)
    client = GrpcClient(gateway.grpc_target)
    try:
        topic = (await open_topic(client, CONFIG_OF[backend])).topic(name)
        if not claims & {Capability.DURABLE, Capability.SHARED}:
            # Kept in the killed process: the topic went with it, and the backend says so.
            with pytest.raises(CallError) as gone:
                await topic.call("GetTopicInfo", q.GetTopicInfoRequest(topic=name))
            assert gone.value.code == "NOT_FOUND"
            request.node.user_properties.append(("verdict", "neither durable nor shared: gone, as claimed"))
            return
        owed, acked_before = ledger.owed(), set(ledger.acked)
        await consume(
            topic, ledger, done=lambda: ledger.published <= ledger.deliveries.keys() and owed <= ledger.after
        )
    finally:
        await client.close()
        gateway.stop()

    assert not ledger.published - ledger.deliveries.keys(), progress(ledger)
    assert owed <= ledger.after, progress(ledger)
    # Contract rule 3 (adapters/queue/base.py): an answered Acknowledge is stored, crash or not.
    assert not acked_before & ledger.after, (
        f"acknowledged, then delivered again: {sorted(acked_before & ledger.after)[:5]}"
    )
    figures = {
        "published": len(ledger.published),
        "delivered_before_kill": len(ledger.before),
        "acknowledged_before_kill": len(acked_before),
        "acknowledgements_cut_by_kill": len(ledger.unanswered),
        "owed_after_kill": len(owed),
        "delivered_after_restart": len(ledger.after),
        "deliveries": sum(ledger.deliveries.values()),
        "duplicates": ledger.duplicates(),
        "acknowledged_then_redelivered": len(acked_before & ledger.after),
        "max_delivery_attempt": ledger.max_attempt,
        "publish_s": round(published_s, 1),
        "until_kill_s": round(killed_s - published_s, 1),
        "total_s": round(time.monotonic() - started, 1),
    }
    # In the test's report (user_properties: plugins, --junitxml with junit_family=legacy) and on screen (-s).
    request.node.user_properties.extend(figures.items())
    print(f"\n[queue crash] {backend}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
