"""Statements keep using their indexes once a table has grown (``adapters/postgres_plans.py``,
``PostgresSettings.statement_lifetime``): PostgreSQL caches a prepared statement's generic plan
after five runs, costed at the table's size then, so a claim, a publish's token lookup or a Get
planned while its table was small would scan all of it on every later run.

Each test has a schema of its own (the adapter's connections find their tables through
``search_path``), so the server's per-table counters (``pg_stat_user_tables``) count its
statements alone: the table is vacuumed empty, as autovacuum leaves a drained outbox; the
statements run more than five times on the one pooled connection while it is small; then it
grows by 20,000 rows; and the statements that follow (a Get's once ``statement_lifetime`` has
passed) must not scan it sequentially. A backend sends its counters to the view at most once a
second (ten when idle), so each reading first makes the pool's connection flush its own
(``pg_stat_force_next_flush``), and the index scans must have moved: the statements were
counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.keyvalue.postgres import PostgresKeyValue
from adapters.postgres_plans import custom_plans
from adapters.queue.base import ConsumeOptions, Entry, Published, Start
from adapters.queue.postgres import PostgresQueue
from adapters.transact.base import Routes, headers_text
from adapters.transact.postgres import PostgresTransact
from tests.servers import POSTGRES_DSN, unreachable

GROWN = 20_000  # rows added once the plans are made
WARM_RUNS = 8  # more than the five custom plans PostgreSQL makes before it caches a generic one


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    if why := unreachable(POSTGRES_DSN):
        pytest.skip(why)
    name = f"prism_plans_{uuid.uuid4().hex[:10]}"
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(f"CREATE SCHEMA {name}")
        yield name
    finally:
        await con.execute(f"DROP SCHEMA {name} CASCADE")
        await con.close()


async def pool_in(schema: str, **settings: Any) -> PostgresPool:
    """One connection, finding (and creating) Prism's tables in ``schema``."""
    pool = PostgresPool(PostgresSettings(dsn=f"{POSTGRES_DSN}?search_path={schema}", pool_size=1, **settings))
    await pool.start()
    return pool


async def sql(schema: str, statement: str, *args: Any) -> None:
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5, server_settings={"search_path": schema})
    try:
        await con.execute(statement, *args)
    finally:
        await con.close()


async def scans(schema: str, table: str) -> tuple[int, int]:
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        found = await con.fetchrow(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
            schema, table,
        )
    finally:
        await con.close()
    assert found is not None, f"{schema}.{table} does not exist"
    return found[0], found[1]


async def flushed(pool: PostgresPool, schema: str, table: str) -> tuple[int, int]:
    """The table's (sequential, index) scans with everything the pool's connection counted:
    its backend flushes its counters as it goes idle after this statement, before it answers."""
    async with pool.connection() as con:
        await con.execute("SELECT pg_stat_force_next_flush()")
    return await scans(schema, table)


def assert_indexed(before: tuple[int, int], after: tuple[int, int], table: str) -> None:
    """Between the two readings the statements used the table's indexes and never scanned it."""
    assert after[1] > before[1], f"no index scan of the {table}: the statements were not counted"
    assert after[0] == before[0], f"{after[0] - before[0]} sequential scans of the {table}"


