"""The Transact adapter contract (``adapters/transact/base.py``), checked against each adapter
directly: the contract a remote plugin adapter must pass as well. ``test_transact.py`` checks
the service through a real gateway.

Each backend is a ``Site``: where its data lives for one test. ``open()`` gives an adapter on a
connection of its own (a second one is what another gateway process would have); the Site also
makes the test's data table (typed columns, a NOT NULL, a CHECK), reads it directly, installs a
trigger that refuses mailbox rows bound for ``explode`` (a mailbox write failing inside the
database, after the data write), holds a lock that blocks a write (so a step can be caught
mid-statement), and checks that no connection is left inside a transaction. Every test uses a
namespace and a table of its own.

Adding a backend is one entry in ``SITES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.sqlite import PRAGMAS
from adapters.sqlite_worker import SqliteWorker
from adapters.transact.base import (
    DataWrite,
    Isolation,
    MailboxWrite,
    Operation,
    State,
    Table,
    TransactAdapter,
    WriteResult,
)
from adapters.transact.postgres import PostgresTransact
from adapters.transact.sqlite import SqliteTransact
from prism.errors import PrismError
from tests.servers import POSTGRES_DSN, unreachable

WAIT = 10.0  # seconds; bound on every wait for something that must happen
TIMEOUT = 5.0  # a Write's timeout
SHORT = 0.4  # a short transaction timeout
RC = Isolation.READ_COMMITTED
COLUMNS = ("id", "customer", "total", "qty", "status", "doc")
EXPLODE = "explode"  # a destination the Site's trigger refuses
NAMESPACES: set[str] = set()  # every namespace a test used, for sites that must delete them

MATRIX = ("Transact adapter", {"sqlite": "sqlite", "postgres": "postgres"})  # for tests/conformance/conftest.py


class SqliteSite:
    """One SQLite file; every ``open()`` is its own SqliteWorker (connection) on it."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.path = tmp / "transact.db"
        self.opened: list[tuple[TransactAdapter, SqliteWorker]] = []

    async def open(self, **options: Any) -> TransactAdapter:
        worker = SqliteWorker(self.path, PRAGMAS)
        await worker.start()
        adapter = SqliteTransact(worker, **options)
        await adapter.start()
        self.opened.append((adapter, worker))
        return adapter

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout = 5000")
        return connection

    async def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            connection = self._connect()
            try:
                return connection.execute(statement, args).fetchall()
            finally:
                connection.close()

        return await asyncio.to_thread(run)

    async def create_table(self, name: str) -> None:
        # STRICT: column types refuse values, as PostgreSQL's do.
        await self.sql(
            f'CREATE TABLE "{name}" (id TEXT PRIMARY KEY, customer TEXT NOT NULL DEFAULT \'\', total REAL, '
            "qty INTEGER, status TEXT CHECK (status IS NULL OR status <> 'forbidden'), doc TEXT, extra TEXT) STRICT"
        )

    async def rows(self, table: str) -> dict[str, dict[str, Any]]:
        found = await self.sql(f'SELECT {", ".join(COLUMNS)} FROM "{table}"')
        return {r[0]: dict(zip(COLUMNS, (*r[:5], json.loads(r[5]) if r[5] is not None else None), strict=True)) for r in found}

    async def fail_mailbox(self) -> None:
        await self.sql(
            "CREATE TRIGGER IF NOT EXISTS prism_test_explode BEFORE INSERT ON prism_transact_mailbox "
            f"WHEN NEW.destination = '{EXPLODE}' BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        )

    @contextlib.asynccontextmanager
    async def blocking(self, table: str, key: str) -> AsyncIterator[None]:
        """The file's write lock, held by another connection: every write waits."""
        connection = await asyncio.to_thread(self._connect)
        await asyncio.to_thread(connection.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(connection.execute, "ROLLBACK")
            await asyncio.to_thread(connection.close)

    async def assert_clean(self, adapter: TransactAdapter) -> None:
        """Neither the shared connection nor a kept one is inside a transaction, and nobody
        holds the file's write lock."""
        assert isinstance(adapter, SqliteTransact)
        assert not await adapter.worker.run(lambda c: c.in_transaction)
        for worker, _ in adapter._idle:
            assert not await worker.run(lambda c: c.in_transaction)
        assert not adapter._open

        def lock_is_free() -> None:
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
            finally:
                connection.close()

        await asyncio.to_thread(lock_is_free)

    async def close_all(self) -> None:
        for adapter, worker in self.opened:
            await adapter.close()
            await worker.close()


class PostgresSite:
    """The PostgreSQL database; every ``open()`` is its own pool and adapter on it. Closing
    drops the suite's tables and trigger and deletes its namespaces' mailbox rows and keys."""

    def __init__(self, tmp: pathlib.Path) -> None:
        if why := unreachable(POSTGRES_DSN):
            pytest.skip(why)
        self.opened: list[tuple[TransactAdapter, PostgresPool]] = []
        self.tables: list[str] = []
        self.trigger = ""
        self.functions: list[str] = []

    async def open(self, *, session: str = "", **options: Any) -> TransactAdapter:
        """``session``: server settings of its connections, as DSN parameters (``a=b&c=d``)."""
        dsn = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}{session}" if session else POSTGRES_DSN
        pool = PostgresPool(PostgresSettings(dsn=dsn, pool_size=4))
        await pool.start()
        adapter = PostgresTransact(pool, **options)
        await adapter.start()
        self.opened.append((adapter, pool))
        return adapter

    async def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        import asyncpg

        con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            return [tuple(r) for r in await con.fetch(statement, *args)]
        finally:
            await con.close()

    async def create_table(self, name: str) -> None:
        await self.sql(
            f'CREATE TABLE "{name}" (id text PRIMARY KEY, customer text NOT NULL DEFAULT \'\', total numeric, '
            "qty integer, status text CHECK (status IS NULL OR status <> 'forbidden'), doc jsonb, extra text)"
        )
        self.tables.append(name)

    async def rows(self, table: str) -> dict[str, dict[str, Any]]:
        found = await self.sql(f'SELECT {", ".join(COLUMNS)} FROM "{table}"')
        return {
            r[0]: dict(zip(COLUMNS, (r[0], r[1], None if r[2] is None else float(r[2]), r[3], r[4],
                                     None if r[5] is None else json.loads(r[5])), strict=True))
            for r in found
        }

    async def fail_mailbox(self) -> None:
        """A trigger of this test's own (dropped at the end), refusing rows bound for EXPLODE."""
        self.trigger = f"prism_test_explode_{uuid.uuid4().hex[:10]}"
        await self.sql(
            f"CREATE FUNCTION {self.trigger}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$"
        )
        await self.sql(
            f"CREATE TRIGGER {self.trigger} BEFORE INSERT ON prism_transact_mailbox FOR EACH ROW "
            f"WHEN (NEW.destination = '{EXPLODE}') EXECUTE FUNCTION {self.trigger}()"
        )

    async def record_isolation(self, table: str) -> None:
        """A trigger of this test's own: every row inserted into ``table`` gets, as its
        ``status``, the isolation level of the transaction that inserted it."""
        function = f"prism_test_isolation_{uuid.uuid4().hex[:10]}"
        await self.sql(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.status := current_setting('transaction_isolation'); RETURN NEW; END $$"
        )
        self.functions.append(function)
        await self.sql(f'CREATE TRIGGER {function} BEFORE INSERT ON "{table}" FOR EACH ROW EXECUTE FUNCTION {function}()')

    @contextlib.asynccontextmanager
    async def blocking(self, table: str, key: str) -> AsyncIterator[None]:
        """The row ``key`` locked by another connection: a write of it waits."""
        import asyncpg

        con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            await con.execute("BEGIN")
            await con.execute(f'SELECT 1 FROM "{table}" WHERE id = $1 FOR UPDATE', key)
            yield
        finally:
            await con.close()

    async def assert_clean(self, adapter: TransactAdapter) -> None:
        """No connection of the adapter's pool is inside a transaction, by the driver's account
        and by the server's."""
        assert isinstance(adapter, PostgresTransact)
        pool = adapter.pool._pool
        assert pool is not None
        pids = []
        for holder in pool._holders:
            con = holder._con
            if con is not None and not con.is_closed():
                assert not con.is_in_transaction()
                pids.append(con.get_server_pid())
        idle_in_transaction = await self.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND state LIKE 'idle in transaction%'", pids
        )
        assert idle_in_transaction == [(0,)]
        assert not adapter._open

    async def close_all(self) -> None:
        for adapter, pool in self.opened:
            await adapter.close()
            await pool.close()
        for table in self.tables:
            await self.sql(f'DROP TABLE IF EXISTS "{table}"')
        for function in self.functions:  # their triggers went with the tables
            await self.sql(f"DROP FUNCTION IF EXISTS {function}()")
        if self.trigger:
            await self.sql(f"DROP TRIGGER IF EXISTS {self.trigger} ON prism_transact_mailbox")
            await self.sql(f"DROP FUNCTION IF EXISTS {self.trigger}()")
        if await self.sql("SELECT to_regclass('prism_transact_mailbox') IS NOT NULL") == [(True,)]:
            for table in ("prism_transact_mailbox", "prism_transact_heads", "prism_transact_keys", "prism_transact_cursors"):
                if await self.sql("SELECT to_regclass($1) IS NOT NULL", table) == [(True,)]:
                    await self.sql(f"DELETE FROM {table} WHERE namespace = ANY($1::text[])", sorted(NAMESPACES))


