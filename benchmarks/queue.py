"""Section 10 — Queue (issue 11): publish and consume throughput through the gateway against
the backend's own Python client doing the same work directly, per backend, in one run.

One gateway (Granian, one worker, as ``prism serve`` runs) with a QUEUE config on each backend
(``queue-<backend>``, bench-only namespace ``prism-bench-queue``; NATS with the stream prefix
``PRISMBENCH``; Kafka with the topic prefix ``prismbench``, on a Tansu broker the section starts
for its run — ``benchmarks/kafka_broker.py``, the tests' broker: a free loopback port, memory
storage, stopped at the section's end, also on failure). Payloads are 100 bytes, no partition
key (keys are the unit of order, and order costs every backend round trips: this is the
unordered case), no headers, no token.
Per backend, messages/s of:

    publish ×1     gateway: Publish over native gRPC, h2load -c1 -m16 (16 calls in flight on one
                   connection, as a gRPC channel is), a pre-framed body
    publish ×100   gateway: PublishBatch of 100 entries, h2load -c1 -m4 (400 messages in flight)
    consume        gateway: rounds of 5,000 messages published (PublishBatch, untimed), then one
                   SubscribeBatches stream of the group (grpc.aio client process, max_in_flight
                   500, at most 100 messages a response, as the direct client claims 100),
                   every delivery acknowledged: Acknowledge of 100 ids, or of what arrived
                   within 10 ms of the first (ACK_LINGER), 4 calls in flight; timed from
                   Subscribe to the round's last acknowledgement; rounds until the timed seconds
                   reach the run's duration

and the same work through the backend's own client in a client process (same in-flight
counts, payloads, rounds and batch sizes: claims of 100, 4 acknowledgements in flight; the same
pool size as the gateway's adapter, 10 connections):

    sqlite    aiosqlite, one connection, WAL, synchronous=NORMAL (the adapter's pragmas); a table
              (id INTEGER PRIMARY KEY, payload, lease_until, acked) with a partial index on the
              unacknowledged; ×1: one INSERT, its own transaction; ×100: executemany in one
              transaction; consume: BEGIN IMMEDIATE, UPDATE … SET lease_until WHERE id IN (the
              first 100 unacknowledged, unleased) RETURNING id, payload, COMMIT; acknowledge:
              UPDATE … SET acked = 1 WHERE id IN (…)
    postgres  asyncpg, a pool of 1..10; the same table shape (bigserial); ×1: INSERT; ×100:
              INSERT … SELECT unnest($1::bytea[]) (one statement); consume: UPDATE … WHERE id IN
              (SELECT … ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING; acknowledge:
              UPDATE … SET acked WHERE id = ANY($1)
    redis     redis.asyncio, a BlockingConnectionPool of 10; ×1: XADD; ×100: 100 XADD in one
              pipeline (not MULTI); consume: a consumer group, XREADGROUP COUNT 100 + XACK
    nats      nats-py JetStream, one connection; a file-storage stream; ×1: js.publish (awaits
              the PubAck); ×100: 100 js.publish_async, then every PubAck awaited; consume: a
              durable pull consumer (explicit ack), fetch(100) + ack_sync of each (the server
              confirms the acknowledgement, as the gateway's Acknowledge does)
    kafka     aiokafka: a topic of 4 partitions (the adapter's default); a producer as a user
              writes it (aiokafka's defaults — records sent while a request is out share the next
              one — with acks="all", the adapter's); ×1: send_and_wait; ×100: 100 send, then
              every delivery awaited; consume: a consumer group (joined before the timing),
              getmany(max_records=100) + commit, per partition, past the last record of the
              batch (aiokafka runs a consumer's commits one at a time, so the 4 in flight queue
              in order); the group's join (seconds on Tansu) is outside the timing, where the
              gateway's consumer joins its group (a ledger command) inside every round's

    gateway (pyvoy)   the publish rows again through native gRPC on the ASGI app (``prism serve
                      --server pyvoy``, h2load on its HTTP port; issue 10's faster gRPC path), once
                      the Granian gateway has stopped, against the same direct rows

    gateway/direct = gateway messages/s ÷ direct messages/s, same backend and work

What the direct rows leave out is the point of comparing: the gateway adds a network hop, a
session, per-entry validation and result, and its adapters keep the whole Queue contract (fixed
partitions with dense offsets, per-group positions and leases, delivery attempts, order per key,
dead letters, notification of other processes) where the direct rows keep only "stored, leased,
acknowledged". Issue 11's target: the gateway at ≥ 50% of the direct client's messages/s for
publish ×100 and for consume.

The direct rows do less than the contract, and are kept so rather than made to do more (they
are what a user of that client would write for an unordered work queue):

    sqlite, postgres  one table: no partitions, offsets or per-group positions; a lease and its
                      redelivery (a claim takes unacknowledged rows whose lease ran out), but no
                      attempt count, no dead letters, no order per key, nothing to wake another
                      process (the client claims in a loop)
    redis             XREADGROUP ">" reads new entries only: a lease that runs out is never
                      redelivered (a real client adds XAUTOCLAIM), no order per key, no dead
                      letters
    nats              leases, redelivery and attempt counts are JetStream's own, as the adapter's
                      are; no order per key (the adapter keeps it in a key-value bucket), no
                      dead letters, no exact count of what an acknowledgement settled (the
                      adapter records each acknowledgement so a repeated one counts 0)
    kafka             a commit is a position per partition, not an acknowledgement per message:
                      no lease and no ack deadline (a record left uncommitted is delivered again
                      only after a rebalance or restart, and with it everything after it), no
                      negative acknowledgement, no attempt count, no dead letters, nothing
                      acknowledged out of order, no idempotency tokens, no order per key across
                      redeliveries; one consumer of the group, so no rebalancing meanwhile. The
                      adapter keeps all of that in its ledger topic: every Acknowledge, and every
                      batch a consumer takes, is a command appended to it and read back
                      (adapters/queue/kafka.py), where the direct client's commit is one request

Both sides' clients do the same work in the same shape. The consume client of the gateway
acknowledges in batches, as a client library does (ACK_LINGER); acknowledging whatever had
arrived when the last call returned sent 5-68 ids per call, several times the direct client's
calls for the same messages. It opens one SubscribeBatches per round, timed from its opening:
a stream left open across rounds would lease the next round's first messages while they are
published, outside the timing (the direct side claims only inside it). SubscribeBatches, not
Subscribe: the direct client takes up to 100 messages per call, and a stream of one message per
gRPC message costs a grpc.aio client about 30-50 µs of CPU per message (a bare grpc.aio stream
of small messages reaches ~15-30k messages/s on these machines, client at 100% CPU), which
bounded every backend's Subscribe consume row near 11k messages/s, whatever the adapter did.

Checked, so no fast failure is timed: before and after each h2load run a real gRPC call of the
same request answers OK (every entry of a batch OK), and the messages the topic gained during
the timed run (GetTopicInfo high offsets, read once the topic stops growing: a call h2load
gave up on may still be storing) are between h2load's successful calls × entries and that plus
the calls in flight when it stopped (a gRPC error is HTTP 200 to h2load). Every
client process counts what it stored and compares with the store (Kafka: the topic read back up
to the offsets the broker acknowledged, since Tansu's end offsets undercount batches), and every
consume round must deliver each of its messages once, with the published payload, and have all
acknowledged (Kafka, direct: the group's committed offsets add up to the acknowledged count).

Everything is removed afterwards: the namespace's queue rows, streams and keys, the direct
rows' tables, keys and streams (each client drops its own), and anything left by an
interrupted earlier run (the same sweep runs first). On Kafka: the gateway's topics (``prismbench.``,
its ledger and snapshots ``prismbench-queue-…``), the direct rows' topics and every consumer
group of either (DeleteGroups), before the section's broker, which held them in memory only, stops.

    python -m benchmarks.run --only queue [--quick]
    python -m benchmarks.queue --backend redis --side direct --work consume --duration 2   (one client run)
    python -m benchmarks.queue --backend kafka --kafka 127.0.0.1:PORT --side direct --work publish --entries 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import resource
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import yaml

from benchmarks import kafka_broker, kv, loader, procs, report
from benchmarks.context import DISTURBED, Context, backend_cpu_seconds
from benchmarks.loader import Shape
from benchmarks.report import Column, Row, Table, ratio, rps, share, text
from prism.v1 import queue_pb2 as q

TITLE = "Queue: publish and consume through the gateway vs the backend's own Python client"
SECTION = "queue"
NAMESPACE = "prism-bench-queue"  # bench-only: created by this section and removed at its end
NATS_PREFIX = "PRISMBENCH"  # the gateway's NATS streams and buckets, apart from any other's
DIRECT = "prism-bench-queue-direct"  # the direct rows' tables, keys and streams start with it (sanitized)
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
KAFKA_PREFIX = "prismbench"  # the gateway's Kafka topics (and its ledger's) start with it
KAFKA_PARTITIONS = 4  # of every Kafka topic, the gateway's (its adapter's default) and the direct rows'
TANSU_NAME = "prismbenchtansu"  # the broker this section starts, by process name (15 characters at most)
PAYLOAD = bytes(range(100))  # 100 bytes
SINGLE = Shape(1, 16)  # Publish: 16 calls in flight on one connection
BATCH = 100  # entries per PublishBatch
BATCH_SHAPE = Shape(1, 4)  # PublishBatch: 4 calls in flight
MAX_IN_FLIGHT = 500  # unacknowledged deliveries of the gateway's consumer
ACK_BATCH = 100  # ids per Acknowledge (gateway) and messages per claim (direct)
# The gateway's consume client gathers ids for one Acknowledge until it has ACK_BATCH or this
# long has passed since the first: what a client library does (Google Cloud Pub/Sub's Python
# subscriber dispatches acknowledgements in batches gathered for at most 10 ms). Acknowledging
# "whatever arrived meanwhile" instead sent 5-68 ids per call, so the gateway did several times
# the direct client's acknowledgement calls for the same messages.
ACK_LINGER = 0.01
ACKS_IN_FLIGHT = 4
POOL = 10  # connections, as the gateway's adapters (pool_size)
ROUND = 5000  # consume: messages published (untimed), then consumed (timed), per round
RATIO_GOAL = 0.5  # issue 11: gateway ≥ 50% of the direct client, publish ×100 and consume
WAIT = 30.0  # seconds: the most a client run waits for any one thing
QS = "/prism.v1.QueueService/"


WORKS = {  # row kind → (what it is, in-flight text)
    "publish-1": ("publish ×1", f"{SINGLE.in_flight} calls"),
    "publish-100": ("publish ×100", f"{BATCH_SHAPE.in_flight} × {BATCH}"),
    "consume": ("consume + ack", f"≤ {MAX_IN_FLIGHT} leased"),
}


# --- the direct clients ----------------------------------------------------------------------


class Direct(ABC):
    """A queue made with the backend's own client: publish, claim (lease), acknowledge."""

    def __init__(self, name: str, workdir: pathlib.Path) -> None:
        self.name = name  # unique to this client run: [a-z0-9_]
        self.workdir = workdir

    @abstractmethod
    async def open(self) -> None:
        """Connect and create this run's queue."""

    @abstractmethod
    async def close(self) -> None:
        """Drop this run's queue and disconnect."""

    @abstractmethod
    async def publish_one(self, payload: bytes) -> None: ...

    @abstractmethod
    async def publish_batch(self, payloads: list[bytes]) -> None:
        """Store all of them, as one call where the client has one."""

    async def start_consuming(self) -> None:
        """Join a consumer group, where the backend has them (after publishing)."""

    async def check_consumed(self, acknowledged: int) -> None:
        """After the consume rounds: the store agrees that ``acknowledged`` were settled."""

    @abstractmethod
    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        """Lease up to ``limit`` unacknowledged messages: (handle, payload) each."""

    @abstractmethod
    async def ack(self, handles: list[Any]) -> int:
        """Acknowledge; how many were leased and not yet acknowledged."""

    @abstractmethod
    async def stored(self) -> int:
        """Messages in the queue."""


