"""SQLite Queue: the embedded default, in the backend's SQLite file.

    prism_queue_topics      topic → its partition count (fixed when the topic is created)
    prism_queue_partitions  partition → high offset (the next it assigns), last publish time
    prism_queue_messages    messages by (partition, seq = offset); idempotency tokens unique per topic
    prism_queue_groups      a group's position on each partition
    prism_queue_deliveries  a group's delivered messages at or above its position: attempts,
                            lease deadline and holder, acknowledged

Every change is one transaction (``BEGIN IMMEDIATE``) on the backend's :class:`SqliteWorker`
thread, with the other changes queued while the thread was busy (group commit,
``_write_group``), and every lease, acknowledgement and position lives in the file that all
gateway worker processes share: an Acknowledge, Commit or Seek may reach any of them,
whichever serves the Subscribe stream.

Waking consumers: a change made in this process wakes its consumers of that topic at once. A
change another process made is noticed by polling ``PRAGMA data_version`` (it moves when another
connection commits) every ``poll_seconds`` (50 ms) while consumers are open — one tiny statement
per process, not a query per consumer: SQLite has no notification across processes. A consumer
waiting for a lease to run out sleeps until that deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from adapters.capabilities import Capability
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
    unavailable,
    unknown_topic,
)
from adapters.sqlite_worker import SqliteWorker
from prism.errors import PrismError

log = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS prism_queue_topics (
        namespace TEXT NOT NULL, topic TEXT NOT NULL, partitions INTEGER NOT NULL,
        PRIMARY KEY (namespace, topic)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS prism_queue_partitions (
        namespace TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        high INTEGER NOT NULL, last_ns INTEGER NOT NULL,
        PRIMARY KEY (namespace, topic, partition)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS prism_queue_messages (
        namespace TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, seq INTEGER NOT NULL,
        key TEXT NOT NULL, headers TEXT NOT NULL, payload BLOB NOT NULL, published_ns INTEGER NOT NULL,
        token TEXT, fingerprint BLOB,
        PRIMARY KEY (namespace, topic, partition, seq))""",
    """CREATE UNIQUE INDEX IF NOT EXISTS prism_queue_tokens
        ON prism_queue_messages (namespace, topic, token) WHERE token IS NOT NULL""",
    # An index by publish time cost every published message a fourth of its insert; a seek by
    # time bisects the offsets instead (publish times increase with them), so files made before
    # lose it.
    "DROP INDEX IF EXISTS prism_queue_times",
    """CREATE TABLE IF NOT EXISTS prism_queue_groups (
        namespace TEXT NOT NULL, topic TEXT NOT NULL, grp TEXT NOT NULL, partition INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (namespace, topic, grp, partition)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS prism_queue_deliveries (
        namespace TEXT NOT NULL, topic TEXT NOT NULL, grp TEXT NOT NULL, partition INTEGER NOT NULL,
        seq INTEGER NOT NULL, attempts INTEGER NOT NULL, deadline_ns INTEGER NOT NULL,
        consumer TEXT NOT NULL, acked INTEGER NOT NULL,
        PRIMARY KEY (namespace, topic, grp, partition, seq)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS prism_queue_holders ON prism_queue_deliveries (consumer) WHERE acked = 0",
)

# How far past its position a group looks for deliverable messages on a partition, per claim:
# the bound on one claim's work. Messages behind a key that is waiting (leased, or at the head
# of a long run of one key) count, so a partition's first LOOKAHEAD unacknowledged messages are
# the ones that can be delivered.
LOOKAHEAD = 1000
BIND_CHUNK = 500  # values in one statement's IN (…) list (SQLite binds at most 32,766 variables)
T = TypeVar("T")


# --- Statements, run on the worker thread inside one transaction ------------------------------


def _transaction(connection: sqlite3.Connection, job: Callable[..., T], args: tuple[Any, ...], write: bool) -> T:
    connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = job(connection, *args)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:  # never leave the shared connection inside a transaction
            connection.execute("ROLLBACK")
        raise
    return result


Job = tuple[Callable[..., Any], tuple[Any, ...]]  # a statement function and its arguments after the connection


def _write_group(c: sqlite3.Connection, jobs: list[Job]) -> list[Any]:
    """The write jobs queued while the thread was busy (publishes, claims, acknowledgements …),
    in one transaction (group commit), each answered only after the COMMIT. If that transaction
    fails — a job raised, the commit failed — each runs again in one of its own, so a failure is
    only its own job's."""
    try:
        return _transaction(c, lambda c: [job(c, *args) for job, args in jobs], (), True)
    except Exception:
        if len(jobs) == 1:
            raise
    outcomes: list[Any] = []
    for job, args in jobs:
        try:
            outcomes.append(_transaction(c, job, args, True))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _create_schema(connection: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        connection.execute(statement)


def _partition_count(c: sqlite3.Connection, ns: str, topic: str) -> int | None:
    row = c.execute("SELECT partitions FROM prism_queue_topics WHERE namespace=? AND topic=?", (ns, topic)).fetchone()
    return row[0] if row else None


def _ensure_topic(c: sqlite3.Connection, ns: str, topic: str, partitions: int) -> int:
    if (found := _partition_count(c, ns, topic)) is not None:
        return found
    c.execute("INSERT INTO prism_queue_topics (namespace, topic, partitions) VALUES (?, ?, ?)", (ns, topic, partitions))
    c.executemany(
        "INSERT INTO prism_queue_partitions (namespace, topic, partition, high, last_ns) VALUES (?, ?, ?, 0, 0)",
        [(ns, topic, p) for p in range(partitions)],
    )
    return partitions


def _existing_partition(c: sqlite3.Connection, ns: str, topic: str, partition: int) -> None:
    partitions = _partition_count(c, ns, topic)
    if partitions is None:
        raise unknown_topic(topic)
    if not 0 <= partition < partitions:
        raise no_partition(topic, partition, partitions)


def _bounds(c: sqlite3.Connection, ns: str, topic: str, partition: int) -> tuple[int, int]:
    (high,) = c.execute(
        "SELECT high FROM prism_queue_partitions WHERE namespace=? AND topic=? AND partition=?", (ns, topic, partition)
    ).fetchone()
    (low,) = c.execute(
        "SELECT min(seq) FROM prism_queue_messages WHERE namespace=? AND topic=? AND partition=?", (ns, topic, partition)
    ).fetchone()
    return (high if low is None else low), high


def _partition_for(key: str, partitions: int, spread: Iterator[int]) -> int:
    """A key's partition is fixed (CRC-32: the same in every process); no key: round robin."""
    return (zlib.crc32(key.encode()) if key else next(spread)) % partitions


def _placer(partitions: int, spread: Iterator[int]) -> Callable[[str], int]:
    """Where the entries of one publish go: a key to its fixed partition, and every entry
    without a key to one partition, the next in round robin for each publish (as Kafka's
    sticky partitioner does), so a batch takes offsets on one partition in one statement."""
    keyless: list[int] = []

    def place(key: str) -> int:
        if key:
            return zlib.crc32(key.encode()) % partitions
        if not keyless:
            keyless.append(next(spread) % partitions)
        return keyless[0]

    return place


def _headers_json(headers: Mapping[str, str]) -> str:
    return json.dumps(dict(headers)) if headers else "{}"


def _headers_of(text: str) -> dict[str, str]:
    return json.loads(text) if text != "{}" else {}


def _append(
    c: sqlite3.Connection, ns: str, topic: str, partition: int, entries: Sequence[Entry], now_ns: int
) -> list[Published]:
    """Store entries on one partition, in order: one statement takes their offsets and publish
    times (strictly increasing within a partition, so a seek by time can bisect the offsets)."""
    n = len(entries)
    first, first_ns = c.execute(
        "UPDATE prism_queue_partitions SET high = high + ?1, last_ns = max(last_ns + 1, ?2) + ?1 - 1 "
        "WHERE namespace=?3 AND topic=?4 AND partition=?5 RETURNING high - ?1, last_ns - ?1 + 1",
        (n, now_ns, ns, topic, partition),
    ).fetchone()
    c.executemany(
        "INSERT INTO prism_queue_messages (namespace, topic, partition, seq, key, headers, payload, published_ns, "
        "token, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                ns, topic, partition, first + i, entry.partition_key, _headers_json(entry.headers), entry.payload,
                first_ns + i, entry.idempotency_token or None, entry.fingerprint() if entry.idempotency_token else None,
            )
            for i, entry in enumerate(entries)
        ],
    )
    return [Published(message_id(partition, first + i), partition, first + i) for i in range(n)]


