"""The PubSub adapter contract (``adapters/pubsub/base.py``), checked against each adapter
directly: the contract a remote plugin adapter must pass as well.
``tests/conformance/test_pubsub.py`` checks the same cases through the gateway's transports.

Each backend is a ``Site``: where ``open()`` gives an adapter as another gateway process would
have it (its own connection; for ``workers``, another worker of one instance, so the first
opened is the hub). Every test uses a namespace of its own. A capability a backend does not
declare (``shared``, ``replay``) is checked for its honest absence and reported as refused.

Order: every backend delivers one subject's messages in publish order. Across subjects a Site
says whether it keeps publish order (``ordered``): Kafka orders per partition, and a subject is
a topic of its own, so there the suite checks each subject's order and that nothing is
missing or repeated.

Adding a backend is one entry in ``SITES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from nats.js.errors import NotFoundError

from adapters.backends.kafka import KafkaConnection, KafkaSettings
from adapters.backends.nats import NatsConnection, NatsSettings
from adapters.backends.redis import RedisClient, RedisSettings
from adapters.capabilities import Capability
from adapters.pubsub.base import (
    OVERFLOWS,
    AfterMessage,
    Delivery,
    FromTime,
    Overflow,
    PubSubAdapter,
    Start,
    Subscription,
)
from adapters.pubsub.kafka import KafkaPubSub
from adapters.pubsub.memory import MemoryPubSub
from adapters.pubsub.nats import NatsHistoryPubSub, NatsPubSub
from adapters.pubsub.redis import RedisPubSub
from adapters.pubsub.workers import WorkersPubSub, hub_address
from prism.errors import PrismError
from tests.kafka_broker import KAFKA_BOOTSTRAP, kafka_broker  # noqa: F401 (a fixture)
from tests.servers import NATS_URL, REDIS_URL, unreachable

WAIT = 10.0  # seconds; bound on every wait for something that must happen
BUFFER = 1024
RUN = uuid.uuid4().hex[:8]
HISTORY_PREFIX = f"PTH{RUN}"


class Site:
    """Adapters opened on one backend, closed (with their connections) at the end."""

    ordered = True  # deliveries of several subjects arrive in publish order
    fixtures: tuple[str, ...] = ()  # requested before the site is made (a server the session starts)

    def __init__(self) -> None:
        self.opened: list[tuple[PubSubAdapter, Any]] = []

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        raise NotImplementedError

    async def open(self, buffer_size: int = BUFFER) -> PubSubAdapter:
        adapter, connection = await self._make(buffer_size)
        await adapter.start()
        self.opened.append((adapter, connection))
        return adapter

    async def close(self, adapter: PubSubAdapter) -> None:
        for opened in [o for o in self.opened if o[0] is adapter]:
            self.opened.remove(opened)
            await opened[0].close()
            if opened[1] is not None:
                await opened[1].close()

    async def close_all(self) -> None:
        for adapter, _ in list(reversed(self.opened)):
            await self.close(adapter)


class MemorySite(Site):
    """Every ``open()`` is another process's broker: nothing shared between them."""

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__()

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        return MemoryPubSub(buffer_size), None


class WorkersSite(Site):
    """Worker processes of one instance: the same hub address, the first opened is the hub."""

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__()
        self.address = hub_address(str(tmp), f"memory-{uuid.uuid4().hex}")

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        return WorkersPubSub(buffer_size, self.address), None


class NatsSite(Site):
    def __init__(self, tmp: pathlib.Path) -> None:
        if why := unreachable(NATS_URL):
            pytest.skip(why)
        super().__init__()

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        connection = NatsConnection(NatsSettings(url=NATS_URL, prefix=f"PT{RUN}"))
        await connection.start()
        return NatsPubSub(connection, buffer_size), connection


class NatsHistorySite(NatsSite):
    """NATS keeping PubSub history (``pubsub_history``) in a stream of this run's own,
    deleted at the end of the module."""

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        settings = NatsSettings(url=NATS_URL, prefix=HISTORY_PREFIX, pubsub_history=True, pubsub_max_age=600)
        connection = NatsConnection(settings)
        await connection.start()
        return NatsHistoryPubSub(connection, buffer_size), connection


async def delete_nats_streams(*names: str) -> None:
    """Delete JetStream streams (those a run made for itself), where they are."""
    connection = NatsConnection(NatsSettings(url=NATS_URL))
    await connection.start()
    try:
        for name in names:
            with contextlib.suppress(NotFoundError):
                await connection.js.delete_stream(name)
    finally:
        await connection.close()


