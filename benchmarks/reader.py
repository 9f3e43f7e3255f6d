"""Section 11 — Reader (issue 13): rows/s of a full Read of a collection through the gateway
against the backend's own Python client running the same keyset queries, per backend, in one run.

One gateway (Granian, one worker, as ``prism serve`` runs) with a READER config per backend
(``reader-sqlite``, ``reader-postgres``; bench-only namespace ``prism-bench-reader``) exposing
one collection, ``rows``: a bench-only table ``prismbench_reader_<run>`` of 200,000 rows (50,000
with ``--quick``) seeded inside the database (a recursive CTE on SQLite, ``generate_series`` on
PostgreSQL, then ``VACUUM ANALYZE``) before anything is timed, and dropped afterwards:

    id bigint primary key, label text, amount double precision, flag boolean, at timestamptz
    (SQLite: INTEGER PRIMARY KEY, TEXT, REAL, BOOLEAN, TIMESTAMP as canonical UTC text)

Every row reads the whole table, in pages of 1,000 rows, in key order, all five columns, one
reader at a time, again and again until the timed seconds reach the run's duration (5 s; at
least one whole read). Per backend:

    direct        the backend's own client in a client process, the keyset statements
                  ``adapters/reader/sql.py`` writes for this read, the columns read raw:
                      SELECT "id", "label", "amount", "flag", "at" FROM "<table>"
                          ORDER BY "id" ASC LIMIT $1                                 (first page)
                      SELECT … FROM "<table>" WHERE (("id" > $1::int8))
                          ORDER BY "id" ASC LIMIT $2                                 (the others)
                  (verbatim on SQLite; the gateway's Postgres statement reads "at" as the
                  database's own RFC 3339 text instead — ``to_char`` in a CASE for the years
                  1000–9999, see adapters/reader/postgres.py — the same WHERE, ORDER BY, LIMIT)
                  postgres: asyncpg, a pool of 1..10 like the adapter's, one connection
                  acquired per page (as the adapter does), ``fetch`` → Records;
                  sqlite: aiosqlite on the same file with the backend's pragmas (WAL,
                  synchronous=NORMAL), ``execute`` + ``fetchall`` → tuples, the same text
                  with backquotes and ``?1``/``?2``.
    gateway gRPC  ReaderService/Read, a native gRPC server stream, from a grpc.aio client
                  process: each Page deserialized (protobuf Structs) and checked
    gateway SSE   GET /v1/collections/rows:read?pageSize=1000 as server-sent events over one
                  HTTP/1.1 connection per read, from a raw asyncio client process: chunked
                  transfer decoded, each page's JSON parsed and checked
    gateway gRPC and SSE, pyvoy   the same two clients on a second gateway (``prism serve
                  --server pyvoy``, started beside the first), the gRPC channel on its HTTP port,
                  whose ASGI app answers native gRPC (issue 10's path, where Envoy does the
                  HTTP/2 work outside the interpreter)

    direct, after the same again, once the gateway's rows have run
    gateway/direct = gateway rows/s ÷ the mean of the two direct rows' rows/s, same backend;
                  issue 13's target ≥ 50%. Measured on both sides of the gateway's rows because
                  this VM's speed drifts within a run: one direct row alone moved 0.70–0.95M
                  rows/s from one run to the next, which moved the ratio as much as any change

The direct client reads rows into its driver's tuples and stops there: what an application
reading its own database with that client gets. The gateway, per page, checks its session and
the stream's deadline, runs the same statement with LIMIT 1,001 (one row more, to know whether
another page follows; the direct client instead stops at a short page, so it runs one statement
more at the end), turns every value into JSON (numbers, strings, booleans; timestamps as RFC
3339 text) column by column, takes the rows that fit the page's byte budget, signs a
continuation cursor, and encodes the page for its transport straight from the columns
(protobuf Structs' wire bytes, or JSON for SSE: ``app/services/reader_pages.py``) — and
reads the next page while the transport sends this one, never further ahead (backpressure: a
full Read holds two pages). Its client decodes and checks every page: that cost lands on the same 2 cores
(*client CPU*), as the direct client's decoding does.

Checked, so no fast failure is timed: every read, on every side, returns exactly the table's
rows, ids 1…N in order with no gap or repeat, in pages of 1,000 (the last one may be shorter);
an SSE ``event: error`` or a gRPC status fails the row. The bench tables are dropped afterwards
(and any left by an interrupted run, first).

    python -m benchmarks.run --only reader [--quick]
    python -m benchmarks.reader --backend postgres --side direct --table T --rows 200000   (one client run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import resource
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import yaml

from benchmarks import kv, procs, report
from benchmarks.context import DISTURBED, Context
from benchmarks.report import Column, Row, Table, ratio, rps, share, text
from prism.v1 import reader_pb2 as r

TITLE = "Reader: a full Read through the gateway vs the backend's own client"
SECTION = "reader"
NAMESPACE = "prism-bench-reader"  # bench-only: its configs exist only in this section's gateway
TABLE_PREFIX = "prismbench_reader_"  # bench-only tables (a collection's table may not be prism_*)
COLLECTION = "rows"
FIELDS = ("id", "label", "amount", "flag", "at")
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
ROWS = 200_000
QUICK_ROWS = 50_000
PAGE = 1000  # rows per page, both sides (the Reader's max_page_size)
POOL = 10  # the direct asyncpg pool, as the gateway's (pool_size)
RATIO_GOAL = 0.5  # issue 13: the gateway at ≥ 50% of the direct client's rows/s
WARMUP_PAGES = 20  # read (untimed) before timing: first statements, encoders, connections
WAIT = 300.0  # seconds: the most one whole read may take
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")  # adapters/backends/sqlite.py

# adapters/reader/sql.py's statements for this read (all fields, ORDER BY the key), verbatim.
PG_FIRST = 'SELECT "id", "label", "amount", "flag", "at" FROM "{table}" ORDER BY "id" ASC LIMIT $1'
PG_NEXT = 'SELECT "id", "label", "amount", "flag", "at" FROM "{table}" WHERE (("id" > $1::int8)) ORDER BY "id" ASC LIMIT $2'
LITE_FIRST = "SELECT `id`, `label`, `amount`, `flag`, `at` FROM `{table}` ORDER BY `id` ASC LIMIT ?1"
LITE_NEXT = "SELECT `id`, `label`, `amount`, `flag`, `at` FROM `{table}` WHERE ((`id` > ?1)) ORDER BY `id` ASC LIMIT ?2"

SIDES = {  # side → (target column, transport column)
    "direct": ("", "—"),
    "grpc": ("gateway (granian)", "gRPC server stream"),
    "sse": ("gateway (granian)", "SSE (HTTP/1.1)"),
    "grpc-pyvoy": ("gateway (pyvoy)", "gRPC server stream through the ASGI app"),
    "sse-pyvoy": ("gateway (pyvoy)", "SSE (HTTP/1.1)"),
    "direct-after": ("", "—"),
}


@dataclass(frozen=True)
class Backend:
    label: str
    direct: str  # the client the direct row uses, for the table
    process: str | None  # the database server's process name: its CPU is counted apart (None: in process)


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("SQLite", "aiosqlite", None),
    "postgres": Backend("Postgres", "asyncpg", "postgres"),
}


# --- seeding and cleanup (the section's process) ----------------------------------------------


def seed_sqlite(path: pathlib.Path, table: str, rows: int) -> None:
    """The collection's table in a fresh SQLite file, filled by SQLite itself."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
        for pragma in SQLITE_PRAGMAS:
            con.execute(pragma)
        con.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, label TEXT NOT NULL, amount REAL NOT NULL, "
            "flag BOOLEAN NOT NULL, at TIMESTAMP NOT NULL)"
        )
        con.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows:d}) "
            f"INSERT INTO {table} SELECT i, 'item-' || i, i * 0.25, i % 2, "
            "strftime('%Y-%m-%dT%H:%M:%S', 1767600000 + i * 60, 'unixepoch') || '.000000Z' FROM n"
        )
        con.execute("ANALYZE")