SITES: dict[str, Callable[[pathlib.Path], Any]] = {"sqlite": SqliteSite, "postgres": PostgresSite}


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close_all()


class Env:
    """A test's namespace and data table, on one adapter."""

    def __init__(self, site: Any, adapter: TransactAdapter, table: Table, namespace: str) -> None:
        self.site, self.adapter, self.table, self.ns = site, adapter, table, namespace

    def data(self, operation: Operation, **row: Any) -> DataWrite:
        return DataWrite(self.table, operation, row)

    async def write(
        self, operation: Operation, row: dict[str, Any], mailbox: str = "orders", payload: bytes = b"p",
        destination: str = "orders.created", key: str = "", isolation: Isolation = RC, adapter: TransactAdapter | None = None,
    ) -> WriteResult:
        return await (adapter or self.adapter).write(
            self.ns, DataWrite(self.table, operation, row), MailboxWrite(mailbox, payload, {"h": "v"}, destination),
            isolation=isolation, time_limit=TIMEOUT, idempotency_key=key, fingerprint=json.dumps([row, mailbox]).encode(),
        )

    async def rows(self) -> dict[str, dict[str, Any]]:
        return await self.site.rows(self.table.name)

    async def sequences(self, mailbox: str = "orders") -> list[int]:
        return [r.sequence for r in await self.adapter.mailbox_rows(self.ns, mailbox, 0, 10_000)]

    async def begin(self, time_limit: float = TIMEOUT, isolation: Isolation = RC) -> Any:
        return await self.adapter.begin(self.ns, isolation=isolation, time_limit=time_limit)


