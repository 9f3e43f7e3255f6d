"""A million-row Read streams in flat memory, over native gRPC and over server-sent events.

The collection is seeded in the database itself (a recursive CTE on SQLite, generate_series on
PostgreSQL: a second or two), then read whole by a client that checks every page follows the
last. The gateway reads one page ahead of what the transport has sent, no further, and the
transport's send waits for the client (HTTP/2 flow control on the gRPC port, the socket's on
the SSE stream). The client stalls for two seconds after its
first page, time enough for the gateway to pile up the whole table if it read on regardless.
Measured as the worker's RSS from /proc (``tests/test_slow_reader.py``), sampled every 20 ms
during the read, against the RSS after a warm-up read: the growth stays under 50 MB. A stream that reaches the request deadline ends with
a cursor, and the client resumes from it, as any client would.

Runtime: about 8–22 s per read on a 2-core machine (the client parses every page too), ~60 s in all.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest

from prism.v1 import reader_pb2 as r
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES_DSN, unreachable
from tests.test_slow_reader import rss_mb

ROWS = 1_000_000
PAGE = 1000
TABLE = f"reader_test_{uuid.uuid4().hex[:8]}_million"
LIMIT_MB = 50
STALL = 2.0  # seconds the client stops reading after its first page
POSTGRES_DOWN = unreachable(POSTGRES_DSN)


def config(sqlite_path: str) -> str:
    lines = [
        "backends:",
        f'  lite: {{type: sqlite, path: "{sqlite_path}"}}',
        *([] if POSTGRES_DOWN else [f'  pg: {{type: postgres, dsn: "{POSTGRES_DSN}"}}']),
        "configs:",
        "  - {name: reader-sqlite, pattern: READER, backend: lite}",
        *([] if POSTGRES_DOWN else ["  - {name: reader-postgres, pattern: READER, backend: pg}"]),
        "reader:",
        "  deadline_seconds: 120",
        f"  collections: {{default: {{million: {{table: {TABLE}, key: [id], fields: [id, label, amount, flag]}}}}}}",
    ]
    return "\n".join(lines) + "\n"


def seed_sqlite(path: pathlib.Path) -> None:
    with sqlite3.connect(path) as con:
        con.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, label TEXT NOT NULL, amount REAL, flag BOOLEAN)")
        con.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS}) "
            f"INSERT INTO {TABLE} SELECT i, 'row-' || i, i * 0.25, i % 2 FROM n"
        )


async def seed_postgres() -> None:
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN)
    try:
        await con.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, label text NOT NULL, amount double precision, flag boolean)"
        )
        await con.execute(
            f"INSERT INTO {TABLE} SELECT i, 'row-' || i, i * 0.25, i % 2 = 1 FROM generate_series(1, {ROWS}) i"
        )
        await con.execute(f"ANALYZE {TABLE}")
    finally:
        await con.close()


async def drop_postgres() -> None:
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN)
    try:
        await con.execute(f"DROP TABLE IF EXISTS {TABLE}")
    finally:
        await con.close()


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway (the default server) over a million rows in SQLite and in PostgreSQL."""
    tmp = tmp_path_factory.mktemp("reader-million")
    path = tmp / "million.db"
    seed_sqlite(path)
    if not POSTGRES_DOWN:
        asyncio.run(seed_postgres())
    gateway = start_gateway(tmp, "granian", config_yaml=config(str(path)))
    try:
        yield gateway
    finally:
        gateway.stop()
        if not POSTGRES_DOWN:
            asyncio.run(drop_postgres())