class RedisSite(Site):
    def __init__(self, tmp: pathlib.Path) -> None:
        if why := unreachable(REDIS_URL):
            pytest.skip(why)
        super().__init__()

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        client = RedisClient(RedisSettings(url=REDIS_URL, pool_size=4))
        await client.start()
        return RedisPubSub(client, buffer_size), client


class KafkaSite(Site):
    """The Tansu broker the session started (tests/kafka_broker.py). Patterns look for other
    processes' topics every 0.2 s, and a queue group's Kafka group forms within seconds."""

    ordered = False
    fixtures = ("kafka_broker",)

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__()

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        settings = KafkaSettings(
            bootstrap_servers=KAFKA_BOOTSTRAP, topic_prefix=f"pt{RUN}", pubsub_refresh=0.2, group_session_timeout=2
        )
        connection = KafkaConnection(settings)
        await connection.start()
        return KafkaPubSub(connection, buffer_size), connection


# backend → its Site, made from a temporary directory of the test.
SITES: dict[str, Callable[[pathlib.Path], Site]] = {
    "memory": MemorySite,
    "workers": WorkersSite,
    "nats": NatsSite,
    "nats-history": NatsHistorySite,
    "redis": RedisSite,
    "kafka": KafkaSite,
}
MATRIX = ("PubSub adapter", {b: b for b in SITES})  # for tests/conformance/conftest.py


@pytest.fixture(scope="module", autouse=True)
async def nats_history_removed() -> AsyncIterator[None]:
    yield
    if not unreachable(NATS_URL):
        await delete_nats_streams(f"{HISTORY_PREFIX}_pubsub")


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Site]:
    for name in getattr(SITES[request.param], "fixtures", ()):
        request.getfixturevalue(name)
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close_all()


class Bus:
    """A namespace of the test's own on one adapter, and the subscriptions made through it."""

    def __init__(self, adapter: PubSubAdapter, namespace: str | None = None, ordered: bool = True) -> None:
        self.adapter = adapter
        self.ns = namespace or f"n{uuid.uuid4().hex[:10]}"
        self.ordered = ordered  # the site keeps publish order across subjects
        self.subscriptions: list[Subscription] = []

    def on(self, adapter: PubSubAdapter) -> Bus:
        """The same namespace through another adapter (another process)."""
        return Bus(adapter, self.ns, self.ordered)

    async def publish(self, subject: str, data: bytes = b"", **headers: str) -> str:
        return await self.adapter.publish(self.ns, tuple(subject.split(".")), data, headers)

    async def subscribe(
        self, pattern: str, group: str = "", overflow: Overflow = Overflow.END, start: Start | None = None
    ) -> Subscription:
        extra = {"start": start} if start is not None else {}
        subscription = await self.adapter.subscribe(self.ns, tuple(pattern.split(".")), group, overflow, **extra)
        self.subscriptions.append(subscription)
        return subscription

    def in_order(self, got: list[Delivery], expected: list[str]) -> None:
        """``got`` are the deliveries with the message ids ``expected``, in publish order (of
        each subject, where the site keeps order per subject only)."""
        ids = [d.message_id for d in got]
        if self.ordered:
            assert ids == expected
            return
        assert sorted(ids) == sorted(expected), "each message once"
        position = {message_id: i for i, message_id in enumerate(expected)}
        for subject in {d.subject for d in got}:
            of_subject = [position[d.message_id] for d in got if d.subject == subject]
            assert of_subject == sorted(of_subject), f"{subject}: out of publish order"

    def subjects_in_order(self, got: list[Delivery], expected: list[str]) -> None:
        """``got`` were published to ``expected`` (one message each, or several of a subject
        in order): exactly, or per subject where the site keeps order per subject only."""
        if self.ordered:
            assert subjects(got) == expected
        else:
            assert sorted(subjects(got)) == sorted(expected)
            for subject in set(expected):
                assert [d.subject for d in got if d.subject == subject] == [s for s in expected if s == subject]

    async def close(self) -> None:
        for subscription in self.subscriptions:
            await subscription.close()


@pytest.fixture
async def bus(site: Site) -> AsyncIterator[Bus]:
    made = Bus(await site.open(), ordered=site.ordered)
    yield made
    await made.close()


async def take(subscription: Subscription, count: int) -> list[Delivery]:
    return [await asyncio.wait_for(anext(subscription), WAIT) for _ in range(count)]


def subjects(deliveries: list[Delivery]) -> list[str]:
    return [d.subject for d in deliveries]