LEASE_NS = 30 * 10**9  # a direct claim's lease


class SqliteDirect(Direct):
    def __init__(self, name: str, workdir: pathlib.Path) -> None:
        super().__init__(name, workdir)
        self.path = workdir / f"{DIRECT}-{name}.db"
        self.lock = asyncio.Lock()  # one connection: one transaction at a time

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000"):
            await self.db.execute(pragma)
        await self.db.execute(
            "CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, "
            "lease_until INTEGER NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0)"
        )
        await self.db.execute("CREATE INDEX q_open ON q (id) WHERE acked = 0")

    async def close(self) -> None:
        await self.db.close()
        for suffix in ("", "-wal", "-shm"):  # the section's scratch directory goes anyway: no hurry
            pathlib.Path(f"{self.path}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240

    async def publish_one(self, payload: bytes) -> None:
        async with self.lock:
            await self.db.execute("INSERT INTO q (payload) VALUES (?)", (payload,))

    async def publish_batch(self, payloads: list[bytes]) -> None:
        async with self.lock:
            await self.db.execute("BEGIN")
            await self.db.executemany("INSERT INTO q (payload) VALUES (?)", [(p,) for p in payloads])
            await self.db.execute("COMMIT")

    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        now = time.time_ns()
        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            cursor = await self.db.execute(
                "UPDATE q SET lease_until = ? WHERE id IN (SELECT id FROM q WHERE acked = 0 AND lease_until < ? "
                "ORDER BY id LIMIT ?) RETURNING id, payload",
                (now + LEASE_NS, now, limit),
            )
            rows = await cursor.fetchall()
            await self.db.execute("COMMIT")
        return [(r[0], r[1]) for r in rows]

    async def ack(self, handles: list[Any]) -> int:
        async with self.lock:
            cursor = await self.db.execute(
                f"UPDATE q SET acked = 1 WHERE acked = 0 AND id IN ({','.join('?' * len(handles))})", handles
            )
            return cursor.rowcount

    async def stored(self) -> int:
        async with self.db.execute("SELECT count(*) FROM q") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0


class PostgresDirect(Direct):
    async def open(self) -> None:
        import asyncpg

        self.table = f"{DIRECT.replace('-', '_')}_{self.name}"
        self.pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=POOL, timeout=5, command_timeout=WAIT)
        await self.pool.execute(
            f"CREATE TABLE {self.table} (id bigserial PRIMARY KEY, payload bytea NOT NULL, "
            "lease_until bigint NOT NULL DEFAULT 0, acked boolean NOT NULL DEFAULT false)"
        )
        await self.pool.execute(f"CREATE INDEX ON {self.table} (id) WHERE NOT acked")

    async def close(self) -> None:
        try:
            await self.pool.execute(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            await self.pool.close()

    async def publish_one(self, payload: bytes) -> None:
        await self.pool.execute(f"INSERT INTO {self.table} (payload) VALUES ($1)", payload)

    async def publish_batch(self, payloads: list[bytes]) -> None:
        await self.pool.execute(f"INSERT INTO {self.table} (payload) SELECT unnest($1::bytea[])", payloads)

    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        now = time.time_ns()
        rows = await self.pool.fetch(
            f"UPDATE {self.table} SET lease_until = $1 WHERE id IN (SELECT id FROM {self.table} "
            "WHERE NOT acked AND lease_until < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id, payload",
            now + LEASE_NS, now, limit,
        )
        return [(r["id"], r["payload"]) for r in rows]

    async def ack(self, handles: list[Any]) -> int:
        status = await self.pool.execute(
            f"UPDATE {self.table} SET acked = true WHERE NOT acked AND id = ANY($1::bigint[])", handles
        )
        return int(status.split()[-1])

    async def stored(self) -> int:
        return int(await self.pool.fetchval(f"SELECT count(*) FROM {self.table}"))


class RedisDirect(Direct):
    GROUP = "bench"

    async def open(self) -> None:
        import redis.asyncio as aioredis

        self.key = f"{DIRECT}:{self.name}"
        pool = aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=POOL, timeout=WAIT)
        self.redis = aioredis.Redis(connection_pool=pool)

    async def close(self) -> None:
        try:
            await self.redis.delete(self.key)
        finally:
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()

    async def publish_one(self, payload: bytes) -> None:
        await self.redis.xadd(self.key, {"p": payload})

    async def publish_batch(self, payloads: list[bytes]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.xadd(self.key, {"p": payload})
            await pipe.execute()

    async def start_consuming(self) -> None:
        await self.redis.xgroup_create(self.key, self.GROUP, id="0", mkstream=True)

    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        answer = await self.redis.xreadgroup(self.GROUP, "c1", {self.key: ">"}, count=limit)
        return [(entry_id, fields[b"p"]) for _, entries in answer for entry_id, fields in entries]

    async def ack(self, handles: list[Any]) -> int:
        return int(await self.redis.xack(self.key, self.GROUP, *handles))

    async def stored(self) -> int:
        return int(await self.redis.xlen(self.key))


class NatsDirect(Direct):
    async def open(self) -> None:
        import nats
        from nats.js.api import StorageType

        self.stream = f"{NATS_PREFIX}_DIRECT_{self.name}"
        self.subject = f"{DIRECT}.{self.name}"
        self.nc = await nats.connect(NATS_URL, connect_timeout=5)
        self.js = self.nc.jetstream(timeout=WAIT)
        await self.js.add_stream(name=self.stream, subjects=[self.subject], storage=StorageType.FILE)

    async def close(self) -> None:
        try:
            await self.js.delete_stream(self.stream)
        finally:
            await self.nc.close()

    async def publish_one(self, payload: bytes) -> None:
        await self.js.publish(self.subject, payload, stream=self.stream)

    async def publish_batch(self, payloads: list[bytes]) -> None:
        acks = [await self.js.publish_async(self.subject, p, stream=self.stream) for p in payloads]
        await asyncio.gather(*acks)

    async def start_consuming(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=LEASE_NS / 1e9, max_ack_pending=10_000)
        self.pull = await self.js.pull_subscribe(self.subject, durable="bench", stream=self.stream, config=config)

    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        return [(m, m.data) for m in await self.pull.fetch(limit, timeout=WAIT)]

    async def ack(self, handles: list[Any]) -> int:
        await asyncio.gather(*(m.ack_sync(timeout=WAIT) for m in handles))
        return len(handles)

    async def stored(self) -> int:
        return int((await self.js.stream_info(self.stream)).state.messages)


class KafkaDirect(Direct):
    """aiokafka: a topic of KAFKA_PARTITIONS partitions; the producer as a user writes it
    (aiokafka's defaults: records sent meanwhile share a batch; acks="all" as the adapter's);
    a consumer group whose commit is the acknowledgement."""

    async def open(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        if not KAFKA.bootstrap:
            raise RuntimeError("kafka: no broker (--kafka host:port)")
        self.topic = self.group = f"{DIRECT}.{self.name}"
        self.tps = [TopicPartition(self.topic, p) for p in range(KAFKA_PARTITIONS)]
        self.common: dict[str, Any] = {"bootstrap_servers": KAFKA.bootstrap, "request_timeout_ms": int(WAIT * 1000)}
        self.consumer: Any = None
        self.admin = AIOKafkaAdminClient(**self.common)
        await self.admin.start()
        await self.admin.create_topics([NewTopic(self.topic, KAFKA_PARTITIONS, 1)])
        self.producer = AIOKafkaProducer(**self.common, acks="all", linger_ms=0)
        await self.producer.start()
        # stored() reads the topic back: Tansu 0.6 reports a partition's high offset after a
        # batch of records as the batch's first offset + 1, so the end offsets undercount what a
        # batching producer stored. It reads up to the ends the broker acknowledged.
        self.counter = AIOKafkaConsumer(**self.common, group_id=None, enable_auto_commit=False,
                                        auto_offset_reset="earliest")
        await self.counter.start()
        self.counter.assign(self.tps)
        self.acknowledged_ends: dict[int, int] = {}  # partition → past the last offset the broker acknowledged
        self.read_ends: dict[int, int] = {}  # partition → past the last offset stored() read
        self.counted = 0

    async def close(self) -> None:
        try:
            for client in (self.consumer, self.counter, self.producer):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.stop()
            await self.admin.delete_topics([self.topic])
            if self.consumer is not None:
                await delete_kafka_groups([self.group])
        finally:
            await self.admin.close()

    def _acknowledged(self, metadata: Any) -> None:
        ends = self.acknowledged_ends
        ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)

    async def publish_one(self, payload: bytes) -> None:
        self._acknowledged(await self.producer.send_and_wait(self.topic, payload))

    async def publish_batch(self, payloads: list[bytes]) -> None:
        sent = [await self.producer.send(self.topic, p) for p in payloads]
        for metadata in await asyncio.gather(*sent):
            self._acknowledged(metadata)

    async def start_consuming(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(self.topic, **self.common, group_id=self.group, enable_auto_commit=False,
                                         auto_offset_reset="earliest")
        await self.consumer.start()
        deadline = time.monotonic() + WAIT
        while not self.consumer.assignment():  # joined (a few seconds on Tansu): outside the timing
            if time.monotonic() > deadline:
                raise RuntimeError(f"kafka: the consumer was not given {self.topic}'s partitions")
            await asyncio.sleep(0.05)

    async def claim(self, limit: int) -> list[tuple[Any, bytes]]:
        batch = await self.consumer.getmany(timeout_ms=int(WAIT * 1000), max_records=limit)
        return [((tp.partition, r.offset), r.value) for tp, records in batch.items() for r in records]

    async def ack(self, handles: list[Any]) -> int:
        """Commit, per partition, past the last of them: what a Kafka consumer's
        acknowledgement is (aiokafka runs a consumer's commits one at a time, in order)."""
        from aiokafka import TopicPartition

        ends: dict[int, int] = {}
        for partition, offset in handles:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        await self.consumer.commit({TopicPartition(self.topic, p): end for p, end in ends.items()})
        return len(handles)

    async def check_consumed(self, acknowledged: int) -> None:
        committed = [await self.consumer.committed(tp) or 0 for tp in self.tps]
        if sum(committed) != acknowledged:
            raise RuntimeError(f"kafka: the group committed {sum(committed)} offsets, {acknowledged} acknowledged")

    async def stored(self) -> int:
        """Records in the topic up to the offsets the broker acknowledged: those read since the
        last call, every partition read to its end (a record missing below it is not counted)."""
        deadline = time.monotonic() + WAIT
        while any(self.read_ends.get(p, 0) < end for p, end in self.acknowledged_ends.items()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"kafka: read the topic to {self.read_ends}, acknowledged {self.acknowledged_ends}")
            for tp, records in (await self.counter.getmany(timeout_ms=1000, max_records=10_000)).items():
                self.counted += len(records)
                self.read_ends[tp.partition] = records[-1].offset + 1
        return self.counted


async def delete_kafka_groups(groups: list[str]) -> int:
    """Delete consumer groups (DeleteGroups at each one's coordinator: aiokafka's admin client
    has no call for it); how many the broker deleted."""
    from aiokafka.client import AIOKafkaClient, CoordinationType
    from aiokafka.protocol.admin import DeleteGroupsRequest

    client = AIOKafkaClient(bootstrap_servers=KAFKA.bootstrap, request_timeout_ms=int(WAIT * 1000))
    await client.bootstrap()
    deleted = 0
    try:
        for group in groups:
            node = await client.coordinator_lookup(CoordinationType.GROUP, group)
            answer = await client.send(node, DeleteGroupsRequest([group]))
            failed = [(name, code) for name, code in answer.results if code]
            if failed:
                raise RuntimeError(f"kafka: deleting group {group}: error codes {failed}")
            deleted += 1
    finally:
        await client.close()
    return deleted


@dataclass
class KafkaSite:
    bootstrap: str = ""  # host:port of the broker the section started (a client run: --kafka)


KAFKA = KafkaSite()


@dataclass(frozen=True)
class Backend:
    """One backend of the section: the gateway's settings entry and the direct client doing the
    same work. Adding a backend is one :class:`Direct` and one entry here."""

    label: str
    settings: Callable[[], dict[str, Any]]  # the gateway's backends entry
    process: str | None  # the server's process name: its CPU is counted apart (None: in process)
    direct: str  # the client the direct rows use, for the table
    make: Callable[[str, pathlib.Path], Direct]  # (a name unique to the run, scratch dir) → its queue


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("SQLite", lambda: {"type": "sqlite", "path": "queue-bench.db"}, None, "aiosqlite",
                      SqliteDirect),
    "postgres": Backend("Postgres", lambda: {"type": "postgres", "dsn": POSTGRES_DSN}, "postgres", "asyncpg",
                        PostgresDirect),
    "redis": Backend("Redis", lambda: {"type": "redis", "url": REDIS_URL}, "redis-server", "redis.asyncio",
                     RedisDirect),
    "nats": Backend("NATS JetStream", lambda: {"type": "nats", "url": NATS_URL, "prefix": NATS_PREFIX},
                    "nats-server", "nats-py", NatsDirect),
    # The Tansu broker the section starts (benchmarks/kafka_broker.py), on a free port.
    "kafka": Backend("Kafka (Tansu)", lambda: {"type": "kafka", "bootstrap_servers": KAFKA.bootstrap,
                                               "topic_prefix": KAFKA_PREFIX},
                     TANSU_NAME, "aiokafka", KafkaDirect),
}


# --- client runs (their own process, like the gateway's callers) -------------------------------


@dataclass
class Meter:
    """Messages, wall seconds and this process's CPU seconds over the timed intervals only: the
    client's own share of the 2 cores, without its start-up and untimed preparation."""

    messages: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    rounds: int = 0
    ack_calls: int = 0  # consume: acknowledgement calls (their batch size is the consumer's choice)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), _cpu()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - wall0
            self.cpu += _cpu() - cpu0
            self.rounds += 1

    def result(self, **extra: Any) -> dict[str, Any]:
        out = {"messages": self.messages, "seconds": round(self.seconds, 3),
               "messages_per_s": round(self.messages / self.seconds, 1),
               "client_cpu_share": round(self.cpu / self.seconds, 3), **extra}
        if self.ack_calls:
            out.update(rounds=self.rounds, ack_calls=self.ack_calls,
                       ids_per_ack=round(self.messages / self.ack_calls, 1))
        return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _flat_out(work: Callable[[], Awaitable[None]], in_flight: int, seconds: float) -> int:
    """Calls of ``work`` completed in ``seconds``, ``in_flight`` at a time (a call running at
    the end is finished and counted: the store has it)."""
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await work()
            done += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done


def _direct(args: argparse.Namespace) -> Direct:
    return BACKENDS[args.backend].make(uuid.uuid4().hex[:12], args.workdir)


async def direct_publish(args: argparse.Namespace) -> dict[str, Any]:
    queue = _direct(args)
    await queue.open()
    meter = Meter()
    try:
        payloads = [PAYLOAD] * args.entries

        async def work() -> None:
            if args.entries == 1:
                await queue.publish_one(PAYLOAD)
            else:
                await queue.publish_batch(payloads)

        warm = await _flat_out(work, args.in_flight, args.warmup) if args.warmup else 0
        with meter.timing():
            calls = await _flat_out(work, args.in_flight, args.duration)
        meter.messages = calls * args.entries
        stored = await queue.stored()
        if stored != (warm + calls) * args.entries:
            raise RuntimeError(f"stored {stored} messages, published {(warm + calls) * args.entries}")
    finally:
        await queue.close()
    return meter.result(calls=calls)


async def _consume(
    claim: Callable[[int], Awaitable[list[tuple[Any, bytes]]]],
    ack: Callable[[list[Any]], Awaitable[int]],
    total: int,
    meter: Meter,
) -> int:
    """Claim batches until ``total`` messages are leased, acknowledging each batch
    (ACKS_IN_FLIGHT at a time) while the next is claimed; every payload checked. How many the
    store counted as acknowledged."""
    claimed, acknowledged = 0, 0
    acks: set[asyncio.Task[int]] = set()

    async def settle(task: asyncio.Task[int]) -> None:
        nonlocal acknowledged
        acknowledged += await task

    while claimed < total:
        batch = await asyncio.wait_for(claim(min(ACK_BATCH, total - claimed)), WAIT)
        if not batch:
            raise RuntimeError(f"nothing to claim after {claimed} of {total}")
        if any(payload != PAYLOAD for _, payload in batch):
            raise RuntimeError("a claimed message has another payload")
        claimed += len(batch)
        while len(acks) >= ACKS_IN_FLIGHT:
            finished, _ = await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                acks.discard(task)
                await settle(task)
        acks.add(asyncio.create_task(ack([handle for handle, _ in batch])))
        meter.ack_calls += 1
    for task in acks:
        await settle(task)
    return acknowledged


async def _rounds(
    args: argparse.Namespace,
    publish: Callable[[int], Awaitable[None]],
    consume: Callable[[int, Meter], Awaitable[int]],
) -> Meter:
    """Rounds of ``args.messages``: published (untimed), then consumed and acknowledged
    (timed), until the timed seconds reach ``args.duration``. Rounds rather than one big batch,
    so that a fast store is timed for as long as a slow one without holding millions."""
    meter = Meter()
    while meter.rounds == 0 or meter.seconds < args.duration:
        await publish(args.messages)
        with meter.timing():
            acknowledged = await consume(args.messages, meter)
        if acknowledged != args.messages:
            raise RuntimeError(f"{acknowledged} acknowledged of {args.messages}")
        meter.messages += acknowledged
    return meter


async def direct_consume(args: argparse.Namespace) -> dict[str, Any]:
    queue = _direct(args)
    await queue.open()
    published = 0
    try:
        await queue.start_consuming()

        async def publish(count: int) -> None:
            nonlocal published
            for start in range(0, count, BATCH):
                await queue.publish_batch([PAYLOAD] * min(BATCH, count - start))
            published += count
            if (stored := await queue.stored()) != published:
                raise RuntimeError(f"the queue holds {stored} messages, {published} were published")

        meter = await _rounds(args, publish, lambda count, meter: _consume(queue.claim, queue.ack, count, meter))
        await queue.check_consumed(meter.messages)
    finally:
        await queue.close()
    return meter.result()


async def gateway_consume(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of PublishBatch (untimed), then a Subscribe stream of the group (from the
    earliest offset, so the first round finds what was published before it joined),
    acknowledging as it reads, until the round's messages are all acknowledged."""
    topic, group = f"consume-{uuid.uuid4().hex[:10]}", "bench"
    metadata = ((kv.SESSION_HEADER, args.token),)
    seen: set[str] = set()  # a message delivered twice is an error here: nothing is redelivered
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        publish_batch = channel.unary_unary(
            QS + "PublishBatch", request_serializer=q.PublishBatchRequest.SerializeToString,
            response_deserializer=q.PublishBatchResponse.FromString,
        )
        acknowledge = channel.unary_unary(
            QS + "Acknowledge", request_serializer=q.AcknowledgeRequest.SerializeToString,
            response_deserializer=q.AcknowledgeResponse.FromString,
        )
        subscribe = channel.unary_stream(
            QS + "SubscribeBatches", request_serializer=q.QueueSubscribeRequest.SerializeToString,
            response_deserializer=q.QueueMessageBatch.FromString,
        )
        request = q.QueueSubscribeRequest(
            topic=topic, consumer_group=group, start=q.START_POSITION_EARLIEST, max_in_flight=MAX_IN_FLIGHT,
            max_batch=ACK_BATCH,
        )

        async def publish(count: int) -> None:
            for start in range(0, count, BATCH):
                entries = [q.QueueEntry(payload=PAYLOAD)] * min(BATCH, count - start)
                answer = await publish_batch(q.PublishBatchRequest(topic=topic, entries=entries), metadata=metadata,
                                             timeout=WAIT)
                if any(r.status.code for r in answer.results):
                    raise RuntimeError(f"PublishBatch refused entries: {answer.results[0].status}")

        async def ack(ids: list[Any]) -> int:
            request = q.AcknowledgeRequest(topic=topic, consumer_group=group, message_ids=ids)
            return (await acknowledge(request, metadata=metadata, timeout=WAIT)).acknowledged

        async def consume(count: int, meter: Meter) -> int:
            inbox: asyncio.Queue[q.QueueMessage | BaseException] = asyncio.Queue()
            call = subscribe(request, metadata=metadata)

            async def read() -> None:
                try:
                    async for batch in call:
                        for message in batch.messages:
                            inbox.put_nowait(message)
                    inbox.put_nowait(RuntimeError("the stream ended"))
                except Exception as exc:
                    inbox.put_nowait(exc)

            async def claim(limit: int) -> list[tuple[Any, bytes]]:
                """What a client library's acknowledgement batching gathers: the next delivery,
                then more until ``limit`` or ACK_LINGER after the first."""
                batch = [await inbox.get()]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ACK_LINGER):
                        while len(batch) < limit:
                            batch.append(inbox.get_nowait() if not inbox.empty() else await inbox.get())
                out = []
                for message in batch:
                    if isinstance(message, BaseException):
                        raise message
                    if message.message_id in seen:
                        raise RuntimeError(f"{message.message_id} delivered twice")
                    seen.add(message.message_id)
                    out.append((message.message_id, message.payload))
                return out

            reader = asyncio.create_task(read())
            try:
                return await _consume(claim, ack, count, meter)
            finally:
                call.cancel()
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

        meter = await _rounds(args, publish, consume)
    return meter.result(topic=topic)


def client_main(argv: list[str] | None = None) -> None:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=list(BACKENDS), required=True)
    parser.add_argument("--side", choices=("direct", "gateway"), required=True)
    parser.add_argument("--work", choices=("publish", "consume"), required=True)
    parser.add_argument("--entries", type=int, default=1, help="publish: messages per call")
    parser.add_argument("--in-flight", type=int, default=SINGLE.in_flight, help="publish: calls at once")
    parser.add_argument("--duration", type=float, default=5.0, help="timed seconds (consume: at least)")
    parser.add_argument("--warmup", type=float, default=1.0, help="publish: seconds before timing")
    parser.add_argument("--messages", type=int, default=ROUND, help="consume: messages per round")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("."), help="sqlite: where its file goes")
    parser.add_argument("--grpc-port", type=int, help="gateway: its gRPC port")
    parser.add_argument("--token", default="", help="gateway: a session of its queue-<backend> config")
    parser.add_argument("--kafka", default="", help="kafka: the broker's host:port")
    args = parser.parse_args(argv)
    if args.side == "gateway" and args.work != "consume":
        parser.error("the gateway's publish rows run under h2load, not this client")
    KAFKA.bootstrap = args.kafka
    run = {("direct", "publish"): direct_publish, ("direct", "consume"): direct_consume,
           ("gateway", "consume"): gateway_consume}[(args.side, args.work)]
    print(json.dumps(uvloop.run(run(args))))


