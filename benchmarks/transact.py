"""Section 12 — Transact (issue 14): Writes/s through the gateway against the same transaction
made with the backend's own Python client, per backend, in one run; and the mailbox listener's
delivery lag at the gateway's rate.

One gateway (Granian, one worker, as ``prism serve`` runs, its mailbox listener inside it, the
default) with a TRANSACT config per backend (``tx-sqlite``, ``tx-postgres``), each in a
bench-only namespace of its own (``prism-bench-transact-<backend>``) whose mailboxes are
delivered to a QUEUE config on the same backend (``events-<backend>``: the outbox on the
database, its messages on that database's queue, as the README's example does). The data table
is a bench-only table ``prismbench_tx_<run>`` with typed columns (id text primary key, customer
text, total double precision, status text), created before the gateway starts. Per backend:

    gateway   TransactService/Write over native gRPC from a grpc.aio client process, 16 calls
              in flight (one channel): an UPSERT of a new row (4 columns) and a 100-byte mailbox
              row (no headers, destination ``orders.created``) per call, no idempotency key;
              each of the 16 callers writes its own mailbox (the mailbox's head row is a lock
              every Write to that mailbox takes until commit: one shared mailbox would measure
              that lock's queue, the same on both sides, rather than the gateway)
    direct    the same two statements in one transaction with the backend's own client in a
              client process (issue 14's baseline), same 16 callers, rows, payloads and
              mailboxes, on tables of its own made from the adapter's DDL
              (``prismbench_txd_<run>_heads``/``_mailbox``/…):
        postgres  asyncpg, a pool of 1..10 (the adapter's pool_size). Per Write: BEGIN ISOLATION
                  LEVEL READ COMMITTED; the data statement the adapter's ``data_statement``
                  writes (values bound as text and cast to the column types, ``INSERT … ON
                  CONFLICT (id) DO UPDATE``); the adapter's APPEND statement (the head row's
                  ``INSERT … ON CONFLICT DO UPDATE SET next = next + 1`` that numbers the
                  mailbox and the mailbox row's INSERT in one statement) — the two statements
                  an interactive Transaction runs; COMMIT: four round trips. (The adapter wakes
                  other processes' listeners with a NOTIFY after the commit, coalesced; the
                  direct side wakes nobody.)
        sqlite    sqlite3 on a thread of its own (one connection, the backend's pragmas: WAL,
                  synchronous=NORMAL), each Write one job on that thread: BEGIN IMMEDIATE; the
                  adapter's upsert; the head row's upsert … RETURNING; the mailbox row's
                  INSERT; COMMIT.
    direct, tuned   for reference: the same client doing what the adapter does since it was
              tuned (issue 14's benchmark), so the gateway is also compared with a direct
              client as clever as itself:
        postgres  the adapter's Write statement (``write_statement``): the upsert, the head
                  and the mailbox row in one statement that is its own transaction (READ
                  COMMITTED, the sessions' default) — one round trip.
        sqlite    group commit: the Writes queued while the thread is busy go in one
                  transaction (the adapter's ``Batcher`` on the event loop; no savepoints: the
                  adapter takes them only to run a group again in which a Write failed).
    direct, NOTIFY in the transaction   Postgres, for reference: the direct row's transaction
              with ``pg_notify`` in its APPEND statement, as the adapter's was until the NOTIFY
              moved after the commit (on a channel nobody listens to): PostgreSQL serializes the
              commits of transactions that NOTIFY on one database-wide lock held through their
              WAL flush, so this is the baseline earlier runs of this section measured.

    gateway/direct = gateway Writes/s ÷ direct Writes/s, same backend; issue 14's target ≥ 50%
    vs tuned direct = gateway Writes/s ÷ tuned direct Writes/s (for reference)
    vs direct with NOTIFY = gateway Writes/s ÷ that row's Writes/s (Postgres, for reference)

    gateway (pyvoy)   the same load through native gRPC on the ASGI app (``prism serve --server
              pyvoy``, the client's channel on its HTTP port; issue 10's faster gRPC path), once the
              Granian gateway has stopped, with its own listener delivering: what a deployment that
              serves gRPC this way gets (gateway/direct as the row above)
    gateway, listener off   for reference, once that gateway has stopped: a second gateway from
              the same configuration with ``mailbox_listener.in_gateway: false`` and the same
              load (its rows stay undelivered, and are removed with the rest): what the
              Writes cost without the delivery running beside them

What the direct side does not do: no session, no request validation, no network hop or
protobuf; no idempotency-key bookkeeping (none is sent to the gateway either); on SQLite not the
adapter's ``PRAGMA busy_timeout`` read, set and restore (three statements around each group of
Writes, so the shared thread is never parked on another process's write lock); and above all
**nothing is delivered**: its mailbox rows stay in its table, where the gateway's listener
claims, publishes to the queue and marks every row in the same process, the same database and
(Postgres) the same connection pool while the Writes run (on SQLite, on the same connection and
thread as the Writes). The gateway's Writes/s therefore include the outbox's delivery — work
the direct rows do not do; the *listener off* row is the like-for-like comparison of the
Writes alone. Its *delivery lag* is the listener's ``prism_mailbox_delivery_lag_seconds``
histogram (commit to publish) scraped from /metrics before and after the row (p50/p99
interpolated within its buckets, as PromQL's histogram_quantile does), and *drain* how long
after the load ended the last of the row's mailbox rows was marked delivered.

Checked, so no fast failure is timed: every Write answers OK, not replayed, with the next
sequence of its mailbox (1, 2, 3 … for each caller); after each row the data table holds
exactly the rows the client wrote, the mailbox table exactly its mailbox rows, and (gateway)
every one of them is delivered within the drain limit and the listener's delivered counter
grew by the same number. The namespaces' rows (mailbox, heads, cursors, queue), the data
tables and the direct rows' tables are removed afterwards (and first, should an interrupted run
have left any), and the gateway's tables they were deleted from are vacuumed: the direct rows get
new tables every run, and on a server without autovacuum (this machine's) the gateway's would
otherwise carry the dead rows of every earlier run, which its scans then read.

    python -m benchmarks.run --only transact [--quick]
    python -m benchmarks.transact --backend postgres --side direct --table T --duration 2   (one client run)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import pathlib
import resource
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import yaml

from benchmarks import kv, procs, report
from benchmarks.context import DISTURBED, Context
from benchmarks.report import Column, Row, Table, ratio, rps, share, text
from prism.v1 import transact_pb2 as t

TITLE = "Transact: Writes through the gateway vs the backend's own client, and the listener's delivery lag"
SECTION = "transact"
NAMESPACE_PREFIX = "prism-bench-transact"  # bench-only: one namespace per backend, removed at the end
TABLE_PREFIX = "prismbench_tx"  # bench-only data tables (a declared table may not be prism_*) and the direct rows'
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
IN_FLIGHT = 16  # Writes at once, each caller its own mailbox
POOL = 10  # the direct asyncpg pool, as the gateway's (pool_size)
PAYLOAD = bytes(range(100))  # the mailbox row's payload
DESTINATION = "orders.created"  # the queue topic the listener publishes every row to
DIRECT_CHANNEL = "prismbench_transact"  # the direct rows' NOTIFY channel: nobody listens to it
RATIO_GOAL = 0.5  # issue 14: the gateway at ≥ 50% of the direct client's Writes/s
DRAIN_LIMIT = 60.0  # seconds the listener may take after the load to deliver the rest
WAIT = 30.0  # seconds: the most a client run waits for one Write
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")  # adapters/backends/sqlite.py
COLUMNS = ("id", "customer", "total", "status")
LAG_METRIC = "prism_mailbox_delivery_lag_seconds"
DELIVERED_METRIC = "prism_mailbox_delivered"


@dataclass(frozen=True)
class Backend:
    label: str
    settings: dict[str, Any]  # the gateway's backends entry (the SQLite path is filled in per run)
    direct: str  # the client the direct rows use, for the table
    process: str | None  # the database server's process name: its CPU is counted apart (None: in process)

    @property
    def namespace(self) -> str:
        return f"{NAMESPACE_PREFIX}-{self.label.lower()}"


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("SQLite", {"type": "sqlite"}, "sqlite3 (one thread)", None),
    "postgres": Backend("Postgres", {"type": "postgres", "dsn": POSTGRES_DSN}, "asyncpg", "postgres"),
}


def data_row(run: str, caller: int, n: int) -> dict[str, Any]:
    """Write ``n`` of ``caller``: a new row each time (the upsert inserts)."""
    return {"id": f"{run}-{caller}-{n}", "customer": f"c-{n % 100}", "total": n * 0.25 + 0.5, "status": "new"}


def mailbox_name(run: str, caller: int) -> str:
    return f"bench-{run}-{caller}"


# --- client runs (their own process, like the gateway's callers) -------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Meter:
    """Writes and their latencies, wall seconds and this process's CPU over the timed part only."""

    writes: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), _cpu()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - wall0
            self.cpu += _cpu() - cpu0

    def result(self, **extra: Any) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else 0.0

        return {"writes": self.writes, "seconds": round(self.seconds, 3),
                "writes_per_s": round(self.writes / self.seconds, 1), "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
                "client_cpu_share": round(self.cpu / self.seconds, 3), **extra}


