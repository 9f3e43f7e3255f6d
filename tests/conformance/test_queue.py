"""Queue conformance: every backend behind a QUEUE config passes every case, through the
public API of a real `prism serve` process — gRPC for most cases, REST with server-sent events
and gRPC-Web where the transport is the point (a round trip on each, acknowledgement by
message id over REST, an SSE stream resumed with Last-Event-ID).

The semantics are those of ``adapters/queue/base.py``; ``test_queue_adapter.py`` checks them
against the adapters directly. Each test works on topics of its own, under a namespace of this
run. A case of a capability a backend does not declare (``seek_timestamp``, ``dead_letter``,
``idempotent_publish``, ``shared``, ``durable``) checks the clean refusal instead:
FAILED_PRECONDITION naming the capability, or for ``shared``/``durable`` the honest absence.
``test_claimed_capabilities_are_the_ones_exercised`` ties the claims to the cases (Dapr's
"claimed → must pass").

Adding a backend is one entry in ``BACKENDS`` (and, for a server, its address in ``SERVERS``
so the suite skips it when the server is down — a failure in CI).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from prism.v1 import plugin_pb2, session_pb2
from prism.v1 import queue_pb2 as q
from tests.clients import CallError, GrpcClient, GrpcWebClient, RestClient
from tests.conftest import make_client
from tests.gateway_process import GatewayProcess, start_gateway
from tests.kafka_broker import KAFKA_BOOTSTRAP, kafka_broker  # noqa: F401 (a fixture)
from tests.kafka_broker import unavailable as kafka_unavailable
from tests.servers import NATS_URL, POSTGRES_DSN, REDIS_URL, purge_namespaces, unreachable

# Backend name → its entry in the suite's server configuration. One QUEUE config per backend.
BACKENDS: dict[str, str] = {
    "sqlite": "{type: sqlite}",
    "postgres": f'{{type: postgres, dsn: "{POSTGRES_DSN}"}}',
    "nats": f'{{type: nats, url: "{NATS_URL}"}}',
    "redis": f'{{type: redis, url: "{REDIS_URL}"}}',
    # The broker the tests start (tests/kafka_broker.py), on a port chosen at import.
    "kafka": f'{{type: kafka, bootstrap_servers: "{KAFKA_BOOTSTRAP}"}}',
}
SERVERS: dict[str, str] = {  # backend → the server's URL, when it has one (checked before the run)
    "postgres": POSTGRES_DSN,
    "nats": NATS_URL,
    "redis": REDIS_URL,
}
CONFIG_OF = {backend: f"queue-{backend}" for backend in BACKENDS}
CONFIGS = list(CONFIG_OF.values())
BACKEND_OF = {config: backend for backend, config in CONFIG_OF.items()}
MATRIX = ("Queue", {**BACKEND_OF, **{b: b for b in BACKENDS}})  # for tests/conformance/conftest.py

RUN = uuid.uuid4().hex[:8]
NAMESPACE = f"queue-{RUN}"
UNREACHABLE = {b: why for b, url in SERVERS.items() if (why := unreachable(url))}
if why_not_kafka := kafka_unavailable():  # no broker to start here
    UNREACHABLE["kafka"] = why_not_kafka

# Capabilities whose cases run for every backend that declares them, and whose refusal (or
# honest absence) is checked on every backend that does not.
CHECKED_CAPABILITIES = {"seek_timestamp", "dead_letter", "idempotent_publish", "shared", "durable"}

QS = "/prism.v1.QueueService/"
WAIT = 10.0  # seconds; bound on every wait for something that must happen
QUIET = 0.5  # seconds a subscriber is watched to show that nothing is delivered
DEADLINE = 0.4  # a short ack deadline, in seconds


def server_config() -> str:
    lines = ["backends:"]
    lines += [f"  {name}: {spec}" for name, spec in BACKENDS.items() if name not in UNREACHABLE]
    # Sessions in the data directory: a second gateway on the same directory (another process)
    # accepts this gateway's session tokens.
    lines += ["sessions: {store: sqlite}", "configs:"]
    lines += [
        f"  - {{name: {config}, pattern: QUEUE, backend: {backend}, namespace: {NAMESPACE}}}"
        for backend, config in CONFIG_OF.items()
        if backend not in UNREACHABLE
    ]
    return "\n".join(lines) + "\n"


QUEUE_CONFIG = server_config()


def require(config: str) -> None:
    """Skip (a failure under PRISM_REQUIRE_BACKENDS=1) when the backend's server is down."""
    if BACKEND_OF[config] in UNREACHABLE:
        pytest.skip(UNREACHABLE[BACKEND_OF[config]])


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


Client = GrpcClient | RestClient | GrpcWebClient