class Peak:
    """The gateway's RSS, sampled from a thread every 20 ms while a read runs."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway, self.peak, self._stop = gateway, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.gateway))

    def __enter__(self) -> Peak:
        self.peak = rss_mb(self.gateway)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.gateway))


async def grpc_pages(gateway: GatewayProcess, token: str, cursor: str = "", page_size: int = PAGE) -> AsyncIterator[r.Page]:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        read = channel.unary_stream(
            "/prism.v1.ReaderService/Read",
            request_serializer=r.ReadRequest.SerializeToString,
            response_deserializer=r.Page.FromString,
        )
        request = r.ReadRequest(collection="million", page_size=page_size, cursor=cursor)
        async for page in read(request, metadata=(("x-prism-session", token),)):
            yield page


async def sse_pages(gateway: GatewayProcess, token: str, cursor: str = "", page_size: int = PAGE) -> AsyncIterator[dict[str, Any]]:
    params = {"pageSize": str(page_size), "prism_session": token, **({"cursor": cursor} if cursor else {})}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=None) as http:
        async with http.stream("GET", "/v1/collections/million:read", params=params) as response:
            assert response.status_code == 200, await response.aread()
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "message":
                    yield json.loads(line[6:])
                elif line.startswith("data: ") and event == "error":
                    raise AssertionError(line)


def first_last(page: Any) -> tuple[int, int, int, str]:
    """(first id, last id, rows, next cursor) of a page, proto or JSON."""
    if isinstance(page, dict):
        rows = page.get("rows", [])
        ids = (int(rows[0]["id"]), int(rows[-1]["id"])) if rows else (0, 0)
        return *ids, len(rows), page.get("nextCursor", "")
    rows = page.rows
    ids = (int(rows[0].fields["id"].number_value), int(rows[-1].fields["id"].number_value)) if rows else (0, 0)
    return *ids, len(rows), page.next_cursor


@pytest.mark.parametrize("transport", ["grpc", "sse"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_million_row_read_streams_in_flat_memory(million: GatewayProcess, backend: str, transport: str) -> None:
    if backend == "postgres" and POSTGRES_DOWN:
        pytest.skip(POSTGRES_DOWN)
    async with httpx.AsyncClient(base_url=million.base_url, timeout=30) as http:
        token = (await http.post("/v1/sessions", json={"configName": f"reader-{backend}"})).json()["token"]
    pages = grpc_pages if transport == "grpc" else sse_pages
    async for _ in pages(million, token, page_size=100):  # warm-up: first statements, encoders
        break
    started = time.monotonic()
    with Peak(million) as memory:
        before = memory.peak
        expected, cursor, streams = 1, "", 0
        while True:
            streams += 1
            async for page in pages(million, token, cursor):
                first, last, count, cursor = first_last(page)
                if count:
                    assert (first, last) == (expected, expected + count - 1), "pages follow each other exactly"
                    expected += count
                if expected == PAGE + 1:
                    # The client stalls: were the gateway to read on regardless, the whole
                    # table would pile up in it now (~60 MB of pages).
                    await asyncio.sleep(STALL)
                    stalled = memory.peak - before
            if not cursor:
                break  # else the deadline ended the stream: resume
    seconds = time.monotonic() - started - STALL
    assert expected - 1 == ROWS
    growth = memory.peak - before
    print(
        f"\n{backend}/{transport}: {ROWS:,} rows in {seconds:.1f}s ({ROWS / seconds:,.0f} rows/s, {streams} stream(s)); "
        f"gateway RSS {before:.0f} MB → peak {memory.peak:.0f} MB (+{growth:.1f} MB; +{stalled:.1f} MB after a {STALL:g}s stall)"
    )
    assert growth < LIMIT_MB, f"RSS grew by {growth:.1f} MB"


@pytest.fixture(scope="module")
def million_db(million: GatewayProcess) -> pathlib.Path:
    """The SQLite file the module's gateway reads (other gateways open it too)."""
    return million.log_path.parent / "million.db"


async def _stalled_stream(gateway: GatewayProcess, transport: str, token: str) -> tuple[float, float]:
    """Open a Read of the million rows, take its first bytes, stop reading for STALL seconds:
    (RSS before the stream, peak RSS during the stall)."""
    before = rss_mb(gateway)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=None) as http:
        if transport == "sse":
            stream = http.stream("GET", "/v1/collections/million:read", params={"pageSize": str(PAGE), "prism_session": token})
        else:  # gRPC-Web, binary
            payload = r.ReadRequest(collection="million", page_size=PAGE).SerializeToString()
            body = len(payload).to_bytes(5, "big") + payload  # flag 0, then the length
            headers = {"content-type": "application/grpc-web+proto", "x-prism-session": token}
            stream = http.stream("POST", "/prism.v1.ReaderService/Read", content=body, headers=headers)
        async with stream as response:
            assert response.status_code == 200
            chunks = response.aiter_raw()
            assert await anext(chunks)
            with Peak(gateway) as memory:
                await asyncio.sleep(STALL)
    return before, memory.peak


@pytest.mark.parametrize("transport", ["sse", "grpc-web"])
@pytest.mark.parametrize("server", ["hypercorn", "pyvoy"])
async def test_a_stalled_reader_holds_the_gateway_flat_under_every_http_server(
    million_db: pathlib.Path, tmp_path: pathlib.Path, server: str, transport: str
) -> None:
    """The same backpressure under the other ASGI servers and on gRPC-Web: a client that stops
    reading after its first bytes leaves the rest of the million rows in the database."""
    lines = [
        f'backends: {{lite: {{type: sqlite, path: "{million_db}"}}}}',
        "configs: [{name: reader-sqlite, pattern: READER, backend: lite}]",
        f"reader: {{collections: {{default: {{million: {{table: {TABLE}, key: [id], fields: [id, label, amount, flag]}}}}}}}}",
    ]
    gateway = start_gateway(tmp_path, server, config_yaml="\n".join(lines) + "\n")
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
            token = (await http.post("/v1/sessions", json={"configName": "reader-sqlite"})).json()["token"]
        async for _ in sse_pages(gateway, token, page_size=100):  # warm-up
            break
        before, peak = await _stalled_stream(gateway, transport, token)
        print(f"\n{server}/{transport}: gateway RSS {before:.0f} MB → peak {peak:.0f} MB during a {STALL:g}s stall")
        assert peak - before < LIMIT_MB, f"RSS grew by {peak - before:.1f} MB while the client did not read"
    finally:
        gateway.stop()