Write = Callable[[int, int], Awaitable[int]]  # (caller, n) → the mailbox sequence it got


async def _callers(write: Write, warmup: float, duration: float, meter: Meter, in_flight: int = IN_FLIGHT) -> int:
    """``in_flight`` callers writing flat out: ``warmup`` seconds untimed, then ``duration`` timed
    (a Write under way at the end is finished and counted: it committed). Every Write must get
    the next sequence of its caller's mailbox. The Writes made in all."""
    counts = [0] * in_flight
    timed = False

    async def caller(index: int, until: float) -> None:
        while time.perf_counter() < until:
            n = counts[index]
            started = time.perf_counter()
            sequence = await asyncio.wait_for(write(index, n), WAIT)
            if timed:
                meter.latencies.append(time.perf_counter() - started)
                meter.writes += 1
            if sequence != n + 1:
                raise RuntimeError(f"caller {index}: Write {n + 1} got mailbox sequence {sequence}")
            counts[index] = n + 1

    if warmup > 0:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(caller(i, until) for i in range(in_flight)))
    timed = True
    with meter.timing():
        until = time.perf_counter() + duration
        await asyncio.gather(*(caller(i, until) for i in range(in_flight)))
    return sum(counts)


class Direct:
    """The direct side's tables: the adapter's DDL with the table names this run's own."""

    def __init__(self, run: str) -> None:
        self.prefix = f"{TABLE_PREFIX}d_{run}_"  # prismbench_txd_<run>_heads, _mailbox, …
        self.data = f"{self.prefix}orders"

    def renamed(self, sql: str) -> str:
        """An adapter statement on this run's tables (and the bench channel, nobody listening)."""
        out = sql.replace("prism_transact_", self.prefix).replace("'prism_transact'", f"'{DIRECT_CHANNEL}'")
        if "prism_transact" in out:
            raise AssertionError(f"a gateway table left in {out[:200]}")
        return out