class Subscriber:
    """One Subscribe stream, read in the background so a test can also show that nothing
    arrives (waiting on the stream itself would cancel it)."""

    def __init__(self, topic: Topic, client: Client, request: q.QueueSubscribeRequest, batched: bool = False) -> None:
        self.topic, self.group = topic, request.consumer_group
        rpc = "SubscribeBatches" if batched else "Subscribe"
        self.stream: AsyncIterator[Message] = client.stream(QS + rpc, request, topic.token)  # type: ignore[assignment]
        self.batched = batched
        self.batch_sizes: list[int] = []  # SubscribeBatches: messages in each response
        self.inbox: asyncio.Queue[q.QueueMessage | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.stream:
                if self.batched:
                    self.batch_sizes.append(len(response.messages))  # type: ignore[attr-defined]
                    for message in response.messages:  # type: ignore[attr-defined]
                        self.inbox.put_nowait(message)
                else:
                    self.inbox.put_nowait(response)  # type: ignore[arg-type]
            self.inbox.put_nowait(StopAsyncIteration())
        except Exception as exc:
            self.inbox.put_nowait(exc)

    async def next(self) -> q.QueueMessage:
        item = await asyncio.wait_for(self.inbox.get(), WAIT)
        if isinstance(item, BaseException):
            raise item
        return item

    async def take(self, count: int) -> list[q.QueueMessage]:
        return [await self.next() for _ in range(count)]

    async def drain(self, count: int) -> list[q.QueueMessage]:
        """``count`` messages, each acknowledged as it arrives (a key's next waits for that)."""
        got = []
        for _ in range(count):
            got.append(await self.next())
            assert await self.topic.ack(self.group, got[-1]) == 1
        return got

    async def nothing(self, seconds: float = QUIET) -> None:
        try:
            item = await asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected delivery or end: {item}")

    async def joined(self) -> Subscriber:
        """Once the group has a position on every partition (the server has joined it)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.task.done() and not self.inbox.empty():
                await self.next()  # the stream was refused: raise why
            try:
                info = await self.topic.info(self.group)
                if info.partitions and all(p.committed_offset >= 0 for p in info.partitions):
                    return self
            except CallError as exc:
                assert exc.code == "NOT_FOUND", exc
            await asyncio.sleep(0.02)
        raise AssertionError("the subscriber never joined its group")

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Topic:
    """A session on one QUEUE config and a topic private to the test, with the streams opened."""

    def __init__(self, client: Client, token: str, config: str, backend: str, name: str = "") -> None:
        self.client, self.token, self.config, self.backend = client, token, config, backend
        self.name = name or f"t{uuid.uuid4().hex[:10]}"
        self.subscribers: list[Subscriber] = []

    def topic(self, name: str) -> Topic:
        """Another topic in the same session."""
        return Topic(self.client, self.token, self.config, self.backend, name)

    async def call(self, rpc: str, request: Message) -> Any:
        return await self.client.call(QS + rpc, request, self.token)

    async def refused(self, rpc: str, request: Message) -> CallError:
        with pytest.raises(CallError) as caught:
            await self.call(rpc, request)
        return caught.value

    async def publish(self, payload: bytes = b"", key: str = "", token: str = "", **headers: str) -> q.QueuePublishResponse:
        entry = q.QueueEntry(payload=payload, partition_key=key, headers=headers, idempotency_token=token)
        return await self.call("Publish", q.QueuePublishRequest(topic=self.name, entry=entry))

    async def publish_all(self, *payloads: bytes, key: str = "") -> list[q.PublishResult]:
        entries = [q.QueueEntry(payload=p, partition_key=key) for p in payloads]
        results = (await self.call("PublishBatch", q.PublishBatchRequest(topic=self.name, entries=entries))).results
        assert all(r.status.code == 0 for r in results), results
        return list(results)

    def subscribe(self, group: str, client: Client | None = None, batched: bool = False, **options: Any) -> Subscriber:
        request = q.QueueSubscribeRequest(topic=self.name, consumer_group=group, **options)
        subscriber = Subscriber(self, client or self.client, request, batched)
        self.subscribers.append(subscriber)
        return subscriber

    async def ack(self, group: str, *messages: Any) -> int:
        request = q.AcknowledgeRequest(topic=self.name, consumer_group=group, message_ids=[m.message_id for m in messages])
        return (await self.call("Acknowledge", request)).acknowledged

    async def commit(self, group: str, partition: int, offset: int) -> None:
        await self.call("Commit", q.CommitRequest(topic=self.name, consumer_group=group, partition=partition, offset=offset))

    async def seek(self, group: str, partition: int, **target: Any) -> int:
        request = q.SeekRequest(topic=self.name, consumer_group=group, partition=partition, **target)
        return (await self.call("Seek", request)).offset

    async def info(self, group: str = "") -> q.GetTopicInfoResponse:
        return await self.call("GetTopicInfo", q.GetTopicInfoRequest(topic=self.name, consumer_group=group))

    async def partition(self, partition: int, group: str = "") -> q.PartitionInfo:
        (found,) = [p for p in (await self.info(group)).partitions if p.partition == partition]
        return found

    async def close(self) -> None:
        for subscriber in self.subscribers:
            await subscriber.close()


async def open_topic(client: Client, config: str) -> Topic:
    response = await client.call(
        "/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config)
    )
    return Topic(client, response.token, config, response.session.config.backend.instance)  # type: ignore[attr-defined]


async def capabilities(client: Client, backend: str) -> set[str]:
    info = await client.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
    (entry,) = [b for b in info.backends if b.name == backend and b.pattern == "QUEUE"]  # type: ignore[attr-defined]
    return set(entry.capabilities)


def payloads(messages: list[q.QueueMessage]) -> list[bytes]:
    return [m.payload for m in messages]


async def until(condition: Callable[[], bool], changed: asyncio.Event) -> None:
    """Until ``condition()`` holds (checked whenever ``changed`` is set), or WAIT passed: the
    assertions after it say what was missing."""

    async def watch() -> None:
        while not condition():  # no await between the check and clear(): no change is lost
            changed.clear()
            await changed.wait()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watch(), WAIT)


@pytest.fixture(scope="module", autouse=True)
def kafka_running(request: pytest.FixtureRequest) -> None:
    """The Kafka broker runs before any gateway of this module starts (the tests start it)."""
    if "kafka" not in UNREACHABLE:
        request.getfixturevalue("kafka_broker")


@pytest.fixture(scope="module", autouse=True)
async def purge_afterwards() -> AsyncIterator[None]:
    """Delete the run's namespace from the servers when the module is done."""
    yield
    await purge_namespaces([b for b in SERVERS if b not in UNREACHABLE], [NAMESPACE])


@pytest.fixture(scope="module")
def queue_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("queue-conformance"), config_yaml=QUEUE_CONFIG)
    yield process
    process.stop()


@pytest.fixture(params=CONFIGS)
async def topic(request: pytest.FixtureRequest, queue_gateway: GatewayProcess, client_factory) -> AsyncIterator[Topic]:
    require(request.param)
    made = await open_topic(client_factory("grpc", queue_gateway), request.param)
    yield made
    await made.close()