def _publish(
    c: sqlite3.Connection, ns: str, topic: str, entries: Sequence[Entry], partitions: int, spread: Iterator[int]
) -> list[Published | PrismError]:
    place = _placer(_ensure_topic(c, ns, topic, partitions), spread)
    now = time.time_ns()
    if not any(entry.idempotency_token or entry.partition_key for entry in entries):  # the common case
        return list(_append(c, ns, topic, place(""), entries, now))  # all to one partition: one statement
    return _publish_per_partition(c, ns, topic, entries, place, now)


def _publish_per_partition(
    c: sqlite3.Connection, ns: str, topic: str, entries: Sequence[Entry], place: Callable[[str], int], now: int
) -> list[Published | PrismError]:
    """``_publish`` of a batch with keys or idempotency tokens: every token looked up in one
    statement (per BIND_CHUNK), the new entries appended per partition in batch order. A token
    stored before answers with its message, or refuses an entry that differs; one that repeats
    within the batch answers as its first entry there."""
    tokens = sorted({entry.idempotency_token for entry in entries if entry.idempotency_token})
    stored: dict[str, tuple[int, int, bytes]] = {}
    for start in range(0, len(tokens), BIND_CHUNK):
        chunk = tokens[start : start + BIND_CHUNK]
        rows = c.execute(
            "SELECT token, partition, seq, fingerprint FROM prism_queue_messages WHERE namespace=? AND topic=? "
            f"AND token IN ({','.join('?' * len(chunk))})",
            (ns, topic, *chunk),
        )
        stored.update((token, (partition, seq, fingerprint)) for token, partition, seq, fingerprint in rows)
    results: list[Published | PrismError | None] = [None] * len(entries)
    first_of: dict[str, int] = {}  # token → index of its entry appended by this batch
    repeats: list[tuple[int, int]] = []  # (index, index of the batch's first entry with its token)
    appended: dict[int, list[int]] = {}  # partition → indexes, in batch order
    for i, entry in enumerate(entries):
        token = entry.idempotency_token
        if token in stored:
            partition, seq, fingerprint = stored[token]
            same = fingerprint == entry.fingerprint()
            results[i] = Published(message_id(partition, seq), partition, seq) if same else token_reused()
            continue
        if token in first_of:
            repeats.append((i, first_of[token]))
            continue
        if token:
            first_of[token] = i
        appended.setdefault(place(entry.partition_key), []).append(i)
    for partition, indexes in sorted(appended.items()):
        for i, published in zip(indexes, _append(c, ns, topic, partition, [entries[i] for i in indexes], now), strict=True):
            results[i] = published
    for i, first in repeats:
        results[i] = results[first] if entries[i].fingerprint() == entries[first].fingerprint() else token_reused()
    done = [result for result in results if result is not None]
    assert len(done) == len(entries), "every entry has its result"
    return done