async def direct_postgres(args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    import asyncpg

    from adapters.transact import postgres as adapter
    from adapters.transact.base import DataWrite, Operation
    from adapters.transact.base import Table as TxTable

    direct = Direct(args.run)
    columns = {"id": adapter.Column("text", False), "customer": adapter.Column("text", False),
               "total": adapter.Column("double precision", False), "status": adapter.Column("text", False)}
    table = TxTable(direct.data, ("id",), COLUMNS)
    write = DataWrite(table, Operation.UPSERT, data_row(args.run, 0, 0))
    data_sql, order = adapter.data_statement(write, columns)
    append = direct.renamed(adapter.APPEND)
    if args.notify:  # the adapter's APPEND as it was: pg_notify in the transaction
        if "pg_notify" in append or not append.endswith("SELECT seq FROM row"):
            raise AssertionError(f"APPEND changed: {append[-80:]}")
        append = append.removesuffix("SELECT seq FROM row") + f"SELECT seq, pg_notify('{DIRECT_CHANNEL}', $1) FROM row"
    begin = adapter.BEGIN[adapter.Isolation.READ_COMMITTED]
    # tuned: the adapter's own Write statement — the upsert, the head and the mailbox row in
    # one statement that is its own transaction (READ COMMITTED: the default)
    one_sql, one_order = adapter.write_statement(write, columns, implicit=True, keyed=False)
    one_sql = direct.renamed(one_sql)
    if one_order != order:
        raise AssertionError(f"the two statements bind {order}, the one statement {one_order}")
    namespace = BACKENDS["postgres"].namespace
    pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=POOL, timeout=5, command_timeout=WAIT)
    try:
        async with pool.acquire() as con:
            for statement in adapter.MIGRATIONS:
                if "prism_transact_keys" in statement or "prism_transact_cursors" in statement:
                    continue  # idempotency keys and the listener's cursors: the direct side has neither
                await con.execute(direct.renamed(statement))
            await con.execute(f"CREATE TABLE {direct.data} (id text PRIMARY KEY, customer text NOT NULL, "
                              "total double precision NOT NULL, status text NOT NULL)")

        async def write(caller: int, n: int) -> int:
            row = data_row(args.run, caller, n)
            values = [adapter._text(row[name], columns[name]) for name in order]
            async with pool.acquire() as con:
                try:
                    await con.execute(begin)
                    now = time.time_ns()
                    await con.execute(data_sql, *values)
                    seq: int = await con.fetchval(append, namespace, mailbox_name(args.run, caller), PAYLOAD, "{}",
                                                  DESTINATION, now)
                    await con.execute("COMMIT")
                except BaseException:
                    await asyncio.shield(con.execute("ROLLBACK"))
                    raise
            return seq

        async def write_one(caller: int, n: int) -> int:
            row = data_row(args.run, caller, n)
            values = [adapter._text(row[name], columns[name]) for name in order]
            async with pool.acquire() as con:
                found = await con.fetchrow(one_sql, *values, namespace, mailbox_name(args.run, caller), PAYLOAD, "{}",
                                           DESTINATION, time.time_ns())
            if found is None or found[0] is None:
                raise RuntimeError("the one statement wrote nothing (not READ COMMITTED?)")
            return int(found[0])

        made = await _callers(write_one if args.tuned else write, args.warmup, args.duration, meter, args.in_flight)
        async with pool.acquire() as con:
            stored = await con.fetchval(f"SELECT count(*) FROM {direct.data}")
            mailbox = await con.fetchval(f"SELECT count(*) FROM {direct.prefix}mailbox")
        if stored != made or mailbox != made:
            raise RuntimeError(f"{made} Writes made, the tables hold {stored} data and {mailbox} mailbox rows")
    finally:
        try:
            async with pool.acquire() as con:
                for name in ("mailbox", "heads", "orders"):
                    await con.execute(f"DROP TABLE IF EXISTS {direct.prefix}{name}")
        finally:
            await pool.close()
    return meter.result(statements=[one_sql] if args.tuned else [begin, data_sql, append, "COMMIT"], notify=args.notify)


# SQLite: copied from adapters/transact/sqlite.py (_next_sequence, _append; inside its functions).
LITE_HEAD = ("INSERT INTO prism_transact_heads (namespace, mailbox, next) VALUES (?, ?, 2) "
             "ON CONFLICT (namespace, mailbox) DO UPDATE SET next = next + 1 RETURNING next - 1")
LITE_APPEND = ("INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, committed_ns) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)")