def refused_for_lack_of(error: CallError, capability: str, request: pytest.FixtureRequest) -> None:
    assert error.code == "FAILED_PRECONDITION", error
    assert capability in error.message, error
    request.node.user_properties.append(("verdict", "refused"))


# --- Publish -----------------------------------------------------------------------------------


@pytest.mark.case("publish")
async def test_publish_answers_partition_offset_and_message_id(topic: Topic) -> None:
    first = await topic.publish(b"a", key="k")
    second = await topic.publish(b"b", key="k")
    assert second.partition == first.partition, "one key, one partition"
    assert second.offset == first.offset + 1
    assert first.message_id and first.message_id != second.message_id
    partition = await topic.partition(first.partition)
    assert (partition.low_offset, partition.high_offset) == (0, 2)


@pytest.mark.case("publish")
async def test_batch_reports_each_entry_and_an_entry_fails_on_its_own(topic: Topic) -> None:
    entries = [
        q.QueueEntry(payload=b"0", partition_key="k"),
        q.QueueEntry(payload=b"bad", headers={"bad name": "x"}),
        q.QueueEntry(payload=b"2", partition_key="k"),
        q.QueueEntry(payload=b"bad", headers={"ok": "line\nbreak"}),
        q.QueueEntry(payload=b"4", partition_key="k"),
    ]
    response = await topic.call("PublishBatch", q.PublishBatchRequest(topic=topic.name, entries=entries))
    results = list(response.results)
    assert [r.status.code for r in results] == [0, 3, 0, 3, 0]  # 3: INVALID_ARGUMENT
    assert results[1].status.message.startswith("entries[1].headers[bad name]:")
    assert results[3].status.message.startswith("entries[3].headers[ok]:")
    assert [r.offset for r in (results[0], results[2], results[4])] == [0, 1, 2]
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST)
    assert payloads(await subscriber.drain(3)) == [b"0", b"2", b"4"]


@pytest.mark.case("idempotent_publish")
async def test_a_retried_publish_with_its_token_is_stored_once(topic: Topic, request: pytest.FixtureRequest) -> None:
    if "idempotent_publish" not in await capabilities(topic.client, topic.backend):
        refused_for_lack_of(
            await topic.refused(
                "Publish", q.QueuePublishRequest(topic=topic.name, entry=q.QueueEntry(payload=b"x", idempotency_token="t"))
            ),
            "idempotent_publish",
            request,
        )
        return
    first = await topic.publish(b"once", key="k", token="retry-1")
    again = await topic.publish(b"once", key="k", token="retry-1")
    assert (again.message_id, again.partition, again.offset) == (first.message_id, first.partition, first.offset)
    reused = await topic.refused(
        "Publish", q.QueuePublishRequest(topic=topic.name, entry=q.QueueEntry(payload=b"other", idempotency_token="retry-1"))
    )
    assert reused.code == "ALREADY_EXISTS" and reused.message.startswith("entry.idempotencyToken:"), reused
    batch = await topic.call(
        "PublishBatch",
        q.PublishBatchRequest(
            topic=topic.name,
            entries=[
                q.QueueEntry(payload=b"once", partition_key="k", idempotency_token="retry-1"),
                q.QueueEntry(payload=b"new", partition_key="k", idempotency_token="retry-2"),
            ],
        ),
    )
    assert batch.results[0].message_id == first.message_id
    assert sum(p.high_offset for p in (await topic.info()).partitions) == 2, "stored once"


# --- Round trip, on every transport ---------------------------------------------------------------


@pytest.mark.case("round trip")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web"])
async def test_messages_round_trip_on_every_transport(
    topic: Topic, queue_gateway: GatewayProcess, client_factory, transport: str
) -> None:
    """Publish, Subscribe (a gRPC stream, server-sent events, a gRPC-Web stream) and
    Acknowledge all over one transport."""
    client = client_factory(transport, queue_gateway)
    here = (await open_topic(client, topic.config)).topic(topic.name)
    bodies = [b"", bytes(range(256)), "ключ 🙂".encode()]
    before = time.time()
    sent = [await here.publish(body, key="k/ключ", trace="t-1", tenant="ключ") for body in bodies]
    subscriber = here.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30))
    try:
        received = await subscriber.drain(len(bodies))
    finally:
        await here.close()
    assert payloads(received) == bodies
    for message, published in zip(received, sent, strict=True):
        assert (message.message_id, message.partition, message.offset) == (
            published.message_id, published.partition, published.offset,
        )
        assert (message.topic, message.partition_key, message.delivery_attempt) == (topic.name, "k/ключ", 1)
        assert dict(message.headers) == {"trace": "t-1", "tenant": "ключ"}
        assert before - 1 <= message.published_at.ToNanoseconds() / 1e9 <= time.time() + 1


@pytest.mark.case("round trip")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web"])
async def test_subscribe_batches_delivers_a_backlog_in_batches_on_every_transport(
    topic: Topic, queue_gateway: GatewayProcess, client_factory, transport: str
) -> None:
    """SubscribeBatches: a backlog arrives each message once, in offset order per partition, in
    fewer responses than messages and none above ``max_batch``; acknowledging them settles
    every one. (No partition key: a key's next message would wait for the previous one's
    acknowledgement.)"""
    client = client_factory(transport, queue_gateway)
    here = (await open_topic(client, topic.config)).topic(topic.name)
    bodies = [str(i).encode() for i in range(250)]
    for start in range(0, len(bodies), 100):
        await here.publish_all(*bodies[start : start + 100])
    subscriber = here.subscribe("g", batched=True, start=q.START_POSITION_EARLIEST, max_batch=40, max_in_flight=250)
    try:
        received = await subscriber.take(len(bodies))
        assert sorted(payloads(received), key=int) == bodies
        for partition in {m.partition for m in received}:
            offsets = [m.offset for m in received if m.partition == partition]
            assert offsets == sorted(offsets), partition
        assert await here.ack("g", *received) == len(bodies)
        await subscriber.nothing()
    finally:
        await here.close()
    assert sum(subscriber.batch_sizes) == len(bodies)
    assert max(subscriber.batch_sizes) <= 40 and len(subscriber.batch_sizes) < len(bodies), subscriber.batch_sizes


