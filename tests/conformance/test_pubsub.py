"""PubSub conformance: every backend behind a PUBSUB config passes every case, through the
public API of a real `prism serve` process (subscriptions as gRPC server streams, SSE, or
gRPC-Web).

Subjects are dot-separated tokens; `*` matches exactly one token and `>` one or more trailing
tokens, with the same meaning on every backend. Each test publishes under its own random root
token, so tests never see each other's messages. To show that a message was *not* delivered
without sleeping, a test publishes a matching sentinel afterwards: delivery is in order per
subscriber, so the sentinel must be the next message.

``test_pubsub_adapter.py`` checks the same semantics against the adapters directly. Adding a
backend is one entry in ``BACKENDS`` (and, for a server, its address in ``SERVERS`` so the
suite skips it when the server is down — a failure in CI).

Kafka orders per partition and a subject is a topic of its own: where a test publishes to
several subjects, a backend in ``PER_SUBJECT_ORDER`` is checked for each subject's order and
for every message exactly once, not for the order across subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import nats
import nats.js.errors
import pytest
from google.protobuf import timestamp_pb2

from prism.v1 import config_pb2, plugin_pb2, session_pb2
from prism.v1 import pubsub_pb2 as ps
from tests.clients import CallError, GrpcClient, GrpcWebClient, RestClient, sse_events
from tests.conftest import open_session
from tests.gateway_process import GatewayProcess, start_gateway
from tests.kafka_broker import KAFKA_BOOTSTRAP, kafka_broker  # noqa: F401 (a fixture)
from tests.kafka_broker import unavailable as kafka_unavailable
from tests.servers import NATS_URL, REDIS_URL, unreachable

# NATS keeping PubSub history (replay) in a stream of this run's own, deleted at the end.
HISTORY_PREFIX = f"PH{uuid.uuid4().hex[:8]}"
# Backend name → its entry in the suite's server configuration. One PUBSUB config per backend.
BACKENDS: dict[str, str] = {
    "memory": "{type: memory}",
    "nats": f'{{type: nats, url: "{NATS_URL}"}}',
    "nats-history": (
        f'{{type: nats, url: "{NATS_URL}", prefix: "{HISTORY_PREFIX}", pubsub_history: true, '
        "pubsub_max_age: 600, pubsub_max_bytes: 67108864}"
    ),
    "redis": f'{{type: redis, url: "{REDIS_URL}"}}',
    # The broker the tests start (tests/kafka_broker.py); patterns look for topics other
    # gateways made every 0.2 s, and a queue group's Kafka group forms within seconds on Tansu.
    "kafka": (
        f'{{type: kafka, bootstrap_servers: "{KAFKA_BOOTSTRAP}", topic_prefix: "ps{uuid.uuid4().hex[:8]}", '
        "pubsub_refresh: 0.2, group_session_timeout: 2}"
    ),
}
SERVERS: dict[str, str] = {"nats": NATS_URL, "nats-history": NATS_URL, "redis": REDIS_URL}  # backend → its server
PER_SUBJECT_ORDER = {"kafka"}  # backends keeping publish order per subject, not across subjects
CONFIG_OF = {backend: f"pubsub-{backend}" for backend in BACKENDS}
CONFIGS = list(CONFIG_OF.values())
BACKEND_OF = {config: backend for backend, config in CONFIG_OF.items()}
MATRIX = ("PubSub", {**BACKEND_OF, **{b: b for b in BACKENDS}})  # for tests/conformance/conftest.py

RUN = uuid.uuid4().hex[:8]
NAMESPACE = f"pubsub-{RUN}"  # nothing is stored: a namespace of the run keeps runs apart
UNREACHABLE = {b: why for b, url in SERVERS.items() if (why := unreachable(url))}
if why_not_kafka := kafka_unavailable():  # no broker to start here
    UNREACHABLE["kafka"] = why_not_kafka


def server_config(namespaces: tuple[str, ...] = (NAMESPACE,)) -> str:
    """Every reachable backend, and a PUBSUB config per backend and namespace (named
    ``pubsub-<backend>`` in the first namespace, ``pubsub-<backend>-<namespace>`` in others)."""
    lines = ["backends:"]
    lines += [f"  {name}: {spec}" for name, spec in BACKENDS.items() if name not in UNREACHABLE]
    lines += ["configs:"]
    for i, namespace in enumerate(namespaces):
        lines += [
            f"  - {{name: {config}{'' if i == 0 else '-' + namespace}, pattern: PUBSUB, backend: {backend}, "
            f"namespace: {namespace}}}"
            for backend, config in CONFIG_OF.items()
            if backend not in UNREACHABLE
        ]
    return "\n".join(lines) + "\n"


PUBSUB_CONFIG = server_config()


def require(config: str) -> None:
    """Skip (a failure under PRISM_REQUIRE_BACKENDS=1) when the backend's server is down."""
    if BACKEND_OF[config] in UNREACHABLE:
        pytest.skip(UNREACHABLE[BACKEND_OF[config]])


PS = "/prism.v1.PubSubService/"
WAIT = 10  # seconds; bound on every wait


Client = GrpcClient | RestClient | GrpcWebClient


class Subscriber:
    """One Subscribe stream; ``open`` waits for the first response, which means it is live."""

    def __init__(
        self, client: Client, token: str, pattern: str, queue_group: str = "", request: ps.PubSubSubscribeRequest | None = None
    ) -> None:
        self.token = token
        request = request or ps.PubSubSubscribeRequest(subject=pattern, queue_group=queue_group)
        self.stream: AsyncIterator[ps.PubSubSubscribeResponse] = client.stream(
            PS + "Subscribe", request, token
        )  # type: ignore[assignment]
        self.id = ""

    async def open(self) -> Subscriber:
        first = await asyncio.wait_for(anext(self.stream), WAIT)
        assert first.subscription_id and not first.HasField("message")
        self.id = first.subscription_id
        return self

    async def next(self) -> ps.PubSubMessage:
        response = await asyncio.wait_for(anext(self.stream), WAIT)
        assert response.subscription_id == self.id
        return response.message

    async def receive(self, count: int) -> list[ps.PubSubMessage]:
        return [await self.next() for _ in range(count)]

    async def close(self) -> None:
        await self.stream.aclose()  # type: ignore[attr-defined]


