"""The PubSub adapter contract (``adapters/pubsub/base.py``), checked against each adapter
directly: the contract a remote plugin adapter must pass as well.
``tests/conformance/test_pubsub.py`` checks the same cases through the gateway's transports.

Each backend is a ``Site``: where ``open()`` gives an adapter as another gateway process would
have it (its own connection; for ``workers``, another worker of one instance, so the first
opened is the hub). Every test uses a namespace of its own. A capability a backend does not
declare (``shared``) is checked for its honest absence and reported as refused.

Adding a backend is one entry in ``SITES``.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from adapters.backends.nats import NatsConnection, NatsSettings
from adapters.backends.redis import RedisClient, RedisSettings
from adapters.capabilities import Capability
from adapters.pubsub.base import OVERFLOWS, Delivery, Overflow, PubSubAdapter, Subscription
from adapters.pubsub.memory import MemoryPubSub
from adapters.pubsub.nats import NatsPubSub
from adapters.pubsub.redis import RedisPubSub
from adapters.pubsub.workers import WorkersPubSub, hub_address
from prism.errors import PrismError
from tests.servers import NATS_URL, REDIS_URL, unreachable

WAIT = 10.0  # seconds; bound on every wait for something that must happen
BUFFER = 1024
RUN = uuid.uuid4().hex[:8]


class Site:
    """Adapters opened on one backend, closed (with their connections) at the end."""

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


class RedisSite(Site):
    def __init__(self, tmp: pathlib.Path) -> None:
        if why := unreachable(REDIS_URL):
            pytest.skip(why)
        super().__init__()

    async def _make(self, buffer_size: int) -> tuple[PubSubAdapter, Any]:
        client = RedisClient(RedisSettings(url=REDIS_URL, pool_size=4))
        await client.start()
        return RedisPubSub(client, buffer_size), client


# backend → its Site, made from a temporary directory of the test.
SITES: dict[str, Callable[[pathlib.Path], Site]] = {
    "memory": MemorySite,
    "workers": WorkersSite,
    "nats": NatsSite,
    "redis": RedisSite,
}
MATRIX = ("PubSub adapter", {b: b for b in SITES})  # for tests/conformance/conftest.py


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Site]:
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close_all()


class Bus:
    """A namespace of the test's own on one adapter, and the subscriptions made through it."""

    def __init__(self, adapter: PubSubAdapter, namespace: str | None = None) -> None:
        self.adapter = adapter
        self.ns = namespace or f"n{uuid.uuid4().hex[:10]}"
        self.subscriptions: list[Subscription] = []

    def on(self, adapter: PubSubAdapter) -> Bus:
        """The same namespace through another adapter (another process)."""
        return Bus(adapter, self.ns)

    async def publish(self, subject: str, data: bytes = b"", **headers: str) -> str:
        return await self.adapter.publish(self.ns, tuple(subject.split(".")), data, headers)

    async def subscribe(self, pattern: str, group: str = "", overflow: Overflow = Overflow.END) -> Subscription:
        subscription = await self.adapter.subscribe(self.ns, tuple(pattern.split(".")), group, overflow)
        self.subscriptions.append(subscription)
        return subscription

    async def close(self) -> None:
        for subscription in self.subscriptions:
            await subscription.close()


@pytest.fixture
async def bus(site: Site) -> AsyncIterator[Bus]:
    made = Bus(await site.open())
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
    assert subjects(await take(star, 4)) == ["a.b", "a.c", "a.end", "a.b"]
    assert subjects(await take(rest, 5)) == ["a.b", "a.b.c", "a.c", "a.end", "a.b"]


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
        assert [d.message_id for d in await take(subscription, 20)] == ids


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
            assert [d.message_id for d in share] == [i for i in ids if i in {d.message_id for d in share}]
    assert [d.message_id for d in await take(plain, 30)] == ids


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
    bus = Bus(await site.open(buffer_size=4))
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
    bus = Bus(await site.open(buffer_size=4))
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
    here = Bus(await site.open())
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
        assert [d.message_id for d in await take(everything, 20)] == ids
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


@pytest.mark.case("claimed capabilities")
async def test_claimed_capabilities_are_the_ones_exercised(bus: Bus) -> None:
    checked = {Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED}
    assert bus.adapter.capabilities <= checked, bus.adapter.capabilities - checked
    assert {Capability.WILDCARDS, Capability.QUEUE_GROUPS} <= bus.adapter.capabilities