@pytest.mark.case("round trip")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web"])
async def test_subscribe_batches_linger_waits_for_more_messages(
    topic: Topic, queue_gateway: GatewayProcess, client_factory, transport: str
) -> None:
    """``lingerMs``: a deliverable message waits up to that long for others before its response
    goes. Ten messages published one call after another arrive in one response (``maxBatch``
    of them: sent then, not at the linger's end); a message with nothing after it goes when the
    linger runs out, never before."""
    client = client_factory(transport, queue_gateway)
    here = (await open_topic(client, topic.config)).topic(topic.name)
    subscriber = await here.subscribe("g", batched=True, max_batch=10, linger_ms=1000).joined()
    try:
        sent = [str(i).encode() for i in range(10)]
        for body in sent:
            await here.publish(body)
        received = await subscriber.take(len(sent))
        assert sorted(payloads(received), key=int) == sent
        assert subscriber.batch_sizes == [10], subscriber.batch_sizes
        started = time.monotonic()
        await here.publish(b"late")
        (late,) = await subscriber.take(1)
        assert late.payload == b"late"
        assert time.monotonic() - started >= 0.95, "sent before the linger ran out"
        assert subscriber.batch_sizes == [10, 1], subscriber.batch_sizes
        assert await here.ack("g", *received, late) == len(sent) + 1
    finally:
        await here.close()


# --- Order --------------------------------------------------------------------------------------


@pytest.mark.case("order per key")
async def test_a_key_s_messages_arrive_in_order_across_the_group(topic: Topic) -> None:
    """Three members acknowledge as they receive; each key's messages arrive in publish order,
    each once, though the keys spread over the members."""
    log: list[tuple[int, q.QueueMessage]] = []
    changed = asyncio.Event()
    members = [topic.subscribe("g", start=q.START_POSITION_EARLIEST, max_in_flight=4) for _ in range(3)]

    async def work(index: int, member: Subscriber) -> None:
        while True:
            message = await member.next()
            log.append((index, message))
            changed.set()
            await topic.ack("g", message)

    workers = [asyncio.create_task(work(i, m)) for i, m in enumerate(members)]
    try:
        keys = ["k0", "k1", "k2", "k3"]
        entries = [q.QueueEntry(payload=str(i).encode(), partition_key=keys[i % 4]) for i in range(40)]
        await topic.call("PublishBatch", q.PublishBatchRequest(topic=topic.name, entries=entries))
        await until(lambda: len(log) >= 40, changed)
        assert len({m.message_id for _, m in log}) == 40 == len(log), "each message once"
        for key in keys:
            sequence = [int(m.payload) for _, m in log if m.partition_key == key]
            assert sequence == sorted(sequence), (key, sequence)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


@pytest.mark.case("order per key")
async def test_a_key_waits_for_its_unacknowledged_message(topic: Topic) -> None:
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(DEADLINE), max_in_flight=10)
    await topic.publish_all(b"a0", b"a1", key="a")
    first = await subscriber.next()
    assert first.payload == b"a0"
    again = await subscriber.next()  # a1 waited; a0 came back after its deadline
    assert (again.payload, again.delivery_attempt) == (b"a0", 2)
    await topic.ack("g", again)
    assert (await subscriber.next()).payload == b"a1"


# --- At-least-once ------------------------------------------------------------------------------


@pytest.mark.case("at-least-once")
async def test_unacknowledged_is_redelivered_after_its_deadline_acknowledged_never(topic: Topic) -> None:
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(DEADLINE))
    await topic.publish(b"kept", key="a")
    await topic.publish(b"done", key="b")
    first = {m.payload: m for m in await subscriber.take(2)}
    started = time.monotonic()
    assert await topic.ack("g", first[b"done"]) == 1
    again = await subscriber.next()
    assert (again.payload, again.message_id, again.delivery_attempt) == (b"kept", first[b"kept"].message_id, 2)
    assert time.monotonic() - started >= DEADLINE * 0.8
    assert await topic.ack("g", again) == 1
    assert await topic.ack("g", again) == 0, "a repeated acknowledgement counts nothing"
    await subscriber.nothing(DEADLINE * 2)
    await topic.publish(b"sentinel", key="b")
    assert (await subscriber.next()).payload == b"sentinel"


@pytest.mark.case("at-least-once")
async def test_acknowledge_over_rest_by_message_id(topic: Topic, queue_gateway: GatewayProcess) -> None:
    """What a browser does: the message id from the stream, POSTed as JSON."""
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(DEADLINE))
    await topic.publish(b"m", key="k")
    message = await subscriber.next()
    async with httpx.AsyncClient(base_url=queue_gateway.base_url, timeout=WAIT) as http:
        response = await http.post(
            f"/v1/topics/{topic.name}:acknowledge",
            json={"consumerGroup": "g", "messageIds": [message.message_id, "no-such-id"]},
            headers={"x-prism-session": topic.token},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"acknowledged": 1}
    await subscriber.nothing(DEADLINE * 2)  # not redelivered after its deadline
    assert (await topic.partition(message.partition, "g")).lag == 0