async def seed_postgres(table: str, rows: int) -> None:
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, label text NOT NULL, amount double precision NOT NULL, "
            "flag boolean NOT NULL, at timestamptz NOT NULL)"
        )
        await con.execute(
            f"INSERT INTO {table} SELECT i, 'item-' || i, i * 0.25, i % 2 = 1, to_timestamp(1767600000 + i * 60) "
            f"FROM generate_series(1, {rows:d}) i"
        )
        # Hint bits set and statistics taken now, so the first timed read writes nothing.
        await con.execute(f"VACUUM ANALYZE {table}")
    finally:
        await con.close()


async def cleanup() -> int:
    """Drop every bench table of this section (this run's, and any an interrupted run left)."""
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    dropped = 0
    try:
        for found in await con.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE $1", TABLE_PREFIX.replace("_", "\\_") + "%"):
            await con.execute(f'DROP TABLE IF EXISTS "{found["tablename"]}"')
            dropped += 1
    finally:
        await con.close()
    return dropped


def write_config(path: pathlib.Path, sqlite_file: pathlib.Path, table: str) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "backends": {
            "lite": {"type": "sqlite", "path": str(sqlite_file)},
            "pg": {"type": "postgres", "dsn": POSTGRES_DSN},
        },
        "configs": [
            {"name": "reader-sqlite", "pattern": "READER", "backend": "lite", "namespace": NAMESPACE},
            {"name": "reader-postgres", "pattern": "READER", "backend": "pg", "namespace": NAMESPACE},
        ],
        "namespaces": [{"name": NAMESPACE}],
        # A whole read well within one stream (the default 60 s would do as well).
        "reader": {"deadline_seconds": 600,
                   "collections": {NAMESPACE: {COLLECTION: {"table": table, "key": ["id"], "fields": list(FIELDS)}}}},
    }, sort_keys=False))
    return path


