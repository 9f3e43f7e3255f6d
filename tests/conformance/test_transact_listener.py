"""The mailbox listener's side of the Transact contract (``adapters/transact/base.py``, rule 6),
checked against each adapter directly, and :class:`app.listener.MailboxListener` on top of it:
two listeners, each on a connection of its own (as two gateway processes would be), sharing one
mailbox into a real Queue on the same backend.

The Sites are ``test_transact_adapter.py``'s, so a backend added there is checked here too.
``tests/test_listener_crash.py`` kills a ``prism listener`` process mid-batch;
``tests/test_listener_e2e.py`` goes from a client's Write to a subscriber.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.sqlite import PRAGMAS
from adapters.queue.base import ConsumeOptions, Delivery, QueueAdapter, Start
from adapters.queue.postgres import PostgresQueue
from adapters.queue.sqlite import SqliteQueue
from adapters.sqlite_worker import SqliteWorker
from adapters.transact.base import (
    MAILBOX_HEADER,
    SEQUENCE_HEADER,
    Claimed,
    MailboxWrite,
    Operation,
    Routes,
    TransactAdapter,
)
from app.listener import MailboxListener, Outgoing, QueueTarget, RouteTable
from app.settings import MailboxListenerSettings
from prism.errors import PrismError
from tests.conformance.test_transact_adapter import RC, SITES, Env, PostgresSite, SqliteSite, new_env
from tests.servers import POSTGRES_DSN, purge_namespaces

MATRIX = ("Transact listener", {"sqlite": "sqlite", "postgres": "postgres"})  # tests/conformance/conftest.py
WAIT = 15.0
QUIET = 0.3  # seconds without a wake-up that count as quiet
BIG = 1 << 30  # bytes: no byte bound
QUEUE_NAMESPACES: list[str] = []


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close_all()


@pytest.fixture
async def env(site: Any) -> Env:
    return await new_env(site)


@pytest.fixture(scope="module", autouse=True)
async def purge_queues() -> AsyncIterator[None]:
    yield
    await purge_namespaces(["postgres"], QUEUE_NAMESPACES)


async def write(env: Env, mailbox: str, count: int, payload: bytes = b"p", adapter: TransactAdapter | None = None) -> None:
    for _ in range(count):
        await env.write(Operation.INSERT, {"id": uuid.uuid4().hex}, mailbox=mailbox, payload=payload, adapter=adapter)


def sequences(claimed: Claimed) -> list[int]:
    return [r.sequence for r in claimed.rows]


async def claim(adapter: TransactAdapter, holder: str, routes: Routes, **bounds: Any) -> dict[str, Claimed]:
    options = {"lease": 30.0, "rows": 100, "max_bytes": BIG, "mailboxes": 16, **bounds}
    got = await adapter.claim(holder, routes, **options)
    return {b.mailbox: b for b in got.batches}


# --- The contract ---------------------------------------------------------------------------------


@pytest.mark.case("listener: claim, lease, mark")
async def test_a_claim_leases_the_lowest_rows_of_each_mailbox_in_order(env: Env) -> None:
    await write(env, "a", 5)
    await write(env, "b", 3)
    routes = Routes(frozenset({env.ns}))
    first = await claim(env.adapter, "h1", routes)
    assert {m: sequences(b) for m, b in first.items()} == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3]}
    row = first["a"].rows[0]
    assert (row.payload, dict(row.headers), row.destination, row.attempts, row.delivered_ns) == (
        b"p", {"h": "v"}, "orders.created", 1, None
    )
    assert first["a"].epoch and first["a"].epoch != first["b"].epoch
    # Leased: another holder gets nothing, and hears when the earliest lease ends.
    before = time.time_ns()
    other = await env.adapter.claim("h2", routes, lease=30, rows=100, max_bytes=BIG, mailboxes=16)
    assert other.batches == ()
    assert other.retry_ns is not None and before + 28e9 < other.retry_ns < before + 32e9
    # A run marked delivered gives the mailbox back: its other rows come to whoever claims next.
    await env.adapter.mark_delivered("h1", env.ns, "a", [1, 2, 3])
    second = await claim(env.adapter, "h2", routes)
    assert {m: sequences(b) for m, b in second.items()} == {"a": [4, 5]}  # b is still h1's
    assert [r.attempts for r in second["a"].rows] == [2, 2] and second["a"].epoch == first["a"].epoch
    stamped = {r.sequence: r.delivered_ns for r in await env.adapter.mailbox_rows(env.ns, "a")}
    assert all(stamped[s] for s in (1, 2, 3)) and stamped[4] is None and stamped[5] is None


@pytest.mark.case("listener: claim, lease, mark")
async def test_a_lease_that_runs_out_makes_its_rows_claimable_again(env: Env) -> None:
    """A holder that crashed: its rows come again, counted, once the lease has run out."""
    await write(env, "a", 3)
    routes = Routes(frozenset({env.ns}))
    first = await claim(env.adapter, "crashed", routes, lease=1.5)
    assert sequences(first["a"]) == [1, 2, 3]
    assert await claim(env.adapter, "h2", routes) == {}
    await asyncio.sleep(1.6)
    again = await claim(env.adapter, "h2", routes)
    assert sequences(again["a"]) == [1, 2, 3] and [r.attempts for r in again["a"].rows] == [2, 2, 2]
    # The crashed holder's late mark is still the truth (it did publish them): stamped, and the
    # mailbox stays with h2, whose lease lives.
    await env.adapter.mark_delivered("crashed", env.ns, "a", [1])
    assert await claim(env.adapter, "h3", routes) == {}


@pytest.mark.case("listener: claim, lease, mark")
async def test_a_failed_delivery_holds_its_mailbox_for_the_pause(env: Env) -> None:
    await write(env, "a", 3)
    routes = Routes(frozenset({env.ns}))
    await claim(env.adapter, "h1", routes)
    await env.adapter.mark_delivered("h1", env.ns, "a", [1], retry_after=1.5)
    assert await claim(env.adapter, "h1", routes) == {}  # not even its holder, before the pause ends
    await asyncio.sleep(1.6)
    again = await claim(env.adapter, "h2", routes)
    assert sequences(again["a"]) == [2, 3] and [r.attempts for r in again["a"].rows] == [2, 2]


@pytest.mark.case("listener: claim, lease, mark")
async def test_claims_are_bounded_by_rows_bytes_and_mailboxes(env: Env) -> None:
    for mailbox in ("a", "b", "c"):
        await write(env, mailbox, 5, payload=b"x" * 100)
    routes = Routes(frozenset({env.ns}))

    async def bounded(**bounds: Any) -> dict[str, list[int]]:
        got = await claim(env.adapter, "h", routes, **bounds)
        for mailbox in got:  # given back at once, for the next case
            await env.adapter.mark_delivered("h", env.ns, mailbox, [])
        return {m: sequences(b) for m, b in got.items()}

    assert sum(map(len, (await bounded(rows=4)).values())) == 4
    by_bytes = await bounded(max_bytes=250)
    assert sorted(map(len, by_bytes.values())) == [2]  # 200 bytes fit, a third row would not
    assert sorted(map(len, (await bounded(max_bytes=10)).values())) == [1]  # one row, whatever its size
    assert len(await bounded(mailboxes=2)) == 2
    assert len(await bounded()) == 3


@pytest.mark.case("listener: claim, lease, mark")
async def test_only_the_routed_mailboxes_are_claimed(site: Any) -> None:
    env, other = await new_env(site), await new_env(site)
    await write(env, "a", 2)
    await write(env, "b", 2)
    await write(other, "a", 2)
    got = await claim(env.adapter, "h", Routes(mailboxes=frozenset({(env.ns, "a")})))
    assert list(got) == ["a"] and got["a"].namespace == env.ns
    got = await claim(env.adapter, "h", Routes(frozenset({other.ns})))
    assert list(got) == ["a"] and got["a"].namespace == other.ns
    assert await claim(env.adapter, "h", Routes(frozenset({f"n{uuid.uuid4().hex[:10]}"}))) == {}


@pytest.mark.case("listener: claim, lease, mark")
async def test_concurrent_claims_never_share_a_mailbox(site: Any) -> None:
    """Two connections (two processes' adapters) claiming at once: every mailbox goes to one."""
    env = await new_env(site)
    second = await site.open()
    mailboxes = [f"m{i}" for i in range(12)]
    for mailbox in mailboxes:
        await write(env, mailbox, 2)
    routes = Routes(frozenset({env.ns}))
    taken: list[tuple[str, str]] = []

    async def claimer(adapter: TransactAdapter, holder: str) -> None:
        while True:
            got = await adapter.claim(holder, routes, lease=30, rows=100, max_bytes=BIG, mailboxes=2)
            taken.extend((holder, b.mailbox) for b in got.batches)
            if not got.batches:
                if got.retry_ns is None or got.retry_ns > time.time_ns() + 1e9:
                    return  # all leased for the next 30 s
                await asyncio.sleep(0.01)  # the file's write lock was taken: soon again

    await asyncio.gather(claimer(env.adapter, "h1"), claimer(second, "h2"), claimer(env.adapter, "h3"))
    assert sorted(m for _, m in taken) == sorted(mailboxes), taken  # each exactly once


@pytest.mark.case("listener: wake-ups")
async def test_watch_wakes_on_a_commit_here_or_elsewhere(site: Any) -> None:
    env = await new_env(site)
    elsewhere = await site.open()  # another process's adapter, on its own connection
    changes = await env.adapter.watch()

    async def quiet() -> None:
        """Until no wake-up has come for a while: one commit may wake twice (at once when it
        went through this adapter, and again when the database's notification arrives, which
        on a busy machine can take a moment), and watching begins with one too."""
        async with asyncio.timeout(WAIT):
            while True:
                changes.arm()
                if not await changes.wait(QUIET):
                    return

    try:
        assert await changes.wait(0)  # a new watcher looks once: rows may be waiting already
        for adapter in (env.adapter, elsewhere):
            await quiet()
            assert not await changes.wait(0)
            started = time.monotonic()
            await write(env, "a", 1, adapter=adapter)
            assert await changes.wait(WAIT), adapter
            assert time.monotonic() - started < 2.0
        await quiet()
        transaction = await elsewhere.begin(env.ns, isolation=RC, time_limit=5)  # an interactive one
        await transaction.data(env.data(Operation.INSERT, id=uuid.uuid4().hex))
        await transaction.mailbox(MailboxWrite("a", b"t"))
        await transaction.commit()
        assert await changes.wait(WAIT)
    finally:
        await changes.close()


# --- Two listeners sharing one mailbox --------------------------------------------------------------


@dataclass
class Published:
    holder: str
    sequence: int
    at: float  # time.monotonic() when its publish returned


class RecordingTarget(QueueTarget):
    """A real Queue destination that also notes who published which row, and when."""

    def __init__(self, queue: QueueAdapter, namespace: str, holder: list[str], log: list[Published]) -> None:
        super().__init__("recorded", namespace, queue)
        self.holder, self.log = holder, log

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        outcomes = await super().publish(destination, rows)
        now = time.monotonic()
        self.log.extend(Published(self.holder[0], row.sequence, now) for (_, row), o in zip(rows, outcomes, strict=True) if o is None)
        return outcomes


async def open_queue(site: Any) -> tuple[QueueAdapter, Any]:
    """A Queue adapter on the Site's backend, on a connection of its own."""
    if isinstance(site, SqliteSite):
        worker = SqliteWorker(site.path, PRAGMAS)
        await worker.start()
        queue: QueueAdapter = SqliteQueue(worker)
        await queue.start()
        return queue, worker
    assert isinstance(site, PostgresSite)
    pool = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=4))
    await pool.start()
    queue = PostgresQueue(pool)
    await queue.start()
    return queue, pool