@pytest.mark.case("at-least-once")
async def test_nack_gives_a_message_back_at_once_with_the_next_attempt(topic: Topic, queue_gateway: GatewayProcess) -> None:
    """A negative acknowledgement (gRPC, then REST by message id) ends the lease now, not at
    the 30 s deadline; a nack after the acknowledgement counts nothing."""
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30))
    await topic.publish(b"m", key="k")
    first = await subscriber.next()
    started = time.monotonic()
    nack = q.NackRequest(topic=topic.name, consumer_group="g", message_ids=[first.message_id, "no-such-id"])
    assert (await topic.call("Nack", nack)).nacked == 1
    second = await subscriber.next()
    assert (second.message_id, second.delivery_attempt) == (first.message_id, 2)
    async with httpx.AsyncClient(base_url=queue_gateway.base_url, timeout=WAIT) as http:
        response = await http.post(
            f"/v1/topics/{topic.name}:nack",
            json={"consumerGroup": "g", "messageIds": [second.message_id]},
            headers={"x-prism-session": topic.token},
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"nacked": 1}
        third = await subscriber.next()
        assert (third.message_id, third.delivery_attempt) == (first.message_id, 3)
        assert time.monotonic() - started < 10, "not after the 30 s deadline"
        assert await topic.ack("g", third) == 1
        assert (await topic.call("Nack", nack)).nacked == 0, "an acknowledged message is not given back"
    await subscriber.nothing()


@pytest.mark.case("disconnect")
@pytest.mark.parametrize("batched", [False, True], ids=["Subscribe", "SubscribeBatches"])
async def test_a_leaving_subscriber_s_messages_go_to_the_group_at_once(topic: Topic, batched: bool) -> None:
    leaving = topic.subscribe("g", batched=batched, start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30), max_in_flight=2)
    await topic.publish_all(b"1", b"2", b"3")
    held = await leaving.take(2)
    staying = topic.subscribe("g", ack_deadline=seconds(30))
    started = time.monotonic()
    await leaving.close()  # the client goes away without acknowledging
    received = await staying.take(3)
    assert time.monotonic() - started < 5, "not after the 30 s deadline"
    assert sorted(payloads(received)) == [b"1", b"2", b"3"]
    attempt = {m.message_id: m.delivery_attempt for m in received}
    assert [attempt[m.message_id] for m in held] == [2, 2]


@pytest.mark.case("disconnect")
async def test_sse_reconnect_with_last_event_id_resumes_the_group(topic: Topic, queue_gateway: GatewayProcess) -> None:
    """An EventSource reconnects with Last-Event-ID after a dropped connection. The group
    keeps the place: what was acknowledged never comes back, what was delivered and not
    acknowledged comes again (the drop released it at once), and then what is new."""
    url = f"/v1/topics/{topic.name}:subscribe"
    query = {"consumerGroup": "browser", "start": "START_POSITION_EARLIEST", "ackDeadline": "30s", "prism_session": topic.token}
    await topic.publish_all(b"0", b"1", b"2")

    async def events(http: httpx.AsyncClient, count: int, last_event_id: str = "") -> list[tuple[str, dict[str, Any]]]:
        headers = {"accept": "text/event-stream", **({"last-event-id": last_event_id} if last_event_id else {})}
        got: list[tuple[str, dict[str, Any]]] = []
        async with http.stream("GET", url, params=query, headers=headers, timeout=None) as response:
            assert response.status_code == 200
            event_id = ""
            async for line in response.aiter_lines():  # ids too, which sse_events leaves out
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    got.append((event_id, json.loads(line[5:])))
                    if len(got) == count:
                        return got
        return got

    async with httpx.AsyncClient(base_url=queue_gateway.base_url, timeout=WAIT) as http:
        first = await asyncio.wait_for(events(http, 3), WAIT)
        assert all(event_id == data["messageId"] for event_id, data in first), "an event's id is its message id"
        by_payload = {base64.b64decode(data["payload"]): event_id for event_id, data in first}
        assert await topic.ack("browser", q.QueuePublishResponse(message_id=by_payload[b"0"])) == 1
        await topic.publish(b"3")
        resumed = await asyncio.wait_for(events(http, 3, last_event_id=first[-1][0]), WAIT)
    again = {base64.b64decode(data["payload"]): data["deliveryAttempt"] for _, data in resumed}
    assert set(again) == {b"1", b"2", b"3"}, "0 was acknowledged"
    assert (again[b"1"], again[b"2"]) == (2, 2)


@pytest.mark.case("disconnect")
async def test_closing_the_session_ends_its_streams_and_returns_their_messages(
    topic: Topic, queue_gateway: GatewayProcess, client_factory
) -> None:
    other = await open_topic(client_factory("grpc", queue_gateway), topic.config)
    mine = other.topic(topic.name)
    leaving = mine.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30))
    await topic.publish(b"m")
    held = await leaving.next()
    await other.client.call("/prism.v1.SessionService/CloseSession", session_pb2.CloseSessionRequest(), other.token)
    with pytest.raises(CallError) as ended:
        await leaving.next()
    assert ended.value.code == "UNAUTHENTICATED", ended.value
    again = await topic.subscribe("g", ack_deadline=seconds(30)).next()
    assert (again.message_id, again.delivery_attempt) == (held.message_id, 2)
    await mine.close()


# --- Consumer groups ----------------------------------------------------------------------------


