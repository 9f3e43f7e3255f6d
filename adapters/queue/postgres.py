"""PostgreSQL Queue: topics as tables in the backend's database, on the instance's shared pool.

    prism_queue_topics      topic → its partition count (fixed when the topic is created)
    prism_queue_partitions  partition → high offset (the next it assigns), last publish time
    prism_queue_messages    messages by (partition, seq = offset)
    prism_queue_tokens      idempotency tokens: the primary key is the unique constraint that
                            makes a retried publish store once; the row names the stored message
    prism_queue_groups      a group's position on each partition
    prism_queue_deliveries  a group's delivered messages at or above its position: attempts,
                            lease deadline and holder, acknowledged

Every row carries its Prism namespace, so namespaces never meet (and tests delete theirs).
Every lease, acknowledgement and position lives in the database, so an Acknowledge, Commit or
Seek may reach any gateway worker or instance, whichever serves the Subscribe stream.

Locks, taken always in this order so that no two transactions wait for each other:

1. A group's row on a partition guards everything the group does there. A claim takes it with
   ``FOR UPDATE SKIP LOCKED``: consumers of a group never wait for each other — one leases from
   partition 0 while another leases from partition 1, and a claim finding a partition busy
   looks again ``busy_retry`` seconds later. Acknowledge, Commit, Seek and a closing consumer
   wait for it (by partition, in order). Holding it makes "is an earlier message of this key
   leased?" and "lease the next one" one step, which is what order per key needs.
2. Idempotency tokens of a publish, inserted in token order (``ON CONFLICT DO NOTHING`` waits
   for a concurrent publish of the same token and then reads what it stored).
3. Partition rows of a topic, locked in partition order while a publish (or a claim's dead
   letters) takes offsets; a partition's messages commit in offset order. A publish to one
   partition of a topic the adapter knows, without tokens, is a single statement.

Lease deadlines and publish times are the gateway's clock (unix ns), as on SQLite: gateways
sharing a database must keep their clocks in step (NTP), well within the shortest ack deadline.

Waking consumers: a change wakes the adapter's own consumers of its topic at once, and other
gateways' by a ``NOTIFY prism_queue`` naming the namespace and topic, sent after the commit
(``adapters/postgres_notify.py``: in a NOTIFY inside every publish and acknowledgement their
commits would take turns). A crash between a commit and its NOTIFY costs other gateways'
consumers at most ``poll_seconds``, never a message. Each adapter holds one connection of its
own (not from the pool) that LISTENs and wakes its consumers of the topics named. That connection is opened when
the first consumer joins, kept until the adapter closes, and reopened after it is lost (a server
restart); once listening again every consumer looks, for what was published meanwhile. A consumer also looks when a
lease it saw runs out, and every ``poll_seconds`` (5 s) whatever happens: a slow fallback, not
the way messages normally arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from adapters.capabilities import Capability
from adapters.keyvalue.postgres import SCHEMA_LOCK
from adapters.postgres_notify import AfterCommitNotifier
from adapters.postgres_plans import custom_plans
from adapters.queue.base import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTERED,
    AtOffset,
    AtTime,
    ConsumeOptions,
    Consumer,
    Delivery,
    Entry,
    Leased,
    LeasingConsumer,
    PartitionInfo,
    Published,
    QueueAdapter,
    SeekTarget,
    Start,
    message_id,
    monotonic_of,
    no_partition,
    offset_out_of_range,
    parse_message_id,
    token_reused,
    unknown_topic,
)
from prism.errors import PrismError

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.postgres import PostgresPool

log = logging.getLogger("prism.adapters.postgres")

CHANNEL = "prism_queue"

# Applied in order; prism_schema remembers how many ran. Never edit a released entry: append.
# Keys and tokens are bytea: a client's string may hold NUL, which text cannot.
MIGRATIONS = [
    """
    CREATE TABLE prism_queue_topics (
        namespace text NOT NULL, topic text NOT NULL, partitions integer NOT NULL,
        PRIMARY KEY (namespace, topic))
    """,
    """
    CREATE TABLE prism_queue_partitions (
        namespace text NOT NULL, topic text NOT NULL, partition integer NOT NULL,
        high bigint NOT NULL, last_ns bigint NOT NULL,
        PRIMARY KEY (namespace, topic, partition))
    """,
    """
    CREATE TABLE prism_queue_messages (
        namespace text NOT NULL, topic text NOT NULL, partition integer NOT NULL, seq bigint NOT NULL,
        key bytea NOT NULL, headers text NOT NULL, payload bytea NOT NULL, published_ns bigint NOT NULL,
        PRIMARY KEY (namespace, topic, partition, seq))
    """,
    "CREATE INDEX prism_queue_times ON prism_queue_messages (namespace, topic, partition, published_ns)",
    """
    CREATE TABLE prism_queue_tokens (
        namespace text NOT NULL, topic text NOT NULL, token bytea NOT NULL, fingerprint bytea NOT NULL,
        partition integer, seq bigint,
        PRIMARY KEY (namespace, topic, token))
    """,
    """
    CREATE TABLE prism_queue_groups (
        namespace text NOT NULL, topic text NOT NULL, grp text NOT NULL, partition integer NOT NULL,
        position bigint NOT NULL,
        PRIMARY KEY (namespace, topic, grp, partition))
    """,
    """
    CREATE TABLE prism_queue_deliveries (
        namespace text NOT NULL, topic text NOT NULL, grp text NOT NULL, partition integer NOT NULL,
        seq bigint NOT NULL, attempts integer NOT NULL, deadline_ns bigint NOT NULL,
        consumer text NOT NULL, acked boolean NOT NULL,
        PRIMARY KEY (namespace, topic, grp, partition, seq))
    """,
    "CREATE INDEX prism_queue_holders ON prism_queue_deliveries (consumer) WHERE NOT acked",
    # Maintaining an index by publish time made a publish half again as costly; a seek by time
    # bisects the offsets instead (publish times increase with them).
    "DROP INDEX IF EXISTS prism_queue_times",
]

# How far past its position a group looks for deliverable messages on a partition, per claim
# (as the SQLite adapter): the bound on one claim's work.
LOOKAHEAD = 1000
INT32_MAX = 2**31 - 1
KNOWN_TOPICS = 10_000  # partition counts remembered per adapter (then forgotten all at once)

GROUP = "namespace = $1 AND topic = $2 AND grp = $3 AND partition = $4"  # a group's rows on a partition


async def migrate(con: asyncpg.Connection) -> None:
    """Bring the queue tables to the latest version; under the same advisory lock as the
    KeyValue tables, so processes and patterns starting together take turns."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await con.execute(
            "CREATE TABLE IF NOT EXISTS prism_schema (component text PRIMARY KEY, version integer NOT NULL)"
        )
        done = await con.fetchval("SELECT version FROM prism_schema WHERE component = 'queue'") or 0
        for statement in MIGRATIONS[done:]:
            await con.execute(statement)
        if done < len(MIGRATIONS):
            await con.execute(
                "INSERT INTO prism_schema (component, version) VALUES ('queue', $1) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                len(MIGRATIONS),
            )