async def new_env(site: Any, adapter: TransactAdapter | None = None) -> Env:
    name = f"t_{uuid.uuid4().hex[:10]}"
    await site.create_table(name)
    table = Table(name, ("id",), COLUMNS)
    adapter = adapter or await site.open()
    await adapter.prepare(table)
    namespace = f"n{uuid.uuid4().hex[:10]}"
    NAMESPACES.add(namespace)
    return Env(site, adapter, table, namespace)


@pytest.fixture
async def env(site: Any) -> Env:
    return await new_env(site)


async def refused(code: grpc.StatusCode, call: Any, field: str | None = None) -> PrismError:
    with pytest.raises(PrismError) as caught:
        await call
    assert caught.value.code == code, caught.value
    if field is not None:
        assert caught.value.field == field, caught.value
    return caught.value


# --- Write ----------------------------------------------------------------------------------------


@pytest.mark.case("write: data and mailbox together")
async def test_write_commits_the_row_and_the_mailbox_row_together(env: Env) -> None:
    first = await env.write(Operation.INSERT, {"id": "a", "customer": "c-1", "total": 12.5, "qty": 3, "doc": {"x": [1, "y", True, None]}})
    assert (first.mailbox_sequence, first.replayed) == (1, False)
    assert (await env.rows())["a"] == {
        "id": "a", "customer": "c-1", "total": 12.5, "qty": 3, "status": None, "doc": {"x": [1, "y", True, None]}
    }
    (row,) = await env.adapter.mailbox_rows(env.ns, "orders")
    assert (row.sequence, row.payload, dict(row.headers), row.destination) == (1, b"p", {"h": "v"}, "orders.created")
    assert row.committed_ns == first.committed_ns and row.delivered_ns is None and row.attempts == 0