@pytest.mark.case("consumer groups")
async def test_a_group_shares_a_topic_and_every_group_gets_everything(topic: Topic) -> None:
    workers = [topic.subscribe("workers", start=q.START_POSITION_EARLIEST, max_in_flight=2) for _ in range(2)]
    auditor = topic.subscribe("auditors", start=q.START_POSITION_EARLIEST)
    sent = {r.message_id for r in await topic.publish_all(*[str(i).encode() for i in range(20)])}
    got: dict[str, list[str]] = {"workers": [], "auditors": []}
    per_worker = [0, 0]
    changed = asyncio.Event()

    async def work(group: str, member: Subscriber, index: int) -> None:
        while True:
            message = await member.next()
            got[group].append(message.message_id)
            if index >= 0:
                per_worker[index] += 1
            changed.set()
            await topic.ack(group, message)

    tasks = [asyncio.create_task(work("workers", w, i)) for i, w in enumerate(workers)]
    tasks.append(asyncio.create_task(work("auditors", auditor, -1)))
    try:
        await until(lambda: len(got["workers"]) >= 20 and len(got["auditors"]) >= 20, changed)
        assert sorted(got["workers"]) == sorted(sent), "each message to exactly one worker"
        assert sorted(got["auditors"]) == sorted(sent), "the other group got everything"
        assert min(per_worker) > 0, per_worker
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.case("consumer groups")
async def test_a_new_group_starts_at_the_latest_offset_unless_asked_for_the_earliest(topic: Topic) -> None:
    await topic.publish(b"old", key="k")
    default = await topic.subscribe("default").joined()
    earliest = topic.subscribe("earliest", start=q.START_POSITION_EARLIEST)
    await topic.publish(b"new", key="k")
    assert payloads(await default.drain(1)) == [b"new"]
    assert payloads(await earliest.drain(2)) == [b"old", b"new"]


@pytest.mark.case("max in flight")
async def test_max_in_flight_bounds_unacknowledged_deliveries(topic: Topic) -> None:
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30), max_in_flight=3)
    await topic.publish_all(*[str(i).encode() for i in range(6)])
    first = await subscriber.take(3)
    await subscriber.nothing()
    assert await topic.ack("g", first[0]) == 1
    await subscriber.take(1)
    await subscriber.nothing()


@pytest.mark.case("max in flight")
async def test_a_batch_never_holds_more_than_max_in_flight(topic: Topic) -> None:
    await topic.publish_all(*[b"m"] * 30)
    subscriber = topic.subscribe("g", batched=True, start=q.START_POSITION_EARLIEST, max_in_flight=7)
    first = await subscriber.take(7)
    await subscriber.nothing()  # every lease is handed out and none acknowledged
    assert subscriber.batch_sizes and max(subscriber.batch_sizes) <= 7
    assert await topic.ack("g", *first) == 7
    await subscriber.take(7)


# --- Commit and seek ----------------------------------------------------------------------------


@pytest.mark.case("commit")
async def test_after_commit_a_new_subscriber_resumes_after_the_committed_offset(topic: Topic) -> None:
    results = await topic.publish_all(*[str(i).encode() for i in range(6)], key="k")
    partition = results[0].partition
    reader = topic.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30))
    assert (await reader.next()).payload == b"0"  # held, never acknowledged
    await topic.commit("g", partition, 3)
    info = await topic.partition(partition, "g")
    assert (info.committed_offset, info.lag) == (3, 3)
    await reader.close()
    resumed = topic.subscribe("g", start=q.START_POSITION_COMMITTED, ack_deadline=seconds(30))
    assert payloads(await resumed.drain(3)) == [b"3", b"4", b"5"]
    await resumed.nothing()
    assert (await topic.partition(partition, "g")).lag == 0


@pytest.mark.case("seek")
async def test_seek_replays_from_an_offset_the_earliest_or_the_latest(topic: Topic) -> None:
    results = await topic.publish_all(*[str(i).encode() for i in range(5)], key="k")
    partition = results[0].partition
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST)
    assert payloads(await subscriber.drain(5)) == [b"0", b"1", b"2", b"3", b"4"]
    assert await topic.seek("g", partition, position=q.START_POSITION_EARLIEST) == 0
    assert payloads(await subscriber.drain(5)) == [b"0", b"1", b"2", b"3", b"4"]
    assert await topic.seek("g", partition, offset=3) == 3
    assert payloads(await subscriber.drain(2)) == [b"3", b"4"]
    assert await topic.seek("g", partition, position=q.START_POSITION_LATEST) == 5
    await subscriber.nothing()
    beyond = await topic.refused("Seek", q.SeekRequest(topic=topic.name, consumer_group="g", partition=partition, offset=99))
    assert beyond.code == "OUT_OF_RANGE" and beyond.message.startswith("offset:"), beyond


@pytest.mark.case("seek_timestamp")
async def test_seek_to_a_time_replays_what_was_published_since(topic: Topic, request: pytest.FixtureRequest) -> None:
    results = await topic.publish_all(*[str(i).encode() for i in range(4)], key="k")
    partition = results[0].partition
    if "seek_timestamp" not in await capabilities(topic.client, topic.backend):
        when = timestamp_pb2.Timestamp(seconds=1)
        error = await topic.refused(
            "Seek", q.SeekRequest(topic=topic.name, consumer_group="g", partition=partition, timestamp=when)
        )
        refused_for_lack_of(error, "seek_timestamp", request)
        return
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST)
    delivered = await subscriber.drain(4)
    assert await topic.seek("g", partition, timestamp=delivered[2].published_at) == 2
    assert payloads(await subscriber.drain(2)) == [b"2", b"3"]


# --- Dead letters -------------------------------------------------------------------------------


@pytest.mark.case("dead_letter")
async def test_a_message_failing_n_times_lands_on_the_dead_letter_topic(
    topic: Topic, request: pytest.FixtureRequest
) -> None:
    options = {"max_delivery_attempts": 2, "dead_letter_topic": f"{topic.name}.dead", "ack_deadline": seconds(DEADLINE)}
    if "dead_letter" not in await capabilities(topic.client, topic.backend):
        with pytest.raises(CallError) as caught:
            await topic.subscribe("g", **options).next()
        refused_for_lack_of(caught.value, "dead_letter", request)
        return
    dead = topic.topic(f"{topic.name}.dead")
    watcher = dead.subscribe("ops", start=q.START_POSITION_EARLIEST)
    subscriber = topic.subscribe("g", start=q.START_POSITION_EARLIEST, **options)
    sent = await topic.publish(b"poison", key="k", trace="t-1")
    assert [m.delivery_attempt for m in await subscriber.take(2)] == [1, 2]
    copy = await watcher.next()
    assert (copy.payload, copy.partition_key, copy.headers["trace"]) == (b"poison", "k", "t-1")
    assert copy.headers["prism-dead-letter-reason"], "the reason is in a header"
    assert copy.headers["prism-dead-letter-message-id"] == sent.message_id
    await topic.publish(b"next", key="k")
    assert (await subscriber.next()).payload == b"next", "the failed message is gone from the group"
    await dead.close()