async def test_claims_and_marks_keep_to_the_indexes_after_the_mailbox_table_grew_from_empty(schema: str) -> None:
    pool = await pool_in(schema)
    adapter = PostgresTransact(pool)
    await adapter.start()
    try:
        await adapter._ready()  # the tables, in this schema
        namespace, holder = "plans", "listener-1"
        routes = Routes(namespaces=frozenset({namespace}))
        headers = headers_text({})
        await sql(schema, "VACUUM prism_transact_mailbox, prism_transact_heads, prism_transact_cursors")

        async def add(mailbox: str, first: int, last: int) -> None:
            await sql(
                schema,
                "INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, committed_ns) "
                "SELECT $1, $2, s, '\\x00'::bytea, $5, 'out', 1 FROM generate_series($3::int8, $4::int8) AS s",
                namespace, mailbox, first, last, headers,
            )
            await sql(
                schema,
                "INSERT INTO prism_transact_heads (namespace, mailbox, next) VALUES ($1, $2, $3) "
                "ON CONFLICT (namespace, mailbox) DO UPDATE SET next = excluded.next",
                namespace, mailbox, last + 1,
            )

        async def claim_and_mark() -> int:
            claim = await adapter.claim(holder, routes, lease=30.0, rows=100, max_bytes=1 << 20, mailboxes=16)
            for batch in claim.batches:
                await adapter.mark_delivered(holder, namespace, batch.mailbox, [row.sequence for row in batch.rows])
            return sum(len(batch.rows) for batch in claim.batches)

        for n in range(1, WARM_RUNS + 1):  # the plans are made while the table holds a row or two
            await add("warm", n, n)
            assert await claim_and_mark() == 1
        await add("grown", 1, GROWN)
        before = await flushed(pool, schema, "prism_transact_mailbox")
        taken = [await claim_and_mark() for _ in range(3)]
        after = await flushed(pool, schema, "prism_transact_mailbox")
    finally:
        await adapter.close()
        await pool.close()
    assert taken == [100, 100, 100]
    assert_indexed(before, after, f"{GROWN}-row mailbox table")


async def test_publishes_with_tokens_keep_to_the_index_after_the_token_table_grew_from_empty(schema: str) -> None:
    pool = await pool_in(schema)
    queue = PostgresQueue(pool, partitions=4, poll_seconds=60)
    await queue.start()
    try:
        namespace, topic = "plans", "orders"
        assert isinstance((await queue.publish(namespace, topic, [Entry(b"first", "k", {}, "t-first")]))[0], Published)
        await sql(schema, "VACUUM prism_queue_tokens, prism_queue_messages, prism_queue_partitions")
        for n in range(WARM_RUNS):
            published = await queue.publish(namespace, topic, [Entry(b"x", "k", {}, f"warm-{n}")])
            assert isinstance(published[0], Published)
        await sql(
            schema,
            "INSERT INTO prism_queue_tokens (namespace, topic, token, fingerprint, partition, seq) "
            "SELECT $1, $2, convert_to('grown-' || s, 'UTF8'), '\\x00'::bytea, 0, 0 FROM generate_series(1, $3::int) AS s",
            namespace, topic, GROWN,
        )
        before = await flushed(pool, schema, "prism_queue_tokens")
        batches = [
            await queue.publish(namespace, topic, [Entry(b"y", f"k{i}", {}, f"after-{b}-{i}") for i in range(50)])
            for b in range(3)
        ]
        again = await queue.publish(namespace, topic, [Entry(b"y", "k7", {}, "after-0-7")])  # a retry: the first's place
        after = await flushed(pool, schema, "prism_queue_tokens")
    finally:
        await queue.close()
        await pool.close()
    assert all(isinstance(result, Published) for batch in batches for result in batch)
    assert again == [batches[0][7]]
    assert_indexed(before, after, f"{GROWN}-row token table")