def _position(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int) -> int | None:
    row = c.execute(
        "SELECT position FROM prism_queue_groups WHERE namespace=? AND topic=? AND grp=? AND partition=?",
        (ns, topic, group, partition),
    ).fetchone()
    return row[0] if row else None


def _set_position(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int, position: int) -> None:
    c.execute(
        "INSERT INTO prism_queue_groups (namespace, topic, grp, partition, position) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (namespace, topic, grp, partition) DO UPDATE SET position = excluded.position",
        (ns, topic, group, partition, position),
    )


def _ensure_position(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int, start: Start) -> int:
    position = _position(c, ns, topic, group, partition)
    if position is None:
        low, high = _bounds(c, ns, topic, partition)
        position = low if start is Start.EARLIEST else high
        _set_position(c, ns, topic, group, partition, position)
    return position


def _join(c: sqlite3.Connection, ns: str, topic: str, group: str, start: Start, partitions: int) -> None:
    for partition in range(_ensure_topic(c, ns, topic, partitions)):
        _ensure_position(c, ns, topic, group, partition, start)


ADVANCE_CHUNK = 512


def _advance(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int) -> None:
    """Move the group's position over the acknowledged messages at its head, forgetting them."""
    start = position = _position(c, ns, topic, group, partition)
    if position is None:
        return
    while True:
        acked = c.execute(
            "SELECT seq FROM prism_queue_deliveries WHERE namespace=? AND topic=? AND grp=? AND partition=? "
            "AND seq >= ? AND acked = 1 ORDER BY seq LIMIT ?",
            (ns, topic, group, partition, position, ADVANCE_CHUNK),
        ).fetchall()
        for (seq,) in acked:
            if seq != position:
                break
            position += 1
        else:
            if len(acked) == ADVANCE_CHUNK:
                continue
        break
    if position != start:
        c.execute(
            "DELETE FROM prism_queue_deliveries WHERE namespace=? AND topic=? AND grp=? AND partition=? AND seq < ?",
            (ns, topic, group, partition, position),
        )
        _set_position(c, ns, topic, group, partition, position)