# --- Topic info ---------------------------------------------------------------------------------


@pytest.mark.case("topic info")
async def test_topic_info_reports_offsets_committed_offsets_and_lag(topic: Topic) -> None:
    error = await topic.refused("GetTopicInfo", q.GetTopicInfoRequest(topic=topic.name))
    assert error.code == "NOT_FOUND", error
    results = await topic.publish_all(b"0", b"1", b"2", key="k")
    partition = results[0].partition
    info = await topic.info()
    assert info.topic == topic.name and [p.partition for p in info.partitions] == list(range(len(info.partitions)))
    assert sum(p.high_offset for p in info.partitions) == 3
    found = await topic.partition(partition, "g")
    assert (found.low_offset, found.high_offset, found.committed_offset, found.lag) == (0, 3, -1, 3)
    await topic.subscribe("g", start=q.START_POSITION_EARLIEST).drain(1)
    found = await topic.partition(partition, "g")
    assert (found.committed_offset, found.lag) == (1, 2)


# --- Bad input ----------------------------------------------------------------------------------


@pytest.mark.case("validation")
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"topic": "a b"}, "topic"),
        ({"topic": "a:b"}, "topic"),
        ({"topic": "a\n"}, "topic"),
        ({"topic": "-a"}, "topic"),
        ({"topic": "x" * 250}, "topic"),
        ({"consumer_group": "g/1"}, "consumerGroup"),
        ({"ack_deadline": seconds(0.01)}, "ackDeadline"),
        ({"ack_deadline": seconds(-1)}, "ackDeadline"),
        ({"max_in_flight": -1}, "maxInFlight"),
        ({"max_in_flight": 1_000_000}, "maxInFlight"),
        ({"max_delivery_attempts": 3}, "deadLetterTopic"),
        ({"dead_letter_topic": "dead"}, "maxDeliveryAttempts"),
        ({"max_delivery_attempts": -1}, "maxDeliveryAttempts"),
        ({"start": 9}, "start"),
        ({"max_batch": 10}, "maxBatch"),  # Subscribe sends one message a response
        ({"max_batch": -1, "batched": True}, "maxBatch"),
        ({"max_batch": 1_000_000, "batched": True}, "maxBatch"),
        ({"topic": "a b", "batched": True}, "topic"),
        ({"linger_ms": 5}, "lingerMs"),  # Subscribe sends each message at once
        ({"linger_ms": -1, "batched": True}, "lingerMs"),
        ({"linger_ms": 1001, "batched": True}, "lingerMs"),
    ],
)
async def test_a_bad_subscription_is_refused_naming_the_field(topic: Topic, options: dict[str, Any], field: str) -> None:
    batched = options.get("batched", False)  # SubscribeBatches, else Subscribe
    request = {"topic": topic.name, "consumer_group": "g", **{k: v for k, v in options.items() if k != "batched"}}
    subscriber = Subscriber(topic, topic.client, q.QueueSubscribeRequest(**request), batched)
    try:
        with pytest.raises(CallError) as caught:
            await subscriber.next()
    finally:
        await subscriber.close()
    assert caught.value.code == "INVALID_ARGUMENT", caught.value
    assert caught.value.message.startswith(f"{field}:"), caught.value