async def collect(subscriptions: list[Subscription], count: int) -> list[list[Delivery]]:
    """Read every subscription until together they hold ``count`` deliveries."""
    got: list[list[Delivery]] = [[] for _ in subscriptions]
    done = asyncio.Event()

    async def read(i: int) -> None:
        async for delivery in subscriptions[i]:
            got[i].append(delivery)
            if sum(map(len, got)) >= count:
                done.set()

    tasks = [asyncio.create_task(read(i)) for i in range(len(subscriptions))]
    try:
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


# --- Subjects -------------------------------------------------------------------------------


@pytest.mark.case("wildcards")
async def test_exact_star_and_greater_than_mean_the_same_everywhere(bus: Bus) -> None:
    exact, star, rest = await bus.subscribe("a.b"), await bus.subscribe("a.*"), await bus.subscribe("a.>")
    for subject in ["a", "a.b", "a.b.c", "ab", "x.a.b", "a.c", "a.end"]:
        await bus.publish(subject)
    await bus.publish("a.b")  # the exact one's sentinel
    assert subjects(await take(exact, 2)) == ["a.b", "a.b"]
    bus.subjects_in_order(await take(star, 4), ["a.b", "a.c", "a.end", "a.b"])
    bus.subjects_in_order(await take(rest, 5), ["a.b", "a.b.c", "a.c", "a.end", "a.b"])


@pytest.mark.case("wildcards")
async def test_glob_characters_are_literal(bus: Bus) -> None:
    tokens = ["a?c", "[ab]", "\\", "%", "ключ🙂"]  # (a token holding "*" or ">" is refused)
    subscribed = {t: await bus.subscribe(f"x.{t}") for t in tokens}
    for token in ["abc", "a", "b", "ac", "a-", "ключ", *tokens]:
        await bus.publish(f"x.{token}", token.encode())
    for token, subscription in subscribed.items():
        assert [d.data for d in await take(subscription, 1)] == [token.encode()]
        await bus.publish(f"x.{token}", b"sentinel")
        assert (await take(subscription, 1))[0].data == b"sentinel", "nothing else arrived in between"


@pytest.mark.case("delivery")
async def test_a_delivery_carries_subject_data_headers_id_and_time(bus: Bus) -> None:
    subscription = await bus.subscribe("orders.>")
    headers = {
        "trace": "t-1",
        "tenant": "ключ",
        "": "empty name",
        "Nats-Msg-Id": "not for the broker",
        "_prism-id": "not ours either",
        "with space": " padded value ",
        "multi": "line\r\nbreak\x00nul",
    }
    data = bytes(range(256))
    before = time.time()
    first = await bus.publish("orders.eu.created", data, **headers)
    second = await bus.publish("orders.us")
    one, two = await take(subscription, 2)
    assert (one.message_id, one.subject, one.data, dict(one.headers)) == (first, "orders.eu.created", data, headers)
    assert before - 1 <= one.published_at <= before + 5
    assert (two.message_id, two.subject, two.data, dict(two.headers)) == (second, "orders.us", b"", {})
    assert first != second


# --- Fan-out and queue groups ---------------------------------------------------------------


@pytest.mark.case("fan-out")
async def test_a_hundred_subscribers_each_get_every_message(bus: Bus) -> None:
    subscriptions = [await bus.subscribe("fan.*") for _ in range(100)]
    ids = [await bus.publish(f"fan.{i}", str(i).encode()) for i in range(20)]
    for subscription in subscriptions:
        bus.in_order(await take(subscription, 20), ids)


@pytest.mark.case("queue groups")
async def test_a_queue_group_shares_while_every_group_gets_everything(bus: Bus) -> None:
    workers = [await bus.subscribe("jobs.*", "workers") for _ in range(3)]
    auditors = [await bus.subscribe("jobs.*", "auditors") for _ in range(2)]
    plain = await bus.subscribe("jobs.*")
    ids = [await bus.publish(f"jobs.n{i}") for i in range(30)]
    for group in (workers, auditors):
        shares = await collect(group, 30)
        assert sorted(d.message_id for share in shares for d in share) == sorted(ids), "each once per group"
        assert all(shares), [len(s) for s in shares]
        for share in shares:  # a member's share arrives in publish order
            bus.in_order(share, [i for i in ids if i in {d.message_id for d in share}])
    bus.in_order(await take(plain, 30), ids)


# --- Unsubscribe ----------------------------------------------------------------------------