@dataclass(slots=True)
class Claim:
    deliveries: list[tuple[Delivery, int]]  # with each one's lease deadline (unix ns)
    held: set[tuple[int, int]] | None  # (partition, offset) of every unacknowledged lease of the consumer before (if asked)
    wake_at: int | None  # when a lease that holds something back runs out (unix ns)
    dead_lettered: int  # messages moved to the dead-letter topic


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _claim(
    c: sqlite3.Connection,
    ns: str,
    topic: str,
    options: ConsumeOptions,
    consumer: str,
    limit: int,
    first: int,
    partitions: int,
    spread: Iterator[int],
    held: bool,
) -> Claim:
    """Lease up to ``limit`` deliverable messages to ``consumer`` (its in-flight bound allowing),
    dead-lettering those out of attempts on the way; with ``held``, also report every
    unacknowledged lease the consumer had (else only their number counts)."""
    now = time.time_ns()
    live, first_end = c.execute(
        "SELECT count(*), min(deadline_ns) FROM prism_queue_deliveries WHERE consumer=? AND acked=0 AND deadline_ns > ?",
        (consumer, now),
    ).fetchone()
    claim = Claim([], None, first_end, 0)
    if held:
        claim.held = {
            (p, s)
            for p, s in c.execute("SELECT partition, seq FROM prism_queue_deliveries WHERE consumer=? AND acked=0", (consumer,))
        }
    room = min(limit, options.max_in_flight - live)
    count = _partition_count(c, ns, topic) or 0
    deadline = now + int(options.ack_deadline * 1e9)
    for i in range(count):
        if room <= 0:
            break
        partition = (first + i) % count
        taken, wake_at, dead = _claim_partition(c, ns, topic, options, consumer, partition, room, now, deadline, partitions, spread)
        claim.deliveries += taken
        claim.wake_at = _earliest(claim.wake_at, wake_at)
        claim.dead_lettered += dead
        room -= len(taken)
    return claim


def _claim_partition(
    c: sqlite3.Connection,
    ns: str,
    topic: str,
    options: ConsumeOptions,
    consumer: str,
    partition: int,
    room: int,
    now: int,
    deadline: int,
    partitions: int,
    spread: Iterator[int],
) -> tuple[list[tuple[Delivery, int]], int | None, int]:
    group = options.group
    position = _ensure_position(c, ns, topic, group, partition, options.start)
    # Stepped, not fetched whole: the rows past those ``room`` asks for are never read.
    rows = c.execute(
        "SELECT m.seq, m.key, d.attempts, d.deadline_ns FROM prism_queue_messages m "
        "LEFT JOIN prism_queue_deliveries d ON d.namespace = m.namespace AND d.topic = m.topic AND d.grp = ? "
        "AND d.partition = m.partition AND d.seq = m.seq "
        "WHERE m.namespace = ? AND m.topic = ? AND m.partition = ? AND m.seq >= ? AND (d.acked IS NULL OR d.acked = 0) "
        "ORDER BY m.seq LIMIT ?",
        (group, ns, topic, partition, position, LOOKAHEAD),
    )
    waiting: set[str] = set()  # keys with an earlier message leased or about to be
    chosen: list[tuple[int, int]] = []  # (seq, attempt)
    dead: list[tuple[int, int]] = []  # (seq, attempts so far)
    wake_at: int | None = None
    for seq, key, attempts, lease_end in rows:
        if attempts is not None and lease_end > now:
            wake_at = _earliest(wake_at, lease_end)
            if key:
                waiting.add(key)
            continue
        if key and key in waiting:
            continue
        attempts = attempts or 0
        if options.max_delivery_attempts and attempts >= options.max_delivery_attempts:
            dead.append((seq, attempts))  # done for the group: the key's next message may follow
            continue
        if key:
            waiting.add(key)
        chosen.append((seq, attempts + 1))
        if len(chosen) >= room:
            break
    rows.close()
    for seq, attempts in dead:
        _dead_letter(c, ns, topic, options, partition, seq, attempts, now, partitions, spread)
    c.executemany(
        "INSERT INTO prism_queue_deliveries (namespace, topic, grp, partition, seq, attempts, deadline_ns, consumer, acked) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (namespace, topic, grp, partition, seq) DO UPDATE SET "
        "attempts = excluded.attempts, deadline_ns = excluded.deadline_ns, consumer = excluded.consumer, acked = 0",
        [(ns, topic, group, partition, seq, attempt, deadline, consumer) for seq, attempt in chosen],
    )
    if dead:
        _advance(c, ns, topic, group, partition)
    if not chosen:
        return [], wake_at, len(dead)
    attempt_of = dict(chosen)
    marks = ",".join("?" * len(chosen))
    found = c.execute(
        f"SELECT seq, key, headers, payload, published_ns FROM prism_queue_messages "
        f"WHERE namespace=? AND topic=? AND partition=? AND seq IN ({marks}) ORDER BY seq",
        (ns, topic, partition, *attempt_of),
    ).fetchall()
    taken = [
        (
            Delivery(message_id(partition, seq), topic, partition, seq, payload, key, _headers_of(headers), attempt_of[seq], published),
            deadline,
        )
        for seq, key, headers, payload, published in found
    ]
    return taken, wake_at, len(dead)