# --- the gateway's side, from the section ------------------------------------------------------


def write_config(path: pathlib.Path, only: Sequence[str] = ()) -> pathlib.Path:
    """The section's gateway configuration: a ``queue-<backend>`` config per backend (``only``:
    just those)."""
    names = [name for name in BACKENDS if not only or name in only]
    path.write_text(yaml.safe_dump({
        "backends": {name: BACKENDS[name].settings() for name in names},
        "configs": [
            {"name": f"queue-{name}", "pattern": "QUEUE", "backend": name, "namespace": NAMESPACE}
            for name in names
        ],
        "namespaces": [{"name": NAMESPACE}],
    }, sort_keys=False))
    return path


def _unary(target: str, rpc: str, request: Any, response_type: Any, token: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(QS + rpc)(request.SerializeToString(), metadata=((kv.SESSION_HEADER, token),),
                                            timeout=WAIT)
    return response_type.FromString(raw)


def _stored(target: str, topic: str, token: str) -> int:
    info = _unary(target, "GetTopicInfo", q.GetTopicInfoRequest(topic=topic), q.GetTopicInfoResponse, token)
    return sum(p.high_offset for p in info.partitions)


def _settled_count(target: str, topic: str, token: str) -> int:
    """The topic's message count once it stops growing: calls h2load gave up on when a run
    ended may still be storing their entries in the gateway (a batch on a slow backend takes a
    while), and the next run's count must not include them."""
    count, deadline = _stored(target, topic, token), time.monotonic() + WAIT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = _stored(target, topic, token)
        if again == count:
            return count
        count = again
    raise RuntimeError(f"topic {topic} kept growing for {WAIT:.0f} s after its load ended")


def _check_publish(target: str, rpc: str, request: Any, token: str) -> None:
    """The exact request h2load sends, through grpcio: status OK, every entry stored."""
    try:
        if rpc == "Publish":
            answer = _unary(target, rpc, request, q.QueuePublishResponse, token)
            results = [answer.message_id]
        else:
            answer = _unary(target, rpc, request, q.PublishBatchResponse, token)
            if bad := [r.status for r in answer.results if r.status.code]:
                raise RuntimeError(f"{rpc}: {len(bad)} entries refused, first: {bad[0]}")
            results = [r.message_id for r in answer.results]
    except grpc.RpcError as exc:
        raise RuntimeError(f"{rpc} check failed: {exc.code()} {exc.details()}") from None
    if len(results) != len(getattr(request, "entries", [None])) or not all(results):
        raise RuntimeError(f"{rpc} check: {len(results)} results for the request")


@dataclass
class Gateway:
    server: procs.Server
    target: str
    tokens: dict[str, str] = field(default_factory=dict)  # backend → session token


def _gateway_publish(ctx: Context, gw: Gateway, backend: str, entries: int, work: pathlib.Path) -> dict[str, Any]:
    """h2load against Publish (entries 1) or PublishBatch, on a topic of its own per try; the
    messages the topic gained are checked against the calls h2load counted."""
    d, token = ctx.durations, gw.tokens[backend]
    shape, rpc = (SINGLE, "Publish") if entries == 1 else (BATCH_SHAPE, "PublishBatch")
    process = BACKENDS[backend].process

    def measure() -> dict[str, Any]:
        topic = f"publish{entries}-{uuid.uuid4().hex[:10]}"
        request: Any = (q.QueuePublishRequest(topic=topic, entry=q.QueueEntry(payload=PAYLOAD)) if entries == 1
                        else q.PublishBatchRequest(topic=topic, entries=[q.QueueEntry(payload=PAYLOAD)] * entries))
        body = work / f"{topic}.grpc"
        body.write_bytes(kv.grpc_frame(request.SerializeToString()))
        url = f"http://{gw.target}{QS}{rpc}"
        headers = ["content-type: application/grpc", "te: trailers", f"{kv.SESSION_HEADER}: {token}"]
        _check_publish(gw.target, rpc, request, token)  # also creates the topic
        if d.warmup:  # a run of its own, so the timed run's stored count is its own
            loader.run(url, shape, duration=d.warmup, warmup=0, server=gw.server, workdir=work, body=body,
                       headers=headers)
        before = _settled_count(gw.target, topic, token)
        backend0, started = backend_cpu_seconds(process) if process else 0.0, time.perf_counter()
        result = loader.run(url, shape, duration=d.throughput, warmup=0, server=gw.server, workdir=work, body=body,
                            headers=headers)
        wall = time.perf_counter() - started
        gained = _settled_count(gw.target, topic, token) - before
        _check_publish(gw.target, rpc, request, token)
        succeeded = int(result["succeeded"])  # type: ignore[call-overload]
        if not succeeded * entries <= gained <= (succeeded + shape.in_flight) * entries:
            raise RuntimeError(f"{rpc} on {backend}: h2load counted {succeeded} calls × {entries}, "
                               f"the topic gained {gained} messages")
        if process:
            result["backend_cpu_share"] = round((backend_cpu_seconds(process) - backend0) / wall, 3)
            result["other_cpu_share"] = round(max(0.0, result["other_cpu_share"] - result["backend_cpu_share"]), 3)  # type: ignore[operator]
        body.unlink()
        return {**result, "messages": gained, "seconds": result["duration_s"],
                "messages_per_s": round(float(result["rps"]) * entries, 1), "h2load": shape.label,  # type: ignore[arg-type]
                "stored_check": f"topic gained {gained:,} messages for {succeeded:,} calls"}

    return ctx.least_disturbed(measure)


def _backend_rows(ctx: Context, gw: Gateway, backend: str, work: pathlib.Path) -> list[Row]:
    """The six rows of one backend, each pair (direct, gateway) measured one right after the
    other."""
    d, spec = ctx.durations, BACKENDS[backend]
    direct = ["benchmarks.queue", "--backend", backend, "--side", "direct", "--workdir", str(work)]
    if backend == "kafka":
        direct.append(f"--kafka={KAFKA.bootstrap}")
    publish = ["--work", "publish", "--duration", str(d.throughput), "--warmup", str(d.warmup)]
    consume = ["--work", "consume", "--messages", str(ROUND), "--duration", str(d.throughput)]
    plan: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    for kind, entries, shape in (("publish-1", 1, SINGLE), ("publish-100", BATCH, BATCH_SHAPE)):
        calls = [*publish, "--entries", str(entries), "--in-flight", str(shape.in_flight)]
        plan.append((kind, "direct", lambda calls=calls: ctx.client(*direct, *calls, backend=spec.process)))
        plan.append((kind, "gateway", lambda entries=entries: _gateway_publish(ctx, gw, backend, entries, work)))
    plan += [
        ("consume", "direct", lambda: ctx.client(*direct, *consume, backend=spec.process)),
        ("consume", "gateway", lambda: ctx.client(
            "benchmarks.queue", "--backend", backend, "--side", "gateway", *consume,
            "--grpc-port", str(gw.server.grpc_port), f"--token={gw.tokens[backend]}",
            server=gw.server, backend=spec.process)),
    ]
    rows: list[Row] = []
    for kind, side, measure in plan:
        under_h2load = side == "gateway" and kind != "consume"  # measures again itself, on a fresh topic
        result = measure() if under_h2load else ctx.least_disturbed(measure)
        rows.append(_row(backend, kind, side, result))
    return rows


def _pyvoy_rows(ctx: Context, gw: Gateway, backend: str, work: pathlib.Path) -> list[Row]:
    """The publish rows again through native gRPC on the ASGI app under pyvoy (issue 10's faster
    gRPC path), for comparison with the direct rows measured beside the Granian gateway's.
    Consume is one stream whose cost per message is not the transport's: not measured again."""
    return [_row(backend, kind, "gateway-pyvoy", _gateway_publish(ctx, gw, backend, entries, work))
            for kind, entries in (("publish-1", 1), ("publish-100", BATCH))]


TARGETS = {"gateway": "gateway (granian), gRPC", "gateway-pyvoy": "gateway (pyvoy), gRPC through the ASGI app"}


def _row(backend: str, kind: str, side: str, result: dict[str, Any]) -> Row:
    spec = BACKENDS[backend]
    what, in_flight = WORKS[kind]
    target = TARGETS.get(side, f"{spec.direct} directly")
    return {"id": f"queue/{backend}/{kind}/{side}", "backend": spec.label, "work": what, "target": target,
            "in_flight": in_flight, **result}


def _with_ratios(rows: list[Row]) -> list[Row]:
    """Each gateway row's messages/s against the direct row of its backend and work."""
    direct = {row["id"].rsplit("/", 1)[0]: row["messages_per_s"] for row in rows if row["id"].endswith("/direct")}
    for row in rows:
        base = direct.get(row["id"].rsplit("/", 1)[0])
        if not row["id"].endswith("/direct") and base:
            row["ratio_vs_direct"] = round(row["messages_per_s"] / base, 3)
    return rows


def _start(ctx: Context, servers: list[procs.Server], work: pathlib.Path, server_name: str) -> Gateway:
    """A gateway with the section's QUEUE configs and a session of each; native gRPC on its
    grpc.aio port, or under pyvoy on its HTTP port (the ASGI app)."""
    server = procs.gateway(ctx.workdir, server_name, config=write_config(work / "prism.yaml"))
    servers.append(server)
    gw = Gateway(server, f"127.0.0.1:{server.http_port if server_name == 'pyvoy' else server.grpc_port}")
    for backend in BACKENDS:
        gw.tokens[backend] = kv.create_session(gw.target, f"queue-{backend}")
    server.record_idle()
    return gw


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.subdir(SECTION)
    rows: list[Row] = []
    removed: dict[str, int] = {}
    load = f"h2load Publish {SINGLE.label}, PublishBatch ×{BATCH} {BATCH_SHAPE.label}; consume + ack"
    # Kafka: a Tansu broker of the section's own (memory storage), stopped on the way out.
    broker = kafka_broker.Broker(kafka_broker.free_port(), name=TANSU_NAME)
    broker.start()
    try:
        KAFKA.bootstrap = broker.bootstrap
        leftover = asyncio.run(cleanup())
        try:
            by_backend: dict[str, list[Row]] = {}
            with ctx.serving(SECTION, load) as servers:
                gw = _start(ctx, servers, work, "granian")
                for backend in BACKENDS:
                    by_backend[backend] = _backend_rows(ctx, gw, backend, work)
            with ctx.serving(SECTION, "the publish loads through the ASGI app on pyvoy") as servers:
                gw = _start(ctx, servers, work, "pyvoy")
                for backend in BACKENDS:
                    by_backend[backend] += _pyvoy_rows(ctx, gw, backend, work)
            rows = _with_ratios([row for backend_rows in by_backend.values() for row in backend_rows])
        finally:
            removed = asyncio.run(cleanup())
    finally:
        broker.stop()
    tansu = f"{pathlib.Path(broker.binary or 'tansu').name}, memory storage, {broker.bootstrap}"
    return {"title": TITLE, "rows": rows, "targets": targets(rows), "namespace": NAMESPACE,
            "consume_round": ROUND, "kafka_broker": tansu, "leftover_before": leftover, "removed_after": removed}


async def remove_postgres_queues(con: Any) -> int:
    """Delete the bench namespace's rows from the PostgreSQL Queue's tables; how many."""
    removed = 0
    for table in ("prism_queue_deliveries", "prism_queue_groups", "prism_queue_tokens",  # adapters/queue/postgres.py's
                  "prism_queue_messages", "prism_queue_partitions", "prism_queue_topics"):
        if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            status = await con.execute(f"DELETE FROM {table} WHERE namespace = $1", NAMESPACE)
            removed += int(status.split()[-1])
    return removed


async def cleanup() -> dict[str, int]:
    """Remove the bench namespace's queues from the servers, and any direct-row table, key or
    stream an interrupted run left (each client drops its own)."""
    removed = {"postgres_rows": 0, "postgres_tables": 0, "redis_keys": 0, "nats_streams": 0,
               "kafka_topics": 0, "kafka_groups": 0}
    import asyncpg

    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        removed["postgres_rows"] = await remove_postgres_queues(con)
        prefix = DIRECT.replace("-", "_")
        for name in await con.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE $1", prefix + "\\_%"):
            await con.execute(f'DROP TABLE IF EXISTS "{name["tablename"]}"')
            removed["postgres_tables"] += 1
    finally:
        await con.close()

    import redis.asyncio as aioredis

    from adapters.queue.redis import namespace_prefix

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for pattern in (namespace_prefix(NAMESPACE) + b"*", f"{DIRECT}:*".encode()):
            async for key in client.scan_iter(match=pattern, count=500):
                removed["redis_keys"] += await client.delete(key)
    finally:
        await client.aclose()

    import nats

    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        # The gateway's streams and buckets under its prefix, and the direct rows' streams.
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith((f"{NATS_PREFIX}_", f"KV_{NATS_PREFIX}-")):
                await js.delete_stream(name)
                removed["nats_streams"] += 1
    finally:
        await nc.close()

    from aiokafka.admin import AIOKafkaAdminClient

    if KAFKA.bootstrap:  # the section's own broker, in memory: only what this run made
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA.bootstrap, request_timeout_ms=int(WAIT * 1000))
        await admin.start()
        try:
            # The gateway's topics (its Queue topics, ledger and snapshots), the direct rows'
            # topics, and their consumer groups (the gateway's mirror of its positions).
            mine = (f"{KAFKA_PREFIX}.", f"{KAFKA_PREFIX}-", f"{DIRECT}.")
            if groups := [g[0] for g in await admin.list_consumer_groups() if str(g[0]).startswith(mine)]:
                removed["kafka_groups"] += await delete_kafka_groups(groups)
            if topics := [t for t in await admin.list_topics() if t.startswith(mine)]:
                await admin.delete_topics(topics)
                removed["kafka_topics"] += len(topics)
        finally:
            await admin.close()
    return removed