class BatchSubscriber(Subscriber):
    """One SubscribeBatches stream, read a message at a time (a batch is taken when the last
    one's messages are used up)."""

    def __init__(self, client: Client, token: str, pattern: str) -> None:
        self.token = token
        request = ps.PubSubSubscribeRequest(subject=pattern)
        self.stream = client.stream(PS + "SubscribeBatches", request, token)  # type: ignore[assignment]
        self.id = ""
        self.ready: list[ps.PubSubMessage] = []

    async def open(self) -> Subscriber:
        first: ps.PubSubMessageBatch = await asyncio.wait_for(anext(self.stream), WAIT)  # type: ignore[arg-type]
        assert first.subscription_id and not first.messages
        self.id = first.subscription_id
        return self

    async def next(self) -> ps.PubSubMessage:
        while not self.ready:
            batch: ps.PubSubMessageBatch = await asyncio.wait_for(anext(self.stream), WAIT)  # type: ignore[arg-type]
            assert batch.subscription_id == self.id
            self.ready = list(batch.messages)
        return self.ready.pop(0)


class Bus:
    """A session on one PUBSUB config, a private subject root, and the streams it opened."""

    def __init__(self, client: Client, token: str, config: str) -> None:
        self.client, self.token, self.config = client, token, config
        self.root = f"c{uuid.uuid4().hex[:10]}"
        self.subscribers: list[Subscriber] = []

    def s(self, rest: str) -> str:
        return f"{self.root}.{rest}"

    @property
    def ordered(self) -> bool:
        """Whether its backend keeps publish order across subjects."""
        return BACKEND_OF[self.config.split(f"-{NAMESPACE}")[0]] not in PER_SUBJECT_ORDER

    def in_order(self, got: list[ps.PubSubMessage], expected: list[str]) -> None:
        """``got`` are the messages with ids ``expected``, in publish order (of each subject,
        on a backend keeping order per subject only)."""
        ids = [m.message_id for m in got]
        if self.ordered:
            assert ids == expected
            return
        assert sorted(ids) == sorted(expected), "each message once"
        position = {message_id: i for i, message_id in enumerate(expected)}
        for subject in {m.subject for m in got}:
            of_subject = [position[m.message_id] for m in got if m.subject == subject]
            assert of_subject == sorted(of_subject), f"{subject}: out of publish order"

    def subjects_in_order(self, got: list[ps.PubSubMessage], expected: list[str]) -> None:
        """``got`` were published to the subjects ``expected``, in order (per subject, on a
        backend keeping order per subject only)."""
        if self.ordered:
            assert subjects(got) == expected
            return
        assert sorted(subjects(got)) == sorted(expected)
        for subject in set(expected):
            assert [m.subject for m in got if m.subject == subject] == [s for s in expected if s == subject]

    async def subscribe(self, pattern: str, queue_group: str = "", token: str = "") -> Subscriber:
        subscriber = Subscriber(self.client, token or self.token, pattern, queue_group)
        self.subscribers.append(subscriber)
        return await subscriber.open()

    async def publish(self, subject: str, data: bytes = b"", **headers: str) -> str:
        request = ps.PubSubPublishRequest(subject=subject, data=data, headers=headers)
        return (await self.client.call(PS + "Publish", request, self.token)).message_id  # type: ignore[attr-defined]

    async def close(self) -> None:
        for subscriber in self.subscribers:
            await subscriber.close()


async def open_bus(client: Client, config: str) -> Bus:
    return Bus(client, await open_session(client, config), config)


@pytest.fixture(scope="module", autouse=True)
def kafka_running(request: pytest.FixtureRequest) -> None:
    """The Kafka broker runs before any gateway of this module starts (the tests start it)."""
    if "kafka" not in UNREACHABLE:
        request.getfixturevalue("kafka_broker")


@pytest.fixture(scope="module", autouse=True)
async def nats_history_removed() -> AsyncIterator[None]:
    """After the module's gateways stop: the history stream of ``nats-history``, and the Queue
    adapter's buckets on that backend (every pattern of a backend starts)."""
    yield
    if "nats-history" in UNREACHABLE:
        return
    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        for stream in (f"{HISTORY_PREFIX}_pubsub", f"KV_{HISTORY_PREFIX}-heads", f"KV_{HISTORY_PREFIX}-acks"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def pubsub_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("pubsub-conformance"), config_yaml=PUBSUB_CONFIG)
    yield process
    process.stop()


@pytest.fixture(params=CONFIGS)
async def bus(request: pytest.FixtureRequest, pubsub_gateway: GatewayProcess, client_factory) -> AsyncIterator[Bus]:
    require(request.param)
    bus = await open_bus(client_factory("grpc", pubsub_gateway), request.param)
    yield bus
    await bus.close()


async def refused(call) -> CallError:  # type: ignore[no-untyped-def]
    with pytest.raises(CallError) as caught:
        await asyncio.wait_for(call, WAIT)
    return caught.value


def subjects(messages: list[ps.PubSubMessage]) -> list[str]:
    return [m.subject for m in messages]


# --- Subject matching -----------------------------------------------------------------------