async def direct_sqlite(args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    from adapters.transact import sqlite as adapter
    from adapters.transact.base import DataWrite, Operation
    from adapters.transact.base import Table as TxTable

    direct = Direct(args.run)
    table = TxTable(direct.data, ("id",), COLUMNS)
    data_sql, _ = adapter.data_statement(DataWrite(table, Operation.UPSERT, data_row(args.run, 0, 0)))
    head, append = direct.renamed(LITE_HEAD), direct.renamed(LITE_APPEND)
    namespace = BACKENDS["sqlite"].namespace
    path = args.workdir / f"{direct.prefix}direct.db"
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-direct")
    loop = asyncio.get_running_loop()
    con = await loop.run_in_executor(thread, lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False))

    def setup() -> None:
        for pragma in SQLITE_PRAGMAS:
            con.execute(pragma)
        for statement in adapter.SCHEMA:
            if "prism_transact_keys" in statement or "prism_transact_cursors" in statement:
                continue  # idempotency keys and the listener's cursors: the direct side has neither
            con.execute(direct.renamed(statement))
        con.execute(f"CREATE TABLE {direct.data} (id TEXT PRIMARY KEY, customer TEXT NOT NULL, total REAL NOT NULL, "
                    "status TEXT NOT NULL)")

    def transaction(values: list[Any], mailbox: str) -> int:
        con.execute("BEGIN IMMEDIATE")
        try:
            now = time.time_ns()
            con.execute(data_sql, values)
            seq: int = con.execute(head, (namespace, mailbox)).fetchone()[0]
            con.execute(append, (namespace, mailbox, seq, PAYLOAD, "{}", DESTINATION, now))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return seq

    def grouped(writes: list[tuple[list[Any], str]]) -> list[int]:
        """tuned: the Writes queued meanwhile in one transaction (as the adapter groups them:
        savepoints only when one fails, and none fails here)."""
        con.execute("BEGIN IMMEDIATE")
        try:
            sequences = []
            for values, mailbox in writes:
                now = time.time_ns()
                con.execute(data_sql, values)
                seq: int = con.execute(head, (namespace, mailbox)).fetchone()[0]
                con.execute(append, (namespace, mailbox, seq, PAYLOAD, "{}", DESTINATION, now))
                sequences.append(seq)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return sequences

    from adapters.transact.base import Batcher  # the adapter's grouping of calls, on the event loop

    batcher: Batcher[tuple[list[Any], str], int] = Batcher(
        lambda writes: loop.run_in_executor(thread, grouped, writes), "direct-writes")

    async def write(caller: int, n: int) -> int:
        row = data_row(args.run, caller, n)
        values = [row[name] for name in COLUMNS]
        if args.tuned:
            return await batcher.submit((values, mailbox_name(args.run, caller)))
        return await loop.run_in_executor(thread, transaction, values, mailbox_name(args.run, caller))

    try:
        await loop.run_in_executor(thread, setup)
        made = await _callers(write, args.warmup, args.duration, meter, args.in_flight)
        stored, mailbox = await loop.run_in_executor(thread, lambda: (
            con.execute(f"SELECT count(*) FROM {direct.data}").fetchone()[0],
            con.execute(f"SELECT count(*) FROM {direct.prefix}mailbox").fetchone()[0]))
        if stored != made or mailbox != made:
            raise RuntimeError(f"{made} Writes made, the tables hold {stored} data and {mailbox} mailbox rows")
    finally:
        await loop.run_in_executor(thread, con.close)
        thread.shutdown()
        for suffix in ("", "-wal", "-shm"):  # the section's scratch directory goes anyway
            pathlib.Path(f"{path}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
    return meter.result(statements=[data_sql, head, append])


async def gateway_writes(args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    """Write over native gRPC, IN_FLIGHT at once on one channel."""
    metadata = ((kv.SESSION_HEADER, args.token),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        call = channel.unary_unary(
            "/prism.v1.TransactService/Write", request_serializer=t.WriteRequest.SerializeToString,
            response_deserializer=t.WriteResponse.FromString,
        )

        async def write(caller: int, n: int) -> int:
            request = t.WriteRequest(
                data=t.DataWrite(table=args.table, operation=t.WRITE_OPERATION_UPSERT),
                mailbox=t.MailboxWrite(mailbox=mailbox_name(args.run, caller), payload=PAYLOAD, destination=DESTINATION),
            )
            request.data.row.update(data_row(args.run, caller, n))
            answer = await call(request, metadata=metadata, timeout=WAIT)
            if answer.replayed:
                raise RuntimeError("a Write without an idempotency key answered replayed")
            return int(answer.mailbox_sequence)

        made = await _callers(write, args.warmup, args.duration, meter, args.in_flight)
    return meter.result(made=made)


async def client(args: argparse.Namespace) -> dict[str, Any]:
    meter = Meter()
    if args.side == "gateway":
        return await gateway_writes(args, meter)
    return await (direct_postgres if args.backend == "postgres" else direct_sqlite)(args, meter)


def client_main(argv: list[str] | None = None) -> None:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m benchmarks.transact", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=list(BACKENDS), required=True)
    parser.add_argument("--side", choices=("direct", "gateway"), required=True)
    parser.add_argument("--notify", action="store_true",
                        help="direct on postgres: pg_notify in the APPEND statement, as the adapter's was")
    parser.add_argument("--tuned", action="store_true",
                        help="direct: as the adapter does it (Postgres one statement, SQLite grouped commits)")
    parser.add_argument("--run", default=uuid.uuid4().hex[:8], help="names this run's rows, mailboxes and tables")
    parser.add_argument("--table", default="", help="gateway: the declared data table")
    parser.add_argument("--duration", type=float, default=5.0, help="timed seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before timing")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("."), help="direct on sqlite: where its file goes")
    parser.add_argument("--grpc-port", type=int, help="gateway: its gRPC port")
    parser.add_argument("--token", default="", help="gateway: a session of its tx-<backend> config")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT,
                        help=f"Writes at once, each caller its own mailbox (the section: {IN_FLIGHT})")
    args = parser.parse_args(argv)
    print(json.dumps(uvloop.run(client(args))))


# --- the gateway's side, from the section ------------------------------------------------------


def write_config(path: pathlib.Path, sqlite_file: pathlib.Path, table: str, *, listener: bool = True) -> pathlib.Path:
    backends = {name: {**spec.settings, **({"path": str(sqlite_file)} if name == "sqlite" else {})}
                for name, spec in BACKENDS.items()}
    tables = {table: {"key": ["id"], "columns": list(COLUMNS)}}
    path.write_text(yaml.safe_dump({
        "backends": backends,
        "configs": [
            *({"name": f"tx-{name}", "pattern": "TRANSACT", "backend": name, "namespace": spec.namespace}
              for name, spec in BACKENDS.items()),
            *({"name": f"events-{name}", "pattern": "QUEUE", "backend": name, "namespace": spec.namespace}
              for name, spec in BACKENDS.items()),
        ],
        "namespaces": [{"name": spec.namespace} for spec in BACKENDS.values()],
        "transact": {spec.namespace: {"backend": name, "tables": tables, "deliver_to": f"events-{name}"}
                     for name, spec in BACKENDS.items()},
        "mailbox_listener": {"in_gateway": listener},
    }, sort_keys=False))
    return path


def create_sqlite_table(path: pathlib.Path, table: str) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
        for pragma in SQLITE_PRAGMAS:
            con.execute(pragma)
        con.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, customer TEXT NOT NULL, total REAL NOT NULL, "
                    "status TEXT NOT NULL)")