# --- client runs (their own process, like the gateway's callers) -------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Meter:
    """Rows, wall seconds and this process's CPU seconds over the timed reads only."""

    rows: int = 0
    pages: int = 0
    reads: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    bytes: int = 0  # bytes received from the gateway (gRPC messages, or the SSE body)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), _cpu()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - wall0
            self.cpu += _cpu() - cpu0
            self.reads += 1

    def result(self) -> dict[str, Any]:
        out = {"rows": self.rows, "pages": self.pages, "reads": self.reads, "seconds": round(self.seconds, 3),
               "rows_per_s": round(self.rows / self.seconds, 1),
               "client_cpu_share": round(self.cpu / self.seconds, 3)}
        if self.bytes:
            out["bytes_per_row"] = round(self.bytes / self.rows, 1)
        return out


class Pages:
    """Checks that the pages of one read follow each other exactly: ids 1…N, full pages but
    the last, nothing after the end."""

    def __init__(self, total: int) -> None:
        self.total, self.next_id, self.pages, self.ended = total, 1, 0, False

    def add(self, first: int, last: int, count: int) -> None:
        if self.ended:
            raise RuntimeError(f"a page after the last one (ids {first}…{last})")
        if count == 0:
            raise RuntimeError(f"an empty page after id {self.next_id - 1}")
        if (first, last) != (self.next_id, self.next_id + count - 1):
            raise RuntimeError(f"page of ids {first}…{last} ({count} rows) where {self.next_id}… was due")
        if count > PAGE:
            raise RuntimeError(f"a page of {count} rows (page size {PAGE})")
        self.ended = count < PAGE
        self.next_id += count
        self.pages += 1

    def finish(self, more: bool = False) -> int:
        """The rows read; an incomplete read (or one that says more would follow) fails."""
        if more or self.next_id - 1 != self.total:
            raise RuntimeError(f"read {self.next_id - 1} of {self.total} rows" + (" and a cursor to go on" if more else ""))
        return self.total