# --- targets and the markdown -----------------------------------------------------------------


def targets(rows: list[Row]) -> list[Row]:
    """Issue 11: the gateway at ≥ 50% of the direct client, publish ×100 and consume."""
    out = []
    for row in rows:
        if row["id"].endswith(("/gateway", "/gateway-pyvoy")) and row.get("ratio_vs_direct") is not None and "/publish-1/" not in row["id"]:
            value = row["ratio_vs_direct"]
            met = value >= RATIO_GOAL
            path = " (pyvoy, the ASGI app's native gRPC)" if row["id"].endswith("-pyvoy") else ""
            out.append({"goal": f"{row['backend']}{path}: {row['work']} ≥ {RATIO_GOAL:.0%} of the direct client",
                        "measured": f"{value * 100:.0f}% ({rps(row['messages_per_s'])} vs direct msgs/s)",
                        "met": met, "status": "met" if met else f"MISSED by {(RATIO_GOAL - value) * 100:.0f} points"})
    return out


TABLE = Table(
    [
        Column("backend", "backend"),
        Column("work", "work"),
        Column("target", "target"),
        Column("in flight", "in_flight"),
        Column("messages", "messages", rps),
        Column("messages/s", "messages_per_s", rps),
        Column("gateway/direct", "ratio_vs_direct", ratio),
        Column("ids per ack", "ids_per_ack", lambda v: "—" if v is None else f"{v:.0f}"),
        Column("client CPU", "client_cpu_share", share),
        Column("loader CPU", "loader_cpu_share", share),
        Column("gateway CPU", "server_cpu_share", share),
        Column("backend CPU", "backend_cpu_share", share),
        Column("other CPU", "other_cpu", text),
    ],
    [Column("messages/s", "messages_per_s", rps)],
)