async def create_postgres_table(table: str) -> None:
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, customer text NOT NULL, "
                          "total double precision NOT NULL, status text NOT NULL)")
    finally:
        await con.close()


@dataclass(frozen=True)
class Stored:
    """What the gateway's database holds for one run (its rows and mailboxes)."""

    data: int
    mailbox: int
    undelivered: int


def _stored_sqlite(path: pathlib.Path, table: str, run: str) -> Stored:
    namespace = BACKENDS["sqlite"].namespace
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        data = con.execute(f"SELECT count(*) FROM {table} WHERE id LIKE ?", (f"{run}-%",)).fetchone()[0]
        mailbox, undelivered = con.execute(
            "SELECT count(*), count(*) - count(delivered_ns) FROM prism_transact_mailbox WHERE namespace = ? AND mailbox LIKE ?",
            (namespace, f"bench-{run}-%"),
        ).fetchone()
    return Stored(data, mailbox, undelivered)


async def _stored_postgres(table: str, run: str) -> Stored:
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        data = await con.fetchval(f"SELECT count(*) FROM {table} WHERE id LIKE $1", f"{run}-%")
        found = await con.fetchrow(
            "SELECT count(*) AS mailbox, count(*) - count(delivered_ns) AS undelivered FROM prism_transact_mailbox "
            "WHERE namespace = $1 AND mailbox LIKE $2", BACKENDS["postgres"].namespace, f"bench-{run}-%",
        )
    finally:
        await con.close()
    return Stored(data, found["mailbox"], found["undelivered"])


def stored(backend: str, sqlite_file: pathlib.Path, table: str, run: str) -> Stored:
    if backend == "sqlite":
        return _stored_sqlite(sqlite_file, table, run)
    return asyncio.run(_stored_postgres(table, run))


def scrape(port: int, namespace: str) -> dict[str, Any]:
    """The listener's lag histogram (cumulative buckets, sum, count) and delivered counter for
    ``namespace``, from the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    out: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0, "delivered": 0.0}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("namespace") != namespace:
                continue
            if sample.name == f"{LAG_METRIC}_bucket":
                out["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name == f"{LAG_METRIC}_sum":
                out["sum"] = sample.value
            elif sample.name == f"{LAG_METRIC}_count":
                out["count"] = sample.value
            elif sample.name == f"{DELIVERED_METRIC}_total":
                out["delivered"] = sample.value
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A quantile from cumulative histogram buckets, interpolated linearly within its bucket
    (what PromQL's histogram_quantile does); None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (bound - lower) * ((rank - below) / max(count - below, 1e-12))
        lower, below = bound, count
    return lower


def lag_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The lag observations made between two scrapes."""
    buckets = sorted((bound, after["buckets"].get(bound, 0.0) - before["buckets"].get(bound, 0.0))
                     for bound in after["buckets"])
    count = after["count"] - before["count"]
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    return {
        "lag_observations": int(count),
        "delivered_counter": int(after["delivered"] - before["delivered"]),
        "lag_mean_ms": round((after["sum"] - before["sum"]) / count * 1000, 2) if count else None,
        "lag_p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "lag_p99_ms": None if p99 is None else round(p99 * 1000, 2),
    }