@pytest.mark.case("write: data and mailbox together")
async def test_every_operation(env: Env) -> None:
    await env.write(Operation.INSERT, {"id": "a", "customer": "c", "total": 1})
    await env.write(Operation.UPSERT, {"id": "a", "status": "paid"})  # only the given columns change
    await env.write(Operation.UPSERT, {"id": "b", "customer": "d"})  # a new row
    await env.write(Operation.UPDATE, {"id": "b", "total": 2.25, "qty": 7})
    rows = await env.rows()
    assert (rows["a"]["customer"], rows["a"]["total"], rows["a"]["status"]) == ("c", 1.0, "paid")
    assert (rows["b"]["total"], rows["b"]["qty"]) == (2.25, 7)
    await env.write(Operation.DELETE, {"id": "a"})
    assert set(await env.rows()) == {"b"}
    assert await env.sequences() == [1, 2, 3, 4, 5]


@pytest.mark.case("write: data and mailbox together")
async def test_sequences_count_per_mailbox_and_namespace(site: Any, env: Env) -> None:
    for i in range(3):
        await env.write(Operation.UPSERT, {"id": f"a{i}"}, mailbox="orders")
        await env.write(Operation.UPSERT, {"id": f"b{i}"}, mailbox="billing")
    other = await new_env(site, env.adapter)  # another namespace: its own mailboxes
    await other.write(Operation.UPSERT, {"id": "c"}, mailbox="orders")
    assert await env.sequences("orders") == [1, 2, 3]
    assert await env.sequences("billing") == [1, 2, 3]
    assert await other.sequences("orders") == [1]
    assert [r.sequence for r in await env.adapter.mailbox_rows(env.ns, "orders", after=1, limit=1)] == [2]


@pytest.mark.case("atomicity")
async def test_a_failing_data_write_leaves_no_mailbox_row(env: Env) -> None:
    await env.write(Operation.INSERT, {"id": "a", "customer": "c"})
    await refused(grpc.StatusCode.ALREADY_EXISTS, env.write(Operation.INSERT, {"id": "a"}))
    await refused(grpc.StatusCode.NOT_FOUND, env.write(Operation.UPDATE, {"id": "nobody", "status": "x"}))
    await refused(grpc.StatusCode.NOT_FOUND, env.write(Operation.DELETE, {"id": "nobody"}))
    await refused(grpc.StatusCode.INVALID_ARGUMENT, env.write(Operation.INSERT, {"id": "b", "customer": None}), "row.customer")
    await refused(grpc.StatusCode.FAILED_PRECONDITION, env.write(Operation.INSERT, {"id": "b", "status": "forbidden"}))
    await refused(grpc.StatusCode.INVALID_ARGUMENT, env.write(Operation.INSERT, {"id": "b", "qty": "many"}), "row")
    assert set(await env.rows()) == {"a"}
    assert await env.sequences() == [1]  # no row, and no sequence used up: the next is 2
    assert (await env.write(Operation.INSERT, {"id": "b"})).mailbox_sequence == 2


@pytest.mark.case("atomicity")
async def test_a_failing_mailbox_write_leaves_no_data_row(site: Any, env: Env) -> None:
    await env.adapter.mailbox_rows(env.ns, "orders")  # the mailbox tables exist: the trigger goes on them
    await site.fail_mailbox()
    await refused(grpc.StatusCode.FAILED_PRECONDITION, env.write(Operation.INSERT, {"id": "a"}, destination=EXPLODE))
    async with await env.begin() as transaction:
        assert await transaction.data(env.data(Operation.INSERT, id="b")) == 1
        await refused(grpc.StatusCode.FAILED_PRECONDITION, transaction.mailbox(MailboxWrite("orders", b"x", {}, EXPLODE)))
        assert transaction.state is State.ROLLED_BACK
    assert await env.rows() == {}
    assert await env.sequences() == []
    await site.assert_clean(env.adapter)


