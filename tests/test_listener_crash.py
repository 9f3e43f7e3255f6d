"""Issue 14: a ``prism listener`` process killed with SIGKILL in the middle of delivering loses
no mailbox row, and its successor keeps each mailbox's order. Per mailbox backend (SQLite,
PostgreSQL) and destination (a Queue on the same backend; PubSub on Redis, which deduplicates
nothing), as an operator would run it:

1. ``MAILBOXES`` mailboxes × ``ROWS`` rows are committed through the Transact adapter (the
   listener is not running: a backlog).
2. ``prism listener --config …`` starts in a subprocess and delivers them; once ``KILL_AT`` of
   them are marked delivered and it holds claimed rows not yet marked (mid-batch), it is killed
   with SIGKILL — no shutdown code, no mark, no release. The rows it had claimed and not marked
   are counted after the kill (``in flight``): more than none shows the kill landed mid-batch
   (if a batch was marked between the look and the kill, the next listener is killed the same way).
3. A new ``prism listener`` starts on the same configuration. It waits for the dead listener's
   leases to run out (``lease_seconds``: 2 s), then delivers every row still unmarked — again,
   for those the dead one had published — and is stopped with SIGTERM (exit status 0).
4. The destination is read: every (mailbox, sequence) arrived; per mailbox the first arrivals
   are in sequence order and no row arrived before every row ahead of it had (no gaps); the
   duplicates are counted and printed (``pytest -s``) and recorded in the test's report
   (``user_properties``). A Queue destination deduplicates (the listener publishes each row
   with an idempotency token), so none may reach its consumer there; on Redis PubSub the rows
   published by the dead listener and published again arrive twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.redis import RedisClient, RedisSettings
from adapters.backends.sqlite import PRAGMAS
from adapters.pubsub.base import Delivery as PubSubDelivery
from adapters.pubsub.redis import RedisPubSub
from adapters.queue.postgres import PostgresQueue
from adapters.queue.sqlite import SqliteQueue
from adapters.sqlite_worker import SqliteWorker
from adapters.transact.base import (
    MAILBOX_HEADER,
    SEQUENCE_HEADER,
    DataWrite,
    Isolation,
    MailboxWrite,
    Operation,
    Table,
    TransactAdapter,
)
from adapters.transact.postgres import PostgresTransact
from adapters.transact.sqlite import SqliteTransact
from tests.conformance.test_transact_listener import read_topic
from tests.gateway_process import ROOT
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces, unreachable

MAILBOXES = 4
ROWS = 400  # per mailbox
KILL_AT = 0.3  # share of the rows delivered when the listener is killed
LEASE = 2.0  # seconds: how long the dead listener's mailboxes stay its own
BATCH = 200  # rows per claim: 50 per mailbox
DEADLINE = 90.0  # seconds for each phase
MAX_KILLS = 5  # listeners killed at most, until one dies holding unmarked rows
TOPIC = "orders"  # every row's destination: one Queue topic (keyed by mailbox) or PubSub subject


@dataclass(frozen=True)
class Case:
    backend: str  # where the mailboxes are: sqlite or postgres
    destination: str  # QUEUE on the same backend, or PUBSUB on redis
    needs: tuple[str, ...]  # servers it needs


CASES = {
    "sqlite-queue": Case("sqlite", "QUEUE", ()),
    "postgres-queue": Case("postgres", "QUEUE", (POSTGRES_DSN,)),
    "postgres-redis-pubsub": Case("postgres", "PUBSUB", (POSTGRES_DSN, REDIS_URL)),
}


class World:
    """One case's configuration, mailbox store and destination, seen from the test's side."""

    def __init__(self, case: Case, tmp: pathlib.Path) -> None:
        self.case, self.tmp = case, tmp
        run = uuid.uuid4().hex[:10]
        self.namespace, self.out, self.table = f"crash-{run}", f"crash-out-{run}", Table(f"crash_{run}", ("id",), ("id",), create=True)
        self.data_dir = tmp / "data"
        self.closing: list[Any] = []
        self.adapter: TransactAdapter | None = None
        self.received: list[tuple[str, int]] = []  # (mailbox, sequence) in arrival order
        self.con: asyncpg.Connection | None = None
        self.all_received = asyncio.Event()  # PubSub: every row has arrived at least once

    def config(self) -> str:
        backend = "lite" if self.case.backend == "sqlite" else "pg"
        out_backend = backend if self.case.destination == "QUEUE" else "cache"
        return json.dumps({
            "data_dir": str(self.data_dir),
            "backends": {
                "lite": {"type": "sqlite"},
                "pg": {"type": "postgres", "dsn": POSTGRES_DSN, "pool_size": 4},
                "cache": {"type": "redis", "url": REDIS_URL},
            },
            "configs": [
                {"name": "out", "pattern": self.case.destination, "backend": out_backend, "namespace": self.out},
            ],
            "transact": {
                self.namespace: {
                    "backend": backend,
                    "tables": {self.table.name: {"key": ["id"], "columns": ["id"], "create": True}},
                    "deliver_to": "out",
                },
            },
            "mailbox_listener": {"lease_seconds": LEASE, "batch_rows": BATCH, "poll_seconds": 1},
        })  # fmt: skip

    async def open(self) -> None:
        if self.case.backend == "sqlite":
            worker = SqliteWorker(self.data_dir / "prism.db", PRAGMAS)
            await worker.start()
            self.closing.append(worker)
            self.adapter = SqliteTransact(worker)
        else:
            pool = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=4))
            await pool.start()
            self.closing.append(pool)
            self.adapter = PostgresTransact(pool)
        await self.adapter.prepare(self.table)

    async def write_backlog(self) -> None:
        assert self.adapter is not None
        adapter = self.adapter

        async def mailbox(name: str) -> None:
            for i in range(ROWS):
                await adapter.write(
                    self.namespace,
                    DataWrite(self.table, Operation.INSERT, {"id": f"{name}-{i}"}),
                    MailboxWrite(name, json.dumps({"mailbox": name, "i": i}).encode(), {"traceparent": TRACEPARENT}, TOPIC),
                    isolation=Isolation.READ_COMMITTED,
                    time_limit=10,
                )

        await asyncio.gather(*(mailbox(f"m{i}") for i in range(MAILBOXES)))

    async def query(self, statement: str) -> int:
        """One number from the mailbox table of this case's namespace ($ns in ``statement``), on
        a connection kept open: the kill must follow the look within a millisecond or two."""
        if self.case.backend == "postgres":
            if self.con is None:
                self.con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            return int(await self.con.fetchval(statement.replace("$ns", "$1"), self.namespace))

        def run() -> int:
            connection = sqlite3.connect(self.data_dir / "prism.db", timeout=5)
            try:
                return int(connection.execute(statement.replace("$ns", "?"), (self.namespace,)).fetchone()[0])
            finally:
                connection.close()

        return await asyncio.to_thread(run)

    async def delivered(self) -> int:
        return await self.query("SELECT count(*) FROM prism_transact_mailbox WHERE namespace = $ns AND delivered_ns IS NOT NULL")

    async def in_flight(self) -> int:
        """Rows claimed (leased) and not marked delivered."""
        return await self.query(
            "SELECT count(*) FROM prism_transact_mailbox WHERE namespace = $ns AND delivered_ns IS NULL AND lease_holder IS NOT NULL"
        )

    async def republished(self) -> int:
        """Rows claimed more than once: handed to the new listener after the kill."""
        return await self.query("SELECT count(*) FROM prism_transact_mailbox WHERE namespace = $ns AND attempts > 1")

    # The destination.

    async def subscribe(self) -> None:
        """PubSub delivers only to who is there: the subscriber comes before the listener."""
        if self.case.destination != "PUBSUB":
            return
        client = RedisClient(RedisSettings(url=REDIS_URL))
        await client.start()
        self.closing.append(client)
        broker = RedisPubSub(client, buffer_size=4 * MAILBOXES * ROWS)
        self.closing.append(broker)
        subscription = await broker.subscribe(self.out, (">",))
        self.closing.append(subscription)

        async def collect() -> None:
            delivery: PubSubDelivery
            async for delivery in subscription:
                self.received.append((delivery.headers[MAILBOX_HEADER], int(delivery.headers[SEQUENCE_HEADER])))
                if len(set(self.received)) == MAILBOXES * ROWS:
                    self.all_received.set()

        self.collector = asyncio.create_task(collect())

    async def read_destination(self) -> list[tuple[str, int]]:
        total = MAILBOXES * ROWS
        if self.case.destination == "PUBSUB":
            with contextlib.suppress(TimeoutError):  # the comparison below names what is missing
                async with asyncio.timeout(10):
                    await self.all_received.wait()
            await asyncio.sleep(0.5)  # a duplicate still on its way
            return list(self.received)
        if self.case.backend == "sqlite":
            worker = SqliteWorker(self.data_dir / "prism.db", PRAGMAS)
            await worker.start()
            self.closing.append(worker)
            queue: Any = SqliteQueue(worker)
        else:
            pool = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=4))
            await pool.start()
            self.closing.append(pool)
            queue = PostgresQueue(pool)
        await queue.start()
        self.closing.append(queue)
        messages = await read_topic(queue, self.out, TOPIC, total)
        return [(m.headers[MAILBOX_HEADER], int(m.headers[SEQUENCE_HEADER])) for m in messages]

    async def close(self) -> None:
        if self.con is not None:
            await self.con.close()
        if getattr(self, "collector", None) is not None:
            self.collector.cancel()
        if self.adapter is not None:
            await self.adapter.close()
        for thing in reversed(self.closing):  # what came last uses what came before
            await thing.close()
        if self.case.backend == "postgres":
            con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            try:
                await con.execute(f'DROP TABLE IF EXISTS "{self.table.name}"')
                for table in ("prism_transact_mailbox", "prism_transact_heads", "prism_transact_keys", "prism_transact_cursors"):
                    if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                        await con.execute(f"DELETE FROM {table} WHERE namespace = $1", self.namespace)
            finally:
                await con.close()
            await purge_namespaces(["postgres"], [self.out])


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def start_listener(tmp: pathlib.Path, name: str) -> tuple[subprocess.Popen[bytes], pathlib.Path]:
    log_path = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "listener", "--config", str(tmp / "prism.yaml"), "--log-level", "warning",
             "--log-format", "text"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    return process, log_path


@pytest.fixture(params=list(CASES))
async def world(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[World]:
    case = CASES[request.param]
    for url in case.needs:
        if why := unreachable(url):
            pytest.skip(why)
    found = World(case, tmp_path)
    (tmp_path / "prism.yaml").write_text(found.config())  # JSON is YAML
    try:
        await found.open()
        yield found
    finally:
        await found.close()


async def wait_for(what: str, check: Any, process: subprocess.Popen[bytes], log_path: pathlib.Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert process.poll() is None, f"the listener exited ({process.returncode}) before {what}:\n{_log(log_path)}"
        assert time.monotonic() < deadline, f"not {what} after {DEADLINE}s:\n{_log(log_path)}"
        await asyncio.sleep(0.01)


async def test_a_listener_killed_mid_batch_loses_nothing_and_keeps_order(world: World, request: pytest.FixtureRequest) -> None:
    total = MAILBOXES * ROWS
    await world.write_backlog()
    await world.subscribe()

    # Killed while it holds claimed rows it has not marked: mid-batch. The look and the kill are
    # a millisecond apart, and a fast batch may be marked in between: then another listener is
    # started and killed the same way (it first waits out the dead one's leases).
    for kills in range(1, MAX_KILLS + 1):
        first, first_log = start_listener(world.tmp, f"killed-{kills}")
        try:
            await wait_for("delivering", lambda: _mid_batch(world, int(total * KILL_AT)), first, first_log)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=15)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        killed_at, in_flight = await world.delivered(), await world.in_flight()
        assert killed_at < total, "all delivered before the kill: nothing to resume"
        if in_flight:
            break

    second, second_log = start_listener(world.tmp, "second")
    try:
        await wait_for("all delivered", lambda: _at_least(world, total), second, second_log)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0, _log(second_log)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert "Traceback" not in _log(second_log), _log(second_log)

    received = await world.read_destination()
    counts = Counter(received)
    duplicates = len(received) - len(counts)
    republished = await world.republished()
    print(
        f"\n{request.node.callspec.id}: {total} rows in {MAILBOXES} mailboxes; SIGKILL (kill {kills}) after {killed_at} marked "
        f"delivered, {in_flight} claimed in flight; republished after the kill {republished}; "
        f"received {len(received)}, duplicates {duplicates}"
    )
    request.node.user_properties += [
        ("duplicates", duplicates), ("in_flight", in_flight), ("republished", republished), ("kills", kills)
    ]
    assert set(counts) == {(f"m{i}", s) for i in range(MAILBOXES) for s in range(1, ROWS + 1)}  # nothing lost
    assert in_flight > 0, "the kill landed between batches"  # mid-batch: claimed rows were unmarked
    assert republished >= in_flight
    highest: dict[str, int] = {}
    firsts: dict[str, list[int]] = {}
    for mailbox, sequence in received:
        assert sequence <= highest.get(mailbox, 0) + 1, f"{mailbox}: {sequence} arrived before {highest.get(mailbox, 0) + 1}"
        highest[mailbox] = max(highest.get(mailbox, 0), sequence)
        if counts[(mailbox, sequence)] and sequence not in firsts.setdefault(mailbox, []):
            firsts[mailbox].append(sequence)
    assert all(seqs == list(range(1, ROWS + 1)) for seqs in firsts.values())  # first arrivals in order
    if world.case.destination == "QUEUE":
        assert duplicates == 0  # the Queue stored each republished row once (idempotency tokens)


def _log(path: pathlib.Path) -> str:
    return path.read_text(errors="replace")


async def _at_least(world: World, count: int) -> bool:
    return await world.delivered() >= count


async def _mid_batch(world: World, count: int) -> bool:
    """At least ``count`` rows delivered, and some claimed and not marked: one look, one query."""
    both = await world.query(
        "SELECT count(*) FILTER (WHERE delivered_ns IS NOT NULL) * 100000 + "
        "count(*) FILTER (WHERE delivered_ns IS NULL AND lease_holder IS NOT NULL) "
        "FROM prism_transact_mailbox WHERE namespace = $ns"
    )
    delivered, in_flight = divmod(both, 100000)
    return delivered >= count and in_flight > 0