@dataclass
class Gateway:
    server: procs.Server
    sqlite_file: pathlib.Path
    table: str
    listener: bool  # its mailbox listener runs (the default), or not (mailbox_listener.in_gateway: false)
    server_name: str = "granian"  # as ``prism serve --server`` names it
    tokens: dict[str, str] = field(default_factory=dict)  # backend → session token

    @property
    def write_port(self) -> int:
        """Where the Writes go: the grpc.aio port, or on pyvoy the HTTP port, whose ASGI app
        answers native gRPC (issue 10's faster path)."""
        port = self.server.http_port if self.server_name == "pyvoy" else self.server.grpc_port
        assert port is not None
        return port


def _start(ctx: Context, servers: list[procs.Server], work: pathlib.Path, sqlite_file: pathlib.Path, table: str,
           *, listener: bool, server_name: str = "granian") -> Gateway:
    name = "prism.yaml" if listener else "prism-no-listener.yaml"
    config = write_config(work / name, sqlite_file, table, listener=listener)
    server = procs.gateway(ctx.workdir, server_name, config=config)
    servers.append(server)
    gw = Gateway(server, sqlite_file, table, listener, server_name)
    for backend in BACKENDS:
        gw.tokens[backend] = kv.create_session(f"127.0.0.1:{server.grpc_port}", f"tx-{backend}")
    server.record_idle()
    return gw


def _gateway_row(ctx: Context, gw: Gateway, backend: str) -> dict[str, Any]:
    """One gateway run: the client process, then (listener on) the drain, the lag, and the checks."""
    spec = BACKENDS[backend]
    run = uuid.uuid4().hex[:8]
    d = ctx.durations
    port = gw.server.http_port or 0
    before = scrape(port, spec.namespace)
    result = ctx.client(
        "benchmarks.transact", "--backend", backend, "--side", "gateway", "--run", run, "--table", gw.table,
        "--duration", str(d.throughput), "--warmup", str(d.warmup), "--grpc-port", str(gw.write_port),
        f"--token={gw.tokens[backend]}", server=gw.server, backend=spec.process,
    )
    ended = time.perf_counter()
    made = int(result["made"])
    found = stored(backend, gw.sqlite_file, gw.table, run)
    if found.data != made or found.mailbox != made:
        raise RuntimeError(f"{backend}: {made} Writes answered OK, the database holds {found.data} data rows and "
                           f"{found.mailbox} mailbox rows of the run")
    if not gw.listener:
        if found.undelivered != made:
            raise RuntimeError(f"{backend}: no listener runs, yet {made - found.undelivered} rows were delivered")
        return result
    result["undelivered_at_end"] = found.undelivered
    while found.undelivered and time.perf_counter() - ended < DRAIN_LIMIT:
        time.sleep(0.02)
        found = stored(backend, gw.sqlite_file, gw.table, run)
    result["drain_s"] = round(time.perf_counter() - ended, 2) if result["undelivered_at_end"] else 0.0
    if found.undelivered:
        raise RuntimeError(f"{backend}: {found.undelivered} of {made} mailbox rows still undelivered "
                           f"{DRAIN_LIMIT:g} s after the load")
    after = scrape(port, spec.namespace)
    deadline = time.perf_counter() + 5  # the counter moves just before the mark: let the last ones land
    while after["delivered"] - before["delivered"] < made and time.perf_counter() < deadline:
        time.sleep(0.05)
        after = scrape(port, spec.namespace)
    lag = lag_between(before, after)
    if lag["delivered_counter"] < made:
        raise RuntimeError(f"{backend}: the listener counted {lag['delivered_counter']} deliveries of {made} rows")
    return {**result, **lag}


TUNED = {"postgres": "one statement", "sqlite": "grouped commits"}  # what the tuned direct row does


def _measured(ctx: Context, backend: str, side: str, measure: Callable[[], dict[str, Any]]) -> Row:
    spec = BACKENDS[backend]
    target = {"direct": f"{spec.direct} directly", "direct-tuned": f"{spec.direct} directly, {TUNED[backend]} (for reference)",
              "direct-notify": f"{spec.direct} directly, NOTIFY in the transaction (for reference)",
              "gateway": "gateway (granian), gRPC Write",
              "gateway-pyvoy": "gateway (pyvoy), gRPC Write through the ASGI app",
              "gateway-no-listener": "gateway, listener off (for reference)"}[side]
    return {"id": f"transact/{backend}/{side}", "backend": spec.label, "target": target,
            "in_flight": f"{IN_FLIGHT} ({IN_FLIGHT} mailboxes)", **ctx.least_disturbed(measure)}


def _direct(ctx: Context, backend: str, work: pathlib.Path, *, tuned: bool = False, notify: bool = False) -> dict[str, Any]:
    d = ctx.durations
    return ctx.client(
        "benchmarks.transact", "--backend", backend, "--side", "direct", "--duration", str(d.throughput),
        "--warmup", str(d.warmup), "--workdir", str(work), *(["--tuned"] if tuned else []),
        *(["--notify"] if notify else []), backend=BACKENDS[backend].process,
    )