def _dead_letter(
    c: sqlite3.Connection,
    ns: str,
    topic: str,
    options: ConsumeOptions,
    partition: int,
    seq: int,
    attempts: int,
    now: int,
    partitions: int,
    spread: Iterator[int],
) -> None:
    key, headers, payload = c.execute(
        "SELECT key, headers, payload FROM prism_queue_messages WHERE namespace=? AND topic=? AND partition=? AND seq=?",
        (ns, topic, partition, seq),
    ).fetchone()
    reason = f"not acknowledged after {attempts} deliveries (max_delivery_attempts {options.max_delivery_attempts})"
    values = (reason, topic, options.group, message_id(partition, seq), str(partition), str(seq), str(attempts))
    copy = Entry(payload, key, {**json.loads(headers), **dict(zip(DEAD_LETTER_HEADERS, values, strict=True))})
    target = options.dead_letter_topic
    _append(c, ns, target, _partition_for(key, _ensure_topic(c, ns, target, partitions), spread), [copy], now)
    c.execute(
        "INSERT INTO prism_queue_deliveries (namespace, topic, grp, partition, seq, attempts, deadline_ns, consumer, acked) "
        "VALUES (?, ?, ?, ?, ?, ?, 0, '', 1) ON CONFLICT (namespace, topic, grp, partition, seq) DO UPDATE SET acked = 1",
        (ns, topic, options.group, partition, seq, attempts),
    )



def _settle(c: sqlite3.Connection, ns: str, topic: str, group: str, ids: Sequence[str], acknowledge: bool) -> int:
    """Acknowledge (or end the leases of) delivered, unacknowledged messages; how many. One
    statement per partition, not one per id."""
    change = "acked = 1" if acknowledge else "deadline_ns = 0, consumer = ''"
    by_partition: dict[int, set[int]] = {}
    for parsed in map(parse_message_id, ids):
        if parsed is not None:
            by_partition.setdefault(parsed[0], set()).add(parsed[1])
    count = 0
    for partition, offsets in sorted(by_partition.items()):
        ordered, settled = sorted(offsets), set()
        for start in range(0, len(ordered), BIND_CHUNK):
            chunk = ordered[start : start + BIND_CHUNK]
            settled.update(
                seq
                for (seq,) in c.execute(
                    f"UPDATE prism_queue_deliveries SET {change} WHERE namespace=? AND topic=? AND grp=? "
                    f"AND partition=? AND acked = 0 AND seq IN ({','.join('?' * len(chunk))}) RETURNING seq",
                    (ns, topic, group, partition, *chunk),
                )
            )
        count += len(settled)
        # The position moves only when its own message is acknowledged (the head is never
        # left acknowledged: every change that acknowledges one advances).
        if acknowledge and settled and _position(c, ns, topic, group, partition) in settled:
            _advance(c, ns, topic, group, partition)
    return count


