"""The shared Postgres pool releases a connection without a reset round trip, and still never
hands out a connection inside a transaction."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from tests.servers import POSTGRES_DSN, unreachable

pytestmark = pytest.mark.skipif(bool(unreachable(POSTGRES_DSN)), reason=unreachable(POSTGRES_DSN) or "")


@pytest.fixture
async def pool() -> AsyncIterator[PostgresPool]:
    opened = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=1))
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


async def test_releasing_a_connection_runs_no_statement(pool: PostgresPool) -> None:
    ran: list[str] = []

    def log(logged: Any) -> None:
        ran.append(logged.query)

    async with pool.connection() as con:
        con.add_query_logger(log)
        await con.execute("SELECT 1")
    async with pool.connection() as con:  # the pool's only connection: the same one
        await con.execute("SELECT 2")
        con.remove_query_logger(log)
    assert ran == ["SELECT 1", "SELECT 2"], "release ran a statement of its own"


async def test_a_connection_released_inside_a_transaction_is_rolled_back(pool: PostgresPool) -> None:
    table = f"prism_pool_test_{uuid.uuid4().hex[:8]}"
    async with pool.connection() as con:
        await con.execute(f"CREATE TABLE {table} (id int)")
    try:
        async with pool.connection() as con:
            await con.execute("BEGIN")  # not asyncpg's managed transaction: nothing ends it but the pool
            await con.execute(f"INSERT INTO {table} VALUES (1)")
        async with pool.connection() as con:
            assert not con.is_in_transaction()
            assert await con.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        async with pool.connection() as con:
            await con.execute(f"DROP TABLE {table}")