@pytest.mark.case("validation")
@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("Publish", q.QueuePublishRequest(topic="t", entry=q.QueueEntry(headers={"": "x"})), "entry.headers[]"),
        ("Publish", q.QueuePublishRequest(topic="t", entry=q.QueueEntry(headers={"h": "\x00"})), "entry.headers[h]"),
        ("Publish", q.QueuePublishRequest(topic="t", entry=q.QueueEntry(headers={"h\n": "x"})), "entry.headers[h\n]"),
        ("Publish", q.QueuePublishRequest(topic="t", entry=q.QueueEntry(partition_key="k" * 1025)), "entry.partitionKey"),
        ("Publish", q.QueuePublishRequest(topic="t", entry=q.QueueEntry(idempotency_token="t" * 257)), "entry.idempotencyToken"),
        ("Publish", q.QueuePublishRequest(topic="t"), "entry"),
        ("Publish", q.QueuePublishRequest(topic="", entry=q.QueueEntry()), "topic"),
        ("PublishBatch", q.PublishBatchRequest(topic="t"), "entries"),
        ("Acknowledge", q.AcknowledgeRequest(topic="t", consumer_group="g", message_ids=["ok", ""]), "messageIds[1]"),
        ("Acknowledge", q.AcknowledgeRequest(topic="t", consumer_group="g"), "messageIds"),
        ("Acknowledge", q.AcknowledgeRequest(topic="t", message_ids=["x"]), "consumerGroup"),
        ("Nack", q.NackRequest(topic="t", consumer_group="g", message_ids=["x" * 257]), "messageIds[0]"),
        ("Nack", q.NackRequest(topic="t", consumer_group="g"), "messageIds"),
        ("Nack", q.NackRequest(topic="bad topic", consumer_group="g", message_ids=["x"]), "topic"),
        ("Commit", q.CommitRequest(topic="t", consumer_group="g", offset=-1), "offset"),
        ("Commit", q.CommitRequest(topic="t", consumer_group="g", partition=-1), "partition"),
        ("Seek", q.SeekRequest(topic="t", consumer_group="g"), "target"),
        ("Seek", q.SeekRequest(topic="t", consumer_group="g", position=q.START_POSITION_UNSPECIFIED), "position"),
        ("Seek", q.SeekRequest(topic="t", consumer_group="g", offset=-5), "offset"),
        ("GetTopicInfo", q.GetTopicInfoRequest(topic="t", consumer_group="bad group"), "consumerGroup"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(topic: Topic, rpc: str, request_: Message, field: str) -> None:
    error = await topic.refused(rpc, request_)
    assert error.code == "INVALID_ARGUMENT", error
    assert error.message.startswith(f"{field}:"), error
    assert field in error.violations, error


@pytest.mark.case("validation")
async def test_commit_seek_and_partition_on_what_does_not_exist(topic: Topic) -> None:
    missing = await topic.refused("Commit", q.CommitRequest(topic=topic.name, consumer_group="g", offset=0))
    assert missing.code == "NOT_FOUND", missing
    await topic.publish(b"x")
    partitions = len((await topic.info()).partitions)
    error = await topic.refused("Commit", q.CommitRequest(topic=topic.name, consumer_group="g", partition=partitions))
    assert error.code == "NOT_FOUND" and error.message.startswith("partition:"), error
    error = await topic.refused(
        "Seek", q.SeekRequest(topic=topic.name, consumer_group="g", partition=partitions, offset=0)
    )
    assert error.code == "NOT_FOUND" and error.message.startswith("partition:"), error


# --- Declared capabilities ----------------------------------------------------------------------


@pytest.mark.case("claimed capabilities")
@pytest.mark.parametrize("config", CONFIGS)
async def test_claimed_capabilities_are_the_ones_exercised(queue_gateway: GatewayProcess, client_factory, config: str) -> None:
    """Claimed → must pass: every capability a queue backend claims is one whose cases this
    suite runs (and whose refusal it checks on the backends that do not claim it)."""
    require(config)
    client = client_factory("grpc", queue_gateway)
    here = await open_topic(client, config)
    claimed = await capabilities(client, here.backend)
    assert claimed <= CHECKED_CAPABILITIES, f"{here.backend} claims untested capabilities: {claimed - CHECKED_CAPABILITIES}"


@pytest.fixture(scope="module")
def second_gateway(queue_gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """Another gateway process on the suite's configuration and data directory (as another
    worker process of one gateway would be)."""
    process = start_gateway(queue_gateway.log_path.parent, config_yaml=QUEUE_CONFIG)
    yield process
    process.stop()


@pytest.mark.case("shared")
@pytest.mark.parametrize("config", CONFIGS)
async def test_acknowledge_commit_and_seek_reach_the_stream_through_another_process(
    queue_gateway: GatewayProcess, second_gateway: GatewayProcess, config: str, request: pytest.FixtureRequest
) -> None:
    """The stream is served by one process; publishes, acknowledgements, commits and seeks go
    to another. A backend claiming "shared" behaves as if there were one process."""
    require(config)
    here_client, there_client = make_client("grpc", queue_gateway), make_client("grpc", second_gateway)
    try:
        here = await open_topic(here_client, config)
        there = Topic(there_client, here.token, config, here.backend, here.name)  # the same session, on B
        if "shared" not in await capabilities(here_client, here.backend):
            await here.publish(b"only here")
            error = await there.refused("GetTopicInfo", q.GetTopicInfoRequest(topic=here.name))
            assert error.code == "NOT_FOUND", "a backend not claiming shared keeps a copy per process"
            request.node.user_properties.append(("verdict", "refused"))
            return
        subscriber = here.subscribe("g", start=q.START_POSITION_EARLIEST, ack_deadline=seconds(30))
        results = await there.publish_all(b"0", b"1", b"2", key="k")
        partition = results[0].partition
        first = await subscriber.next()
        assert first.payload == b"0"
        assert await there.ack("g", first) == 1
        assert (await subscriber.next()).payload == b"1", "the acknowledgement on B let the key move on A"
        await there.commit("g", partition, 3)
        await subscriber.nothing()
        assert await there.seek("g", partition, offset=0) == 0
        replayed = await subscriber.next()
        assert (replayed.payload, replayed.delivery_attempt) == (b"0", 1)
        assert (await there.partition(partition, "g")).committed_offset == 0
        await here.close()
    finally:
        await here_client.close()
        await there_client.close()


@pytest.mark.case("durable")
@pytest.mark.parametrize("config", CONFIGS)
async def test_acknowledged_publishes_survive_a_gateway_restart(
    tmp_path_factory: pytest.TempPathFactory, config: str, request: pytest.FixtureRequest
) -> None:
    require(config)
    tmp = tmp_path_factory.mktemp("queue-restart")
    gateway = start_gateway(tmp, config_yaml=QUEUE_CONFIG)
    client = GrpcClient(gateway.grpc_target)
    try:
        before = await open_topic(client, config)
        sent = [await before.publish(f"{i}".encode(), key="k") for i in range(3)]
        claims = await capabilities(client, before.backend)
    finally:
        await client.close()
        gateway.stop()  # SIGTERM right after the acknowledgements
    gateway = start_gateway(tmp, config_yaml=QUEUE_CONFIG)
    client = GrpcClient(gateway.grpc_target)
    try:
        after = (await open_topic(client, config)).topic(before.name)
        if "durable" not in claims:
            # Kept in the gateway process: gone. Shared (a server that keeps nothing on disk):
            # still there, as that server did not restart; tests/faults restarts servers.
            if "shared" in claims:
                assert sum(p.high_offset for p in (await after.info()).partitions) == 3
            else:
                error = await after.refused("GetTopicInfo", q.GetTopicInfoRequest(topic=before.name))
                assert error.code == "NOT_FOUND"
            request.node.user_properties.append(("verdict", "refused"))
            return
        received = await after.subscribe("g", start=q.START_POSITION_EARLIEST).drain(3)
        assert [m.message_id for m in received] == [s.message_id for s in sent]
        await after.close()
    finally:
        await client.close()
        gateway.stop()