def _release(c: sqlite3.Connection, consumer: str, handed_out: frozenset[tuple[int, int]]) -> None:
    """A closing consumer's leases end now. Those it never handed out do not count as attempts."""
    held = c.execute(
        "SELECT namespace, topic, grp, partition, seq FROM prism_queue_deliveries WHERE consumer=? AND acked=0",
        (consumer,),
    ).fetchall()
    for ns, topic, group, partition, seq in held:
        undo = 0 if (partition, seq) in handed_out else 1
        c.execute(
            "UPDATE prism_queue_deliveries SET attempts = max(attempts - ?, 0), deadline_ns = 0, consumer = '' "
            "WHERE namespace=? AND topic=? AND grp=? AND partition=? AND seq=?",
            (undo, ns, topic, group, partition, seq),
        )


def _commit(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int, offset: int) -> None:
    _existing_partition(c, ns, topic, partition)
    low, high = _bounds(c, ns, topic, partition)
    if not low <= offset <= high:
        raise offset_out_of_range(partition, offset, low, high)
    _set_position(c, ns, topic, group, partition, offset)
    c.execute(
        "DELETE FROM prism_queue_deliveries WHERE namespace=? AND topic=? AND grp=? AND partition=? AND seq < ?",
        (ns, topic, group, partition, offset),
    )
    _advance(c, ns, topic, group, partition)


