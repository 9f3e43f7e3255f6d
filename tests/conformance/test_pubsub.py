"""PubSub conformance: every backend behind a PUBSUB config passes every case, through the
public API of a real `prism serve` process (subscriptions as gRPC server streams, or SSE).

Subjects are dot-separated tokens; `*` matches exactly one token and `>` one or more trailing
tokens, with the same meaning on every backend. Each test publishes under its own random root
token, so tests never see each other's messages. To show that a message was *not* delivered
without sleeping, a test publishes a matching sentinel afterwards: delivery is in order per
subscriber, so the sentinel must be the next message.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from prism.v1 import pubsub_pb2 as ps
from tests.clients import CallError, GrpcClient, RestClient
from tests.conftest import open_session
from tests.gateway_process import GatewayProcess, start_gateway

# PUBSUB configs of the default server configuration, one per backend.
CONFIGS = ["events"]  # memory
MATRIX = ("PubSub", {"events": "memory"})  # for tests/conformance/conftest.py

PS = "/prism.v1.PubSubService/"
WAIT = 10  # seconds; bound on every wait


class Subscriber:
    """One Subscribe stream; ``open`` waits for the first response, which means it is live."""

    def __init__(
        self, client: GrpcClient | RestClient, token: str, pattern: str, queue_group: str = ""
    ) -> None:
        self.token = token
        request = ps.PubSubSubscribeRequest(subject=pattern, queue_group=queue_group)
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


class Bus:
    """A session on one PUBSUB config, a private subject root, and the streams it opened."""

    def __init__(self, client: GrpcClient, token: str, config: str) -> None:
        self.client, self.token, self.config = client, token, config
        self.root = f"c{uuid.uuid4().hex[:10]}"
        self.subscribers: list[Subscriber] = []

    def s(self, rest: str) -> str:
        return f"{self.root}.{rest}"

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


async def open_bus(client: GrpcClient, config: str) -> Bus:
    return Bus(client, await open_session(client, config), config)


@pytest.fixture(params=CONFIGS)
async def bus(
    request: pytest.FixtureRequest, hypercorn_gateway: GatewayProcess, client_factory
) -> AsyncIterator[Bus]:
    bus = await open_bus(client_factory("grpc", hypercorn_gateway), request.param)
    yield bus
    await bus.close()


async def refused(call) -> CallError:  # type: ignore[no-untyped-def]
    with pytest.raises(CallError) as caught:
        await asyncio.wait_for(call, WAIT)
    return caught.value


def subjects(messages: list[ps.PubSubMessage]) -> list[str]:
    return [m.subject for m in messages]


# --- Subject matching -----------------------------------------------------------------------


async def test_exact_subject_matches_only_itself(bus: Bus) -> None:
    subscriber = await bus.subscribe(bus.s("a.b"))
    for rest in ["a", "a.b.c", "a.bb", "a.B", "ab", "x.a.b", "a.b"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.b"), b"sentinel")
    received = await subscriber.receive(2)
    assert subjects(received) == [bus.s("a.b"), bus.s("a.b")]
    assert received[1].data == b"sentinel"


async def test_star_matches_exactly_one_token(bus: Bus) -> None:
    trailing = await bus.subscribe(bus.s("a.*"))
    middle = await bus.subscribe(bus.s("*.b"))
    for rest in ["a", "a.b.c", "a.b", "ab.x", "x.a.b", "a.c", "b", "x.y.b", "q.b"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.end"))
    await bus.publish(bus.s("end.b"))
    assert subjects(await trailing.receive(3)) == [bus.s("a.b"), bus.s("a.c"), bus.s("a.end")]
    assert subjects(await middle.receive(3)) == [bus.s("a.b"), bus.s("q.b"), bus.s("end.b")]


async def test_greater_than_matches_one_or_more_trailing_tokens(bus: Bus) -> None:
    subscriber = await bus.subscribe(bus.s("a.>"))
    for rest in ["a", "a.b", "ab.c", "a.b.c.d", "x.a.b", "a.c"]:
        await bus.publish(bus.s(rest))
    await bus.publish(bus.s("a.end"))
    assert subjects(await subscriber.receive(4)) == [
        bus.s("a.b"),
        bus.s("a.b.c.d"),
        bus.s("a.c"),
        bus.s("a.end"),
    ]
    # A bare '*' or '>' after the root covers the root's children, never the root itself.
    star, rest = await bus.subscribe(bus.s("*")), await bus.subscribe(bus.s(">"))
    await bus.publish(bus.root)
    await bus.publish(bus.s("one"))
    await bus.publish(bus.s("one.two"))
    await bus.publish(bus.s("end"))
    assert subjects(await star.receive(2)) == [bus.s("one"), bus.s("end")]
    assert subjects(await rest.receive(3)) == [bus.s("one"), bus.s("one.two"), bus.s("end")]


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


# --- Fan-out and queue groups ---------------------------------------------------------------


async def test_every_subscriber_gets_a_copy(
    bus: Bus, hypercorn_gateway: GatewayProcess, client_factory
) -> None:
    other = await open_bus(client_factory("grpc", hypercorn_gateway), bus.config)
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
        assert sorted(ids(auditors)) == sorted(published), "each message to exactly one auditor"
        assert [m.message_id for m in plain.messages] == published, (
            "a subscriber outside groups gets all, in order"
        )
        for member in everyone:  # each member's share arrives in publish order
            assert [m.message_id for m in member.messages] == [
                i for i in published if i in set(ids([member]))
            ]
    finally:
        for member in everyone:
            await member.stop()


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


async def test_unsubscribe_from_another_session_is_refused(
    bus: Bus, hypercorn_gateway: GatewayProcess, client_factory
) -> None:
    subscriber = await bus.subscribe(bus.s("a"))
    stranger = await open_bus(client_factory("grpc", hypercorn_gateway), bus.config)
    request = ps.UnsubscribeRequest(subscription_id=subscriber.id)
    assert (
        await refused(stranger.client.call(PS + "Unsubscribe", request, stranger.token))
    ).code == "NOT_FOUND"
    await bus.publish(bus.s("a"), b"still here")
    assert (await subscriber.next()).data == b"still here"


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


@pytest.mark.parametrize("pattern", INVALID_PATTERNS)
async def test_invalid_pattern_is_refused(bus: Bus, pattern: str) -> None:
    subscriber = Subscriber(bus.client, bus.token, pattern)
    error = await refused(anext(subscriber.stream))
    assert error.code == "INVALID_ARGUMENT"
    assert error.message.startswith("subject:"), error.message


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
        tmp_path_factory.mktemp("pubsub-small-buffer"), env={"PRISM_LIMITS__STREAM_BUFFER": "16"}
    )
    yield process
    process.stop()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(
    "slow_transport", ["grpc", "rest"]
)  # rest: the stream is server-sent events
async def test_slow_subscriber_never_stalls_the_others(
    small_buffer_gateway: GatewayProcess, client_factory, config: str, slow_transport: str
) -> None:
    """A subscriber that stops reading is cut off with RESOURCE_EXHAUSTED once its buffer (16)
    and the transport's buffers are full; the fast subscriber gets every message, in order.
    Messages are 64 KiB so 500 of them overflow any socket or HTTP/2 window."""
    bus = await open_bus(client_factory("grpc", small_buffer_gateway), config)
    slow_client = client_factory(slow_transport, small_buffer_gateway)
    slow = await Subscriber(slow_client, await open_session(slow_client, config), bus.s(">")).open()
    changed = asyncio.Event()
    fast = Collector(await bus.subscribe(bus.s(">")), changed)
    count, payload = 500, b"p" * (64 * 1024)
    try:
        for i in range(count):
            await asyncio.wait_for(bus.publish(bus.s(f"m.{i}"), payload), WAIT)
        await wait_until(lambda: len(fast.messages) == count, changed)
        assert subjects(fast.messages) == [bus.s(f"m.{i}") for i in range(count)]
        assert all(m.data == payload for m in fast.messages)

        # The slow one gets what its buffers held, in order, then the refusal.
        held: list[str] = []
        with pytest.raises(CallError) as cut_off:
            while True:
                held.append((await slow.next()).subject)
        assert cut_off.value.code == "RESOURCE_EXHAUSTED", cut_off.value
        assert held == [bus.s(f"m.{i}") for i in range(len(held))]
        assert len(held) < count
    finally:
        await fast.stop()
        await slow.close()
        await bus.close()


# --- Namespaces -----------------------------------------------------------------------------

NAMESPACED_CONFIG = """
backends:
  memory: {type: memory}
configs:
  - {name: events-a, pattern: PUBSUB, backend: memory, namespace: tenant-a}
  - {name: events-b, pattern: PUBSUB, backend: memory, namespace: tenant-b}
"""


@pytest.fixture(scope="module")
def namespaced_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("pubsub-namespaces")
    process = start_gateway(tmp, config_yaml=NAMESPACED_CONFIG)
    yield process
    process.stop()


async def test_subscriptions_are_isolated_per_namespace(
    namespaced_gateway: GatewayProcess, client_factory
) -> None:
    a = await open_bus(client_factory("grpc", namespaced_gateway), "events-a")
    b = await open_bus(client_factory("grpc", namespaced_gateway), "events-b")
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