@pytest.mark.case("atomicity")
async def test_writes_arriving_together_succeed_or_fail_each_alone(site: Any, env: Env) -> None:
    """Writes arriving at once (on SQLite they share one transaction, a savepoint each): every
    refused one leaves nothing behind, every other one commits, and the mailbox is numbered
    without a gap, each row as its Write answered."""
    await env.write(Operation.INSERT, {"id": "taken"})
    await site.fail_mailbox()
    calls, codes, committed = [], [], set()
    for i in range(30):
        kind = i % 5
        if kind == 0:
            calls.append(env.write(Operation.INSERT, {"id": "taken"}))
            codes.append(grpc.StatusCode.ALREADY_EXISTS)
        elif kind == 1:
            calls.append(env.write(Operation.UPDATE, {"id": f"nobody{i}", "qty": 1}))
            codes.append(grpc.StatusCode.NOT_FOUND)
        elif kind == 2:  # the data row is written, then the mailbox row refused
            calls.append(env.write(Operation.INSERT, {"id": f"explode{i}"}, destination=EXPLODE))
            codes.append(grpc.StatusCode.FAILED_PRECONDITION)
        elif kind == 3:
            calls.append(env.write(Operation.INSERT, {"id": f"forbidden{i}", "status": "forbidden"}))
            codes.append(grpc.StatusCode.FAILED_PRECONDITION)
        else:
            calls.append(env.write(Operation.INSERT, {"id": f"ok{i}", "qty": i}, payload=f"ok{i}".encode()))
            codes.append(None)
            committed.add(f"ok{i}")
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [r.code if isinstance(r, PrismError) else None for r in results] == codes, results
    rows = await env.rows()
    assert set(rows) == {"taken", *committed}
    written = {r.mailbox_sequence: r for r in results if isinstance(r, WriteResult)}
    assert sorted(written) == list(range(2, 2 + len(committed)))
    mailbox = await env.adapter.mailbox_rows(env.ns, "orders")
    assert [r.sequence for r in mailbox] == list(range(1, 2 + len(committed)))
    for row in mailbox[1:]:
        assert row.committed_ns == written[row.sequence].committed_ns
        assert rows[row.payload.decode()]["qty"] == int(row.payload[2:])
    await site.assert_clean(env.adapter)


