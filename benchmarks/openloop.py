"""An open-loop latency client, run in its own process: calls start on a fixed schedule
whether or not earlier calls have answered, and each call's latency is measured from its
*scheduled* start, so a stall shows up as latency instead of silently lowering the rate.

asyncio's timers wake at whole milliseconds (epoll's timeout unit), far too coarse for a
0.5 ms target, so a plain thread sleeps to each scheduled instant (nanosleep) and hands the
call to the event loop. ``dispatch`` in the output is how late the loop started the calls:
the client's own share of every latency, the same for every target.

    python -m benchmarks.openloop --kind grpc --port 8980 --path /prism.v1.KeyValueService/Get \
        --payload-file req.bin --token T --expect-bytes 141 --rate 500 --duration 10
    --kind http   (raw HTTP/1.1 keep-alive pool, GET --path)   --kind sqlite (aiosqlite directly)
    --kind redis / --kind postgres   (redis.asyncio / asyncpg directly, --namespace --key --expect-bytes)
    --closed N    N calls in flight back to back instead of a rate (saturation)

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import uvloop

Call = Callable[[], Awaitable[None]]
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


# --- targets ---------------------------------------------------------------------------------


async def grpc_call(args: argparse.Namespace) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import grpc

    channel = grpc.aio.insecure_channel(f"{args.host}:{args.port}")
    await channel.channel_ready()
    stub = channel.unary_unary(args.path)  # bytes in, bytes out: no (de)serialization cost
    payload = args.payload
    metadata = (("x-prism-session", args.token),) if args.token else ()
    expect = args.expect_bytes

    async def call() -> None:
        response = await stub(payload, metadata=metadata, timeout=10)
        if len(response) != expect:
            raise RuntimeError(f"{len(response)} bytes back, expected {expect}")

    return call, channel.close


class _H1(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, Content-Length bodies."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, int]] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False  # e.g. by the server's keep-alive timeout while idle in the pool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        found = CONTENT_LENGTH.search(self.buffer, 0, end + 2)
        if found is None:
            self._fail(RuntimeError(f"no content-length in {bytes(self.buffer[:end])!r}"))
            return
        total = end + 4 + int(found[1])
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, total - end - 4))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection closed: {exc}"))

    async def request(self, data: bytes) -> tuple[int, int]:
        assert self.transport is not None
        if self.closed:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


async def http_call(args: argparse.Namespace) -> tuple[Call, Callable[[], Awaitable[None]]]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET {args.path} HTTP/1.1\r\nhost: {args.host}:{args.port}\r\n"
        + (f"x-prism-session: {args.token}\r\n" if args.token else "")
        + "\r\n"
    ).encode()
    idle: list[_H1] = []
    opened: list[_H1] = []
    expect = args.expect_bytes

    async def connect() -> _H1:
        _, protocol = await loop.create_connection(_H1, args.host, args.port)
        opened.append(protocol)
        return protocol

    for _ in range(4):
        idle.append(await connect())

    async def fresh() -> _H1:
        while idle:  # most recently used first: the others may have been closed while idle
            conn = idle.pop()
            if not conn.closed and not conn.buffer:
                return conn
        return await connect()

    async def call() -> None:
        conn = await fresh()
        try:
            status, length = await conn.request(request)
        except ConnectionError:
            if conn.buffer:  # part of a response had arrived: a real failure
                raise
            # Closed by the server (keep-alive timeout) just as it was reused: the request
            # never reached the application. Send it once more on a new connection; the time
            # spent stays in this call's latency.
            conn = await connect()
            status, length = await conn.request(request)
        idle.append(conn)
        if status != 200 or length != expect:
            raise RuntimeError(f"HTTP {status} with {length} bytes, expected 200 with {expect}")

    async def close() -> None:
        for conn in opened:
            if conn.transport is not None:
                conn.transport.close()

    return call, close


async def sqlite_call(args: argparse.Namespace) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The gateway's read, through aiosqlite directly: same table, pragmas and statement."""
    import aiosqlite

    from adapters.keyvalue.sqlite import LIVE, SCHEMA

    db = await aiosqlite.connect(args.db, isolation_level=None)
    for pragma in ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000"):
        await db.execute(pragma)
    await db.execute(SCHEMA)
    value = args.payload
    await db.execute(
        "INSERT OR REPLACE INTO prism_kv (namespace, key, value, etag, expires_at) VALUES (?, ?, ?, ?, NULL)",
        ("default", args.key, value, "0123456789abcdef"),
    )
    sql = f"SELECT value, etag, expires_at FROM prism_kv WHERE namespace=? AND key=? AND {LIVE}"
    key = args.key
    expect = len(value)

    async def call() -> None:
        async with db.execute(sql, ("default", key, time.time())) as cursor:
            row = await cursor.fetchone()
        if row is None or len(row[0]) != expect:
            raise RuntimeError("row missing")

    return call, db.close


