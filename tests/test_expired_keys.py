"""Expired keys do not pile up in the servers: reads ignore them at once (the conformance suite),
and the stores also reclaim them — Postgres rows by a periodic sweep, Redis index entries as
later writes and scans pass by (Redis itself drops the expired records)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.redis import RedisClient, RedisSettings
from adapters.keyvalue.postgres import PostgresKeyValue
from adapters.keyvalue.redis import RedisKeyValue, expiry_key, index_key
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces, unreachable


async def test_postgres_sweep_deletes_expired_rows_only() -> None:
    if reason := unreachable(POSTGRES_DSN):
        pytest.skip(reason)
    pool, namespace = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN)), f"sweep-{uuid.uuid4().hex[:8]}"
    await pool.start()
    store = PostgresKeyValue(pool)
    await store.start()
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        for i in range(5):
            await store.set(namespace, f"short/{i}", b"x", expires_at=time.time() + 0.2)
        await store.set(namespace, "long", b"x", expires_at=time.time() + 60)
        await store.set(namespace, "forever", b"x")
        await asyncio.sleep(0.3)
        await store.sweep()
        rows = await admin.fetch("SELECT key FROM prism_kv WHERE namespace = $1 ORDER BY key", namespace.encode())
        assert [r["key"] for r in rows] == [b"forever", b"long"]
    finally:
        await admin.close()
        await store.close()
        await pool.close()
        await purge_namespaces(["postgres"], [namespace])


async def test_redis_indexes_forget_expired_keys() -> None:
    if reason := unreachable(REDIS_URL):
        pytest.skip(reason)
    connection, namespace = RedisClient(RedisSettings(url=REDIS_URL)), f"sweep-{uuid.uuid4().hex[:8]}"
    await connection.start()
    store = RedisKeyValue(connection)
    await store.start()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for i in range(5):
            await store.set(namespace, f"short/{i}", b"x", expires_at=time.time() + 0.2)
        await store.set(namespace, "forever", b"x")
        await asyncio.sleep(0.3)
        await store.set(namespace, "later", b"x")  # a write drops expired entries of its namespace
        assert await client.zrange(index_key(namespace), 0, -1) == [b"forever", b"later"]
        assert await client.zcard(expiry_key(namespace)) == 0

        # An entry whose record vanished without the write path knowing (evicted, say) is
        # skipped by a scan and dropped from the index.
        await client.zadd(index_key(namespace), {b"evicted": 0})
        assert [k for k, _ in await store.scan(namespace, "", "", 10)] == ["forever", "later"]
        assert await client.zrange(index_key(namespace), 0, -1) == [b"forever", b"later"]
    finally:
        await client.aclose()
        await store.close()
        await connection.close()
        await purge_namespaces(["redis"], [namespace])
