"""The SQLite worker's grouped jobs (``SqliteWorker.run_grouped``, group commit formed on the
thread), on a real file: the items queued while the thread was busy go to one call of their
group, in the order they came, at the first one's turn; each caller gets its own item's outcome;
a group that raises fails each of its items; a caller that left before its turn is left out.
The SQLite Queue's publishes go together this way; one that fails does not fail the others.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import threading
from collections.abc import AsyncIterator

import pytest

from adapters.backends.sqlite import PRAGMAS
from adapters.queue.base import Entry, Published
from adapters.queue.sqlite import SqliteQueue
from adapters.sqlite_worker import SqliteWorker

CALLS: list[list[int]] = []


def insert_all(c: sqlite3.Connection, items: list[int]) -> list[int | BaseException]:
    """One transaction for the group; a negative item is refused alone (the others commit)."""
    CALLS.append(list(items))
    c.execute("BEGIN IMMEDIATE")
    outcomes: list[int | BaseException] = []
    for item in items:
        if item < 0:
            outcomes.append(ValueError(f"item {item} refused"))
            continue
        c.execute("INSERT INTO t (n) VALUES (?)", (item,))
        outcomes.append(item * 10)
    c.execute("COMMIT")
    return outcomes


def broken(c: sqlite3.Connection, items: list[int]) -> list[int]:
    raise sqlite3.OperationalError("disk I/O error")


@pytest.fixture
async def worker(tmp_path: pathlib.Path) -> AsyncIterator[SqliteWorker]:
    w = SqliteWorker(tmp_path / "w.db", PRAGMAS)
    await w.start()
    await w.run(lambda c: c.execute("CREATE TABLE t (n INTEGER NOT NULL)"))
    CALLS.clear()
    yield w
    await w.close()


def hold(worker: SqliteWorker) -> tuple[threading.Event, asyncio.Future[None]]:
    """Keep the thread busy until the event is set, so what is queued meanwhile waits together."""
    release = threading.Event()
    return release, worker.run(lambda c: release.wait(5) and None)


async def stored(worker: SqliteWorker) -> list[int]:
    return [n for (n,) in await worker.run(lambda c: c.execute("SELECT n FROM t ORDER BY rowid").fetchall())]


async def test_items_queued_meanwhile_go_in_one_call_in_order_and_each_gets_its_outcome(worker: SqliteWorker) -> None:
    release, held = hold(worker)
    futures = [worker.run_grouped(insert_all, n) for n in (1, 2, -3, 4)]
    release.set()
    await held
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert CALLS == [[1, 2, -3, 4]]
    assert outcomes[:2] == [10, 20] and outcomes[3] == 40
    assert isinstance(outcomes[2], ValueError) and "item -3" in str(outcomes[2])
    assert await stored(worker) == [1, 2, 4]


async def test_a_group_runs_at_its_first_items_turn_and_other_jobs_keep_theirs(worker: SqliteWorker) -> None:
    release, held = hold(worker)
    first = worker.run_grouped(insert_all, 1)
    between = worker.run(lambda c: c.execute("INSERT INTO t (n) VALUES (100)").rowcount)
    second = worker.run_grouped(insert_all, 2)
    release.set()
    await held
    assert await asyncio.gather(first, between, second) == [10, 1, 20]
    assert CALLS == [[1, 2]]
    assert await stored(worker) == [1, 2, 100]


async def test_one_item_alone_is_a_group_of_one_and_later_items_a_group_of_their_own(worker: SqliteWorker) -> None:
    assert await worker.run_grouped(insert_all, 7) == 70
    assert await asyncio.gather(worker.run_grouped(insert_all, 8), worker.run_grouped(insert_all, 9)) == [80, 90]
    assert CALLS[0] == [7] and [item for call in CALLS[1:] for item in call] == [8, 9]


async def test_a_group_that_raises_fails_every_item_of_it(worker: SqliteWorker) -> None:
    release, held = hold(worker)
    futures = [worker.run_grouped(broken, n) for n in range(3)]
    other = worker.run_grouped(insert_all, 5)  # another group: unaffected
    release.set()
    await held
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(o, sqlite3.OperationalError) and "disk I/O" in str(o) for o in outcomes)
    assert await other == 50


async def test_a_caller_that_left_before_its_turn_is_left_out(worker: SqliteWorker) -> None:
    release, held = hold(worker)
    kept = worker.run_grouped(insert_all, 1)
    left = worker.run_grouped(insert_all, 2)
    left.cancel()
    release.set()
    await held
    assert await kept == 10
    assert CALLS == [[1]]
    assert await stored(worker) == [1]


# --- the SQLite Queue's publishes, grouped this way --------------------------------------------


async def test_publishes_queued_together_commit_together_and_a_failing_one_fails_alone(worker: SqliteWorker) -> None:
    """Three publishes queued while the thread is busy (write jobs of the Queue go together: publishes,
    claims, acknowledgements …): one of them cannot be stored (a payload
    SQLite cannot bind). Their group's transaction fails, so each runs again alone: the two good
    ones are stored once each, in their order, and the bad one's caller gets the error."""
    queue = SqliteQueue(worker)
    await queue.start()
    try:
        release, held = hold(worker)
        good = queue.publish("ns", "orders", [Entry(b"a1"), Entry(b"a2")])
        bad = queue.publish("ns", "orders", [Entry(object())])  # type: ignore[arg-type]
        later = queue.publish("ns", "orders", [Entry(b"c1")])
        release.set()
        await held
        outcomes = await asyncio.gather(good, bad, later, return_exceptions=True)
        assert isinstance(outcomes[1], sqlite3.Error)
        assert all(isinstance(p, Published) for p in (*outcomes[0], *outcomes[2]))  # type: ignore[misc]
        stored = await worker.run(
            lambda c: c.execute("SELECT payload FROM prism_queue_messages WHERE namespace='ns' ORDER BY published_ns").fetchall()
        )
        assert [p for (p,) in stored] == [b"a1", b"a2", b"c1"]
    finally:
        await queue.close()