@pytest.mark.case("unsubscribe")
async def test_close_ends_only_that_subscription(bus: Bus) -> None:
    leaving, staying = await bus.subscribe("a"), await bus.subscribe("a")
    waiting = asyncio.create_task(anext(leaving))
    await asyncio.sleep(0.01)
    await leaving.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, WAIT)
    await bus.publish("a", b"after")
    assert [d.data for d in await take(staying, 1)] == [b"after"]
    with pytest.raises(StopAsyncIteration):
        await anext(leaving)


# --- Flow control ---------------------------------------------------------------------------


@pytest.mark.case("flow control")
async def test_overflow_ends_a_slow_subscription_and_never_the_others(site: Site) -> None:
    bus = Bus(await site.open(buffer_size=4), ordered=site.ordered)
    try:
        slow, fast = await bus.subscribe("s.>"), await bus.subscribe("s.>")
        ended = OVERFLOWS.labels(bus.ns, "end")
        ids = []
        for i in range(20):  # nobody reads slow; fast keeps up
            ids.append(await asyncio.wait_for(bus.publish(f"s.{i}"), WAIT))
            assert (await take(fast, 1))[0].message_id == ids[-1]
        with pytest.raises(PrismError) as cut_off:
            await asyncio.wait_for(anext(slow), WAIT)
        assert cut_off.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ended._value.get() == 1, "counted once, when it ended"
    finally:
        await bus.close()


@pytest.mark.case("flow control")
async def test_drop_oldest_keeps_the_latest_messages(site: Site) -> None:
    bus = Bus(await site.open(buffer_size=4), ordered=site.ordered)
    try:
        lagging = await bus.subscribe("d.*", overflow=Overflow.DROP_OLDEST)
        dropped = OVERFLOWS.labels(bus.ns, "drop_oldest")
        for i in range(10):
            await bus.publish(f"d.{i}")
        await until(lambda: dropped._value.get() == 6)  # the counter shows all ten were offered
        assert subjects(await take(lagging, 4)) == [f"d.{i}" for i in range(6, 10)]
        await bus.publish("d.last")
        assert subjects(await take(lagging, 1)) == ["d.last"], "it goes on"
    finally:
        await bus.close()


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "not within the wait"
        await asyncio.sleep(0.01)


# --- Namespaces -----------------------------------------------------------------------------


@pytest.mark.case("namespaces")
async def test_namespaces_are_isolated(bus: Bus) -> None:
    a, b = bus, Bus(bus.adapter, f"{bus.ns}.b")  # a name that extends the other one
    a_all, b_all = await a.subscribe(">"), await b.subscribe(">")
    a_group, b_group = await a.subscribe("q", "same"), await b.subscribe("q", "same")
    await a.publish("q", b"for a")
    await b.publish("q", b"for b")
    assert [d.data for d in await take(a_all, 1)] == [b"for a"]
    assert [d.data for d in await take(b_all, 1)] == [b"for b"]
    assert [d.data for d in await take(a_group, 1)] == [b"for a"]
    assert [d.data for d in await take(b_group, 1)] == [b"for b"]
    await a.publish("end")
    assert subjects(await take(a_all, 1)) == ["end"]
    await b.close()


# --- Several processes ----------------------------------------------------------------------


@pytest.mark.case("shared")
async def test_another_process_publishes_to_subscribers_here(site: Site, request: pytest.FixtureRequest) -> None:
    """A backend claiming ``shared`` delivers across processes: fan-out, groups spanning
    processes (each message once per group), in order. One not claiming it keeps messages in
    the process that published them."""
    here = Bus(await site.open(), ordered=site.ordered)
    there = here.on(await site.open())
    try:
        everything = await here.subscribe("p.>")
        members = [await here.subscribe("p.*", "g"), await there.subscribe("p.*", "g")]
        if Capability.SHARED not in here.adapter.capabilities:
            await there.publish("p.there")
            await here.publish("p.here")
            assert subjects(await take(everything, 1)) == ["p.here"], "another process's broker is its own"
            request.node.user_properties.append(("verdict", "refused"))
            return
        ids = [await there.publish(f"p.{i}") for i in range(20)]
        here.in_order(await take(everything, 20), ids)
        shares = await collect(members, 20)
        assert sorted(d.message_id for share in shares for d in share) == sorted(ids)
    finally:
        await here.close()
        await there.close()