def _seek(c: sqlite3.Connection, ns: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
    _existing_partition(c, ns, topic, partition)
    low, high = _bounds(c, ns, topic, partition)
    if isinstance(target, AtOffset):
        if not low <= target.offset <= high:
            raise offset_out_of_range(partition, target.offset, low, high)
        offset = target.offset
    elif isinstance(target, AtTime):
        offset = _first_at(c, ns, topic, partition, target.unix_ns, low, high)
    elif target is Start.EARLIEST:
        offset = low
    elif target is Start.LATEST:
        offset = high
    else:
        committed = _position(c, ns, topic, group, partition)
        offset = high if committed is None else committed
    _set_position(c, ns, topic, group, partition, offset)
    c.execute(
        "DELETE FROM prism_queue_deliveries WHERE namespace=? AND topic=? AND grp=? AND partition=?",
        (ns, topic, group, partition),
    )
    return offset


def _first_at(c: sqlite3.Connection, ns: str, topic: str, partition: int, unix_ns: int, low: int, high: int) -> int:
    """The offset of the first message published at or after ``unix_ns`` (``high`` if none):
    publish times strictly increase with offsets in a partition, so a bisection of the offsets,
    one primary-key lookup per step."""
    while low < high:
        middle = (low + high) // 2
        row = c.execute(
            "SELECT published_ns FROM prism_queue_messages WHERE namespace=? AND topic=? AND partition=? AND seq >= ? "
            "ORDER BY seq LIMIT 1",
            (ns, topic, partition, middle),
        ).fetchone()
        if row is None or row[0] >= unix_ns:
            high = middle
        else:
            low = middle + 1
    return high


def _topic_info(c: sqlite3.Connection, ns: str, topic: str, group: str) -> list[PartitionInfo]:
    partitions = _partition_count(c, ns, topic)
    if partitions is None:
        raise unknown_topic(topic)
    found = []
    for partition in range(partitions):
        low, high = _bounds(c, ns, topic, partition)
        committed = _position(c, ns, topic, group, partition) if group else None
        if committed is None:
            found.append(PartitionInfo(partition, low, high, -1, high - low if group else 0))
        else:
            found.append(PartitionInfo(partition, low, high, committed, high - committed))
    return found


def _data_version(c: sqlite3.Connection) -> int:
    return c.execute("PRAGMA data_version").fetchone()[0]


# --- The adapter --------------------------------------------------------------------------------


class SqliteQueue(QueueAdapter):
    capabilities = frozenset(
        {
            Capability.DURABLE,
            Capability.SHARED,
            Capability.SEEK_TIMESTAMP,
            Capability.DEAD_LETTER,
            Capability.IDEMPOTENT_PUBLISH,
        }
    )

    def __init__(self, worker: SqliteWorker, *, partitions: int = 4, poll_seconds: float = 0.05) -> None:
        self.worker = worker  # the backend's connection, shared with its other patterns
        self.partitions = partitions  # of each topic this adapter creates
        self.poll_seconds = poll_seconds
        self._spread = itertools.count()  # round robin over partitions for messages without a key
        self._consumers: dict[tuple[str, str], set[SqliteConsumer]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._run(_create_schema)

    async def close(self) -> None:
        for consumer in [c for group in self._consumers.values() for c in group]:
            await consumer.close()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def _run(self, job: Callable[..., T], *args: Any, write: bool = True) -> T:
        """``job(connection, *args)`` in a transaction on the worker thread: a write job with
        the others queued meanwhile (``_write_group``), a read in one of its own. The file being
        locked, full or unreadable is UNAVAILABLE; any other driver error is a bug here."""
        try:
            if write:
                return await self.worker.run_grouped(_write_group, (job, args))
            return await self.worker.run(lambda connection: _transaction(connection, job, args, False))
        except sqlite3.OperationalError as exc:
            raise unavailable("sqlite", exc) from exc

    # Consumers of this process, woken by changes made here or (through the poller) elsewhere.

    def _wake(self, namespace: str, topic: str) -> None:
        for consumer in self._consumers.get((namespace, topic), ()):
            consumer.wake()

    def _register(self, consumer: SqliteConsumer) -> None:
        self._consumers.setdefault((consumer.namespace, consumer.topic), set()).add(consumer)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="sqlite-queue-poller")

    def _unregister(self, consumer: SqliteConsumer) -> None:
        key = (consumer.namespace, consumer.topic)
        members = self._consumers.get(key, set())
        members.discard(consumer)
        if not members:
            self._consumers.pop(key, None)

    async def _poll(self) -> None:
        """While consumers are open: wake them all when another process committed a change."""
        version = None
        while self._consumers:
            try:
                current = await self.worker.run(_data_version)
            except sqlite3.Error as exc:  # the next round tries again; claims report the outage
                log.warning("sqlite queue: cannot poll for changes: %s", exc)
                current = version
            if current != version:  # the first round too: a change may predate it
                for members in list(self._consumers.values()):
                    for consumer in members:
                        consumer.wake()
            version = current
            await asyncio.sleep(self.poll_seconds)

    # The contract.

    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        results = await self._run(_publish, namespace, topic, list(entries), self.partitions, self._spread)
        self._wake(namespace, topic)
        return results

    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        await self._run(_join, namespace, topic, options.group, options.start, self.partitions)
        consumer = SqliteConsumer(self, namespace, topic, options)
        self._register(consumer)
        return consumer

    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        count = await self._run(_settle, namespace, topic, group, list(message_ids), True)
        if count:  # frees in-flight room, and the next message of each key
            self._wake(namespace, topic)
        return count

    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        count = await self._run(_settle, namespace, topic, group, list(message_ids), False)
        if count:
            self._wake(namespace, topic)
        return count

    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        await self._run(_commit, namespace, topic, group, partition, offset)
        self._wake(namespace, topic)

    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        offset = await self._run(_seek, namespace, topic, group, partition, target)
        self._wake(namespace, topic)
        return offset

    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        return await self._run(_topic_info, namespace, topic, group, write=False)


class SqliteConsumer(LeasingConsumer):
    def __init__(self, queue: SqliteQueue, namespace: str, topic: str, options: ConsumeOptions) -> None:
        super().__init__(options)
        self.queue, self.namespace, self.topic = queue, namespace, topic

    async def _claim(self) -> float | None:
        if self._closed:
            return None
        queue, options = self.queue, self.options
        # What was handed out is forgotten once acknowledged: asking the file which leases are
        # still held costs a row per lease, so only when the set has outgrown the bound.
        prune = len(self._handed_out) > options.max_in_flight
        claim = await queue._run(
            _claim, self.namespace, self.topic, options, self.id, options.max_in_flight,
            next(self._turn), queue.partitions, queue._spread, prune,
        )
        if claim.held is not None:
            self._handed_out &= claim.held
        if claim.deliveries:
            lease_end = monotonic_of(claim.deliveries[0][1])  # one deadline for the whole claim
            for delivery, _ in claim.deliveries:
                self._handed_out.discard((delivery.partition, delivery.offset))  # leased again, not handed out yet
                self._buffer.append(Leased(delivery, lease_end))
        if claim.dead_lettered:
            DEAD_LETTERED.labels(self.namespace).inc(claim.dead_lettered)
            queue._wake(self.namespace, options.dead_letter_topic)
        return None if claim.wake_at is None else max(0.0, (claim.wake_at - time.time_ns()) / 1e9)

    async def _release(self, unsent: list[Leased]) -> None:
        # The file knows every lease of this consumer, unsent ones too.
        await self.queue._run(_release, self.id, frozenset(self._handed_out))
        self.queue._wake(self.namespace, self.topic)  # the group's other consumers take them over

    async def _leave(self) -> None:
        self.queue._unregister(self)