async def read_topic(queue: QueueAdapter, namespace: str, topic: str, expected: int) -> list[Delivery]:
    """Every message of the topic from the start, until ``expected`` came and then a quiet
    half second (so a duplicate would be seen too)."""
    consumer = await queue.consume(namespace, topic, ConsumeOptions(group="check", start=Start.EARLIEST, max_in_flight=1000))
    got: list[Delivery] = []
    try:
        while True:
            try:
                async with asyncio.timeout(0.5 if len(got) >= expected else WAIT):
                    delivery = await anext(consumer)
            except TimeoutError:
                break
            got.append(delivery)
            await queue.acknowledge(namespace, topic, "check", [delivery.message_id])
    finally:
        await consumer.close()
    return got


@pytest.mark.case("listener: delivery")
async def test_two_listeners_share_one_mailbox_in_order_without_a_duplicate(site: Any, request: pytest.FixtureRequest) -> None:
    """Two listeners, each on a connection of its own (two gateway processes), and two writers
    on one mailbox. A listener keeps a mailbox while it has a backlog (it claims again first),
    so which one delivers a row is a race: the phases make sure each does some. 1: the first
    alone; 2: both, while both writers write; 3: the first closes (likely mid-stream) and the
    second carries on where it left off."""
    env = await new_env(site)
    other = await site.open()
    queue, connection = await open_queue(site)
    out = f"out-{uuid.uuid4().hex[:10]}"
    QUEUE_NAMESPACES.append(out)
    log: list[Published] = []
    options = MailboxListenerSettings(lease_seconds=10, batch_rows=8, poll_seconds=1)
    listeners = []
    for adapter in (env.adapter, other):
        holder: list[str] = [""]
        listener = MailboxListener(adapter, RouteTable({env.ns: RecordingTarget(queue, out, holder, log)}), options)
        holder[0] = listener.holder
        listeners.append(listener)
    first, second = listeners
    phase = 80  # rows per phase
    total = 3 * phase

    async def delivered(count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len({p.sequence for p in log}) < count:
            assert time.monotonic() < deadline, f"{len({p.sequence for p in log})} of {count} delivered"
            await asyncio.sleep(0.02)

    async def both_writers() -> None:
        await asyncio.gather(*(write(env, "shared", phase // 2, adapter=a) for a in (env.adapter, other)))

    try:
        await first.start()
        await both_writers()
        await delivered(phase)
        await second.start()
        await both_writers()
        await first.close()  # likely mid-stream: what it claimed is published and marked, or given back
        await both_writers()  # only the second is left for these
        await delivered(total)
    finally:
        for listener in listeners:
            await listener.close()
    counts = Counter(p.sequence for p in log)
    duplicates = sum(n - 1 for n in counts.values())
    by_holder = Counter(p.holder for p in log)
    print(f"\n{type(site).__name__}: {total} rows, published by {dict(by_holder)}, duplicates {duplicates}")
    request.node.user_properties.append(("duplicates", duplicates))
    assert sorted(counts) == list(range(1, total + 1)) and duplicates == 0  # no row twice inside its lease
    assert by_holder[first.holder] >= phase and by_holder[second.holder] > 0, by_holder  # both took part
    in_time = [p.sequence for p in sorted(log, key=lambda p: p.at)]
    assert in_time == sorted(in_time)  # one holder at a time, in order
    rows = await env.adapter.mailbox_rows(env.ns, "shared", 0, 10_000)
    assert all(r.delivered_ns for r in rows) and len(rows) == total
    # What the Queue holds: every row once, in order (one partition key: the mailbox), with
    # the headers that say where it came from.
    messages = await read_topic(queue, out, "orders.created", total)
    assert [int(m.headers[SEQUENCE_HEADER]) for m in messages] == list(range(1, total + 1))
    assert {(m.partition_key, m.headers[MAILBOX_HEADER], m.headers["h"]) for m in messages} == {("shared", "shared", "v")}
    await queue.close()
    await connection.close()


class FlakyTarget(RecordingTarget):
    """Refuses the batch that holds ``refused`` (after publishing the rows before it) ``times``
    times: a destination down for a while, or refusing one row."""

    def __init__(self, *args: Any, refused: int, times: int) -> None:
        super().__init__(*args)
        self.refused, self.times = refused, times

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        if self.times and any(row.sequence == self.refused for _, row in rows):  # one mailbox's rows
            self.times -= 1
            before = [(batch, row) for batch, row in rows if row.sequence < self.refused]
            published = list(await super().publish(destination, before)) if before else []
            down = PrismError(grpc.StatusCode.UNAVAILABLE, "the destination is down")
            return published + [down] * (len(rows) - len(before))
        return await super().publish(destination, rows)


@pytest.mark.case("listener: delivery")
async def test_a_failed_row_holds_its_mailbox_and_is_retried_in_order(site: Any) -> None:
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = f"out-{uuid.uuid4().hex[:10]}"
    QUEUE_NAMESPACES.append(out)
    log: list[Published] = []
    target = FlakyTarget(queue, out, ["one"], log, refused=5, times=3)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), MailboxListenerSettings(batch_rows=4, poll_seconds=1))
    await write(env, "a", 12)
    started = time.monotonic()
    try:
        await listener.start()
        deadline = time.monotonic() + WAIT
        while len({p.sequence for p in log}) < 12:
            assert time.monotonic() < deadline, log
            await asyncio.sleep(0.02)
    finally:
        await listener.close()
    assert [p.sequence for p in log] == list(range(1, 13))  # 5 waited, and everything behind it
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4  # three pauses, doubling
    rows = {r.sequence: r for r in await env.adapter.mailbox_rows(env.ns, "a")}
    assert rows[5].attempts == 4 and rows[1].attempts == 1 and all(r.delivered_ns for r in rows.values())
    await queue.close()
    await connection.close()