@pytest.mark.case("shared")
@pytest.mark.parametrize("backend", ["workers"])
async def test_workers_keep_delivering_when_the_hub_exits(tmp_path: pathlib.Path, backend: str) -> None:
    """The hub worker goes away: another worker takes over, every worker's subscriptions are
    registered again and deliver what is published after."""
    site = WorkersSite(tmp_path)
    try:
        hub = await site.open()
        first, second = Bus(await site.open()), None
        assert isinstance(hub, WorkersPubSub) and hub.is_hub
        second = first.on(await site.open())
        here, there = await first.subscribe("h.*"), await second.subscribe("h.*")
        await site.close(hub)
        followers = [a for a, _ in site.opened if isinstance(a, WorkersPubSub)]
        # Until one of them is the hub and the other has registered with it again.
        await until(lambda: sum(a.is_hub for a in followers) == 1 and all(a._ready.is_set() for a in followers))
        message_id = await first.publish("h.after")
        assert [d.message_id for d in await take(here, 1)] == [message_id]
        assert [d.message_id for d in await take(there, 1)] == [message_id]
        await first.close()
        await second.close()
    finally:
        await site.close_all()


# --- Replay ---------------------------------------------------------------------------------


def refused_replay(bus: Bus, request: pytest.FixtureRequest) -> bool:
    """A backend without ``replay`` is only checked for not claiming it: the service refuses
    a start position before asking such an adapter (tests/conformance/test_pubsub.py)."""
    if Capability.REPLAY in bus.adapter.capabilities:
        return False
    request.node.user_properties.append(("verdict", "refused"))
    return True


@pytest.mark.case("replay")
async def test_a_subscription_starts_at_a_time(bus: Bus, request: pytest.FixtureRequest) -> None:
    """From a time: what the backend holds from then on (published elsewhere in the
    pattern's subjects too), then what comes next; nothing before it."""
    if refused_replay(bus, request):
        return
    before = [await bus.publish(s) for s in ("r.a", "r.b.c", "x.a")]
    await asyncio.sleep(0.01)
    since = time.time_ns()
    after = [await bus.publish(s, s.encode()) for s in ("r.a", "r.b", "x.b", "r.b.c")]
    everything = await bus.subscribe("r.>", start=FromTime(0))
    from_since = await bus.subscribe("r.>", start=FromTime(since))
    live = [await bus.publish("r.c"), await bus.publish("r.a")]
    bus.in_order(await take(everything, 7), [before[0], before[1], after[0], after[1], after[3], *live])
    got = await take(from_since, 5)
    bus.in_order(got, [after[0], after[1], after[3], *live])
    assert (got[0].subject, got[0].data) in {("r.a", b"r.a"), ("r.b", b"r.b"), ("r.b.c", b"r.b.c")}


@pytest.mark.case("replay")
async def test_a_subscription_resumes_after_a_message(bus: Bus, request: pytest.FixtureRequest) -> None:
    """After a message id: the messages published after it, of its subject and the others,
    then what comes next. An id the backend never gave is refused naming the field, unless
    it is only a cursor (an EventSource's Last-Event-ID): then the subscription starts live."""
    if refused_replay(bus, request):
        return
    ids = [await bus.publish(s) for s in ("m.a", "m.b", "m.a", "m.c", "m.b", "m.a")]
    resumed = await bus.subscribe("m.*", start=AfterMessage(ids[2]))
    bus.in_order(await take(resumed, 3), ids[3:])
    with pytest.raises(PrismError) as bad:
        await bus.subscribe("m.*", start=AfterMessage("not-an-id"))
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.message.startswith("startAfter:")
    lenient = await bus.subscribe("m.*", start=AfterMessage("not-an-id", required=False))
    last = await bus.publish("m.z")
    assert [d.message_id for d in await take(resumed, 1)] == [last]
    assert [d.message_id for d in await take(lenient, 1)] == [last], "a cursor it cannot place: live"


@pytest.mark.case("replay")
async def test_a_replay_sees_topics_of_another_process(site: Site, request: pytest.FixtureRequest) -> None:
    """A subject another process publishes to first, after the replaying subscription began,
    reaches it from its first message."""
    here = Bus(await site.open(), ordered=site.ordered)
    try:
        if refused_replay(here, request):
            return
        there = here.on(await site.open())
        first = await here.publish("o.first")
        replaying = await here.subscribe("o.>", start=AfterMessage(first))
        live = await here.subscribe("o.>")
        ids = [await there.publish(f"o.new.{i}") for i in range(3)]
        here.in_order(await take(replaying, 3), ids)
        here.in_order(await take(live, 3), ids)
    finally:
        await here.close()


@pytest.mark.case("claimed capabilities")
async def test_claimed_capabilities_are_the_ones_exercised(bus: Bus) -> None:
    checked = {Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED, Capability.REPLAY}
    assert bus.adapter.capabilities <= checked, bus.adapter.capabilities - checked
    assert {Capability.WILDCARDS, Capability.QUEUE_GROUPS} <= bus.adapter.capabilities
