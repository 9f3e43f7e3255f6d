"""What a production mailbox listener needs beyond delivering (``adapters/transact/base.py``, rule 7;
``app/listener.py``), on SQLite and PostgreSQL, each adapter checked directly and the listener on
top of it into a real Queue on the same backend:

- **dead letters**: a row its destination keeps refusing is dead-lettered after
  ``max_delivery_attempts`` refusals while the rows behind it are delivered in order; outages are
  retried for ever and never counted as refusals; a holder that lost its mailbox records nothing;
- **retention**: delivered rows older than ``retain_delivered_seconds`` are deleted in bounded
  batches, and nothing undelivered (waiting, unrouted or dead-lettered) ever is;
- **upgrades**: a database an older gateway made (its mailbox table without the dead-letter columns
  and the retention index) is upgraded in place, keeping its rows — SQLite by columns added under
  the file's write lock, PostgreSQL by the migrations after ``prism_schema``'s version.

The Sites and helpers are the conformance suites' (``tests/conformance/test_transact_adapter.py``,
``test_transact_listener.py``), so a backend added there is checked here too.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.sqlite import PRAGMAS
from adapters.queue.base import QueueAdapter
from adapters.sqlite_worker import SqliteWorker
from adapters.transact import postgres as pg
from adapters.transact import sqlite as lite
from adapters.transact.base import (
    MAILBOX_HEADER,
    SEQUENCE_HEADER,
    Failure,
    MailboxRow,
    Routes,
    TransactAdapter,
)
from app.listener import MailboxListener, Outgoing, QueueTarget, RouteTable, refused
from app.settings import MailboxListenerSettings
from prism.errors import PrismError
from tests.conformance.test_transact_adapter import SITES, Env, new_env
from tests.conformance.test_transact_listener import claim, open_queue, read_topic, sequences, write
from tests.servers import POSTGRES_DSN, purge_namespaces, unreachable

WAIT = 15.0
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


def out_namespace() -> str:
    name = f"out-{uuid.uuid4().hex[:10]}"
    QUEUE_NAMESPACES.append(name)
    return name


async def by_sequence(env: Env, mailbox: str) -> dict[int, MailboxRow]:
    return {r.sequence: r for r in await env.adapter.mailbox_rows(env.ns, mailbox, 0, 10_000)}


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_refusals_are_what_says_the_row_can_never_go() -> None:
    assert refused(PrismError(grpc.StatusCode.INVALID_ARGUMENT, "not a subject"))
    assert refused(PrismError(grpc.StatusCode.FAILED_PRECONDITION, "no route"))
    assert refused(PrismError(grpc.StatusCode.RESOURCE_EXHAUSTED, "payload too large", field="payload"))
    assert not refused(PrismError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"))
    assert not refused(PrismError(grpc.StatusCode.UNAVAILABLE, "down"))
    assert not refused(PrismError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"))
    assert not refused(TimeoutError("the lease ran out"))
    assert not refused(ConnectionResetError("a driver's own"))


# --- Dead letters ---------------------------------------------------------------------------------


async def test_a_failure_is_recorded_and_a_dead_lettered_row_is_never_claimed_again(env: Env) -> None:
    await write(env, "a", 3)
    routes = Routes(frozenset({env.ns}))
    assert sequences((await claim(env.adapter, "h1", routes))["a"]) == [1, 2, 3]
    # A refusal is counted and its error kept; an outage's error is kept, not counted.
    await env.adapter.mark_delivered("h1", env.ns, "a", [], failure=Failure(1, "INVALID_ARGUMENT: no", refused=True))
    again = (await claim(env.adapter, "h1", routes))["a"]
    assert (sequences(again), again.rows[0].refusals, again.rows[1].refusals) == ([1, 2, 3], 1, 0)
    await env.adapter.mark_delivered("h1", env.ns, "a", [], failure=Failure(1, "UNAVAILABLE: down", refused=False))
    row = (await by_sequence(env, "a"))[1]
    assert (row.refusals, row.last_error, row.dead_ns, row.delivered_ns) == (1, "UNAVAILABLE: down", None, None)
    # Dead-lettered: the rows behind it are claimed from now on; it stays, undelivered.
    await claim(env.adapter, "h1", routes)
    await env.adapter.mark_delivered("h1", env.ns, "a", [], failure=Failure(1, "INVALID_ARGUMENT: no" + "x" * 5000, True, dead=True))
    assert sequences((await claim(env.adapter, "h1", routes))["a"]) == [2, 3]
    await env.adapter.mark_delivered("h1", env.ns, "a", [2, 3])
    assert await claim(env.adapter, "h1", routes) == {}
    rows = await by_sequence(env, "a")
    assert rows[1].dead_ns and rows[1].delivered_ns is None and rows[1].refusals == 2
    assert rows[1].last_error.startswith("INVALID_ARGUMENT: no") and len(rows[1].last_error) == 1000
    assert rows[2].delivered_ns and rows[3].delivered_ns and rows[2].dead_ns is None
    # Delivered again, after the rows that passed it, the way the README says.
    where = f"namespace = '{env.ns}' AND mailbox = 'a'"
    await env.site.sql(f"UPDATE prism_transact_mailbox SET dead_ns = NULL, refusals = 0 WHERE {where} AND seq = 1")
    await env.site.sql(f"UPDATE prism_transact_cursors SET delivered = 0 WHERE {where}")
    assert sequences((await claim(env.adapter, "h1", routes))["a"]) == [1]
    await env.adapter.mark_delivered("h1", env.ns, "a", [1])
    assert await claim(env.adapter, "h1", routes) == {}
    # A mailbox whose last row is dead: claims find nothing to take (and do not spin on it).
    await write(env, "b", 1)
    await claim(env.adapter, "h1", routes)
    await env.adapter.mark_delivered("h1", env.ns, "b", [], failure=Failure(1, "NOT_FOUND: gone", True, dead=True))
    for _ in range(2):
        assert await claim(env.adapter, "h1", routes) == {}


async def test_a_holder_that_lost_its_mailbox_records_no_failure(env: Env) -> None:
    """A late mark of a crashed (or slow) holder must not dead-letter a row another holder has."""
    await write(env, "a", 2)
    routes = Routes(frozenset({env.ns}))
    await claim(env.adapter, "slow", routes, lease=1.0)
    await asyncio.sleep(1.1)
    assert sequences((await claim(env.adapter, "h2", routes))["a"]) == [1, 2]
    await env.adapter.mark_delivered("slow", env.ns, "a", [], failure=Failure(1, "INVALID_ARGUMENT: no", True, dead=True))
    row = (await by_sequence(env, "a"))[1]
    assert (row.dead_ns, row.refusals, row.last_error) == (None, 0, "")
    await env.adapter.mark_delivered("h2", env.ns, "a", [1, 2])
    assert all(r.delivered_ns for r in (await by_sequence(env, "a")).values())


class ScriptedTarget(QueueTarget):
    """A real Queue destination that fails some rows: ``script[(mailbox, sequence)]`` is the
    codes its next tries raise, one per try (after publishing the rows before it); it notes
    which rows went out, in order."""

    def __init__(self, queue: QueueAdapter, namespace: str, script: dict[tuple[str, int], list[grpc.StatusCode]]) -> None:
        super().__init__("scripted", namespace, queue)
        self.script = script
        self.log: list[tuple[str, int]] = []

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(rows)
        stopped: dict[str, PrismError] = {}  # mailbox → the error its scripted row met
        sendable = []
        for i, (batch, row) in enumerate(rows):
            if batch.mailbox in stopped:  # behind a failed row of its mailbox: not sent
                outcomes[i] = stopped[batch.mailbox]
            elif codes := self.script.get((batch.mailbox, row.sequence)):
                stopped[batch.mailbox] = outcomes[i] = PrismError(codes.pop(0), f"row {row.sequence} is not welcome", field="payload")
            else:
                sendable.append(i)
        if sendable:
            published = await super().publish(destination, [rows[i] for i in sendable])
            for i, outcome in zip(sendable, published, strict=True):
                outcomes[i] = outcome
                if outcome is None:
                    self.log.append((rows[i][0].mailbox, rows[i][1].sequence))
        return outcomes


async def test_a_poison_row_is_dead_lettered_and_the_rows_behind_it_go_on_in_order(
    site: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 3 of ``a`` is always refused: after three refusals it is dead-lettered and 4 … 10 are
    delivered in order. Row 2 of ``b`` meets an outage five times — more than the limit — and
    is delivered all the same: outages are not refusals."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = out_namespace()
    script = {("a", 3): [grpc.StatusCode.INVALID_ARGUMENT] * 100, ("b", 2): [grpc.StatusCode.UNAVAILABLE] * 5}
    target = ScriptedTarget(queue, out, script)
    options = MailboxListenerSettings(batch_rows=8, poll_seconds=1, max_retry_seconds=0.2, max_delivery_attempts=3)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), options)
    await write(env, "a", 10)
    await write(env, "b", 3)
    expected = {"a": [1, 2, *range(4, 11)], "b": [1, 2, 3]}

    async def done() -> bool:
        return all([s for m, s in target.log if m == mailbox] == want for mailbox, want in expected.items())

    try:
        with caplog.at_level(logging.WARNING, logger="prism.listener"):
            await listener.start()
            await until(done, "every row but the poison one delivered")
    finally:
        await listener.close()
    assert [s for m, s in target.log if m == "a"] == expected["a"]  # once each, in order
    poison = (await by_sequence(env, "a"))[3]
    assert poison.dead_ns and poison.delivered_ns is None and poison.refusals == 3
    assert poison.last_error == f"INVALID_ARGUMENT: row 3 is not welcome (delivering to {target.config})"
    assert all(r.delivered_ns for s, r in (await by_sequence(env, "a")).items() if s != 3)
    outage = (await by_sequence(env, "b"))[2]
    assert (outage.refusals, outage.dead_ns, outage.attempts) == (0, None, 6) and outage.delivered_ns
    assert outage.last_error.startswith("UNAVAILABLE")
    assert listener.dead_lettered == 1
    assert REGISTRY.get_sample_value("prism_mailbox_dead_lettered_total", {"namespace": env.ns}) == 1
    dead = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead) == 1 and f"{env.ns}/a row 3 dead-lettered after 3 refusals" in dead[0], dead
    # The topic holds the rows of a, in order, without the poison one.
    messages = [m for m in await read_topic(queue, out, "orders.created", 12) if m.headers[MAILBOX_HEADER] == "a"]
    assert [int(m.headers[SEQUENCE_HEADER]) for m in messages] == expected["a"]
    await queue.close()
    await connection.close()


# --- Retention -------------------------------------------------------------------------------------


async def test_delete_delivered_deletes_only_old_delivered_rows_in_bounded_batches(site: Any) -> None:
    env, other = await new_env(site), await new_env(site)
    await write(env, "a", 6)
    await write(env, "b", 2)
    await write(other, "a", 1)
    await claim(env.adapter, "h", Routes(frozenset({env.ns})))
    await claim(other.adapter, "h", Routes(frozenset({other.ns})))
    await env.adapter.mark_delivered("h", env.ns, "a", [1, 2, 3])
    await env.adapter.mark_delivered("h", env.ns, "b", [1, 2])
    await other.adapter.mark_delivered("h", other.ns, "a", [1])  # another namespace: not this sweep's
    await asyncio.sleep(0.01)
    cutoff = time.time_ns()
    await asyncio.sleep(0.01)
    assert sequences((await claim(env.adapter, "h", Routes(frozenset({env.ns}))))["a"]) == [4, 5, 6]
    await env.adapter.mark_delivered("h", env.ns, "a", [4], failure=Failure(5, "INVALID_ARGUMENT: no", True, dead=True))
    # Five rows delivered before the cutoff: two at a time, oldest first.
    deleted = [await env.adapter.delete_delivered(env.ns, before_ns=cutoff, limit=2) for _ in range(4)]
    assert deleted == [2, 2, 1, 0]
    rows = await by_sequence(env, "a")
    assert sorted(rows) == [4, 5, 6]  # 4: delivered after the cutoff; 5: dead-lettered; 6: undelivered
    assert rows[4].delivered_ns and rows[5].dead_ns and rows[6].delivered_ns is None and rows[6].dead_ns is None
    assert await by_sequence(env, "b") == {}
    assert list(await by_sequence(other, "a")) == [1]
    # Everything delivered until now; nothing undelivered, ever.
    for namespace in (env.ns, other.ns):
        assert await env.adapter.delete_delivered(namespace, before_ns=time.time_ns(), limit=100) == 1
    assert sorted(await by_sequence(env, "a")) == [5, 6] and await by_sequence(other, "a") == {}
    # The mailbox numbers on and is delivered on as before.
    await write(env, "a", 1)
    assert sequences((await claim(env.adapter, "h", Routes(frozenset({env.ns}))))["a"]) == [6, 7]


async def test_the_listener_deletes_delivered_rows_past_their_retention_and_nothing_else(site: Any) -> None:
    """Retention 2 s: delivered rows are there just after delivery and gone after, while the
    dead-lettered row and the rows of an unrouted mailbox (never delivered) stay."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = out_namespace()
    target = ScriptedTarget(queue, out, {("a", 2): [grpc.StatusCode.FAILED_PRECONDITION]})
    options = MailboxListenerSettings(poll_seconds=1, max_delivery_attempts=1, retain_delivered_seconds=2)
    listener = MailboxListener(env.adapter, RouteTable(mailboxes={(env.ns, "a"): target}), options)
    await write(env, "a", 5)
    await write(env, "parked", 2)  # no route: never delivered, never deleted

    async def delivered() -> bool:
        return len(target.log) == 4

    async def swept() -> bool:
        return sorted(await by_sequence(env, "a")) == [2]

    try:
        await listener.start()
        await until(delivered, "rows 1, 3, 4, 5 delivered")
        assert await listener.sweep() == 0  # younger than 2 s
        assert sorted(await by_sequence(env, "a")) == [1, 2, 3, 4, 5]
        await until(swept, "the delivered rows deleted")
    finally:
        await listener.close()
    assert listener.swept == 4 and listener.dead_lettered == 1
    assert (await by_sequence(env, "a"))[2].dead_ns
    assert [(r.sequence, r.delivered_ns) for r in (await by_sequence(env, "parked")).values()] == [(1, None), (2, None)]
    await queue.close()
    await connection.close()