def _partition_for(key: str, partitions: int, spread: Iterator[int]) -> int:
    """A key's partition is fixed (CRC-32: the same in every process, as on SQLite); no key:
    round robin."""
    return (zlib.crc32(key.encode()) if key else next(spread)) % partitions


# Publish on one partition in one statement: take the offsets and publish times, store the
# rows. $6: the payloads; $7 and $8 the keys and headers, or none when every entry has neither.
_PUBLISH = (
    "WITH taken AS (UPDATE prism_queue_partitions SET high = high + $4, "
    "last_ns = greatest(last_ns + 1, $5) + $4 - 1 WHERE namespace=$1 AND topic=$2 AND partition=$3 "
    "RETURNING high - $4 AS seq, last_ns - $4 + 1 AS published_ns), "
    "stored AS (INSERT INTO prism_queue_messages (namespace, topic, partition, seq, key, headers, payload, "
    "published_ns) SELECT $1, $2, $3, taken.seq + u.i - 1, {key}, {headers}, u.payload, "
    "taken.published_ns + u.i - 1 FROM taken, unnest({arrays}) WITH ORDINALITY AS u({columns}, i)) "
    "SELECT taken.seq FROM taken"
)
PUBLISH_ROWS = _PUBLISH.format(
    key="u.key", headers="u.headers", arrays="$6::bytea[], $7::bytea[], $8::text[]", columns="payload, key, headers"
)
PUBLISH_PAYLOADS = _PUBLISH.format(key="''::bytea", headers="'{}'", arrays="$6::bytea[]", columns="payload")


def _headers_json(headers: Mapping[str, str]) -> str:
    return json.dumps(dict(headers)) if headers else "{}"


def _headers_of(text: str) -> dict[str, str]:
    return json.loads(text) if text != "{}" else {}


def _placer(partitions: int, spread: Iterator[int]) -> Callable[[str], int]:
    """Where the entries of one publish go: a key to its fixed partition, and every entry
    without a key to one partition, the next in round robin for each publish (as Kafka's
    sticky partitioner does), so a batch is one statement on one partition row."""
    keyless: list[int] = []

    def place(key: str) -> int:
        if key:
            return zlib.crc32(key.encode()) % partitions
        if not keyless:
            keyless.append(next(spread) % partitions)
        return keyless[0]

    return place


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(slots=True)
class Claim:
    deliveries: list[tuple[Delivery, int]]  # with each one's lease deadline (unix ns)
    held: set[tuple[int, int]] | None  # (partition, offset) of every unacknowledged lease of the consumer before (if asked)
    wake_at: int | None  # when a lease that holds something back runs out (unix ns)
    dead_lettered: int = 0  # messages moved to the dead-letter topic
    busy: bool = False  # a partition was skipped: another transaction held the group's row


@dataclass(slots=True)
class _Dead:
    """A message a claim found out of attempts, and its dead-letter copy once read."""

    partition: int
    seq: int
    attempts: int
    copy: Entry | None = None