async def direct_reads(args: argparse.Namespace, meter: Meter, limit_pages: int | None = None) -> None:
    """Whole reads with the backend's own client (``limit_pages``: a warm-up of that many pages)."""
    if args.backend == "postgres":
        import asyncpg

        first, following = PG_FIRST.format(table=args.table), PG_NEXT.format(table=args.table)
        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=POOL, timeout=5, command_timeout=WAIT)

        async def page(after: int | None) -> list[Any]:
            async with pool.acquire() as con:
                if after is None:
                    return await con.fetch(first, PAGE)
                return await con.fetch(following, after, PAGE)

        close = pool.close
    else:
        import aiosqlite

        first, following = LITE_FIRST.format(table=args.table), LITE_NEXT.format(table=args.table)
        db = await aiosqlite.connect(args.sqlite_path, isolation_level=None)
        for pragma in SQLITE_PRAGMAS:
            await db.execute(pragma)

        async def page(after: int | None) -> list[Any]:
            params = (PAGE,) if after is None else (after, PAGE)
            async with db.execute(first if after is None else following, params) as cursor:
                return list(await cursor.fetchall())

        close = db.close
    try:
        if limit_pages is not None:
            after = None
            for _ in range(limit_pages):
                rows = await page(after)
                after = rows[-1][0]
            return
        while meter.reads == 0 or meter.seconds < args.duration:
            check = Pages(args.rows)
            with meter.timing():
                after = None
                async with asyncio.timeout(WAIT):
                    while True:
                        rows = await page(after)
                        if not rows:
                            break  # the table ended on a full page: one statement more than the gateway
                        check.add(rows[0][0], rows[-1][0], len(rows))
                        if len(rows) < PAGE:
                            break
                        after = rows[-1][0]
            meter.rows += check.finish()
            meter.pages += check.pages
    finally:
        await close()


def _struct_id(row: Any) -> int:
    return int(row.fields["id"].number_value)