async def redis_call(args: argparse.Namespace) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The gateway's Redis read, through redis.asyncio directly: the same pool settings and the
    same HMGET of the record hash (fields v, e, x) decoded the same way as adapters/keyvalue/redis.py,
    reading the very record the gateway wrote."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from adapters.keyvalue.redis import FIELDS, _record, record_key

    no_retry = Retry(NoBackoff(), 0)
    pool = aioredis.BlockingConnectionPool.from_url(
        args.url, max_connections=10, timeout=5.0, socket_connect_timeout=2.0, socket_timeout=5.0, retry=no_retry
    )
    client = aioredis.Redis(connection_pool=pool, retry=no_retry)
    name = record_key(args.namespace, args.key)
    expect = args.expect_bytes

    async def call() -> None:
        record = _record(await client.hmget(name, FIELDS))
        if record is None or len(record.value) != expect:
            raise RuntimeError(f"record missing or wrong size: {record!r}")

    async def close() -> None:
        await client.aclose(close_connection_pool=True)

    return call, close


async def postgres_call(args: argparse.Namespace) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The gateway's Postgres read, through asyncpg directly: a pool like the adapter's
    (1..10 connections), one pooled connection per call, the adapter's SELECT and parameters,
    reading the very row the gateway wrote."""
    import asyncpg

    from adapters.keyvalue.postgres import live

    pool = await asyncpg.create_pool(args.dsn, min_size=1, max_size=10, timeout=2.0, command_timeout=5.0,
                                     server_settings={"application_name": "prism-bench-direct"})
    sql = f"SELECT value, etag, expires_at FROM prism_kv WHERE namespace=$1 AND key=$2 AND {live(3)}"
    ns, key = args.namespace.encode(), args.key.encode()
    expect = args.expect_bytes

    async def call() -> None:
        async with pool.acquire(timeout=5.0) as con:
            row = await con.fetchrow(sql, ns, key, time.time())
        if row is None or len(row[0]) != expect:
            raise RuntimeError("row missing or wrong size")

    return call, pool.close


TARGETS = {"grpc": grpc_call, "http": http_call, "sqlite": sqlite_call, "redis": redis_call, "postgres": postgres_call}


# --- schedules -------------------------------------------------------------------------------


def _ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = max(0, -(-len(ordered) * q // 100) - 1)
    return round(ordered[int(index)] * 1000, 3)


def _summary(latencies: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)
    return {
        "p50_ms": _ms(ordered, 50),
        "p90_ms": _ms(ordered, 90),
        "p99_ms": _ms(ordered, 99),
        "p999_ms": _ms(ordered, 99.9),
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else None,
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3) if ordered else None,
    }


async def open_loop(call: Call, rate: float, duration: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * duration))
    latencies: list[float] = []
    dispatch: list[float] = []
    errors: list[str] = []
    remaining = count
    finished = asyncio.Event()

    async def one(scheduled: float) -> None:
        nonlocal remaining
        dispatch.append(time.perf_counter() - scheduled)
        try:
            await call()
        except Exception as exc:
            errors.append(repr(exc))
        else:
            latencies.append(time.perf_counter() - scheduled)
        finally:
            remaining -= 1
            if remaining == 0:
                finished.set()

    running: set[asyncio.Task[None]] = set()

    def start(scheduled: float) -> None:
        task = loop.create_task(one(scheduled))
        running.add(task)
        task.add_done_callback(running.discard)

    first = time.perf_counter() + 0.05

    def sender() -> None:
        for i in range(count):
            scheduled = first + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(start, scheduled)

    thread = threading.Thread(target=sender, name="schedule", daemon=True)
    thread.start()
    await asyncio.wait_for(finished.wait(), timeout=duration + 60)
    elapsed = time.perf_counter() - first
    thread.join()
    ordered_dispatch = sorted(dispatch)
    return {
        "mode": f"open loop, {rate:g}/s",
        "sent": count,
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "achieved_rps": round(len(latencies) / elapsed, 1),
        **_summary(latencies),
        "dispatch_p50_ms": _ms(ordered_dispatch, 50),
        "dispatch_p99_ms": _ms(ordered_dispatch, 99),
    }


async def closed_loop(call: Call, in_flight: int, duration: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while (now := time.perf_counter()) < deadline:
            try:
                await call()
            except Exception as exc:
                errors.append(repr(exc))
            else:
                latencies.append(time.perf_counter() - now)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return {
        "mode": f"closed loop, {in_flight} in flight",
        "sent": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rps": round(len(latencies) / elapsed, 1),
        **_summary(latencies),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    call, close = await TARGETS[args.kind](args)
    try:
        if args.warmup > 0:  # connections, caches, the server's first-call paths
            if args.closed:
                await closed_loop(call, args.closed, args.warmup)
            else:
                await open_loop(call, args.rate, args.warmup)
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if args.closed:
            result = await closed_loop(call, args.closed, args.duration)
        else:
            result = await open_loop(call, args.rate, args.duration)
        usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        result["client_cpu_share"] = round(cpu / (wall1 - wall0), 3)
        return result
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=sorted(TARGETS), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", default="")
    parser.add_argument("--payload-file", help="grpc: the request message; sqlite: the value")
    parser.add_argument("--token", default="")
    parser.add_argument("--expect-bytes", type=int, default=0)
    parser.add_argument("--db", help="sqlite: database file")
    parser.add_argument("--key", default="bench-key")
    parser.add_argument("--namespace", default="default", help="redis, postgres: the record's namespace")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="redis: server URL")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test", help="postgres: DSN")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--closed", type=int, default=0, help="closed loop with this many in flight")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    args = parser.parse_args()
    args.payload = pathlib.Path(args.payload_file).read_bytes() if args.payload_file else b""
    sys.setswitchinterval(0.0005)  # the schedule thread gets the GIL back quickly
    result = uvloop.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