def run(ctx: Context) -> dict[str, Any]:
    """Per backend: direct, then the gateway with its listener; then, with that gateway stopped (so
    no listener delivers their rows), the gateway with its listener off."""
    work = ctx.subdir(SECTION)
    run_id = uuid.uuid4().hex[:8]
    table = f"{TABLE_PREFIX}_{run_id}"
    sqlite_file = work / "transact-gateway.db"
    leftover = asyncio.run(cleanup())
    by_backend: dict[str, list[Row]] = {backend: [] for backend in BACKENDS}
    removed: dict[str, int] = {}
    load = f"gRPC Write, {IN_FLIGHT} in flight"
    try:
        create_sqlite_table(sqlite_file, table)
        asyncio.run(create_postgres_table(table))
        with ctx.serving(SECTION, f"{load}, listener delivering to a queue") as servers:
            gw = _start(ctx, servers, work, sqlite_file, table, listener=True)
            for backend, rows in by_backend.items():
                rows.append(_measured(ctx, backend, "direct", lambda backend=backend: _direct(ctx, backend, work)))
                rows.append(_measured(ctx, backend, "gateway", lambda backend=backend: _gateway_row(ctx, gw, backend)))
                rows.append(_measured(ctx, backend, "direct-tuned",
                                      lambda backend=backend: _direct(ctx, backend, work, tuned=True)))
                if backend == "postgres":
                    rows.append(_measured(ctx, backend, "direct-notify",
                                          lambda backend=backend: _direct(ctx, backend, work, notify=True)))
        with ctx.serving(SECTION, f"{load} through the ASGI app on pyvoy, listener delivering to a queue") as servers:
            gw = _start(ctx, servers, work, sqlite_file, table, listener=True, server_name="pyvoy")
            for backend, rows in by_backend.items():
                rows.append(_measured(ctx, backend, "gateway-pyvoy", lambda backend=backend: _gateway_row(ctx, gw, backend)))
        with ctx.serving(SECTION, f"{load}, listener off") as servers:
            gw = _start(ctx, servers, work, sqlite_file, table, listener=False)
            for backend, rows in by_backend.items():
                rows.append(_measured(ctx, backend, "gateway-no-listener", lambda backend=backend: _gateway_row(ctx, gw, backend)))
    finally:
        removed = asyncio.run(cleanup())
    rows = [row for backend_rows in by_backend.values() for row in backend_rows]
    for backend_rows in by_backend.values():
        rate = {row["id"].rsplit("/", 1)[1]: row["writes_per_s"] for row in backend_rows}
        for row in backend_rows:
            side = row["id"].rsplit("/", 1)[1]
            if side.startswith("gateway") and rate.get("direct"):
                row["ratio_vs_direct"] = round(row["writes_per_s"] / rate["direct"], 3)
            if side.startswith("gateway") and rate.get("direct-tuned"):
                row["ratio_vs_tuned"] = round(row["writes_per_s"] / rate["direct-tuned"], 3)
            if side.startswith("gateway") and rate.get("direct-notify"):
                row["ratio_vs_notify"] = round(row["writes_per_s"] / rate["direct-notify"], 3)
    return {"title": TITLE, "rows": rows, "targets": targets(rows), "namespaces": [s.namespace for s in BACKENDS.values()],
            "table": table, "leftover_before": leftover, "removed_after": removed}


async def cleanup() -> dict[str, int]:
    """Remove the bench namespaces' rows from the gateway's tables on Postgres (mailbox, heads,
    keys, cursors, and the queue the listener delivered to), and every bench data table and
    direct-row table (this run's, or an interrupted run's); vacuum the gateway's tables rows were
    deleted from (what autovacuum would do, on a server that runs none). SQLite's files are
    scratch."""
    import asyncpg

    removed = {"postgres_rows": 0, "postgres_tables": 0, "vacuumed": 0}
    namespaces = [spec.namespace for spec in BACKENDS.values()]
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        # Every gateway table with a namespace column: the Transact tables and the Queue's.
        emptied = []
        for found in await con.fetch(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND column_name = 'namespace' AND (table_name LIKE 'prism\\_transact\\_%' OR table_name LIKE 'prism\\_queue\\_%')"
        ):
            status = await con.execute(f'DELETE FROM "{found["table_name"]}" WHERE namespace = ANY($1::text[])', namespaces)
            removed["postgres_rows"] += int(status.split()[-1])
            if int(status.split()[-1]):
                emptied.append(found["table_name"])
        await con.execute("SET lock_timeout = '5s'")  # another session's VACUUM or migration: skip, not wait
        for name in emptied:
            try:
                await con.execute(f'VACUUM "{name}"')
                removed["vacuumed"] += 1
            except asyncpg.LockNotAvailableError:
                pass
        for found in await con.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE $1", TABLE_PREFIX.replace("_", "\\_") + "%"):
            await con.execute(f'DROP TABLE IF EXISTS "{found["tablename"]}"')
            removed["postgres_tables"] += 1
    finally:
        await con.close()
    return removed


# --- targets and the markdown -----------------------------------------------------------------


def targets(rows: list[Row]) -> list[Row]:
    """Issue 14: the gateway's Writes/s at ≥ 50% of the direct client's, per backend."""
    out = []
    for row in rows:
        if row.get("ratio_vs_direct") is None or not row["id"].endswith(("/gateway", "/gateway-pyvoy")):
            continue  # the listener-off row is for reference: a gateway runs its listener by default
        value = row["ratio_vs_direct"]
        met = value >= RATIO_GOAL
        path = " (pyvoy, the ASGI app's native gRPC)" if row["id"].endswith("-pyvoy") else ""
        out.append({"goal": f"{row['backend']}{path}: Writes/s with the listener delivering ≥ {RATIO_GOAL:.0%} of the direct client",
                    "measured": f"{value * 100:.0f}% ({rps(row['writes_per_s'])} Writes/s)",
                    "met": met, "status": "met" if met else f"MISSED by {(RATIO_GOAL - value) * 100:.0f} points"})
    return out


