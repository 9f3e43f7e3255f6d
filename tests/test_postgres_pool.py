"""The shared Postgres pool releases a connection without a reset round trip, never hands out
a connection inside a transaction, and bounds the wait for a connection."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from prism.errors import PrismError
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


async def test_waiting_for_a_busy_pool_ends_unavailable_and_loses_no_connection() -> None:
    """A call that finds every connection taken for longer than ``command_timeout`` is
    UNAVAILABLE; the abandoned wait leaves the pool whole (the connection goes to the next)."""
    opened = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=1, command_timeout=0.3))
    await opened.start()
    try:
        async with opened.connection():
            started = time.monotonic()
            with pytest.raises(PrismError) as refused:
                async with opened.connection():
                    pass
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            assert 0.25 <= time.monotonic() - started < 2
        async with asyncio.timeout(2), opened.connection() as con:
            assert await con.fetchval("SELECT 1") == 1
    finally:
        await opened.close()