async def test_a_consumers_claims_keep_to_the_index_after_a_backlog_grew_from_none(schema: str) -> None:
    pool = await pool_in(schema)
    queue = PostgresQueue(pool, partitions=1, poll_seconds=60)
    await queue.start()
    consumer = None
    try:
        namespace, topic, group = "plans", "orders", "workers"
        assert isinstance((await queue.publish(namespace, topic, [Entry(b"first")]))[0], Published)
        await sql(schema, "VACUUM prism_queue_messages, prism_queue_deliveries, prism_queue_groups, prism_queue_partitions")
        consumer = await queue.consume(namespace, topic, ConsumeOptions(group, Start.EARLIEST, max_in_flight=100))

        async def take_and_acknowledge(count: int) -> list[int]:
            taken = []
            while len(taken) < count:
                taken += await asyncio.wait_for(consumer.take(count - len(taken)), 10)
            await queue.acknowledge(namespace, topic, group, [d.message_id for d in taken])
            return [d.offset for d in taken]

        assert await take_and_acknowledge(1) == [0]
        for n in range(1, WARM_RUNS + 1):  # each publish wakes the consumer: a claim of one message
            await queue.publish(namespace, topic, [Entry(b"x")])
            assert await take_and_acknowledge(1) == [n]
        await sql(  # a backlog behind the next offset, then the partition's high moved past it
            schema,
            "INSERT INTO prism_queue_messages (namespace, topic, partition, seq, key, headers, payload, published_ns) "
            "SELECT $1, $2, 0, s, '', '{}', '\\x00'::bytea, s FROM generate_series($3::int8, $4::int8) AS s",
            namespace, topic, WARM_RUNS + 1, WARM_RUNS + GROWN,
        )
        await sql(schema, "UPDATE prism_queue_partitions SET high = $3 WHERE namespace = $1 AND topic = $2",
                  namespace, topic, WARM_RUNS + GROWN + 1)
        before = await flushed(pool, schema, "prism_queue_messages")
        await queue.publish(namespace, topic, [Entry(b"wake")])  # the consumer wakes: claims of 100
        offsets = [offset for _ in range(3) for offset in await take_and_acknowledge(100)]
        after = await flushed(pool, schema, "prism_queue_messages")
    finally:
        if consumer is not None:
            await consumer.close()
        await queue.close()
        await pool.close()
    assert offsets == list(range(WARM_RUNS + 1, WARM_RUNS + 301))
    assert_indexed(before, after, f"{GROWN}-message table")


async def test_a_point_lookup_planned_on_a_small_table_is_planned_again_once_it_grew(schema: str) -> None:
    """A Get is per call, so it keeps its cached plan (no planning at every run): PostgreSQL
    plans it as a scan of a one-page table, and the connection prepares it again, for the
    table's size, ``statement_lifetime`` after it first did."""
    lifetime = 0.5
    pool = await pool_in(schema, statement_lifetime=lifetime)
    kv = PostgresKeyValue(pool)
    await kv.start()
    try:
        namespace = "plans"
        for n in range(5):
            await kv.set(namespace, f"k{n}", b"v")
        await sql(schema, "ANALYZE prism_kv")  # statistics of the small table: one page, five rows
        for _ in range(WARM_RUNS):
            assert (await kv.get(namespace, "k1")).value == b"v"
        await sql(
            schema,
            "INSERT INTO prism_kv (namespace, key, value, etag) "
            "SELECT convert_to($1, 'UTF8'), convert_to('grown-' || s, 'UTF8'), '\\x00'::bytea, 'e' "
            "FROM generate_series(1, $2::int) AS s",
            namespace, GROWN,
        )
        await asyncio.sleep(lifetime * 2)
        before = await flushed(pool, schema, "prism_kv")
        found = [await kv.get(namespace, key) for key in ("k1", "k2", "grown-7", "grown-19999", "absent", "k3")]
        after = await flushed(pool, schema, "prism_kv")
    finally:
        await kv.close()
        await pool.close()
    assert [None if r is None else r.value for r in found] == [b"v", b"v", b"\x00", b"\x00", None, b"v"]
    assert_indexed(before, after, f"{GROWN}-row table")


async def test_custom_plans_hold_for_the_block_only_and_a_failure_leaves_no_transaction(schema: str) -> None:
    pool = await pool_in(schema)
    try:
        async with pool.connection() as con:
            async with custom_plans(con):
                assert await con.fetchval("SELECT current_setting('plan_cache_mode')") == "force_custom_plan"
                await con.execute("CREATE TABLE kept (n int)")
            assert not con.is_in_transaction()
            assert await con.fetchval("SELECT current_setting('plan_cache_mode')") == "auto"
            with pytest.raises(asyncpg.UndefinedTableError):
                async with custom_plans(con):
                    await con.execute("CREATE TABLE dropped (n int)")
                    await con.execute("SELECT * FROM missing")
            assert not con.is_in_transaction()
            assert await con.fetchval("SELECT current_setting('plan_cache_mode')") == "auto"
            assert await con.fetchval("SELECT to_regclass('kept') IS NOT NULL AND to_regclass('dropped') IS NULL")
    finally:
        await pool.close()