async def grpc_reads(args: argparse.Namespace, meter: Meter) -> None:
    """Whole reads over ReaderService/Read, one stream each, on one channel."""
    metadata = ((kv.SESSION_HEADER, args.token),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        read = channel.unary_stream(
            "/prism.v1.ReaderService/Read", request_serializer=r.ReadRequest.SerializeToString,
            response_deserializer=r.Page.FromString,
        )
        request = r.ReadRequest(collection=COLLECTION, page_size=PAGE)
        # Warm-up: the first pages of one read, then the stream is cancelled.
        call = read(request, metadata=metadata)
        pages = 0
        async for _ in call:
            pages += 1
            if pages == WARMUP_PAGES:
                call.cancel()
                break
        while meter.reads == 0 or meter.seconds < args.duration:
            check, more, size = Pages(args.rows), False, 0
            with meter.timing():
                async with asyncio.timeout(WAIT):
                    async for page in read(request, metadata=metadata):
                        rows = page.rows
                        if rows:
                            check.add(_struct_id(rows[0]), _struct_id(rows[-1]), len(rows))
                        more = bool(page.next_cursor)
                        size += page.ByteSize()
            if more and check.ended:
                raise RuntimeError("the last page carries a cursor")
            meter.rows += check.finish(more and not check.ended)
            meter.pages += check.pages
            meter.bytes += size


class _SseRead(asyncio.Protocol):
    """One Read as server-sent events over HTTP/1.1: the chunked body decoded, events split,
    each page's JSON parsed and checked as it arrives."""

    def __init__(self, check: Pages, stop_after: int | None = None) -> None:
        self.check = check
        self.stop_after = stop_after  # a warm-up: done once this many pages arrived
        self.buffer = bytearray()  # raw bytes not yet decoded
        self.events = bytearray()  # decoded body bytes not yet split into events
        self.head_done = False
        self.chunk_left = 0  # bytes of the current chunk still to come (then its CRLF)
        self.body_bytes = 0
        self.more = False  # the last page seen carried a cursor
        self.newline: bytes | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A warm-up hangs up mid-stream on purpose: its "closed early" is expected, not an error to report.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:
            if not self.done.done():
                self.done.set_exception(exc)

    def _received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                raise RuntimeError(f"SSE read answered {bytes(self.buffer[:end])[:300]!r}")
            if b"transfer-encoding: chunked" not in head:
                raise RuntimeError("SSE read: expected a chunked body")
            del self.buffer[: end + 4]
            self.head_done = True
        while self.buffer and not self.done.done():
            if self.chunk_left == 0:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
                if size == 0:  # the last chunk: the stream is complete
                    self._events(final=True)
                    if not self.done.done():
                        self.done.set_result(None)
                    return
                del self.buffer[: end + 2]
                self.chunk_left = size + 2  # its data, then CRLF
            if self.chunk_left > 2:  # the chunk's data
                take = min(self.chunk_left - 2, len(self.buffer))
                self.events += self.buffer[:take]
                self.body_bytes += take
            else:  # the CRLF after it
                take = min(self.chunk_left, len(self.buffer))
            del self.buffer[:take]
            self.chunk_left -= take
        self._events(final=False)

    def _events(self, final: bool) -> None:
        if self.done.done():  # a warm-up that has its pages: the rest is ignored
            return
        if self.newline is None:  # SSE lines end in CRLF, LF or CR: the gateway's first line says which
            if (at := self.events.find(b"\n")) < 0:
                return
            self.newline = b"\r\n" if at > 0 and self.events[at - 1 : at] == b"\r" else b"\n"
        newline = self.newline
        separator = newline * 2
        while (end := self.events.find(separator)) >= 0:
            event = bytes(self.events[:end])
            del self.events[: end + len(separator)]
            kind, data = "message", b""
            for line in event.split(newline):
                if line.startswith(b"event: "):
                    kind = line[7:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
            if kind == "message" and data:
                page = json.loads(data)
                rows = page.get("rows", [])
                if rows:
                    self.check.add(int(rows[0]["id"]), int(rows[-1]["id"]), len(rows))
                self.more = bool(page.get("nextCursor"))
                if self.stop_after is not None and self.check.pages >= self.stop_after and not self.done.done():
                    self.done.set_result(None)
                    return
            elif kind == "error":
                raise RuntimeError(f"SSE event: error {data[:300]!r}")
        if final and self.events.strip():
            raise RuntimeError(f"SSE body ended inside an event: {bytes(self.events[:200])!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"connection closed before the stream ended ({exc})"))


async def _sse_read(args: argparse.Namespace, check: Pages, stop_after: int | None = None) -> _SseRead:
    loop = asyncio.get_running_loop()
    query = urllib.parse.urlencode({"pageSize": PAGE, "prism_session": args.token})
    request = (f"GET /v1/collections/{COLLECTION}:read?{query} HTTP/1.1\r\nhost: 127.0.0.1:{args.http_port}\r\n"
               "accept: text/event-stream\r\n\r\n").encode()
    transport, protocol = await loop.create_connection(lambda: _SseRead(check, stop_after), "127.0.0.1", args.http_port)
    try:
        transport.write(request)  # a warm-up (stop_after) hangs up once it has its pages
        async with asyncio.timeout(WAIT):
            await protocol.done
        return protocol
    finally:
        transport.close()


async def sse_reads(args: argparse.Namespace, meter: Meter) -> None:
    """Whole reads as server-sent events, a new HTTP/1.1 connection each (as EventSource opens one)."""
    await _sse_read(args, Pages(args.rows), stop_after=WARMUP_PAGES)
    while meter.reads == 0 or meter.seconds < args.duration:
        check = Pages(args.rows)
        with meter.timing():
            protocol = await _sse_read(args, check)
        meter.rows += check.finish(protocol.more and not check.ended)
        meter.pages += check.pages
        meter.bytes += protocol.body_bytes


async def client(args: argparse.Namespace) -> dict[str, Any]:
    meter = Meter()
    if args.side == "direct":
        await direct_reads(args, Meter(), limit_pages=WARMUP_PAGES)
        await direct_reads(args, meter)
    elif args.side == "grpc":
        await grpc_reads(args, meter)
    else:
        await sse_reads(args, meter)
    return meter.result()


def client_main(argv: list[str] | None = None) -> None:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=list(BACKENDS), required=True)
    parser.add_argument("--side", choices=[side for side in SIDES if not side.endswith("-pyvoy")], required=True)
    parser.add_argument("--table", required=True, help="direct: the collection's table")
    parser.add_argument("--rows", type=int, required=True, help="rows in the table (every read is checked)")
    parser.add_argument("--duration", type=float, default=5.0, help="timed seconds (at least one whole read)")
    parser.add_argument("--sqlite-path", type=pathlib.Path, help="direct on sqlite: the file")
    parser.add_argument("--grpc-port", type=int, help="grpc: the gateway's gRPC port")
    parser.add_argument("--http-port", type=int, help="sse: the gateway's HTTP port")
    parser.add_argument("--token", default="", help="grpc/sse: a session of the reader-<backend> config")
    args = parser.parse_args(argv)
    print(json.dumps(uvloop.run(client(args))))


# --- the section ------------------------------------------------------------------------------


def _rows_for(ctx: Context) -> int:
    """The full table, or a smaller one for ``--quick`` (a smoke test of the harness)."""
    return ROWS if ctx.durations.throughput >= 5 else QUICK_ROWS


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.subdir(SECTION)
    total = _rows_for(ctx)
    table = f"{TABLE_PREFIX}{uuid.uuid4().hex[:8]}"
    leftover = asyncio.run(cleanup())
    rows: list[Row] = []
    dropped = 0
    sqlite_file = work / "reader-bench.db"
    seeded: dict[str, float] = {}
    try:
        started = time.perf_counter()
        seed_sqlite(sqlite_file, table, total)
        seeded["sqlite"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        asyncio.run(seed_postgres(table, total))
        seeded["postgres"] = round(time.perf_counter() - started, 2)
        with ctx.serving(SECTION, f"full Read of {total:,} rows, pages of {PAGE}") as servers:
            config = write_config(work / "prism.yaml", sqlite_file, table)
            server = procs.gateway(ctx.workdir, "granian", config=config)
            pyvoy = procs.gateway(ctx.workdir, "pyvoy", config=config)
            servers += [server, pyvoy]
            tokens = {
                (gateway.name, backend): kv.create_session(f"127.0.0.1:{gateway.grpc_port}", f"reader-{backend}")
                for gateway in (server, pyvoy) for backend in BACKENDS
            }
            server.record_idle()
            pyvoy.record_idle()
            for backend, spec in BACKENDS.items():
                common = ["benchmarks.reader", "--backend", backend, "--table", table, "--rows", str(total),
                          "--duration", str(ctx.durations.throughput)]
                direct = [*common, "--side", "direct", "--sqlite-path", str(sqlite_file)]
                plan = {
                    "direct": direct,
                    "grpc": [*common, "--side", "grpc", "--grpc-port", str(server.grpc_port),
                             f"--token={tokens[server.name, backend]}"],
                    "sse": [*common, "--side", "sse", "--http-port", str(server.http_port),
                            f"--token={tokens[server.name, backend]}"],
                    "grpc-pyvoy": [*common, "--side", "grpc", "--grpc-port", str(pyvoy.http_port),
                                   f"--token={tokens[pyvoy.name, backend]}"],
                    "sse-pyvoy": [*common, "--side", "sse", "--http-port", str(pyvoy.http_port),
                                  f"--token={tokens[pyvoy.name, backend]}"],
                    "direct-after": direct,
                }
                measured: list[Row] = []
                for side, args in plan.items():
                    gateway = None if side.startswith("direct") else pyvoy if side.endswith("-pyvoy") else server
                    result = ctx.least_disturbed(
                        lambda args=args, gateway=gateway, spec=spec: ctx.client(*args, server=gateway, backend=spec.process)
                    )
                    name, transport = SIDES[side]
                    again = ", again after the gateway" if side == "direct-after" else ""
                    measured.append({"id": f"reader/{backend}/{side}", "backend": spec.label,
                                     "target": name or f"{spec.direct} directly{again}", "transport": transport,
                                     "page": PAGE, "table_rows": total, **result})
                directs = [row["rows_per_s"] for row in measured if row["id"].split("/")[-1].startswith("direct")]
                baseline = sum(directs) / len(directs)
                for row in measured:
                    if not row["id"].split("/")[-1].startswith("direct") and baseline:
                        row["ratio_vs_direct"] = round(row["rows_per_s"] / baseline, 3)
                rows += measured
    finally:
        dropped = asyncio.run(cleanup())
    return {"title": TITLE, "rows": rows, "targets": targets(rows), "namespace": NAMESPACE, "table_rows": total,
            "page": PAGE, "seeded_seconds": seeded, "leftover_before": leftover, "dropped_after": dropped}


# --- targets and the markdown -----------------------------------------------------------------


def targets(rows: list[Row]) -> list[Row]:
    """Issue 13: a full Read through the gateway at ≥ 50% of the direct client's rows/s, per
    backend and transport."""
    out = []
    for row in rows:
        if row.get("ratio_vs_direct") is None:
            continue
        value = row["ratio_vs_direct"]
        met = value >= RATIO_GOAL
        server = " on pyvoy" if row["id"].endswith("-pyvoy") else ""
        out.append({"goal": f"{row['backend']}: full Read over {row['transport']}{server} ≥ {RATIO_GOAL:.0%} of the direct client",
                    "measured": f"{value * 100:.0f}% ({rps(row['rows_per_s'])} rows/s)",
                    "met": met, "status": "met" if met else f"MISSED by {(RATIO_GOAL - value) * 100:.0f} points"})
    return out


TABLE = Table(
    [
        Column("backend", "backend"),
        Column("target", "target"),
        Column("transport", "transport"),
        Column("reads", "reads"),
        Column("rows", "rows", rps),
        Column("seconds", "seconds", lambda v: "—" if v is None else f"{v:.2f}"),
        Column("rows/s", "rows_per_s", rps),
        Column("gateway/direct", "ratio_vs_direct", ratio),
        Column("bytes/row", "bytes_per_row", lambda v: "—" if v is None else f"{v:.0f}"),
        Column("client CPU", "client_cpu_share", share),
        Column("gateway CPU", "server_cpu_share", share),
        Column("backend CPU", "backend_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("rows/s", "rows_per_s", rps)],
)


def markdown(section: dict[str, Any], old: dict[str, Row] | None, old_label: str) -> list[str]:
    out = ["### Targets (issue 13)", "", "| goal | measured | status |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in section.get("targets", [])]
    out += ["", report.render(TABLE, section["rows"], old, old_label), ""]
    disturbed = [row for row in section["rows"] if row.get("other_cpu_share", 0) > DISTURBED]
    if disturbed:
        out.append(f"- **Disturbed**: {len(disturbed)} of {len(section['rows'])} rows ran beside more than "
                   f"{DISTURBED:g} of a core of other work (*other CPU*): not for quoting.")
    out += [
        f"- Each row reads a bench-only table of {section.get('table_rows', 0):,} rows (id, label, amount, flag, "
        f"timestamp) whole, in pages of {section.get('page')} rows in key order, one read at a time, reads repeated "
        "until the timed seconds reach the run's duration. *gateway*: one Granian worker with a READER config per "
        f"backend (namespace `{section.get('namespace')}`); gRPC from a grpc.aio client process, SSE from a raw "
        "HTTP/1.1 client process (a new connection per read), every page decoded and checked. *direct*: the "
        "backend's own client in a client process running the keyset statements adapters/reader/sql.py writes "
        "for the same read (asyncpg with a pool like the adapter's; aiosqlite on the same file, same pragmas), "
        "rows into driver tuples and no further, once before the gateway's rows and once after: *gateway/direct* "
        "divides by the mean of the two. *bytes/row*: what the gateway sent per row (protobuf or SSE text).",
        "- Checked: every read on every side returned ids 1…N in order, no gap or repeat, full pages but the last; "
        "a gateway stream ending with a cursor, an SSE `event: error` or a gRPC error fails the row.",
        f"- Seeded in the database (seconds: {section.get('seeded_seconds')}); bench tables dropped afterwards: "
        f"{section.get('dropped_after')} (left from an earlier run beforehand: {section.get('leftover_before')}).",
    ]
    return out


if __name__ == "__main__":
    client_main()
