"""The Postgres Queue wakes its consumers by LISTEN/NOTIFY on a connection of its own, not by
polling: a consumer in one process gets what another process published at once, and when that
connection is lost (the server ending it, as a restart does) the adapter listens again and
misses nothing published in between. The fallback poll is set to a minute here, so only a
notification (or the look every consumer takes once listening again) can deliver in time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.queue.base import ConsumeOptions, Entry, Start
from adapters.queue.postgres import PostgresQueue
from tests.servers import POSTGRES_DSN, purge_namespaces, unreachable

WAIT = 5.0  # seconds: far below the fallback poll

pytestmark = pytest.mark.skipif(bool(unreachable(POSTGRES_DSN)), reason=unreachable(POSTGRES_DSN) or "")


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    made = f"notify-{uuid.uuid4().hex[:8]}"
    yield made
    await purge_namespaces(["postgres"], [made])


@pytest.fixture
async def process_pair() -> AsyncIterator[tuple[PostgresQueue, PostgresQueue]]:
    """Two adapters on their own pools, as two gateway processes have."""
    opened: list[tuple[PostgresQueue, PostgresPool]] = []
    for _ in range(2):
        pool = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=2))
        await pool.start()
        queue = PostgresQueue(pool, poll_seconds=60)
        await queue.start()
        opened.append((queue, pool))
    yield opened[0][0], opened[1][0]
    for queue, pool in opened:
        await queue.close()
        await pool.close()


async def listener_pid(con: asyncpg.Connection, queue: PostgresQueue, other_than: int = 0) -> int:
    """The server pid of the adapter's listening connection (once it listens)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        pid = await con.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2 "
            "AND query ILIKE 'LISTEN%'",
            f"prism-queue-listener {queue.id}", other_than,
        )
        if pid:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError("the adapter is not listening")


async def test_a_lost_listening_connection_is_reopened_and_nothing_is_missed(
    process_pair: tuple[PostgresQueue, PostgresQueue], namespace: str
) -> None:
    here, there = process_pair
    consumer = await here.consume(namespace, "t", ConsumeOptions("g", start=Start.EARLIEST))
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        pending = asyncio.ensure_future(anext(consumer))
        pid = await listener_pid(admin, here)
        await there.publish_one(namespace, "t", Entry(b"first"))
        assert (await asyncio.wait_for(pending, WAIT)).payload == b"first", "woken by the notification"

        pending = asyncio.ensure_future(anext(consumer))
        await asyncio.sleep(0.05)  # waiting, with nothing to deliver
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await there.publish_one(namespace, "t", Entry(b"while not listening"))
        assert (await asyncio.wait_for(pending, WAIT)).payload == b"while not listening"
        new_pid = await listener_pid(admin, here, other_than=pid)

        pending = asyncio.ensure_future(anext(consumer))
        await asyncio.sleep(0.05)
        await there.publish_one(namespace, "t", Entry(b"after"))
        assert (await asyncio.wait_for(pending, WAIT)).payload == b"after", "notifications again"
        assert new_pid != pid
    finally:
        await consumer.close()
        await admin.close()