@pytest.mark.case("wildcards")
async def test_exact_subject_matches_only_itself(bus: Bus) -> None:
    subscriber = await bus.subscribe(bus.s("a.b"))
    for rest in ["a", "a.b.c", "a.bb", "a.B", "ab", "x.a.b", "a.b"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.b"), b"sentinel")
    received = await subscriber.receive(2)
    assert subjects(received) == [bus.s("a.b"), bus.s("a.b")]
    assert received[1].data == b"sentinel"


@pytest.mark.case("wildcards")
async def test_star_matches_exactly_one_token(bus: Bus) -> None:
    trailing = await bus.subscribe(bus.s("a.*"))
    middle = await bus.subscribe(bus.s("*.b"))
    for rest in ["a", "a.b.c", "a.b", "ab.x", "x.a.b", "a.c", "b", "x.y.b", "q.b"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.end"))
    await bus.publish(bus.s("end.b"))
    bus.subjects_in_order(await trailing.receive(3), [bus.s("a.b"), bus.s("a.c"), bus.s("a.end")])
    bus.subjects_in_order(await middle.receive(3), [bus.s("a.b"), bus.s("q.b"), bus.s("end.b")])


@pytest.mark.case("wildcards")
async def test_greater_than_matches_one_or_more_trailing_tokens(bus: Bus) -> None:
    subscriber = await bus.subscribe(bus.s("a.>"))
    for rest in ["a", "a.b", "ab.c", "a.b.c.d", "x.a.b", "a.c"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.end"))
    bus.subjects_in_order(await subscriber.receive(4), [bus.s("a.b"), bus.s("a.b.c.d"), bus.s("a.c"), bus.s("a.end")])
    # A bare '*' or '>' after the root covers the root's children, never the root itself.
    star, rest = await bus.subscribe(bus.s("*")), await bus.subscribe(bus.s(">"))
    await bus.publish(bus.root)
    await bus.publish(bus.s("one"))
    await bus.publish(bus.s("one.two"))
    await bus.publish(bus.s("end"))
    bus.subjects_in_order(await star.receive(2), [bus.s("one"), bus.s("end")])
    bus.subjects_in_order(await rest.receive(3), [bus.s("one"), bus.s("one.two"), bus.s("end")])


@pytest.mark.case("wildcards")
async def test_glob_and_sql_characters_in_subjects_are_literal(bus: Bus) -> None:
    """Only whole-token `*` and `>` are wildcards: Redis glob or SQL LIKE characters are not."""
    subscribers = {
        token: await bus.subscribe(bus.s(f"x.{token}"))
        for token in ["a?c", "[ab]", "%", "_", "ключ🙂"]
    }
    for token in ["abc", "a", "b", "zz", "Z", "ключ", "a?c", "[ab]", "%", "_", "ключ🙂"]:
        await bus.publish(bus.s(f"x.{token}"))
    for token, subscriber in subscribers.items():
        assert subjects(await subscriber.receive(1)) == [bus.s(f"x.{token}")]
    # Nothing else arrived first: the next message of each is its own sentinel.
    for token, subscriber in subscribers.items():
        await bus.publish(bus.s(f"x.{token}"), b"sentinel")
        assert (await subscriber.next()).data == b"sentinel"


@pytest.mark.case("delivery")
async def test_delivery_carries_concrete_subject_data_headers_and_id(bus: Bus) -> None:
    subscriber = await bus.subscribe(bus.s("orders.*.>"))
    data = bytes(range(256))
    message_id = await bus.publish(bus.s("orders.eu.created.v2"), data, trace="t-1", tenant="ключ")
    message = await subscriber.next()
    assert message.subject == bus.s("orders.eu.created.v2")
    assert (message.message_id, message.data, dict(message.headers)) == (
        message_id,
        data,
        {"trace": "t-1", "tenant": "ключ"},
    )
    assert message.published_at.seconds > 0
    empty_id = await bus.publish(bus.s("orders.us.x"))
    empty = await subscriber.next()
    assert (empty.message_id, empty.subject, empty.data, dict(empty.headers)) == (
        empty_id,
        bus.s("orders.us.x"),
        b"",
        {},
    )
    assert empty_id != message_id


async def publish_stream(gateway: GatewayProcess, token: str, requests: list[ps.PubSubPublishRequest]) -> None:
    """The messages published in order by one PublishStream call: back to back, so they reach
    a subscriber together."""
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        call = channel.stream_unary(
            PS + "PublishStream", request_serializer=ps.PubSubPublishRequest.SerializeToString,
            response_deserializer=ps.PublishStreamResponse.FromString,
        )  # fmt: skip
        answer = await asyncio.wait_for(call(iter(requests), metadata=(("x-prism-session", token),)), WAIT)
    assert answer.published == len(requests)


@pytest.mark.case("delivery")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web"])
async def test_subscribe_batches_delivers_every_message_once_in_order(
    bus: Bus, pubsub_gateway: GatewayProcess, client_factory, transport: str
) -> None:
    """SubscribeBatches: the first response names the live subscription; then every message of
    a burst of 200 once, in publish order, none above ``maxBatch`` to a response (how many a
    response holds is what was waiting when it was sent: tests/test_pubsub_batches.py). Over
    SSE an event's id is its last message's id, so an EventSource that reconnects resumes
    after the batch."""
    pattern = bus.s("b.*")
    request = ps.PubSubSubscribeRequest(subject=pattern, max_batch=16)
    stream = client_factory(transport, pubsub_gateway).stream(PS + "SubscribeBatches", request, bus.token)
    sse = sse_with_ids(pubsub_gateway.base_url, bus.token, pattern, rpc="subscribeBatches")
    try:
        first = await asyncio.wait_for(anext(stream), WAIT)
        assert first.subscription_id and not first.messages  # type: ignore[attr-defined]
        assert "subscriptionId" in (await asyncio.wait_for(anext(sse), WAIT))[1]
        sent = [ps.PubSubPublishRequest(subject=bus.s(f"b.{i % 3}"), data=str(i).encode()) for i in range(200)]
        await publish_stream(pubsub_gateway, bus.token, sent)
        sizes, got = [], []
        while len(got) < len(sent):
            batch = await asyncio.wait_for(anext(stream), WAIT)
            assert batch.subscription_id == first.subscription_id  # type: ignore[attr-defined]
            sizes.append(len(batch.messages))  # type: ignore[attr-defined]
            got += batch.messages  # type: ignore[attr-defined]
        order = [int(m.data) for m in got]
        assert sorted(order) == list(range(200)), "each message once"
        if bus.ordered:  # publish order, where the backend keeps it across subjects
            assert order == list(range(200))
        assert max(sizes) <= 16, sizes
        seen = 0
        while seen < len(sent):  # the same burst as events
            event_id, body = await asyncio.wait_for(anext(sse), WAIT)
            assert body["messages"] and event_id == body["messages"][-1]["messageId"]
            seen += len(body["messages"])
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await sse.aclose()


@pytest.mark.case("delivery")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web"])
async def test_subscribe_batches_linger_waits_for_more_messages(
    bus: Bus, pubsub_gateway: GatewayProcess, client_factory, transport: str
) -> None:
    """``lingerMs``: a waiting message waits up to that long for others before its response
    goes. Ten messages published one call after another reach the subscriber at different
    times and arrive in one response (``maxBatch`` of them: sent at once, not at the linger's
    end); a message with nothing after it goes when the linger runs out, never before."""
    request = ps.PubSubSubscribeRequest(subject=bus.s("l.*"), max_batch=10, linger_ms=800)
    stream = client_factory(transport, pubsub_gateway).stream(PS + "SubscribeBatches", request, bus.token)
    try:
        first = await asyncio.wait_for(anext(stream), WAIT)
        assert first.subscription_id and not first.messages  # type: ignore[attr-defined]
        ids = [await bus.publish(bus.s(f"l.{i % 2}"), str(i).encode()) for i in range(10)]
        bus.in_order(list((await asyncio.wait_for(anext(stream), WAIT)).messages), ids)  # type: ignore[attr-defined]
        started = time.monotonic()
        late = await bus.publish(bus.s("l.x"), b"late")
        batch = await asyncio.wait_for(anext(stream), WAIT)
        assert [m.message_id for m in batch.messages] == [late]  # type: ignore[attr-defined]
        assert time.monotonic() - started >= 0.79
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# --- Fan-out and queue groups ---------------------------------------------------------------


@pytest.mark.case("fan-out")
async def test_every_subscriber_gets_a_copy(bus: Bus, pubsub_gateway: GatewayProcess, client_factory) -> None:
    other = await open_bus(client_factory("grpc", pubsub_gateway), bus.config)
    try:
        subscribers = [
            await bus.subscribe(bus.s("a.b")),
            await bus.subscribe(bus.s("a.b")),  # the same pattern twice in one session
            await bus.subscribe(bus.s("a.*")),
            await bus.subscribe(bus.s("a.>")),
            await other.subscribe(bus.s("a.b")),  # another session on another connection
        ]
        ids = [await bus.publish(bus.s("a.b"), str(i).encode()) for i in range(5)]
        for subscriber in subscribers:
            received = await subscriber.receive(5)
            assert [(m.message_id, m.data) for m in received] == [
                (ids[i], str(i).encode()) for i in range(5)
            ]
        assert len({s.id for s in subscribers}) == len(subscribers)
    finally:
        await other.close()


class Collector:
    """Reads one subscriber in the background, so several can be drained at once; sets
    ``changed`` (shared by the collectors of one test) on every message."""

    def __init__(self, subscriber: Subscriber, changed: asyncio.Event) -> None:
        self.messages: list[ps.PubSubMessage] = []
        self.changed = changed
        self.task = asyncio.create_task(self._run(subscriber))

    async def _run(self, subscriber: Subscriber) -> None:
        async for response in subscriber.stream:
            self.messages.append(response.message)
            self.changed.set()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_until(condition, changed: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not condition():  # no await between the check and clear(): no wake-up is lost
            changed.clear()
            await changed.wait()

    await asyncio.wait_for(poll(), WAIT)


def ids(collectors: list[Collector]) -> list[str]:
    return [m.message_id for c in collectors for m in c.messages]


@pytest.mark.case("queue groups")
async def test_queue_group_members_share_while_others_get_everything(bus: Bus) -> None:
    changed = asyncio.Event()
    workers = [
        Collector(await bus.subscribe(bus.s("jobs.*"), "workers"), changed) for _ in range(3)
    ]
    wildcard_worker = Collector(
        await bus.subscribe(bus.s("jobs.>"), "workers"), changed
    )  # same group, other pattern
    auditors = [
        Collector(await bus.subscribe(bus.s("jobs.*"), "auditors"), changed) for _ in range(2)
    ]
    plain = Collector(await bus.subscribe(bus.s("jobs.*")), changed)
    group = [*workers, wildcard_worker]
    everyone = [*group, *auditors, plain]
    try:
        published = [await bus.publish(bus.s(f"jobs.n{i}")) for i in range(40)]
        await wait_until(
            lambda: (
                len(set(ids(group))) == 40
                and len(set(ids(auditors))) == 40
                and len(plain.messages) == 40
            ),
            changed,
        )
        assert sorted(ids(group)) == sorted(published), "each message to exactly one worker"
        assert all(member.messages for member in group), "every member, whatever its pattern, gets a share"
        assert sorted(ids(auditors)) == sorted(published), "each message to exactly one auditor"
        bus.in_order(plain.messages, published)  # a subscriber outside groups gets all, in order
        for member in everyone:  # each member's share arrives in publish order
            bus.in_order(member.messages, [i for i in published if i in set(ids([member]))])
    finally:
        for member in everyone:
            await member.stop()


@pytest.mark.case("queue groups")
async def test_every_queue_group_spreads_messages_over_its_members(bus: Bus) -> None:
    changed = asyncio.Event()
    groups = {
        name: [Collector(await bus.subscribe(bus.s("jobs"), name), changed) for _ in range(2)]
        for name in ("left", "right")
    }
    members = [m for group in groups.values() for m in group]
    try:
        for _ in range(20):
            await bus.publish(bus.s("jobs"))
        await wait_until(lambda: all(len(ids(g)) == 20 for g in groups.values()), changed)
        shares = {name: [len(m.messages) for m in group] for name, group in groups.items()}
        assert all(min(share) > 0 for share in shares.values()), shares
    finally:
        for member in members:
            await member.stop()


# --- Unsubscribe ----------------------------------------------------------------------------


@pytest.mark.case("unsubscribe")
async def test_unsubscribe_stops_only_that_subscription(bus: Bus) -> None:
    leaving = await bus.subscribe(bus.s("a"))
    staying = await bus.subscribe(bus.s("a"))
    await bus.publish(bus.s("a"), b"1")
    assert (await leaving.next()).data == b"1"
    assert (await staying.next()).data == b"1"

    await bus.client.call(
        PS + "Unsubscribe", ps.UnsubscribeRequest(subscription_id=leaving.id), bus.token
    )
    with pytest.raises(StopAsyncIteration):  # the stream ends cleanly, with OK
        await asyncio.wait_for(anext(leaving.stream), WAIT)

    await bus.publish(bus.s("a"), b"2")
    assert (await staying.next()).data == b"2"
    error = await refused(
        bus.client.call(
            PS + "Unsubscribe", ps.UnsubscribeRequest(subscription_id=leaving.id), bus.token
        )
    )
    assert error.code == "NOT_FOUND", "an ended subscription cannot be unsubscribed again"


@pytest.mark.case("unsubscribe")
async def test_unsubscribe_from_another_session_is_refused(
    bus: Bus, pubsub_gateway: GatewayProcess, client_factory
) -> None:
    subscriber = await bus.subscribe(bus.s("a"))
    stranger = await open_bus(client_factory("grpc", pubsub_gateway), bus.config)
    request = ps.UnsubscribeRequest(subscription_id=subscriber.id)
    assert (
        await refused(stranger.client.call(PS + "Unsubscribe", request, stranger.token))
    ).code == "NOT_FOUND"
    await bus.publish(bus.s("a"), b"still here")
    assert (await subscriber.next()).data == b"still here"


@pytest.mark.case("unsubscribe")
async def test_client_leaving_a_stream_does_not_disturb_others(bus: Bus) -> None:
    leaving = await bus.subscribe(bus.s("a"))
    staying = await bus.subscribe(bus.s("a"))
    await leaving.close()  # the client cancels its stream without Unsubscribe
    for i in range(3):
        await bus.publish(bus.s("a"), str(i).encode())
    assert [m.data for m in await staying.receive(3)] == [b"0", b"1", b"2"]


# --- Validation -----------------------------------------------------------------------------

INVALID_PATTERNS = [
    "a..b",
    "a.>.b",
    "a*",
    "",
    ".a",
    "a.",
    ">.a",
    "a.b*",
    "a.>b",
    "a.*b",
    "a b",
    "a.\tb",
    ".",
]


@pytest.mark.case("validation")
@pytest.mark.parametrize("pattern", INVALID_PATTERNS)
async def test_invalid_pattern_is_refused(bus: Bus, pattern: str) -> None:
    subscriber = Subscriber(bus.client, bus.token, pattern)
    error = await refused(anext(subscriber.stream))
    assert error.code == "INVALID_ARGUMENT"
    assert error.message.startswith("subject:"), error.message


@pytest.mark.case("validation")
@pytest.mark.parametrize(
    ("rpc", "max_batch", "subject"),
    [("Subscribe", 10, "a"), ("SubscribeBatches", -1, "a"), ("SubscribeBatches", 1_000_000, "a"), ("SubscribeBatches", 0, "a..b")],
)
async def test_a_bad_batch_subscription_is_refused_naming_the_field(bus: Bus, rpc: str, max_batch: int, subject: str) -> None:
    request = ps.PubSubSubscribeRequest(subject=subject, max_batch=max_batch)
    error = await refused(anext(bus.client.stream(PS + rpc, request, bus.token)))
    assert error.code == "INVALID_ARGUMENT"
    field = "subject" if max_batch == 0 else "maxBatch"
    assert error.message.startswith(f"{field}:"), error.message


@pytest.mark.case("validation")
@pytest.mark.parametrize(("rpc", "linger_ms"), [("Subscribe", 5), ("SubscribeBatches", -1), ("SubscribeBatches", 1001)])
async def test_a_bad_linger_is_refused_naming_it(bus: Bus, rpc: str, linger_ms: int) -> None:
    request = ps.PubSubSubscribeRequest(subject=bus.s("a"), linger_ms=linger_ms)
    error = await refused(anext(bus.client.stream(PS + rpc, request, bus.token)))
    assert error.code == "INVALID_ARGUMENT"
    assert error.message.startswith("lingerMs:"), error.message


@pytest.mark.case("validation")
@pytest.mark.parametrize(
    "subject",
    [
        "{root}.*",
        "{root}.>",
        "*",
        ">",
        "{root}.b*",
        "{root}.>b",
        "{root}..b",
        "",
        "{root}.",
        "{root} b",
    ],
)
async def test_publish_to_a_wildcard_or_invalid_subject_is_refused(bus: Bus, subject: str) -> None:
    catch_all = await bus.subscribe(bus.s(">"))
    error = await refused(bus.publish(subject.format(root=bus.root)))
    assert error.code == "INVALID_ARGUMENT"
    assert error.message.startswith("subject:"), error.message
    await bus.publish(bus.s("sentinel"))
    assert (await catch_all.next()).subject == bus.s("sentinel"), (
        "nothing was delivered for the refused publish"
    )


# --- Slow subscribers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_buffer_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(
        tmp_path_factory.mktemp("pubsub-small-buffer"),
        config_yaml=PUBSUB_CONFIG,
        env={"PRISM_LIMITS__STREAM_BUFFER": "16"},
    )
    yield process
    process.stop()


@pytest.mark.case("flow control")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    ("slow_transport", "rpc"), [("grpc", "Subscribe"), ("rest", "Subscribe"), ("grpc", "SubscribeBatches"), ("rest", "SubscribeBatches")]
)  # rest: the stream is server-sent events
async def test_slow_subscriber_never_stalls_the_others(
    small_buffer_gateway: GatewayProcess, client_factory, config: str, slow_transport: str, rpc: str
) -> None:
    """A subscriber that stops reading is cut off with RESOURCE_EXHAUSTED once its buffer (16)
    and the transport's buffers are full; the publisher is never held up and the fast
    subscriber gets every message, in order. Messages are 64 KiB so 500 of them overflow any
    socket or HTTP/2 window. The publisher waits for the fast subscriber's copy of each message
    (a buffer of 16 is not meant to absorb a broker's bursts). They go to one subject, numbered
    in a header: the buffer is what is tested, not 500 subjects (500 topics, on Kafka). A
    SubscribeBatches stream holds no more (its transport reads no batch ahead)."""
    require(config)
    bus = await open_bus(client_factory("grpc", small_buffer_gateway), config)
    slow_client = client_factory(slow_transport, small_buffer_gateway)
    subscriber = Subscriber if rpc == "Subscribe" else BatchSubscriber
    slow = await subscriber(slow_client, await open_session(slow_client, config), bus.s(">")).open()
    changed = asyncio.Event()
    fast = Collector(await bus.subscribe(bus.s(">")), changed)
    count, payload = 500, b"p" * (64 * 1024)
    try:
        for i in range(count):
            await asyncio.wait_for(bus.publish(bus.s("m"), payload, i=str(i)), WAIT)
            await wait_until(lambda: len(fast.messages) == i + 1, changed)  # noqa: B023 (awaited here)
        assert [m.headers["i"] for m in fast.messages] == [str(i) for i in range(count)]
        assert all(m.data == payload for m in fast.messages)

        # The slow one gets what its buffers held, in order, then the refusal.
        held: list[str] = []
        with pytest.raises(CallError) as cut_off:
            while True:
                held.append((await slow.next()).headers["i"])
        assert cut_off.value.code == "RESOURCE_EXHAUSTED", cut_off.value
        assert held == [str(i) for i in range(len(held))]
        assert len(held) < count
    finally:
        await fast.stop()
        await slow.close()
        await bus.close()


# --- Namespaces -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def namespaced_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("pubsub-namespaces")
    process = start_gateway(tmp, config_yaml=server_config((f"{NAMESPACE}-a", f"{NAMESPACE}-b")))
    yield process
    process.stop()


@pytest.mark.case("namespaces")
@pytest.mark.parametrize("config", CONFIGS)
async def test_subscriptions_are_isolated_per_namespace(
    namespaced_gateway: GatewayProcess, client_factory, config: str
) -> None:
    require(config)
    a = await open_bus(client_factory("grpc", namespaced_gateway), config)
    b = await open_bus(client_factory("grpc", namespaced_gateway), f"{config}-{NAMESPACE}-b")
    b.root = a.root  # the very same subjects in both namespaces
    try:
        a_all, b_all = await a.subscribe(">"), await b.subscribe(">")
        a_group, b_group = (
            await a.subscribe(a.s("q"), "shared-name"),
            await b.subscribe(b.s("q"), "shared-name"),
        )
        await a.publish(a.s("q"), b"for a")
        await b.publish(b.s("q"), b"for b")
        assert [(m.subject, m.data) for m in await a_all.receive(1)] == [(a.s("q"), b"for a")]
        assert [(m.subject, m.data) for m in await b_all.receive(1)] == [(b.s("q"), b"for b")]
        # A queue group of the same name in another namespace is another group.
        assert (await a_group.next()).data == b"for a"
        assert (await b_group.next()).data == b"for b"
        # A subscription of one namespace cannot be ended from the other.
        error = await refused(
            b.client.call(
                PS + "Unsubscribe", ps.UnsubscribeRequest(subscription_id=a_all.id), b.token
            )
        )
        assert error.code == "NOT_FOUND"
        await a.publish(a.s("end"))
        assert (await a_all.next()).subject == a.s("end")
    finally:
        await a.close()
        await b.close()


# --- Fan-out --------------------------------------------------------------------------------


@pytest.mark.case("fan-out")
async def test_a_hundred_subscribers_each_get_every_message(
    bus: Bus, pubsub_gateway: GatewayProcess, client_factory
) -> None:
    """One publisher, 100 subscribers on four connections (and sessions): none misses a
    message, each gets them in publish order."""
    buses = [bus, *[await open_bus(client_factory("grpc", pubsub_gateway), bus.config) for _ in range(3)]]
    for other in buses[1:]:
        other.root = bus.root
    try:
        subscribers = [await buses[i % 4].subscribe(bus.s("fan.>")) for i in range(100)]
        ids = [await bus.publish(bus.s(f"fan.{i}"), str(i).encode()) for i in range(20)]
        received = await asyncio.gather(*(s.receive(20) for s in subscribers))
        for messages in received:
            bus.in_order(messages, ids)
    finally:
        for other in buses[1:]:
            await other.close()


# --- Flow control options -------------------------------------------------------------------


async def inline_session(client: Client, config: str, **options: str) -> str:
    """A session on an inline copy of the named ``config`` with ``backend.options``."""
    named = await client.call("/prism.v1.ConfigService/GetConfig", config_pb2.GetConfigRequest(name=config))
    inline = config_pb2.ClientConfig()
    inline.CopyFrom(named.config)  # type: ignore[attr-defined]
    inline.name = f"{config}-inline"
    inline.backend.options.update(options)
    request = session_pb2.CreateSessionRequest(config=inline)
    return (await client.call("/prism.v1.SessionService/CreateSession", request)).token  # type: ignore[attr-defined]


def overflows(gateway: GatewayProcess, policy: str) -> float:
    """prism_pubsub_overflows_total of the run's namespace on /metrics (one worker)."""
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=5).text
    line = re.search(
        rf'^prism_pubsub_overflows_total\{{namespace="{NAMESPACE}",overflow="{policy}"\}} (\S+)$', text, re.M
    )
    return float(line.group(1)) if line else 0.0


@pytest.mark.case("flow control")
@pytest.mark.parametrize("config", CONFIGS)
async def test_drop_oldest_keeps_a_slow_subscriber_with_the_latest_messages(
    small_buffer_gateway: GatewayProcess, client_factory, config: str
) -> None:
    """``backend.options.overflow: drop_oldest``: a subscriber that falls behind loses the
    oldest waiting messages instead of its subscription, and the drops are counted. (One
    subject, messages numbered in a header, as above.)"""
    require(config)
    bus = await open_bus(client_factory("grpc", small_buffer_gateway), config)
    slow_client = client_factory("grpc", small_buffer_gateway)
    before = overflows(small_buffer_gateway, "drop_oldest")
    slow = await Subscriber(slow_client, await inline_session(slow_client, config, overflow="drop_oldest"), bus.s(">")).open()
    watcher = await bus.subscribe(bus.s(">"))
    count, payload = 300, b"p" * (64 * 1024)
    try:
        for i in range(count):
            await asyncio.wait_for(bus.publish(bus.s("m"), payload, i=str(i)), WAIT)
            await watcher.next()
        held: list[int] = []
        while not held or held[-1] != count - 1:
            held.append(int((await slow.next()).headers["i"]))
        assert held == sorted(held) and len(held) < count, "in order, with the oldest dropped"
        assert overflows(small_buffer_gateway, "drop_oldest") - before == count - len(held)
        await bus.publish(bus.s("after"))
        assert (await slow.next()).subject == bus.s("after"), "the subscription goes on"
    finally:
        await slow.close()
        await bus.close()


@pytest.mark.case("validation")
@pytest.mark.parametrize("config", CONFIGS)
async def test_an_unknown_overflow_option_is_refused_naming_it(
    pubsub_gateway: GatewayProcess, client_factory, config: str
) -> None:
    require(config)
    client = client_factory("grpc", pubsub_gateway)
    token = await inline_session(client, config, overflow="block")
    error = await refused(Subscriber(client, token, "a.b").open())
    assert error.code == "FAILED_PRECONDITION", error
    assert error.message.startswith("config.backend.options.overflow: 'block'"), error.message


@pytest.mark.case("queue groups")
async def test_any_queue_group_name_works(bus: Bus) -> None:
    """A group name is the client's: spaces, dots, unicode or a long one mean the same on
    every backend."""
    names = [" spaced out ", "a.b", "ключ🙂", "x" * 2000]
    members = {name: [await bus.subscribe(bus.s("g"), name) for _ in range(2)] for name in names}
    changed = asyncio.Event()
    collectors = {name: [Collector(m, changed) for m in group] for name, group in members.items()}
    try:
        sent = [await bus.publish(bus.s("g")) for _ in range(6)]
        await wait_until(lambda: all(len(ids(c)) == 6 for c in collectors.values()), changed)
        assert all(sorted(ids(c)) == sorted(sent) for c in collectors.values())
    finally:
        for group in collectors.values():
            for collector in group:
                await collector.stop()


# --- Declared capabilities ------------------------------------------------------------------


async def capabilities(client: Client, backend: str) -> set[str]:
    info = await client.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
    (entry,) = [b for b in info.backends if b.name == backend and b.pattern == "PUBSUB"]  # type: ignore[attr-defined]
    return set(entry.capabilities)


@pytest.mark.case("claimed capabilities")
@pytest.mark.parametrize("config", CONFIGS)
async def test_claimed_capabilities_are_the_ones_exercised(
    pubsub_gateway: GatewayProcess, client_factory, config: str
) -> None:
    """Claimed → must pass: every capability a PubSub backend claims is one this suite runs
    (wildcards and queue groups everywhere, shared across instances and replay below)."""
    require(config)
    claimed = await capabilities(client_factory("grpc", pubsub_gateway), BACKEND_OF[config])
    assert {"wildcards", "queue_groups"} <= claimed <= {"wildcards", "queue_groups", "shared", "replay"}, claimed


# --- Several gateway instances --------------------------------------------------------------


@pytest.fixture(scope="module")
def other_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A second gateway instance on the same configuration: its own data directory and
    sessions, the same brokers."""
    process = start_gateway(tmp_path_factory.mktemp("pubsub-other-instance"), config_yaml=PUBSUB_CONFIG)
    yield process
    process.stop()


async def event_source(base_url: str, token: str, pattern: str) -> AsyncIterator[dict]:
    """What a browser's EventSource does: a GET with the token in the query (it cannot set
    headers), yielding each message event's JSON."""
    url = f"{base_url}/v1/subjects/{pattern}:subscribe"
    headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
    async with httpx.AsyncClient(timeout=None) as http:
        async with http.stream("GET", url, params={"prism_session": token}, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for event, data in sse_events(response):
                if event != "message":
                    raise AssertionError(f"event {event}: {data}")
                yield json.loads(data)


@pytest.mark.case("shared")
@pytest.mark.parametrize("config", CONFIGS)
async def test_browser_clients_of_one_instance_get_what_another_instance_published(
    pubsub_gateway: GatewayProcess, other_instance: GatewayProcess, config: str, request: pytest.FixtureRequest
) -> None:
    """Two instances share the broker: an EventSource and a gRPC-Web client on B receive the
    wildcard deliveries published through A, concrete subjects and all; queue group members
    on A and B share the messages. A backend not claiming ``shared`` (memory) keeps each
    instance's messages to itself."""
    require(config)
    a_client, b_grpc_web = GrpcClient(pubsub_gateway.grpc_target), GrpcWebClient(other_instance.base_url)
    try:
        a = await open_bus(a_client, config)
        b = await open_bus(b_grpc_web, config)
        b.root = a.root
        sse = event_source(other_instance.base_url, b.token, a.s("orders.*.>"))
        assert "subscriptionId" in await asyncio.wait_for(anext(sse), WAIT)  # live
        web = await b.subscribe(a.s("orders.>"))
        members = [await a.subscribe(a.s("jobs"), "g"), await b.subscribe(a.s("jobs"), "g")]
        if "shared" not in await capabilities(a_client, BACKEND_OF[config]):
            await a.publish(a.s("orders.eu.from-a"))
            await b.publish(a.s("orders.eu.from-b"))
            assert (await web.next()).subject == a.s("orders.eu.from-b"), "A's message stayed on A"
            request.node.user_properties.append(("verdict", "refused"))
            await sse.aclose()
            return
        sent = [await a.publish(a.s(f"orders.{region}.created.v1"), region.encode()) for region in ("eu", "us")]
        for region, message_id in zip(("eu", "us"), sent, strict=True):
            event = (await asyncio.wait_for(anext(sse), WAIT))["message"]
            assert (event["messageId"], event["subject"]) == (message_id, a.s(f"orders.{region}.created.v1"))
            delivered = await web.next()
            assert (delivered.message_id, delivered.subject, delivered.data) == (
                message_id,
                a.s(f"orders.{region}.created.v1"),
                region.encode(),
            )
        await sse.aclose()
        jobs = [await a.publish(a.s("jobs")) for _ in range(20)]
        changed = asyncio.Event()
        collectors = [Collector(member, changed) for member in members]
        await wait_until(lambda: len(ids(collectors)) >= 20, changed)
        await asyncio.sleep(0.2)  # nothing more arrives
        assert sorted(ids(collectors)) == sorted(jobs), "each message once across the instances"
        for collector in collectors:
            await collector.stop()
    finally:
        await a_client.close()
        await b_grpc_web.close()


# --- Several workers of one instance (the embedded default) ----------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``prism serve --workers 2`` on the default configuration: ``events`` is PubSub in
    process, relayed between the workers."""
    process = start_gateway(tmp_path_factory.mktemp("pubsub-workers"), "granian", extra_args=("--workers", "2"))
    yield process
    process.stop()


async def connected_to_both_workers(gateway: GatewayProcess, count: int) -> list[httpx.AsyncClient]:
    """``count`` HTTP clients, each with one connection, at least one on each worker (the
    second worker may still be starting when the first answers)."""
    for _ in range(60):
        clients = [httpx.AsyncClient(base_url=gateway.base_url, timeout=None) for _ in range(count)]
        pids = set()
        for client in clients:  # the connection /metrics answered on is the one kept
            pids |= set(re.findall(r'prism_worker_info\{pid="(\d+)"\}', (await client.get("/metrics")).text))
        if len(pids) == 2:
            return clients
        for client in clients:
            await client.aclose()
        await asyncio.sleep(0.25)
    raise AssertionError("every connection landed on one worker")


@pytest.mark.case("workers")
@pytest.mark.parametrize("backend", ["memory"])  # the default configuration's
async def test_every_worker_s_subscribers_get_what_any_worker_published(two_workers: GatewayProcess, backend: str) -> None:
    """The issue's scenario: ten SSE subscribers and five publishes, each on its own connection
    (so over both workers): every subscriber gets all five; a queue group spread over the
    workers gets each message once."""
    # Plain subscribers, group members and publishers each on both workers.
    plain_clients = await connected_to_both_workers(two_workers, 6)
    group_clients = await connected_to_both_workers(two_workers, 4)
    publishers = await connected_to_both_workers(two_workers, 5)
    subscribers = [*plain_clients, *group_clients]
    root = f"w{uuid.uuid4().hex[:8]}"
    try:
        token = (await publishers[0].post("/v1/sessions", json={"configName": "events"})).json()["token"]
        session = {"x-prism-session": token, "accept": "text/event-stream"}

        async def subscribe(http: httpx.AsyncClient, group: str, received: list[dict], live: asyncio.Event) -> None:
            url = f"/v1/subjects/{root}.*:subscribe"
            async with http.stream("GET", url, params={"queueGroup": group} if group else {}, headers=session) as response:
                assert response.status_code == 200
                async for event, data in sse_events(response):
                    assert event == "message", data
                    body = json.loads(data)
                    if "message" in body:
                        received.append(body["message"])
                        changed.set()
                    else:
                        live.set()

        changed = asyncio.Event()
        plain = [([], asyncio.Event()) for _ in subscribers[:6]]
        grouped = [([], asyncio.Event()) for _ in subscribers[6:]]
        tasks = [
            asyncio.create_task(subscribe(http, "" if i < 6 else "g", *(plain + grouped)[i]))
            for i, http in enumerate(subscribers)
        ]
        await asyncio.wait_for(asyncio.gather(*(live.wait() for _, live in plain + grouped)), WAIT)
        sent = []
        for i, http in enumerate(publishers):
            response = await http.post(f"/v1/subjects/{root}.m{i}:publish", json={}, headers={"x-prism-session": token})
            sent.append(response.json()["messageId"])

        with contextlib.suppress(TimeoutError):  # the assertions say what is missing
            await wait_until(
                lambda: all(len(r) >= 5 for r, _ in plain) and sum(len(r) for r, _ in grouped) >= 5, changed
            )
        await asyncio.sleep(0.2)  # nothing more arrives
        assert all([m["messageId"] for m in r] == sent for r, _ in plain)
        assert sorted(m["messageId"] for r, _ in grouped for m in r) == sorted(sent), "once per group"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for http in [*subscribers, *publishers]:
            await http.aclose()


# --- Replay ---------------------------------------------------------------------------------


async def replays(gateway: GatewayProcess, client_factory, config: str) -> bool:  # type: ignore[no-untyped-def]
    return "replay" in await capabilities(client_factory("grpc", gateway), BACKEND_OF[config])


@pytest.mark.case("replay")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("transport", ["grpc", "rest"])  # rest: SSE, the start in the query
async def test_a_subscription_starts_in_the_past_where_the_backend_keeps_history(
    pubsub_gateway: GatewayProcess, client_factory, config: str, transport: str, request: pytest.FixtureRequest
) -> None:
    """``startTime``: what the backend holds from then on; ``startAfter``: the messages after
    that one, of every subject of the pattern; then what comes next. Without history (or with a
    queue group) the request is refused naming the field, before anything is subscribed."""
    require(config)
    client = client_factory(transport, pubsub_gateway)
    bus = await open_bus(client, config)
    try:
        since = timestamp_pb2.Timestamp()
        since.GetCurrentTime()
        published = [await bus.publish(bus.s(f"h.{i % 2}"), str(i).encode()) for i in range(4)]
        by_time = ps.PubSubSubscribeRequest(subject=bus.s("h.*"), start_time=since)
        after = ps.PubSubSubscribeRequest(subject=bus.s("h.*"), start_after=published[1])
        if not await replays(pubsub_gateway, client_factory, config):
            for refused_request, field in ((by_time, "startTime"), (after, "startAfter")):
                error = await refused(Subscriber(client, bus.token, "", request=refused_request).open())
                assert error.code == "FAILED_PRECONDITION", error
                assert error.message.startswith(f"{field}: backend ") and error.message.endswith("lacks replay"), error
            request.node.user_properties.append(("verdict", "refused"))
            return
        replayed = await Subscriber(client, bus.token, "", request=by_time).open()
        resumed = await Subscriber(client, bus.token, "", request=after).open()
        bus.subscribers += [replayed, resumed]
        live = await bus.publish(bus.s("h.9"))
        got = await replayed.receive(5)
        bus.in_order(got, [*published, live])
        assert [(m.subject, m.data) for m in got if m.message_id == published[2]] == [(bus.s("h.0"), b"2")]
        bus.in_order(await resumed.receive(3), [*published[2:], live])

        grouped = ps.PubSubSubscribeRequest(subject=bus.s("h.*"), queue_group="g", start_time=since)
        error = await refused(Subscriber(client, bus.token, "", request=grouped).open())
        assert (error.code, error.message.split(":")[0]) == ("INVALID_ARGUMENT", "startTime"), error
        unknown = ps.PubSubSubscribeRequest(subject=bus.s("h.*"), start_after="not-a-message-id")
        error = await refused(Subscriber(client, bus.token, "", request=unknown).open())
        assert (error.code, error.message.split(":")[0]) == ("INVALID_ARGUMENT", "startAfter"), error
    finally:
        await bus.close()


async def sse_with_ids(
    base_url: str, token: str, pattern: str, last_event_id: str = "", rpc: str = "subscribe"
) -> AsyncIterator[tuple[str, dict]]:
    """What an EventSource does, reconnecting with ``Last-Event-ID`` when given: (id, JSON)
    of each message event."""
    url = f"{base_url}/v1/subjects/{pattern}:{rpc}"
    headers = {"accept": "text/event-stream", **({"last-event-id": last_event_id} if last_event_id else {})}
    async with httpx.AsyncClient(timeout=None) as http:
        async with http.stream("GET", url, params={"prism_session": token}, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            event_id, event, data = "", "message", []
            async for line in response.aiter_lines():
                if line == "" and data:
                    assert event == "message", data
                    yield event_id, json.loads("\n".join(data))
                    event, data = "message", []
                elif line.startswith(("id:", "event:", "data:")):
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "id":
                        event_id = value
                    elif name == "event":
                        event = value
                    else:
                        data.append(value)


@pytest.mark.case("replay")
@pytest.mark.parametrize("config", CONFIGS)
async def test_an_event_source_that_reconnects_resumes_after_its_last_event(
    pubsub_gateway: GatewayProcess, client_factory, config: str, request: pytest.FixtureRequest
) -> None:
    """An SSE message's id is its message id, so an EventSource that reconnects sends the last
    one it got as Last-Event-ID. A backend with history resumes right after it: what was
    published while the browser was away comes first. One without starts with the next
    message, and never refuses the reconnection."""
    require(config)
    bus = await open_bus(client_factory("grpc", pubsub_gateway), config)
    pattern = bus.s("e.>")
    first = sse_with_ids(pubsub_gateway.base_url, bus.token, pattern)
    try:
        assert "subscriptionId" in (await asyncio.wait_for(anext(first), WAIT))[1]
        seen = await bus.publish(bus.s("e.one"))
        event_id, body = await asyncio.wait_for(anext(first), WAIT)
        assert event_id == body["message"]["messageId"] == seen
    finally:
        await first.aclose()
    missed = [await bus.publish(bus.s(f"e.{rest}")) for rest in ("one", "two.x", "three")]
    again = sse_with_ids(pubsub_gateway.base_url, bus.token, pattern, last_event_id=seen)
    try:
        assert "subscriptionId" in (await asyncio.wait_for(anext(again), WAIT))[1]
        live = await bus.publish(bus.s("e.live"))
        expected = [*missed, live] if await replays(pubsub_gateway, client_factory, config) else [live]
        got = [await asyncio.wait_for(anext(again), WAIT) for _ in expected]
        assert all(event_id == body["message"]["messageId"] for event_id, body in got)
        messages = [ps.PubSubMessage(message_id=b["message"]["messageId"], subject=b["message"]["subject"]) for _, b in got]
        bus.in_order(messages, expected)
        if expected == [live]:
            request.node.user_properties.append(("verdict", "refused"))
    finally:
        await again.aclose()