@pytest.mark.case("write: bounded waits")
async def test_a_write_waits_for_a_lock_until_its_deadline_without_stalling_others(site: Any, env: Env) -> None:
    await env.write(Operation.INSERT, {"id": "a"})
    short = env.adapter.write(
        env.ns, env.data(Operation.UPDATE, id="a", qty=1), MailboxWrite("orders", b"late"), isolation=RC, time_limit=SHORT
    )
    async with site.blocking(env.table.name, "a"):
        await refused(grpc.StatusCode.DEADLINE_EXCEEDED, short)
        waiting = asyncio.ensure_future(env.write(Operation.UPDATE, {"id": "a", "qty": 2}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        async with asyncio.timeout(1.0):  # the adapter answers other calls meanwhile
            assert await env.sequences() == [1]
    assert (await asyncio.wait_for(waiting, WAIT)).mailbox_sequence == 2
    assert (await env.rows())["a"]["qty"] == 2
    assert [r.payload for r in await env.adapter.mailbox_rows(env.ns, "orders")] == [b"p", b"p"]
    await site.assert_clean(env.adapter)


# --- Interactive transactions -----------------------------------------------------------------------


@pytest.mark.case("transaction: commit")
async def test_a_transaction_commits_everything_at_once(site: Any, env: Env) -> None:
    reader = await new_env(site, await site.open())
    transaction = await env.begin()
    assert await transaction.data(env.data(Operation.INSERT, id="a", total=1)) == 1
    assert await transaction.data(env.data(Operation.UPSERT, id="b", qty=2)) == 1
    assert await transaction.data(env.data(Operation.UPDATE, id="nobody", qty=2)) == 0  # reported, not refused
    assert await transaction.mailbox(MailboxWrite("orders", b"one")) == 1
    assert await transaction.mailbox(MailboxWrite("orders", b"two")) == 2
    assert await transaction.data(env.data(Operation.DELETE, id="b")) == 1
    assert await reader.site.rows(env.table.name) == {}  # nothing visible before the commit
    assert await reader.adapter.mailbox_rows(env.ns, "orders") == []
    committed = await transaction.commit()
    assert transaction.state is State.COMMITTED
    assert set(await env.rows()) == {"a"}
    rows = await env.adapter.mailbox_rows(env.ns, "orders")
    assert [(r.sequence, r.payload, r.committed_ns) for r in rows] == [(1, b"one", committed), (2, b"two", committed)]
    await refused(grpc.StatusCode.FAILED_PRECONDITION, transaction.data(env.data(Operation.UPSERT, id="c")))
    await transaction.rollback()  # after a commit: nothing
    assert set(await env.rows()) == {"a"}
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_rollback_explicit_and_by_leaving_the_block(site: Any, env: Env) -> None:
    transaction = await env.begin()
    await transaction.data(env.data(Operation.INSERT, id="a"))
    await transaction.mailbox(MailboxWrite("orders", b"x"))
    await transaction.rollback()
    await transaction.rollback()  # idempotent
    assert transaction.state is State.ROLLED_BACK
    await refused(grpc.StatusCode.FAILED_PRECONDITION, transaction.commit())
    async with await env.begin() as transaction:
        await transaction.data(env.data(Operation.INSERT, id="b"))
    assert transaction.state is State.ROLLED_BACK
    with contextlib.suppress(RuntimeError):
        async with await env.begin() as transaction:
            await transaction.mailbox(MailboxWrite("orders", b"y"))
            raise RuntimeError("the caller failed")
    assert await env.rows() == {}
    assert await env.sequences() == []
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_rollback_on_a_failed_step(site: Any, env: Env) -> None:
    await env.write(Operation.INSERT, {"id": "a"})
    for bad in (
        env.data(Operation.INSERT, id="a"),  # the database refuses it
        env.data(Operation.UPSERT, id="z", nope=1),  # the declaration refuses it, before any statement
    ):
        transaction = await env.begin()
        await transaction.data(env.data(Operation.INSERT, id="b"))
        await transaction.mailbox(MailboxWrite("orders", b"x"))
        with pytest.raises(PrismError):
            await transaction.data(bad)
        assert transaction.state is State.ROLLED_BACK
        await refused(grpc.StatusCode.FAILED_PRECONDITION, transaction.commit())
    assert set(await env.rows()) == {"a"}
    assert await env.sequences() == [1]
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_rollback_at_the_timeout_while_idle(site: Any, env: Env) -> None:
    transaction = await env.begin(time_limit=SHORT)
    await transaction.data(env.data(Operation.INSERT, id="a"))
    await transaction.mailbox(MailboxWrite("orders", b"x"))
    async with asyncio.timeout(WAIT):
        await transaction.finished.wait()  # nobody called: the deadline alone rolled it back
    assert transaction.state is State.ROLLED_BACK
    error = await refused(grpc.StatusCode.DEADLINE_EXCEEDED, transaction.commit())
    assert "rolled back" in error.message
    assert await env.rows() == {}
    assert await env.sequences() == []
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_rollback_at_the_timeout_mid_statement(site: Any, env: Env) -> None:
    await env.write(Operation.INSERT, {"id": "a"})
    transaction = await env.begin(time_limit=SHORT)
    async with site.blocking(env.table.name, "a"):
        await refused(grpc.StatusCode.DEADLINE_EXCEEDED, transaction.data(env.data(Operation.UPDATE, id="a", qty=9)))
    async with asyncio.timeout(WAIT):
        await transaction.finished.wait()
    assert (await env.rows())["a"]["qty"] is None
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_rollback_when_the_caller_is_cancelled_mid_statement(site: Any, env: Env) -> None:
    """A client that disconnects: its handler is cancelled while a statement waits. (The
    statement is the transaction's first: on SQLite a write before it would hold the very lock
    the blocker waits for.)"""
    await env.write(Operation.INSERT, {"id": "a"})
    transaction = await env.begin()
    async with site.blocking(env.table.name, "a"):
        step = asyncio.ensure_future(transaction.data(env.data(Operation.UPDATE, id="a", qty=9)))
        await asyncio.sleep(0.3)
        assert not step.done()  # waiting for the lock
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        assert transaction.state is State.ROLLED_BACK
    async with asyncio.timeout(WAIT):
        await transaction.finished.wait()
    assert (await env.rows())["a"]["qty"] is None
    assert await env.sequences() == [1]
    await site.assert_clean(env.adapter)


@pytest.mark.case("transaction: rollback paths")
async def test_closing_the_adapter_rolls_back_what_is_open(site: Any) -> None:
    adapter = await site.open()
    env = await new_env(site, adapter)
    transaction = await env.begin()
    await transaction.data(env.data(Operation.INSERT, id="a"))
    await adapter.close()
    assert transaction.state is State.ROLLED_BACK and transaction.finished.is_set()
    assert await env.rows() == {}


@pytest.mark.case("transaction: rollback paths")
async def test_open_transactions_are_bounded(site: Any) -> None:
    env = await new_env(site, await site.open(max_transactions=2))
    first, second = await env.begin(), await env.begin()
    await refused(grpc.StatusCode.RESOURCE_EXHAUSTED, env.begin())
    await first.rollback()
    third = await env.begin()
    await second.rollback()
    await third.rollback()
    await site.assert_clean(env.adapter)


# --- Idempotency ------------------------------------------------------------------------------------


@pytest.mark.case("idempotency")
async def test_a_retried_write_applies_once(site: Any, env: Env) -> None:
    first = await env.write(Operation.INSERT, {"id": "a"}, key="k1")
    again = await env.write(Operation.INSERT, {"id": "a"}, key="k1")  # applied again, it would be ALREADY_EXISTS
    assert again == WriteResult(first.mailbox_sequence, first.committed_ns, replayed=True)
    elsewhere = await env.write(Operation.INSERT, {"id": "a"}, key="k1", adapter=await site.open())  # another process
    assert elsewhere.replayed and elsewhere.mailbox_sequence == first.mailbox_sequence
    await refused(grpc.StatusCode.ALREADY_EXISTS, env.write(Operation.INSERT, {"id": "b"}, key="k1"), "idempotencyKey")
    # A write that failed claimed nothing: its retry applies afresh.
    await refused(grpc.StatusCode.NOT_FOUND, env.write(Operation.UPDATE, {"id": "c", "qty": 1}, key="k2"))
    await env.write(Operation.INSERT, {"id": "c"})
    assert not (await env.write(Operation.UPDATE, {"id": "c", "qty": 1}, key="k2")).replayed
    assert set(await env.rows()) == {"a", "c"}
    assert await env.sequences() == [1, 2, 3]


@pytest.mark.case("idempotency")
async def test_concurrent_retries_of_one_key_apply_once(site: Any, env: Env) -> None:
    other = await site.open()
    calls = [env.write(Operation.INSERT, {"id": "a"}, key="same", adapter=a) for a in (env.adapter, other) for _ in range(8)]
    results = await asyncio.gather(*calls)
    assert sorted(r.replayed for r in results) == [False] + [True] * 15
    assert {(r.mailbox_sequence, r.committed_ns) for r in results} == {(1, results[0].committed_ns)}
    assert set(await env.rows()) == {"a"}
    assert await env.sequences() == [1]
    await site.assert_clean(env.adapter)
    await site.assert_clean(other)


# --- Order and isolation ----------------------------------------------------------------------------


@pytest.mark.case("order and isolation")
async def test_sequences_commit_in_order_under_concurrency(site: Any, env: Env) -> None:
    """Writes racing from two processes: a reader never sees a gap that a later commit fills,
    and at SERIALIZABLE (conflicts retried) every write applies, the last sequence's last."""
    other = await site.open()
    stop = asyncio.Event()
    seen: list[list[int]] = []

    async def read() -> None:
        while not stop.is_set():
            seen.append(await env.sequences("hot"))
            await asyncio.sleep(0)

    reader = asyncio.ensure_future(read())
    writes = [
        env.write(Operation.UPSERT, {"id": "hot", "status": f"s{i}"}, mailbox="hot", payload=f"s{i}".encode(),
                  isolation=Isolation.SERIALIZABLE, adapter=(env.adapter, other)[i % 2])
        for i in range(16)
    ]
    results = await asyncio.gather(*writes)
    stop.set()
    await reader
    assert sorted(r.mailbox_sequence for r in results) == list(range(1, 17))
    for sequences in seen:
        assert sequences == list(range(1, len(sequences) + 1))
    last = max(results, key=lambda r: r.mailbox_sequence)
    rows = await env.adapter.mailbox_rows(env.ns, "hot", 0, 100)
    assert (await env.rows())["hot"]["status"] == rows[-1].payload.decode()
    assert rows[-1].committed_ns == last.committed_ns
    await site.assert_clean(env.adapter)


@pytest.mark.case("order and isolation")
async def test_writes_run_at_the_configured_isolation_level(site: Any, env: Env) -> None:
    """Every level, as asked. On PostgreSQL a trigger records the level each data row was
    written at: a READ COMMITTED Write without a key is one statement without BEGIN, so it runs
    at the sessions' default level — checked by the statement itself, and where the default is
    another level (the second adapter's sessions default to SERIALIZABLE) the Write runs BEGIN
    … COMMIT at the level asked instead. SQLite runs every write transaction serializably."""
    levels = {
        Isolation.READ_COMMITTED: "read committed",
        Isolation.REPEATABLE_READ: "repeatable read",
        Isolation.SERIALIZABLE: "serializable",
    }
    adapters = [env.adapter]
    if isinstance(site, PostgresSite):
        await site.record_isolation(env.table.name)
        adapters.append(await site.open(session="default_transaction_isolation=serializable"))
    n = 0
    for adapter in adapters:
        for isolation, name in levels.items():
            for key in ("", f"k{n}"):
                n += 1
                result = await env.write(Operation.INSERT, {"id": f"r{n}"}, key=key, isolation=isolation, adapter=adapter)
                assert (result.mailbox_sequence, result.replayed) == (n, False)
                if isinstance(site, PostgresSite):
                    assert (await env.rows())[f"r{n}"]["status"] == name, (adapter, isolation, key)
    if isinstance(site, PostgresSite):  # the one-statement Write where it can run, BEGIN where it cannot
        assert [adapter._implicit for adapter in adapters] == [True, False]  # type: ignore[attr-defined]
    assert await env.sequences() == list(range(1, n + 1))
    for adapter in adapters:
        await site.assert_clean(adapter)


# --- Bad input ---------------------------------------------------------------------------------------


@pytest.mark.case("bad input named")
async def test_declarations_are_checked(site: Any, env: Env) -> None:
    for bad in ('orders"; DROP TABLE x; --', "1abc", "a b", "", "prism_kv", "x" * 64):
        with pytest.raises(ValueError):
            Table(bad, ("id",), ("id",))
    with pytest.raises(ValueError):
        Table("t", ("id",), ("id", 'c"; --'))
    with pytest.raises(ValueError):
        Table("t", ("id",), ("name",))  # the key among the columns
    name = env.table.name
    missing = f"t_{uuid.uuid4().hex[:10]}"
    error = await refused(grpc.StatusCode.FAILED_PRECONDITION, env.adapter.prepare(Table(missing, ("id",), ("id",))))
    assert "no such table" in error.message
    error = await refused(grpc.StatusCode.FAILED_PRECONDITION, env.adapter.prepare(Table(name, ("id",), ("id", "nope"))))
    assert "'nope'" in error.message
    error = await refused(grpc.StatusCode.FAILED_PRECONDITION, env.adapter.prepare(Table(name, ("customer",), ("id", "customer"))))
    assert "unique" in error.message
    created = Table(f"t_{uuid.uuid4().hex[:10]}", ("k",), ("k", "v"), create=True)
    if isinstance(site, PostgresSite):
        site.tables.append(created.name)
    await env.adapter.prepare(created)  # created when missing, then checked like any other
    await env.adapter.write(env.ns, DataWrite(created, Operation.UPSERT, {"k": 1, "v": {"any": "json"}}),
                            MailboxWrite("m", b""), isolation=RC, time_limit=TIMEOUT)


@pytest.mark.case("bad input named")
async def test_rows_are_checked_against_the_declaration(env: Env) -> None:
    write = env.write
    injected = 'id"; DROP TABLE x; --'
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": "a", injected: 1}), f"row.{injected}")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": "a", "extra": "x"}), "row.extra")  # real, not declared
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"customer": "c"}), "row.id")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": None}), "row.id")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": {"a": 1}}), "row.id")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPDATE, {"id": "a"}), "row")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.DELETE, {"id": "a", "qty": 1}), "row.qty")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": "a"}, mailbox="no spaces"), "mailbox")
    await refused(grpc.StatusCode.INVALID_ARGUMENT, write(Operation.UPSERT, {"id": "a"}, destination="a b"), "destination")
    assert await env.rows() == {}
    assert await env.sequences() == []


@pytest.mark.case("bad input named")
async def test_values_are_bound_never_interpolated(env: Env) -> None:
    hostile = ["x'); DROP TABLE students; --", 'a"b', "\\", "'", "$1", "?", "%s", "😀"]
    for i, value in enumerate(hostile):
        await env.write(Operation.INSERT, {"id": value, "customer": value, "doc": {value: value}})
        assert (await env.rows())[value]["customer"] == value, i
    assert set(await env.rows()) == set(hostile)  # the table is still there, every value as written