class PostgresQueue(QueueAdapter):
    capabilities = frozenset(
        {
            Capability.DURABLE,
            Capability.SHARED,
            Capability.SEEK_TIMESTAMP,
            Capability.DEAD_LETTER,
            Capability.IDEMPOTENT_PUBLISH,
        }
    )

    def __init__(
        self,
        pool: PostgresPool,
        *,
        partitions: int = 4,
        poll_seconds: float = 5.0,
        busy_retry: float = 0.02,
    ) -> None:
        self.pool = pool  # the backend's, shared with its other patterns
        self.partitions = partitions  # of each topic this adapter creates
        self.poll_seconds = poll_seconds  # fallback: a waiting consumer looks at least this often
        self.busy_retry = busy_retry  # seconds before looking again at a partition another claim held
        self.id = uuid.uuid4().hex  # names this adapter's notifications, so it skips its own
        self._spread = itertools.count()  # round robin over partitions for messages without a key
        self._consumers: dict[tuple[str, str], set[PostgresConsumer]] = {}
        self._known: dict[tuple[str, str], int] = {}  # (namespace, topic) → partitions, for publishing
        self._listener: asyncio.Task[None] | None = None
        self._notifier = AfterCommitNotifier(pool, CHANNEL, "postgres-queue")

    async def start(self) -> None:
        async with self.pool.connection() as con:
            await migrate(con)

    async def close(self) -> None:
        for consumer in [c for group in self._consumers.values() for c in group]:
            await consumer.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self._notifier.close()

    @contextlib.asynccontextmanager
    async def _transaction(self, *, plan_each_run: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction; the pool maps driver failures. With
        ``plan_each_run``, its statements are planned for the tables as they are
        (``adapters/postgres_plans.py``): a consumer's claim reads a topic's messages, which a
        backlog grows from none to millions under a plan cached while there were none."""
        async with self.pool.connection() as con:
            async with custom_plans(con) if plan_each_run else con.transaction():
                yield con

    # --- Waking consumers --------------------------------------------------------------------

    def _wake(self, namespace: str, topic: str) -> None:
        for consumer in self._consumers.get((namespace, topic), ()):
            consumer.wake()

    def _wake_all(self) -> None:
        for members in list(self._consumers.values()):
            for consumer in members:
                consumer.wake()

    def _changed(self, namespace: str, topic: str) -> None:
        """A committed change to the topic: its consumers here wake now, other gateways' by the
        next NOTIFY."""
        self._wake(namespace, topic)
        self._notifier.notify(self._payload(namespace, topic))

    def _payload(self, namespace: str, topic: str) -> str:
        return json.dumps([self.id, namespace, topic])

    def _notified(self, con: object, pid: int, channel: str, payload: str) -> None:
        try:
            sender, namespace, topic = json.loads(payload)
        except (ValueError, TypeError):
            log.warning("postgres queue: ignoring a notification it cannot read: %.100r", payload)
            return
        if sender != self.id:  # this adapter woke its own consumers when it committed
            self._wake(namespace, topic)

    def _register(self, consumer: PostgresConsumer) -> None:
        self._consumers.setdefault((consumer.namespace, consumer.topic), set()).add(consumer)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="postgres-queue-listener")

    def _unregister(self, consumer: PostgresConsumer) -> None:
        key = (consumer.namespace, consumer.topic)
        members = self._consumers.get(key, set())
        members.discard(consumer)
        if not members:
            self._consumers.pop(key, None)

    async def _listen(self) -> None:
        """Hold a LISTEN connection until closed, reopening it whenever it is lost."""
        settings = self.pool.settings
        pause = 0.1
        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await asyncpg.connect(
                    settings.dsn,
                    timeout=settings.connect_timeout,
                    command_timeout=settings.command_timeout,
                    server_settings={"application_name": f"prism-queue-listener {self.id}"},
                )
                lost = asyncio.Event()
                con.add_termination_listener(lambda _, lost=lost: lost.set())
                await con.add_listener(CHANNEL, self._notified)
                pause = 0.1
                self._wake_all()  # what changed while nobody listened
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_seconds):  # not wait_for: see LeasingConsumer.take
                            await lost.wait()
                    if not lost.is_set():  # a connection the OS has not reported dead yet
                        await con.fetchval("SELECT 1")
                log.warning("postgres queue: notification connection lost; reconnecting")
            except Exception as exc:  # whatever ended the connection, open another: this task must live on
                log.warning("postgres queue: cannot listen for changes (%s: %s); retrying", type(exc).__name__, exc)
            finally:
                if con is not None:
                    con.terminate()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    # --- Statements, on a connection inside a transaction ------------------------------------

    def _remember(self, ns: str, topic: str, partitions: int) -> None:
        """A topic's partition count, fixed at its creation, for the publish fast path."""
        if len(self._known) >= KNOWN_TOPICS:
            self._known.clear()
        self._known[(ns, topic)] = partitions

    @staticmethod
    async def _partition_count(con: asyncpg.Connection, ns: str, topic: str) -> int | None:
        return await con.fetchval("SELECT partitions FROM prism_queue_topics WHERE namespace=$1 AND topic=$2", ns, topic)

    async def _ensure_topic(self, con: asyncpg.Connection, ns: str, topic: str) -> int:
        if (found := await self._partition_count(con, ns, topic)) is not None:
            self._remember(ns, topic, found)
            return found
        created = await con.fetchval(
            "INSERT INTO prism_queue_topics (namespace, topic, partitions) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING partitions",
            ns, topic, self.partitions,
        )
        if created is None:  # another transaction created it meanwhile (and committed: we waited)
            return await self._partition_count(con, ns, topic)  # type: ignore[return-value]
        await con.execute(
            "INSERT INTO prism_queue_partitions (namespace, topic, partition, high, last_ns) "
            "SELECT $1, $2, p, 0, 0 FROM generate_series(0, $3 - 1) AS p",
            ns, topic, created,
        )
        return created

    async def _existing_partition(self, con: asyncpg.Connection, ns: str, topic: str, partition: int) -> None:
        partitions = await self._partition_count(con, ns, topic)
        if partitions is None:
            raise unknown_topic(topic)
        if not 0 <= partition < partitions:
            raise no_partition(topic, partition, partitions)

    @staticmethod
    async def _bounds(con: asyncpg.Connection, ns: str, topic: str, partition: int) -> tuple[int, int]:
        low, high = await con.fetchrow(
            "SELECT coalesce((SELECT min(seq) FROM prism_queue_messages m WHERE m.namespace=$1 AND m.topic=$2 "
            "AND m.partition=$3), high), high FROM prism_queue_partitions WHERE namespace=$1 AND topic=$2 AND partition=$3",
            ns, topic, partition,
        )
        return low, high

    async def _append(
        self, con: asyncpg.Connection, ns: str, topic: str, placed: list[tuple[int, Entry]], now: int
    ) -> list[Published]:
        """Store entries on their partitions, in order: offsets taken under the partitions'
        row locks (in partition order), publish times strictly increasing per partition so a
        seek by time can bisect the offsets."""
        counts = Counter(partition for partition, _ in placed)
        parts = sorted(counts)
        if len(parts) > 1:
            await con.execute(
                "SELECT 1 FROM prism_queue_partitions WHERE namespace=$1 AND topic=$2 AND partition = ANY($3::integer[]) "
                "ORDER BY partition FOR UPDATE",
                ns, topic, parts,
            )
        rows = await con.fetch(
            "UPDATE prism_queue_partitions AS p SET high = p.high + u.n, last_ns = greatest(p.last_ns + 1, $5) + u.n - 1 "
            "FROM unnest($3::integer[], $4::bigint[]) AS u(part, n) "
            "WHERE p.namespace=$1 AND p.topic=$2 AND p.partition = u.part "
            "RETURNING p.partition, p.high - u.n, p.last_ns - u.n + 1",
            ns, topic, parts, [counts[p] for p in parts], now,
        )
        next_seq = {r[0]: r[1] for r in rows}
        next_ns = {r[0]: r[2] for r in rows}
        published: list[Published] = []
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for partition, entry in placed:
            seq, published_ns = next_seq[partition], next_ns[partition]
            next_seq[partition], next_ns[partition] = seq + 1, published_ns + 1
            values = (partition, seq, entry.partition_key.encode(), _headers_json(entry.headers), entry.payload, published_ns)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            published.append(Published(message_id(partition, seq), partition, seq))
        await con.execute(
            "INSERT INTO prism_queue_messages (namespace, topic, partition, seq, key, headers, payload, published_ns) "
            "SELECT $1, $2, u.* FROM unnest($3::integer[], $4::bigint[], $5::bytea[], $6::text[], $7::bytea[], $8::bigint[]) "
            "AS u(partition, seq, key, headers, payload, published_ns)",
            ns, topic, *columns,
        )
        return published

    async def _publish(self, con: asyncpg.Connection, ns: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        partitions = await self._ensure_topic(con, ns, topic)
        first_of: dict[str, int] = {}  # token → index of its first entry here
        for i, entry in enumerate(entries):
            if entry.idempotency_token:
                first_of.setdefault(entry.idempotency_token, i)
        stored: dict[str, tuple[bytes, Published]] = {}  # tokens an earlier publish holds
        if first_of:
            tokens = sorted(first_of)
            mine = await con.fetch(
                "INSERT INTO prism_queue_tokens (namespace, topic, token, fingerprint) "
                "SELECT $1, $2, u.token, u.fingerprint FROM unnest($3::bytea[], $4::bytea[]) AS u(token, fingerprint) "
                "ORDER BY u.token ON CONFLICT DO NOTHING RETURNING token",
                ns, topic, [t.encode() for t in tokens], [entries[first_of[t]].fingerprint() for t in tokens],
            )
            taken = set(tokens) - {r[0].decode() for r in mine}
            if taken:
                for token, fingerprint, partition, seq in await con.fetch(
                    "SELECT token, fingerprint, partition, seq FROM prism_queue_tokens "
                    "WHERE namespace=$1 AND topic=$2 AND token = ANY($3::bytea[])",
                    ns, topic, [t.encode() for t in taken],
                ):
                    stored[token.decode()] = (fingerprint, Published(message_id(partition, seq), partition, seq))
        # Which entries are stored now: those without a token, and the first of each new token.
        place = _placer(partitions, self._spread)
        placed = [
            (i, place(entry.partition_key))
            for i, entry in enumerate(entries)
            if not entry.idempotency_token or (entry.idempotency_token not in stored and first_of[entry.idempotency_token] == i)
        ]
        appended = dict(
            zip(
                (i for i, _ in placed),
                await self._append(con, ns, topic, [(p, entries[i]) for i, p in placed], time.time_ns()) if placed else [],
                strict=True,
            )
        )
        owned = [(entries[i].idempotency_token, appended[i]) for i, _ in placed if entries[i].idempotency_token]
        if owned:
            # The tokens' rows (inserted above) get their messages' places through their
            # primary key as the ON CONFLICT arbiter: a probe of the index whatever the plan.
            # (An UPDATE by key, or joined to unnest(…), is planned from the table's statistics:
            # a plan cached while the table was small scans every token of the topic.)
            await con.execute(
                "INSERT INTO prism_queue_tokens (namespace, topic, token, fingerprint, partition, seq) "
                "SELECT $1, $2, u.* FROM unnest($3::bytea[], $4::bytea[], $5::integer[], $6::bigint[]) "
                "AS u(token, fingerprint, partition, seq) "
                "ON CONFLICT (namespace, topic, token) DO UPDATE SET partition = excluded.partition, seq = excluded.seq",
                ns, topic, [token.encode() for token, _ in owned], [entries[first_of[token]].fingerprint() for token, _ in owned],
                [published.partition for _, published in owned], [published.offset for _, published in owned],
            )
            for token, published in owned:
                stored[token] = (entries[first_of[token]].fingerprint(), published)
        results: list[Published | PrismError] = []
        for i, entry in enumerate(entries):
            if i in appended:
                results.append(appended[i])
            else:
                fingerprint, published = stored[entry.idempotency_token]
                results.append(published if fingerprint == entry.fingerprint() else token_reused())
        return results

    @staticmethod
    async def _set_position(con: asyncpg.Connection, ns: str, topic: str, group: str, partition: int, position: int) -> None:
        await con.execute(
            "INSERT INTO prism_queue_groups (namespace, topic, grp, partition, position) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (namespace, topic, grp, partition) DO UPDATE SET position = excluded.position",
            ns, topic, group, partition, position,
        )

    @staticmethod
    async def _lock_position(
        con: asyncpg.Connection, ns: str, topic: str, group: str, partition: int, *, wait: bool
    ) -> int | None:
        """The group's position on the partition, its row locked for this transaction; None
        when it has none, or (``wait`` False) another transaction holds it."""
        return await con.fetchval(
            f"SELECT position FROM prism_queue_groups WHERE {GROUP} FOR UPDATE{'' if wait else ' SKIP LOCKED'}",
            ns, topic, group, partition,
        )

    @staticmethod
    async def _add_position(con: asyncpg.Connection, ns: str, topic: str, group: str, start: Start, partition: int | None) -> int | None:
        """Give the group a position on the partition (every partition: None) if it has none:
        the low offset for EARLIEST, else the high. The new position, or None when it had one."""
        return await con.fetchval(
            "INSERT INTO prism_queue_groups (namespace, topic, grp, partition, position) "
            "SELECT p.namespace, p.topic, $3, p.partition, CASE WHEN $5 THEN coalesce((SELECT min(m.seq) "
            "FROM prism_queue_messages m WHERE m.namespace=$1 AND m.topic=$2 AND m.partition=p.partition), p.high) "
            "ELSE p.high END FROM prism_queue_partitions p "
            "WHERE p.namespace=$1 AND p.topic=$2 AND ($4::integer IS NULL OR p.partition = $4) "
            "ON CONFLICT DO NOTHING RETURNING position",
            ns, topic, group, partition, start is Start.EARLIEST,
        )

    @staticmethod
    async def _advance(con: asyncpg.Connection, ns: str, topic: str, group: str, partition: int, position: int) -> None:
        """Move the group's position over the acknowledged messages at its head, forgetting
        them. The run of consecutive acknowledged offsets from the head is the rows whose
        offset less their rank is ``position - 1`` (one range scan, whatever the statistics)."""
        await con.execute(
            "WITH run AS (SELECT seq, seq - row_number() OVER (ORDER BY seq) AS gap FROM prism_queue_deliveries "
            f"WHERE {GROUP} AND seq >= $5 AND acked), "
            "head AS (SELECT coalesce(max(seq) + 1, $5) AS position FROM run WHERE gap = $5 - 1), "
            f"forgotten AS (DELETE FROM prism_queue_deliveries WHERE {GROUP} AND seq < (SELECT position FROM head)) "
            f"UPDATE prism_queue_groups SET position = (SELECT position FROM head) WHERE {GROUP} "
            "AND (SELECT position FROM head) > $5",
            ns, topic, group, partition, position,
        )

    async def _claim(
        self,
        con: asyncpg.Connection,
        ns: str,
        topic: str,
        options: ConsumeOptions,
        consumer: str,
        first: int,
        partitions: int,
        held: bool,
    ) -> Claim:
        """Lease deliverable messages to ``consumer`` (its in-flight bound allowing),
        dead-lettering those out of attempts on the way; with ``held``, also report every
        unacknowledged lease the consumer had (else only their number counts)."""
        now = time.time_ns()
        live, first_end = await con.fetchrow(
            "SELECT count(*), min(deadline_ns) FROM prism_queue_deliveries WHERE consumer=$1 AND NOT acked AND deadline_ns > $2",
            consumer, now,
        )
        claim = Claim([], None, first_end)
        if held:
            rows = await con.fetch("SELECT partition, seq FROM prism_queue_deliveries WHERE consumer=$1 AND NOT acked", consumer)
            claim.held = {(p, s) for p, s in rows}
        room = options.max_in_flight - live
        group = options.group
        dead: list[_Dead] = []
        for i in range(partitions):
            if room <= 0:
                break
            partition = (first + i) % partitions
            position = await self._lock_position(con, ns, topic, group, partition, wait=False)
            if position is None:
                # Another claim (or an acknowledgement) is at work there: look again soon. Never
                # wait for it, as an insert meeting its row would, holding other partitions' rows.
                exists = await con.fetchval(f"SELECT 1 FROM prism_queue_groups WHERE {GROUP}", ns, topic, group, partition)
                if exists or (position := await self._add_position(con, ns, topic, group, options.start, partition)) is None:
                    claim.busy = True
                    continue
            # The delivery row of each message is looked up by its whole key in a lateral
            # subquery that OFFSET 0 keeps from being flattened: as a plain join, a table
            # without statistics (autovacuum off, or not run since it grew) gets a plan that
            # reads the group's every delivery row once per message.
            rows = await con.fetch(
                "SELECT m.seq, m.key, d.attempts, d.deadline_ns FROM prism_queue_messages m "
                "LEFT JOIN LATERAL (SELECT d.attempts, d.deadline_ns, d.acked FROM prism_queue_deliveries d "
                "WHERE d.namespace = $1 AND d.topic = $2 AND d.grp = $3 AND d.partition = $4 AND d.seq = m.seq "
                "OFFSET 0) d ON true "
                "WHERE m.namespace = $1 AND m.topic = $2 AND m.partition = $4 AND m.seq >= $5 AND d.acked IS NOT TRUE "
                "ORDER BY m.seq LIMIT $6",
                ns, topic, group, partition, position, LOOKAHEAD,
            )
            waiting: set[bytes] = set()  # keys with an earlier message leased or about to be
            chosen: list[tuple[int, int]] = []  # (seq, attempt)
            for seq, key, attempts, lease_end in rows:
                if attempts is not None and lease_end > now:
                    claim.wake_at = _earliest(claim.wake_at, lease_end)
                    if key:
                        waiting.add(key)
                    continue
                if key and key in waiting:
                    continue
                attempts = attempts or 0
                if options.max_delivery_attempts and attempts >= options.max_delivery_attempts:
                    dead.append(_Dead(partition, seq, attempts))  # done for the group: the key's next may follow
                    continue
                if key:
                    waiting.add(key)
                chosen.append((seq, attempts + 1))
                if len(chosen) >= room:
                    break
            if chosen:
                deadline = time.time_ns() + int(options.ack_deadline * 1e9)  # from now, not the claim's start
                # The messages are read by their offsets' range (the ANY is a filter within it):
                # an ANY alone, or a join on the leased rows, is planned without statistics as
                # a scan of the whole partition.
                seqs = [seq for seq, _ in chosen]
                leased = await con.fetch(
                    "WITH leased AS (INSERT INTO prism_queue_deliveries AS d "
                    "(namespace, topic, grp, partition, seq, attempts, deadline_ns, consumer, acked) "
                    "SELECT $1, $2, $3, $4, u.seq, u.attempts, $7, $8, false "
                    "FROM unnest($5::bigint[], $6::integer[]) AS u(seq, attempts) "
                    "ON CONFLICT (namespace, topic, grp, partition, seq) DO UPDATE SET attempts = excluded.attempts, "
                    "deadline_ns = excluded.deadline_ns, consumer = excluded.consumer, acked = false) "
                    "SELECT seq, key, headers, payload, published_ns FROM prism_queue_messages "
                    "WHERE namespace = $1 AND topic = $2 AND partition = $4 AND seq >= $9 AND seq <= $10 "
                    "AND seq = ANY($5::bigint[]) ORDER BY seq",
                    ns, topic, group, partition, seqs, [a for _, a in chosen], deadline, consumer, seqs[0], seqs[-1],
                )
                attempt_of = dict(chosen)
                claim.deliveries += [
                    (
                        Delivery(
                            message_id(partition, seq), topic, partition, seq, payload, key.decode(),
                            _headers_of(headers), attempt_of[seq], published_ns,
                        ),
                        deadline,
                    )
                    for seq, key, headers, payload, published_ns in leased
                ]
                room -= len(leased)
        if dead:
            await self._dead_letter(con, ns, topic, options, dead, now)
            claim.dead_lettered = len(dead)
        return claim

    async def _dead_letter(
        self, con: asyncpg.Connection, ns: str, topic: str, options: ConsumeOptions, dead: list[_Dead], now: int
    ) -> None:
        """Append copies of the messages to the dead-letter topic (in one append, so its
        partitions are locked in order) and count them acknowledged for the group."""
        group = options.group
        for item in dead:
            key, headers, payload = await con.fetchrow(
                "SELECT key, headers, payload FROM prism_queue_messages WHERE namespace=$1 AND topic=$2 AND partition=$3 AND seq=$4",
                ns, topic, item.partition, item.seq,
            )
            reason = f"not acknowledged after {item.attempts} deliveries (max_delivery_attempts {options.max_delivery_attempts})"
            values = (reason, topic, group, message_id(item.partition, item.seq), str(item.partition), str(item.seq), str(item.attempts))
            item.copy = Entry(payload, key.decode(), {**json.loads(headers), **dict(zip(DEAD_LETTER_HEADERS, values, strict=True))})
        target = options.dead_letter_topic
        partitions = await self._ensure_topic(con, ns, target)
        copies = [(_partition_for(d.copy.partition_key, partitions, self._spread), d.copy) for d in dead if d.copy]
        await self._append(con, ns, target, copies, now)
        by_partition: dict[int, list[_Dead]] = {}
        for item in dead:
            by_partition.setdefault(item.partition, []).append(item)
        for partition, items in sorted(by_partition.items()):
            await con.execute(
                "INSERT INTO prism_queue_deliveries (namespace, topic, grp, partition, seq, attempts, deadline_ns, consumer, acked) "
                "SELECT $1, $2, $3, $4, u.seq, u.attempts, 0, '', true FROM unnest($5::bigint[], $6::integer[]) AS u(seq, attempts) "
                "ON CONFLICT (namespace, topic, grp, partition, seq) DO UPDATE SET acked = true, consumer = ''",
                ns, topic, group, partition, [d.seq for d in items], [d.attempts for d in items],
            )
            position = await self._lock_position(con, ns, topic, group, partition, wait=True)  # held already
            if position is not None:
                await self._advance(con, ns, topic, group, partition, position)

    async def _settle(
        self, con: asyncpg.Connection, ns: str, topic: str, group: str, ids: Sequence[str], acknowledge: bool
    ) -> int:
        """Acknowledge (or end the leases of) delivered, unacknowledged messages; how many."""
        by_partition: dict[int, set[int]] = {}
        for parsed in map(parse_message_id, ids):
            if parsed is not None and parsed[0] <= INT32_MAX:
                by_partition.setdefault(parsed[0], set()).add(parsed[1])
        change = "acked = true" if acknowledge else "deadline_ns = 0, consumer = ''"
        count = 0
        for partition, offsets in sorted(by_partition.items()):
            # One statement locks the group's row (waiting for it, as every settle does: the
            # uncorrelated EXISTS runs once, before any delivery row is touched) and settles;
            # a delivery row another transaction changed meanwhile is checked again as it is
            # now. Each settled message frees in-flight room, and the next message of its key
            # (the caller announces the change). The offsets' range bounds the scan, whatever
            # the statistics say.
            ordered = sorted(offsets)
            row = await con.fetchrow(
                f"WITH locked AS (SELECT position FROM prism_queue_groups WHERE {GROUP} FOR UPDATE), "
                f"settled AS (UPDATE prism_queue_deliveries SET {change} WHERE {GROUP} AND seq >= $6 AND seq <= $7 "
                "AND seq = ANY($5::bigint[]) AND NOT acked AND EXISTS (SELECT 1 FROM locked) RETURNING seq) "
                "SELECT (SELECT position FROM locked), ARRAY(SELECT seq FROM settled)",
                ns, topic, group, partition, ordered, ordered[0], ordered[-1],
            )
            position, settled = row[0], row[1]
            count += len(settled)
            if acknowledge and position in settled:  # else the head stays
                await self._advance(con, ns, topic, group, partition, position)
        return count

    async def _release(self, con: asyncpg.Connection, consumer: str, handed_out: frozenset[tuple[int, int]]) -> None:
        """A closing consumer's leases end now. Those it never handed out do not count as attempts."""
        holdings = await con.fetch(
            "SELECT DISTINCT namespace, topic, grp, partition FROM prism_queue_deliveries WHERE consumer=$1 AND NOT acked "
            "ORDER BY namespace, topic, grp, partition",
            consumer,
        )
        for ns, topic, group, partition in holdings:
            await self._lock_position(con, ns, topic, group, partition, wait=True)
        await con.execute(
            "UPDATE prism_queue_deliveries SET attempts = greatest(attempts - CASE WHEN (partition, seq) IN "
            "(SELECT * FROM unnest($2::integer[], $3::bigint[])) THEN 0 ELSE 1 END, 0), deadline_ns = 0, consumer = '' "
            "WHERE consumer=$1 AND NOT acked",
            consumer, [p for p, _ in handed_out], [s for _, s in handed_out],
        )

    async def _commit(self, con: asyncpg.Connection, ns: str, topic: str, group: str, partition: int, offset: int) -> None:
        await self._existing_partition(con, ns, topic, partition)
        low, high = await self._bounds(con, ns, topic, partition)
        if not low <= offset <= high:
            raise offset_out_of_range(partition, offset, low, high)
        await self._set_position(con, ns, topic, group, partition, offset)
        await con.execute(f"DELETE FROM prism_queue_deliveries WHERE {GROUP} AND seq < $5", ns, topic, group, partition, offset)
        await self._advance(con, ns, topic, group, partition, offset)

    async def _seek(self, con: asyncpg.Connection, ns: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        await self._existing_partition(con, ns, topic, partition)
        committed = await self._lock_position(con, ns, topic, group, partition, wait=True)
        low, high = await self._bounds(con, ns, topic, partition)
        if isinstance(target, AtOffset):
            if not low <= target.offset <= high:
                raise offset_out_of_range(partition, target.offset, low, high)
            offset = target.offset
        elif isinstance(target, AtTime):
            # Publish times strictly increase with offsets in a partition: a bisection of the
            # offsets, one primary-key lookup per step, all in one statement (each step reads
            # the first message at or after the middle, an ordered scan every plan keeps to the
            # primary key).
            offset = await con.fetchval(
                "WITH RECURSIVE bisect (lo, hi) AS (SELECT $4::bigint, $5::bigint UNION ALL "
                "SELECT CASE WHEN coalesce(m.published_ns >= $6, true) THEN b.lo ELSE b.middle + 1 END, "
                "CASE WHEN coalesce(m.published_ns >= $6, true) THEN b.middle ELSE b.hi END "
                "FROM (SELECT lo, hi, (lo + hi) / 2 AS middle FROM bisect WHERE lo < hi) b "
                "LEFT JOIN LATERAL (SELECT published_ns FROM prism_queue_messages WHERE namespace = $1 AND topic = $2 "
                "AND partition = $3 AND seq >= b.middle ORDER BY seq LIMIT 1) m ON true) "
                "SELECT min(hi) FROM bisect",
                ns, topic, partition, low, high, target.unix_ns,
            )
        elif target is Start.EARLIEST:
            offset = low
        elif target is Start.LATEST:
            offset = high
        else:
            offset = high if committed is None else committed
        await self._set_position(con, ns, topic, group, partition, offset)
        await con.execute(f"DELETE FROM prism_queue_deliveries WHERE {GROUP}", ns, topic, group, partition)
        return offset

    # --- The contract ---------------------------------------------------------------------------

    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        entries = list(entries)
        results: list[Published | PrismError] | None = await self._publish_fast(namespace, topic, entries)
        if results is None:
            async with self._transaction() as con:
                results = await self._publish(con, namespace, topic, entries)
        self._changed(namespace, topic)
        return results

    async def _publish_fast(self, ns: str, topic: str, entries: list[Entry]) -> list[Published | PrismError] | None:
        """The common publish — a topic this adapter has seen, entries without tokens, all on
        one partition (a single entry always is) — as one statement, so one round trip; None
        when it is not that case (or the topic has gone), for the general path."""
        partitions = self._known.get((ns, topic))
        if partitions is None or not entries or any(e.idempotency_token for e in entries):
            return None
        place = _placer(partitions, self._spread)
        placed = {place(e.partition_key) for e in entries}
        if len(placed) != 1:
            return None
        (partition,) = placed
        payloads = [e.payload for e in entries]
        async with self.pool.connection() as con:
            if any(e.partition_key or e.headers for e in entries):
                first = await con.fetchrow(
                    PUBLISH_ROWS, ns, topic, partition, len(entries), time.time_ns(), payloads,
                    [e.partition_key.encode() for e in entries], [_headers_json(e.headers) for e in entries],
                )
            else:  # one array to encode, not three (asyncpg checks every element of each)
                first = await con.fetchrow(PUBLISH_PAYLOADS, ns, topic, partition, len(entries), time.time_ns(), payloads)
        if first is None:  # the topic is gone (deleted under us): the general path makes it again
            self._known.pop((ns, topic), None)
            return None
        return [Published(message_id(partition, seq), partition, seq) for seq in range(first[0], first[0] + len(entries))]

    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        async with self._transaction() as con:
            partitions = await self._ensure_topic(con, namespace, topic)
            await self._add_position(con, namespace, topic, options.group, options.start, None)
        consumer = PostgresConsumer(self, namespace, topic, options, partitions)
        self._register(consumer)
        return consumer

    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        async with self._transaction() as con:
            count = await self._settle(con, namespace, topic, group, message_ids, True)
        if count:
            self._changed(namespace, topic)
        return count

    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        async with self._transaction() as con:
            count = await self._settle(con, namespace, topic, group, message_ids, False)
        if count:
            self._changed(namespace, topic)
        return count

    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        async with self._transaction() as con:
            await self._commit(con, namespace, topic, group, partition, offset)
        self._changed(namespace, topic)

    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        async with self._transaction() as con:
            offset = await self._seek(con, namespace, topic, group, partition, target)
        self._changed(namespace, topic)
        return offset

    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        async with self.pool.connection() as con:
            rows = await con.fetch(
                "SELECT p.partition, coalesce((SELECT min(m.seq) FROM prism_queue_messages m WHERE m.namespace=$1 "
                "AND m.topic=$2 AND m.partition=p.partition), p.high), p.high, g.position "
                "FROM prism_queue_partitions p LEFT JOIN prism_queue_groups g ON g.namespace=$1 AND g.topic=$2 "
                "AND g.grp=$3 AND g.partition=p.partition WHERE p.namespace=$1 AND p.topic=$2 ORDER BY p.partition",
                namespace, topic, group,
            )
        if not rows:
            raise unknown_topic(topic)
        found = []
        for partition, low, high, committed in rows:
            if committed is None:
                found.append(PartitionInfo(partition, low, high, -1, high - low if group else 0))
            else:
                found.append(PartitionInfo(partition, low, high, committed, high - committed))
        return found


class PostgresConsumer(LeasingConsumer):
    def __init__(self, queue: PostgresQueue, namespace: str, topic: str, options: ConsumeOptions, partitions: int) -> None:
        super().__init__(options)
        self.queue, self.namespace, self.topic = queue, namespace, topic
        self.partitions = partitions  # fixed when the topic was created

    async def _claim(self) -> float | None:
        queue, options = self.queue, self.options
        if self._closed:
            return 0.0
        # What was handed out is forgotten once acknowledged: asking the database which leases
        # are still held costs a row per lease, so only when the set has outgrown the bound.
        prune = len(self._handed_out) > options.max_in_flight
        async with queue._transaction(plan_each_run=True) as con:
            claim = await queue._claim(
                con, self.namespace, self.topic, options, self.id, next(self._turn), self.partitions, prune
            )
        if claim.held is not None:
            self._handed_out &= claim.held
        ends: dict[int, float] = {}  # a deadline per partition claimed, on the monotonic clock
        for delivery, lease_end in claim.deliveries:
            self._handed_out.discard((delivery.partition, delivery.offset))  # leased again, not handed out yet
            if lease_end not in ends:
                ends[lease_end] = monotonic_of(lease_end)
            self._buffer.append(Leased(delivery, ends[lease_end]))
        if claim.dead_lettered:
            DEAD_LETTERED.labels(self.namespace).inc(claim.dead_lettered)
            queue._changed(self.namespace, options.dead_letter_topic)
        wait = queue.poll_seconds  # a missed notification costs at most this long
        if claim.wake_at is not None:
            wait = min(wait, max(0.0, (claim.wake_at - time.time_ns()) / 1e9))
        if claim.busy:
            wait = min(wait, queue.busy_retry)
        return wait

    async def _release(self, unsent: list[Leased]) -> None:
        # The database knows every lease of this consumer, unsent ones too.
        async with self.queue._transaction() as con:
            await self.queue._release(con, self.id, frozenset(self._handed_out))
        self.queue._changed(self.namespace, self.topic)  # the group's other consumers take them over

    async def _leave(self) -> None:
        self.queue._unregister(self)