def markdown(section: dict[str, Any], old: dict[str, Row] | None, old_label: str) -> list[str]:
    out = ["### Targets (issue 11)", "", "| goal | measured | status |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['measured']} | {g['status']} |" for g in section.get("targets", [])]
    out += ["", report.render(TABLE, section["rows"], old, old_label), ""]
    disturbed = [r for r in section["rows"] if r.get("other_cpu_share", 0) > DISTURBED]
    if disturbed:
        out.append(f"- **Disturbed**: {len(disturbed)} of {len(section['rows'])} rows ran beside more than "
                   f"{DISTURBED:g} of a core of other work (*other CPU*): not for quoting.")
    out += [
        "- *gateway (pyvoy)*: the publish rows again, once the Granian gateway has stopped, through native gRPC on "
        "the ASGI app of a `prism serve --server pyvoy` gateway (its HTTP port; issue 10's faster gRPC path) from "
        "the same configuration, compared with the direct rows above. Consume is one stream whose cost per "
        "message is not the transport's, so it is measured on Granian only.",
        "- 100-byte payloads, no partition key. *gateway*: one Granian worker with a QUEUE config per backend "
        f"(namespace `{section.get('namespace')}`); publish rows under h2load (native gRPC, pre-framed body, "
        "one connection), consume from a grpc.aio client process: one SubscribeBatches stream (at most "
        f"{ACK_BATCH} messages a response), max_in_flight {MAX_IN_FLIGHT}, Acknowledge of {ACK_BATCH} ids "
        f"or of what arrived within {ACK_LINGER * 1000:g} ms (*ids per ack*), "
        f"{ACKS_IN_FLIGHT} in flight. *direct*: the "
        "backend's own Python client in a client process doing the same work with the same concurrency "
        "(benchmarks/queue.py says what each does). messages/s = stored (publish) or acknowledged (consume) "
        "messages / timed seconds; consume rows run rounds of "
        f"{section.get('consume_round', 0):,} messages published (untimed) then consumed (timed) until the timed "
        "seconds reach the run's duration.",
        "- Checked: each h2load run's topic gained exactly the messages of the calls h2load counted (plus at most "
        "those in flight when it stopped), with a grpcio call of the same request OK before and after; each "
        "direct run's store holds what it published; each consume run delivered every message once, with its "
        "payload, and all were acknowledged.",
        f"- Removed afterwards: {section.get('removed_after')} (left from an earlier run beforehand: "
        f"{section.get('leftover_before')}).",
    ]
    if section.get("kafka_broker"):
        out.append(
            f"- Kafka: a Tansu broker the section started ({section.get('kafka_broker')}), its process's CPU as "
            "*backend CPU*. Both sides produce as aiokafka does by default: records sent while a request is out "
            "share the next one. The direct consumer joins its group once, untimed; the gateway's consumer joins "
            "(a ledger command) in every timed round, and every batch it takes and every Acknowledge is a "
            "ledger command appended and read back."
        )
    return out


if __name__ == "__main__":
    client_main()