def _ms(v: Any) -> str:
    return "—" if v is None else f"{v:,.2f}"


TABLE = Table(
    [
        Column("backend", "backend"),
        Column("target", "target"),
        Column("in flight", "in_flight"),
        Column("writes", "writes", rps),
        Column("Writes/s", "writes_per_s", rps),
        Column("gateway/direct", "ratio_vs_direct", ratio),
        Column("vs tuned direct", "ratio_vs_tuned", ratio),
        Column("vs direct with NOTIFY", "ratio_vs_notify", ratio),
        Column("p50 ms", "p50_ms", _ms),
        Column("p99 ms", "p99_ms", _ms),
        Column("lag p50 ms", "lag_p50_ms", _ms),
        Column("lag p99 ms", "lag_p99_ms", _ms),
        Column("lag mean ms", "lag_mean_ms", _ms),
        Column("backlog at end", "undelivered_at_end", rps),
        Column("drain s", "drain_s", lambda v: "—" if v is None else f"{v:.2f}"),
        Column("client CPU", "client_cpu_share", share),
        Column("gateway CPU", "server_cpu_share", share),
        Column("backend CPU", "backend_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("Writes/s", "writes_per_s", rps), Column("lag p99 ms", "lag_p99_ms", _ms)],
)


def markdown(section: dict[str, Any], old: dict[str, Row] | None, old_label: str) -> list[str]:
    out = ["### Targets (issue 14)", "", "| goal | measured | status |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in section.get("targets", [])]
    out += ["", report.render(TABLE, section["rows"], old, old_label), ""]
    disturbed = [row for row in section["rows"] if row.get("other_cpu_share", 0) > DISTURBED]
    if disturbed:
        out.append(f"- **Disturbed**: {len(disturbed)} of {len(section['rows'])} rows ran beside more than "
                   f"{DISTURBED:g} of a core of other work (*other CPU*): not for quoting.")
    out += [
        f"- Each Write: an UPSERT of a new 4-column row into a bench-only table (`{section.get('table')}`) and a "
        f"100-byte mailbox row, one transaction; {IN_FLIGHT} callers flat out, each writing its own mailbox, no "
        "idempotency key. *gateway*: TransactService/Write over native gRPC from a grpc.aio client process, one "
        "Granian worker whose mailbox listener delivers every row to a QUEUE config on the same backend meanwhile "
        f"(namespaces {', '.join(f'`{n}`' for n in section.get('namespaces', []))}). *direct*: the same two "
        "statements in one transaction with the backend's own client in a client process on tables made from the "
        "adapter's DDL — asyncpg (pool of 10; BEGIN READ COMMITTED, the adapter's upsert and APPEND statements, "
        "COMMIT: four round trips) or sqlite3 on one thread (BEGIN IMMEDIATE, upsert, head upsert, mailbox INSERT, "
        "COMMIT as one job per Write); it delivers nothing, wakes no listener and keeps no idempotency keys "
        "(benchmarks/transact.py says exactly what it does and does not do).",
        "- *direct, tuned* (for reference; *vs tuned direct*): the same client doing what the adapter itself does — "
        "on Postgres the adapter's one Write statement (upsert, head and mailbox row; its own READ COMMITTED "
        "transaction: one round trip), on SQLite group commit (the Writes queued meanwhile in one transaction).",
        "- *direct, NOTIFY in the transaction* (Postgres, for reference; *vs direct with NOTIFY*): the direct row "
        "with `pg_notify` in its APPEND statement, as the adapter's mailbox statement had it until its NOTIFY moved "
        "after the commit — the baseline of this section's earlier runs (NOTIFY serializes commits on a "
        "database-wide lock held through each one's WAL flush).",
        "- *gateway, listener off*: the same load on a second gateway started, after the first stopped, from the "
        "same configuration with `mailbox_listener.in_gateway: false` (nothing delivered): the Writes' own cost, the "
        "like-for-like comparison with the direct rows (which deliver nothing either); the target applies to the "
        "gateway as it runs by default, its listener claiming, publishing and marking every row meanwhile.",
        "- *lag*: the listener's `prism_mailbox_delivery_lag_seconds` (commit to publish) over the row's deliveries "
        "(its warm-up's too), from /metrics before and after; p50/p99 interpolated within the histogram's buckets. "
        "*backlog at end*: the row's mailbox rows not yet delivered when the load stopped; *drain*: seconds until "
        "the last was. *p50/p99 ms*: each Write's latency at the client (closed loop: mostly queueing).",
        "- Checked: every Write OK, not replayed, with the next sequence of its mailbox; the data and mailbox tables "
        "hold exactly the client's Writes; every gateway mailbox row delivered, and the listener's delivered "
        "counter grew by as many.",
        f"- Removed afterwards: {section.get('removed_after')} (left from an earlier run beforehand: "
        f"{section.get('leftover_before')}); the gateway's tables they were deleted from are vacuumed, before and "
        "after (a server without autovacuum would otherwise keep every earlier run's dead rows in the gateway's "
        "tables, while the direct rows get new tables each run).",
    ]
    return out


if __name__ == "__main__":
    client_main()