async def test_sweeps_racing_writes_and_deliveries_never_delete_an_undelivered_row(site: Any) -> None:
    """A retention of 50 ms, so the listener sweeps all the time, while two writers fill three
    mailboxes: every row is published, once and in order, and the table ends with no row
    deleted before it was delivered (each is either gone after its delivery or still there)."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    target = ScriptedTarget(queue, out_namespace(), {})
    options = MailboxListenerSettings(batch_rows=16, poll_seconds=1, retain_delivered_seconds=0.05)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), options)
    mailboxes, per_writer = ("a", "b", "c"), 20

    async def writer() -> None:
        for _ in range(per_writer):
            for mailbox in mailboxes:
                await write(env, mailbox, 1)
            await asyncio.sleep(0.02)  # writing spans many sweeps

    async def all_published() -> bool:
        return len(target.log) == len(mailboxes) * 2 * per_writer

    async def all_swept() -> bool:
        return listener.swept == len(mailboxes) * 2 * per_writer

    try:
        await listener.start()
        await asyncio.gather(writer(), writer())
        swept_while_writing = listener.swept
        await until(all_published, "every row published")
        for mailbox in mailboxes:  # what is left is delivered
            assert all(r.delivered_ns for r in (await by_sequence(env, mailbox)).values())
        await until(all_swept, "every row deleted once delivered")
    finally:
        await listener.close()
    assert swept_while_writing > 0  # the sweeps raced the writes and deliveries
    for mailbox in mailboxes:
        assert [s for m, s in target.log if m == mailbox] == list(range(1, 2 * per_writer + 1)), mailbox
        assert await by_sequence(env, mailbox) == {}
    await queue.close()
    await connection.close()


# --- Upgrades -------------------------------------------------------------------------------------

FIRST_RELEASE = 6  # the Transact migrations of the release before dead letters and retention
NS = "old"
OLD_ROWS = [  # (seq, delivered_ns): one delivered long ago, two waiting
    (1, 1_000_000_000),
    (2, None),
    (3, None),
]


async def check_upgraded(adapter: TransactAdapter) -> None:
    """The old rows are all there, claimed as before; the new columns work."""
    rows = await adapter.mailbox_rows(NS, "m")
    assert [(r.sequence, r.delivered_ns, r.refusals, r.dead_ns, r.last_error) for r in rows] == [
        (1, 1_000_000_000, 0, None, ""), (2, None, 0, None, ""), (3, None, 0, None, "")
    ]  # fmt: skip
    claim = await adapter.claim("h", Routes(frozenset({NS})), lease=30, rows=10, max_bytes=1 << 20, mailboxes=4)
    assert [r.sequence for r in claim.batches[0].rows] == [2, 3]
    await adapter.mark_delivered("h", NS, "m", [], failure=Failure(2, "INVALID_ARGUMENT: no", True, dead=True))
    assert await adapter.delete_delivered(NS, before_ns=time.time_ns(), limit=10) == 1
    rows = await adapter.mailbox_rows(NS, "m")
    assert [(r.sequence, bool(r.dead_ns), r.refusals) for r in rows] == [(2, True, 1), (3, False, 0)]


# --- SQLite ---------------------------------------------------------------------------------------


def make_old_sqlite(path: pathlib.Path) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in lite.SCHEMA:  # the first release's tables, as it created them
            connection.execute(statement)
        connection.execute("INSERT INTO prism_transact_heads VALUES (?, 'm', 4)", (NS,))
        for seq, delivered in OLD_ROWS:
            connection.execute(
                "INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, "
                "committed_ns, delivered_ns) VALUES (?, 'm', ?, x'00', '{}', '', 1, ?)",
                (NS, seq, delivered),
            )
        columns = {row[1] for row in connection.execute("PRAGMA table_info(prism_transact_mailbox)")}
        assert "dead_ns" not in columns
    finally:
        connection.close()


async def test_an_old_sqlite_file_is_upgraded_in_place(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "old.db"
    make_old_sqlite(path)
    workers = [SqliteWorker(path, PRAGMAS) for _ in range(2)]
    adapters = [lite.SqliteTransact(w) for w in workers]
    try:
        for worker in workers:
            await worker.start()
        # Two processes opening the file together: one adds the columns, the other finds them.
        await asyncio.gather(*(adapter.mailbox_rows(NS, "m") for adapter in adapters))
        await check_upgraded(adapters[0])
        indexes = await workers[0].run(lambda c: [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")])
        assert "prism_transact_delivered" in indexes
    finally:
        for adapter, worker in zip(adapters, workers, strict=True):
            await adapter.close()
            await worker.close()


# --- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture
async def old_schema() -> AsyncIterator[str]:
    """A schema of its own holding the first release's Transact tables, with rows."""
    if reason := unreachable(POSTGRES_DSN):
        pytest.skip(reason)
    schema = f"prism_upgrade_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        con = await asyncpg.connect(f"{POSTGRES_DSN}?search_path={schema}")
        try:
            for statement in pg.MIGRATIONS[:FIRST_RELEASE]:
                await con.execute(statement)
            await con.execute("CREATE TABLE prism_schema (component text PRIMARY KEY, version integer NOT NULL)")
            await con.execute("INSERT INTO prism_schema VALUES ('transact', $1)", FIRST_RELEASE)
            await con.execute("INSERT INTO prism_transact_heads VALUES ($1, 'm', 4)", NS)
            for seq, delivered in OLD_ROWS:
                await con.execute(
                    "INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, "
                    "committed_ns, delivered_ns) VALUES ($1, 'm', $2, '\\x00', '{}', '', 1, $3)",
                    NS, seq, delivered,
                )  # fmt: skip
        finally:
            await con.close()
        yield schema
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def test_an_old_postgres_schema_is_migrated_in_place(old_schema: str) -> None:
    pool = PostgresPool(PostgresSettings(dsn=f"{POSTGRES_DSN}?search_path={old_schema}", pool_size=2))
    await pool.start()
    adapter = pg.PostgresTransact(pool)
    try:
        await check_upgraded(adapter)
        async with pool.connection() as con:
            assert await con.fetchval("SELECT version FROM prism_schema WHERE component = 'transact'") == len(pg.MIGRATIONS)
            assert await con.fetchval("SELECT to_regclass('prism_transact_delivered') IS NOT NULL")
    finally:
        await adapter.close()
        await pool.close()
