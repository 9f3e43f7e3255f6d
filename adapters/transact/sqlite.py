"""SQLite Transact: the data tables and the mailbox in the backend's SQLite file.

    prism_transact_heads    (namespace, mailbox) → the next sequence it hands out
    prism_transact_mailbox  mailbox rows by (namespace, mailbox, sequence), with the listener's
                            columns (delivered_ns, lease holder and deadline, attempts, refusals,
                            dead_ns and last_error: dead letters)
    prism_transact_keys     Write idempotency keys: fingerprint and the first result, until expiry
    prism_transact_cursors  the listener's, per mailbox: delivered up to, lease holder and deadline

A **Write** runs in one job on the backend's :class:`SqliteWorker` thread, ``BEGIN IMMEDIATE``
to ``COMMIT``, so the whole transaction runs without yielding the thread and nobody else's
statement lands inside it. The Writes queued while the thread is busy go together in one job
(group commit, formed on the thread: :meth:`SqliteWorker.run_grouped`): one transaction, and
every Write is answered only after the COMMIT. When one of them fails, the transaction is
rolled back and run again with each Write in a savepoint of its own — the one that fails is
rolled back to its savepoint alone, the others commit (savepoints only then: they cost two
statements a Write). SQLite has one writer at
a time (across every process on the file), so this is the order they would have run in anyway,
without a BEGIN and a COMMIT (and the write lock taken and given back) per Write. While another
connection holds the write lock, a Write does not park the shared thread (every other pattern's
statements queue behind it): its job waits ``LOCK_WAIT`` at most (``busy_timeout``, then
restored) and gives up, and the Writes try again from the event loop, until their deadlines.
Each Write's deadline is checked again after its statements, before its savepoint is kept, so a
Write that answers DEADLINE_EXCEEDED has written nothing.

An **interactive transaction** stays open across awaits, so it cannot run on the shared worker
(every other caller's statement would join it). Each one gets a connection of its own: a worker
thread on the same file, reused from a small idle set. Its ``BEGIN IMMEDIATE`` comes with its
first write; from then on it holds the file's write lock until it ends, so every other writer
waits for it — keep these short; the namespace's timeout bounds them, and at most
``max_transactions`` are open at once. Its own wait for the lock ends at its deadline, or after
``BUSY_CAP`` (UNAVAILABLE), whichever comes first: a thread blocked in SQLite's busy handler
cannot be interrupted. A step the caller stops waiting for (timeout, cancel) is
interrupted (``sqlite3.Connection.interrupt``) before the rollback runs behind it on that thread.

**The listener's side.** A claim first looks without a lock (most wake-ups find nothing to
take), then leases under ``BEGIN IMMEDIATE`` — the file's one writer at a time is what keeps two
claims, in any processes, from taking the same mailbox. Marks that arrive together (a claim's
mailboxes are delivered concurrently) share one write transaction. Claims and marks wait
``LOCK_WAIT`` at most for the write lock, as Writes do. Wake-ups: a commit through this adapter wakes its watchers
at once; another connection's (another process, or a transaction's own connection) is noticed by
``PRAGMA data_version``, which moves when another connection commits to the file, read every
``poll_seconds`` (50 ms) while someone watches: SQLite has no notification across processes.
Delivered rows are deleted in batches (``delete_delivered``), each its own short write
transaction that waits ``LOCK_WAIT`` at most for the lock, so writers get the file between them.

**Upgrades.** The tables are created if missing; the columns and indexes added since the first
release (``ADDED_COLUMNS``, ``ADDED_INDEXES``) are added to a file an older gateway made, under
the write lock, so processes starting together take turns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from adapters.capabilities import Capability
from adapters.sqlite_worker import SqliteWorker
from adapters.transact.base import (
    KEY_WINDOW_SECONDS,
    Changes,
    Claim,
    Claimed,
    DataWrite,
    Failure,
    Isolation,
    MailboxRow,
    MailboxWrite,
    Operation,
    Routes,
    Table,
    TransactAdapter,
    Transaction,
    Value,
    Watchers,
    WriteResult,
    check_mailbox,
    check_row,
    conflict,
    headers_of,
    headers_text,
    key_reused,
    no_row,
    quoted,
    row_exists,
    schema_mismatch,
    timed_out,
    too_many,
    unavailable,
)
from prism.errors import PrismError, internal, invalid_argument

log = logging.getLogger("prism.adapters.transact")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS prism_transact_heads (
        namespace TEXT NOT NULL, mailbox TEXT NOT NULL, next INTEGER NOT NULL,
        PRIMARY KEY (namespace, mailbox)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS prism_transact_mailbox (
        namespace TEXT NOT NULL, mailbox TEXT NOT NULL, seq INTEGER NOT NULL,
        payload BLOB NOT NULL, headers TEXT NOT NULL, destination TEXT NOT NULL, committed_ns INTEGER NOT NULL,
        delivered_ns INTEGER, lease_holder TEXT, lease_until_ns INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, mailbox, seq))""",
    """CREATE INDEX IF NOT EXISTS prism_transact_pending
        ON prism_transact_mailbox (namespace, mailbox, seq) WHERE delivered_ns IS NULL""",
    """CREATE TABLE IF NOT EXISTS prism_transact_keys (
        namespace TEXT NOT NULL, key TEXT NOT NULL, fingerprint BLOB NOT NULL,
        seq INTEGER, committed_ns INTEGER, expires_ns INTEGER NOT NULL,
        PRIMARY KEY (namespace, key)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS prism_transact_keys_expiry ON prism_transact_keys (expires_ns)",
    # The listener's state per mailbox, apart from the heads so it never waits for a writer.
    """CREATE TABLE IF NOT EXISTS prism_transact_cursors (
        namespace TEXT NOT NULL, mailbox TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0, holder TEXT, lease_until_ns INTEGER NOT NULL DEFAULT 0,
        epoch TEXT NOT NULL DEFAULT (lower(hex(randomblob(16)))),
        PRIMARY KEY (namespace, mailbox)) WITHOUT ROWID""",
)

# Added since the first release; never edit an entry: append. A file without them gains them.
ADDED_COLUMNS = (
    ("refusals", "INTEGER NOT NULL DEFAULT 0"),  # times the destination refused the row
    ("dead_ns", "INTEGER"),  # dead-lettered then (unix ns): never claimed again
    ("last_error", "TEXT"),  # why its last delivery failed
)
ADDED_INDEXES = (
    # Retention: a namespace's delivered rows, oldest first.
    """CREATE INDEX IF NOT EXISTS prism_transact_delivered
        ON prism_transact_mailbox (namespace, delivered_ns) WHERE delivered_ns IS NOT NULL""",
)

PURGE_EVERY = 1000  # keyed Writes between two sweeps of expired keys
PURGE_BATCH = 1000  # expired keys deleted per sweep
IDLE_CONNECTIONS = 2  # transaction connections kept for reuse
LOCK_WAIT = 0.05  # seconds a Write's job waits for the write lock before handing the thread back
BUSY_CAP = 5.0  # seconds a transaction's connection waits for the write lock at most
MARK_PATIENCE = 5.0  # seconds a mark waits for the write lock, in LOCK_WAIT turns (then the lease runs out)
T = TypeVar("T")


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY / SQLITE_LOCKED): worth another try."""
    return "locked" in str(exc) or "busy" in str(exc)


class _Expired(Exception):
    """The Write's deadline passed on the worker thread: it rolled back."""


# --- Statements -----------------------------------------------------------------------------------


def _bound(value: Value) -> Any:
    """A JSON value as SQLite stores it: nested objects and lists as JSON text, booleans as 0/1."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, bool):
        return int(value)
    return value


def data_statement(write: DataWrite) -> tuple[str, list[Any]]:
    """The SQL (declared names, quoted) and its bound values for one data write."""
    sql, order = _shape(write.table, write.operation, tuple(write.table.ordered(write.row)))
    row = write.row
    return sql, [_bound(row[n]) for n in order]


_SHAPES: dict[tuple[Table, Operation, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}
SHAPES_KEPT = 1000  # data statement texts remembered (then forgotten all at once)


def _shape(table: Table, operation: Operation, names: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The SQL of a data write of these columns, and the order its values bind in: written once
    per shape (table, operation, columns), remembered."""
    if (found := _SHAPES.get((table, operation, names))) is not None:
        return found
    t = quoted(table.name)
    if operation in (Operation.INSERT, Operation.UPSERT):
        sql = f"INSERT INTO {t} ({', '.join(map(quoted, names))}) VALUES ({', '.join('?' for _ in names)})"
        if operation is Operation.UPSERT:
            sets = [n for n in names if n not in table.key] or [table.key[0]]
            sql += f" ON CONFLICT ({', '.join(map(quoted, table.key))}) DO UPDATE SET "
            sql += ", ".join(f"{quoted(n)} = excluded.{quoted(n)}" for n in sets)
        found = sql, names
    else:
        where = " AND ".join(f"{quoted(k)} = ?" for k in table.key)
        if operation is Operation.UPDATE:
            sets = tuple(n for n in names if n not in table.key)
            found = f"UPDATE {t} SET {', '.join(f'{quoted(n)} = ?' for n in sets)} WHERE {where}", sets + table.key
        else:
            found = f"DELETE FROM {t} WHERE {where}", table.key
    if len(_SHAPES) >= SHAPES_KEPT:
        _SHAPES.clear()
    _SHAPES[(table, operation, names)] = found
    return found


def _create_schema(c: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        c.execute(statement)
    if _missing_columns(c):  # a file an older gateway made: upgraded once, whoever comes first
        c.execute("BEGIN IMMEDIATE")
        try:
            for name, kind in _missing_columns(c):
                c.execute(f"ALTER TABLE prism_transact_mailbox ADD COLUMN {name} {kind}")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
    for statement in ADDED_INDEXES:
        c.execute(statement)


def _missing_columns(c: sqlite3.Connection) -> list[tuple[str, str]]:
    have = {row[0] for row in c.execute("SELECT name FROM pragma_table_info('prism_transact_mailbox')")}
    return [(name, kind) for name, kind in ADDED_COLUMNS if name not in have]


def _describe(c: sqlite3.Connection, table: Table) -> None:
    """The declaration against the real table (created first with ``create``)."""
    found = c.execute("SELECT name, pk FROM pragma_table_info(?)", (table.name,)).fetchall()
    if not found and table.create:  # only when missing: a CREATE takes the write lock
        columns = ", ".join(quoted(n) for n in table.columns)
        c.execute(f"CREATE TABLE IF NOT EXISTS {quoted(table.name)} ({columns}, PRIMARY KEY ({', '.join(map(quoted, table.key))}))")
        found = c.execute("SELECT name, pk FROM pragma_table_info(?)", (table.name,)).fetchall()
    if not found:
        raise schema_mismatch(table, "no such table (create it, or declare it with create: true)")
    real = {name for name, _ in found}
    if missing := [n for n in table.columns if n not in real]:
        raise schema_mismatch(table, f"declared column {missing[0]!r} is not in the table")
    uniques = [{name for name, pk in found if pk}]
    for index, unique, partial in c.execute('SELECT name, "unique", partial FROM pragma_index_list(?)', (table.name,)):
        if unique and not partial:
            uniques.append({r[0] for r in c.execute("SELECT name FROM pragma_index_info(?)", (index,))})
    if set(table.key) not in uniques:
        raise schema_mismatch(table, f"no primary key or unique index on exactly its key ({', '.join(table.key)})")


def _next_sequence(c: sqlite3.Connection, ns: str, mailbox: str) -> int:
    return c.execute(
        "INSERT INTO prism_transact_heads (namespace, mailbox, next) VALUES (?, ?, 2) "
        "ON CONFLICT (namespace, mailbox) DO UPDATE SET next = next + 1 RETURNING next - 1",
        (ns, mailbox),
    ).fetchone()[0]


def _append(c: sqlite3.Connection, ns: str, write: MailboxWrite, committed_ns: int) -> int:
    seq = _next_sequence(c, ns, write.mailbox)
    c.execute(
        "INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, committed_ns) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (ns, write.mailbox, seq, write.payload, headers_text(write.headers), write.destination, committed_ns),
    )
    return seq


def _apply(c: sqlite3.Connection, write: DataWrite) -> int:
    sql, values = data_statement(write)
    return c.execute(sql, values).rowcount


@dataclass(slots=True)
class _Write:
    """Everything a Write job needs on the worker thread."""

    namespace: str
    data: DataWrite
    mailbox: MailboxWrite
    key: str
    fingerprint: bytes
    deadline: float  # time.monotonic()
    window_ns: int
    purge: bool


Outcome = tuple[int, int, bool] | BaseException  # (sequence, committed_ns, replayed), or what that Write raises


def _write_batch(c: sqlite3.Connection, writes: list[_Write]) -> list[Outcome]:
    """The Writes queued meanwhile, in one transaction (group commit); each is answered only
    after the COMMIT. First without savepoints: when none fails — nearly always — that is all.
    When one fails — refused, NOT_FOUND, past its deadline — the transaction is rolled back and
    run again with each Write in a savepoint of its own, so the failing one is rolled back alone
    and the others commit. A failure that ends the whole transaction (the write lock not granted
    within ``LOCK_WAIT``, a full disk) is every remaining Write's, and none of them wrote anything."""
    outcomes: list[Outcome | None] = [None] * len(writes)
    now = time.monotonic()
    live = []
    for i, w in enumerate(writes):
        if w.deadline <= now:
            outcomes[i] = _Expired()
        else:
            live.append(i)
    if not live:
        return outcomes  # type: ignore[return-value]
    left_ms = int((min(writes[i].deadline for i in live) - now) * 1000)
    (busy,) = c.execute("PRAGMA busy_timeout").fetchone()
    c.execute(f"PRAGMA busy_timeout = {max(1, min(left_ms, int(LOCK_WAIT * 1000))):d}")  # an int, never a client's
    try:
        if not _group(c, writes, live, outcomes, savepoints=False):
            _group(c, writes, live, outcomes, savepoints=True)
    finally:
        c.execute(f"PRAGMA busy_timeout = {int(busy):d}")
    return outcomes  # type: ignore[return-value]


def _group(c: sqlite3.Connection, writes: list[_Write], live: list[int], outcomes: list[Outcome | None], *, savepoints: bool) -> bool:
    """The ``live`` Writes in one transaction, their outcomes set. Without savepoints, a Write
    that fails rolls the whole transaction back: False (run them again with savepoints) — unless
    it was the only one, whose failure it is."""
    c.execute("BEGIN IMMEDIATE")
    try:
        for i in live:
            w = writes[i]
            if savepoints:
                c.execute("SAVEPOINT w")
            try:
                result = _write_body(c, w)
                if not result[2] and time.monotonic() > w.deadline:
                    raise _Expired
            except BaseException as exc:
                if not c.in_transaction:  # the statement ended the transaction: nothing stays
                    raise
                if savepoints:
                    c.execute("ROLLBACK TO w")
                    c.execute("RELEASE w")
                    outcomes[i] = exc
                    continue
                c.execute("ROLLBACK")
                if len(live) > 1:
                    return False
                outcomes[i] = exc
                return True
            if savepoints:
                c.execute("RELEASE w")  # a replay wrote nothing: releasing it keeps nothing
            outcomes[i] = result
        c.execute("COMMIT")
    except BaseException as exc:
        if c.in_transaction:  # never leave the shared connection inside a transaction
            c.execute("ROLLBACK")
        for i in live:
            if outcomes[i] is None or not isinstance(outcomes[i], BaseException):
                outcomes[i] = exc
    return True


def _write_body(c: sqlite3.Connection, w: _Write) -> tuple[int, int, bool]:
    now = time.time_ns()
    if w.key:
        # The claim comes first: a concurrent retry waits for the write lock, then finds it.
        claimed = c.execute(
            "INSERT INTO prism_transact_keys (namespace, key, fingerprint, seq, committed_ns, expires_ns) "
            "VALUES (?, ?, ?, NULL, NULL, ?) ON CONFLICT (namespace, key) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, seq = NULL, committed_ns = NULL, expires_ns = excluded.expires_ns "
            "WHERE prism_transact_keys.expires_ns < ? RETURNING 1",
            (w.namespace, w.key, w.fingerprint, now + w.window_ns, now),
        ).fetchone()
        if claimed is None:
            fingerprint, seq, committed_ns = c.execute(
                "SELECT fingerprint, seq, committed_ns FROM prism_transact_keys WHERE namespace=? AND key=?",
                (w.namespace, w.key),
            ).fetchone()
            if fingerprint != w.fingerprint:
                raise key_reused()
            if seq is None:  # never committed without its result; a guard, not a state
                raise conflict("an earlier write with this idempotency key is unfinished")
            return seq, committed_ns, True
        if w.purge:
            c.execute(
                "DELETE FROM prism_transact_keys WHERE (namespace, key) IN "
                "(SELECT namespace, key FROM prism_transact_keys WHERE expires_ns < ? LIMIT ?)",
                (now, PURGE_BATCH),
            )
    if _apply(c, w.data) == 0 and w.data.operation in (Operation.UPDATE, Operation.DELETE):
        raise no_row(w.data.table, w.data.row)
    seq = _append(c, w.namespace, w.mailbox, now)
    if w.key:
        c.execute(
            "UPDATE prism_transact_keys SET seq=?, committed_ns=? WHERE namespace=? AND key=?",
            (seq, now, w.namespace, w.key),
        )
    return seq, now, False


def _mailbox_rows(c: sqlite3.Connection, ns: str, mailbox: str, after: int, limit: int) -> list[MailboxRow]:
    rows = c.execute(
        "SELECT seq, payload, headers, destination, committed_ns, delivered_ns, attempts, refusals, dead_ns, "
        "coalesce(last_error, '') FROM prism_transact_mailbox WHERE namespace=? AND mailbox=? AND seq > ? ORDER BY seq LIMIT ?",
        (ns, mailbox, after, limit),
    ).fetchall()
    return [MailboxRow(mailbox, s, p, headers_of(h), *rest) for s, p, h, *rest in rows]


# --- The listener's side --------------------------------------------------------------------------

# A mailbox the claim's routes name: bound to JSON lists of namespaces and of [namespace, mailbox].
ROUTED = (
    "(h.namespace IN (SELECT value FROM json_each(?)) OR (h.namespace, h.mailbox) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)))"
)
# Mailboxes with undelivered rows (the head is past what was delivered) and no live lease, least
# recently leased first. A mailbox the listener has not seen yet has no cursor row.
PICK = (
    "SELECT h.namespace, h.mailbox, h.next - 1, c.epoch FROM prism_transact_heads h "
    "LEFT JOIN prism_transact_cursors c ON c.namespace = h.namespace AND c.mailbox = h.mailbox "
    f"WHERE h.next - 1 > coalesce(c.delivered, 0) AND (c.holder IS NULL OR c.lease_until_ns <= ?) AND {ROUTED} "
    "ORDER BY coalesce(c.lease_until_ns, 0), h.namespace, h.mailbox LIMIT ?"
)
NEXT_LEASE_END = (
    "SELECT min(c.lease_until_ns) FROM prism_transact_heads h JOIN prism_transact_cursors c "
    "ON c.namespace = h.namespace AND c.mailbox = h.mailbox "
    f"WHERE h.next - 1 > c.delivered AND c.holder IS NOT NULL AND c.lease_until_ns > ? AND {ROUTED}"
)
# A mailbox's lowest undelivered rows: at most ? rows, and within ? bytes of payload (the first
# row of a claim whatever its size: the last parameter), leased and counted.
TAKE = (
    "WITH first AS (SELECT seq, length(payload) AS size FROM prism_transact_mailbox "
    "WHERE namespace = ? AND mailbox = ? AND delivered_ns IS NULL AND dead_ns IS NULL ORDER BY seq LIMIT ?), "
    "picked AS (SELECT seq FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS n, "
    "sum(size) OVER (ORDER BY seq) AS total FROM first) WHERE total <= ? OR (? AND n = 1)) "
    "UPDATE prism_transact_mailbox SET lease_holder = ?, lease_until_ns = ?, attempts = attempts + 1 "
    "WHERE namespace = ? AND mailbox = ? AND seq IN (SELECT seq FROM picked) "
    "RETURNING seq, payload, headers, destination, committed_ns, attempts, refusals"
)
PENDING = (
    "SELECT 1 FROM prism_transact_mailbox WHERE namespace = ? AND mailbox = ? "
    "AND delivered_ns IS NULL AND dead_ns IS NULL LIMIT 1"
)
# Retention: a namespace's rows delivered before ?, oldest first, at most ? of them (a range of
# prism_transact_delivered, so a batch reads no more rows than it deletes).
DELETE_DELIVERED = (
    "DELETE FROM prism_transact_mailbox WHERE rowid IN (SELECT rowid FROM prism_transact_mailbox "
    "WHERE namespace = ? AND delivered_ns < ? ORDER BY delivered_ns LIMIT ?)"
)


class _Busy(Exception):
    """Another connection held the file's write lock for longer than ``LOCK_WAIT``."""


def _with_write_lock(c: sqlite3.Connection, job: Callable[[sqlite3.Connection], T]) -> T:
    """``job`` in a write transaction, waiting ``LOCK_WAIT`` at most for the lock (_Busy), so a
    listener never parks the shared thread behind another process's transaction."""
    (busy,) = c.execute("PRAGMA busy_timeout").fetchone()
    c.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT * 1000):d}")
    try:
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise _Busy from exc
            raise
        try:
            result = job(c)
            c.execute("COMMIT")
            return result
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
    finally:
        c.execute(f"PRAGMA busy_timeout = {int(busy):d}")


def _routes(routes: Routes) -> tuple[str, str]:
    return json.dumps(sorted(routes.namespaces)), json.dumps(sorted(map(list, routes.mailboxes)))


@dataclass(slots=True)
class _ClaimJob:
    holder: str
    routes: tuple[str, str]
    lease_ns: int
    rows: int
    max_bytes: int
    mailboxes: int


def _claim(c: sqlite3.Connection, job: _ClaimJob) -> Claim:
    now = time.time_ns()
    if not c.execute(PICK, (now, *job.routes, 1)).fetchone():  # a look without the lock first
        retry = c.execute(NEXT_LEASE_END, (now, *job.routes)).fetchone()[0]
        return Claim((), retry)
    return _with_write_lock(c, lambda c: _lease(c, job))


def _lease(c: sqlite3.Connection, job: _ClaimJob) -> Claim:
    now = time.time_ns()
    until = now + job.lease_ns
    batches: list[Claimed] = []
    rows_left, bytes_left = job.rows, job.max_bytes
    picked = c.execute(PICK, (now, *job.routes, job.mailboxes)).fetchall()
    share = -(-job.rows // max(1, len(picked)))  # rows per mailbox: a backlog in one leaves room for the others
    for ns, mailbox, head, epoch in picked:
        if rows_left <= 0 or bytes_left <= 0:
            break
        if epoch is None:  # a mailbox seen for the first time: its cursor
            (epoch,) = c.execute(
                "INSERT INTO prism_transact_cursors (namespace, mailbox) VALUES (?, ?) "
                "ON CONFLICT DO UPDATE SET epoch = epoch RETURNING epoch",
                (ns, mailbox),
            ).fetchone()
        limit = min(share, rows_left)
        taken = c.execute(
            TAKE, (ns, mailbox, limit, bytes_left, not batches, job.holder, until, ns, mailbox)
        ).fetchall()
        if not taken:
            if c.execute(PENDING, (ns, mailbox)).fetchone():
                break  # its rows do not fit in what is left of the claim
            # Every row is delivered (or dead-lettered) already: the cursor lagged; catch it up.
            c.execute(
                "UPDATE prism_transact_cursors SET delivered = max(delivered, ?) WHERE namespace = ? AND mailbox = ?",
                (head, ns, mailbox),
            )
            continue
        taken.sort()
        c.execute(
            "UPDATE prism_transact_cursors SET holder = ?, lease_until_ns = ? WHERE namespace = ? AND mailbox = ?",
            (job.holder, until, ns, mailbox),
        )
        rows = tuple(MailboxRow(mailbox, s, p, headers_of(h), d, c_ns, None, a, r) for s, p, h, d, c_ns, a, r in taken)
        batches.append(Claimed(ns, mailbox, rows, epoch))
        rows_left -= len(rows)
        bytes_left -= sum(len(r.payload) for r in rows)
    return Claim(tuple(batches))


@dataclass(slots=True)
class _MarkJob:
    holder: str
    namespace: str
    mailbox: str
    sequences: Sequence[int]
    retry_after_ns: int
    failure: Failure | None


def _mark(c: sqlite3.Connection, job: _MarkJob) -> None:
    now = time.time_ns()
    ns, mailbox, holder = job.namespace, job.mailbox, job.holder
    if job.failure is not None:  # first: only while the holder still has the mailbox
        _record_failure(c, ns, mailbox, holder, job.failure, now)
    if job.sequences:
        first, last = min(job.sequences), max(job.sequences)
        c.execute(
            "UPDATE prism_transact_mailbox SET delivered_ns = ? WHERE namespace = ? AND mailbox = ? "
            "AND seq BETWEEN ? AND ? AND delivered_ns IS NULL",
            (now, ns, mailbox, first, last),
        )
    else:
        last = 0
    # Delivered up to the run's last row; the mailbox given back — at once, or kept until the
    # pause ends so nobody claims it before (only while the holder still has it).
    retry = job.retry_after_ns
    c.execute(
        "UPDATE prism_transact_cursors SET delivered = max(delivered, ?), "
        "holder = CASE WHEN holder = ? AND ? = 0 THEN NULL ELSE holder END, "
        "lease_until_ns = CASE WHEN holder = ? AND ? > 0 THEN ? ELSE lease_until_ns END "
        "WHERE namespace = ? AND mailbox = ?",
        (last, holder, retry, holder, retry, now + retry, ns, mailbox),
    )


def _mark_group(c: sqlite3.Connection, jobs: list[_MarkJob]) -> list[None]:
    """The marks that came together (a claim's mailboxes, delivered concurrently): one write
    transaction for all of them."""
    return _with_write_lock(c, lambda c: [_mark(c, job) for job in jobs])


def _record_failure(c: sqlite3.Connection, ns: str, mailbox: str, holder: str, failure: Failure, now: int) -> None:
    """The row's last error, one more refusal, and its dead-lettering (rule 7)."""
    c.execute(
        "UPDATE prism_transact_mailbox SET last_error = ?, refusals = refusals + ?, dead_ns = ? "
        "WHERE namespace = ? AND mailbox = ? AND seq = ? AND delivered_ns IS NULL AND dead_ns IS NULL "
        "AND EXISTS (SELECT 1 FROM prism_transact_cursors WHERE namespace = ? AND mailbox = ? AND holder = ?)",
        (failure.text, int(failure.refused), now if failure.dead else None, ns, mailbox, failure.sequence, ns, mailbox, holder),
    )


def _delete_delivered(c: sqlite3.Connection, ns: str, before_ns: int, limit: int) -> int:
    return c.execute(DELETE_DELIVERED, (ns, before_ns, limit)).rowcount


def _data_version(c: sqlite3.Connection) -> int:
    return c.execute("PRAGMA data_version").fetchone()[0]


# --- Errors ---------------------------------------------------------------------------------------


def mapped(exc: BaseException, write: DataWrite | None = None) -> PrismError:
    """A driver error as the contract's PrismError (``write``: the data write it came from)."""
    if isinstance(exc, PrismError):
        return exc
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError) and write is not None:
        table = write.table
        if text.startswith("UNIQUE constraint failed") or text.startswith("PRIMARY KEY"):
            return row_exists(table, write.row)
        if text.startswith("cannot store"):  # a STRICT table's column type refusing a value
            return invalid_argument("row", f"table {table.name!r} refused a value: {text}")
        if text.startswith("NOT NULL constraint failed"):
            column = text.rsplit(".", 1)[-1]
            return invalid_argument(f"row.{column}", f"table {table.name!r} requires a value")
        return PrismError(grpc.StatusCode.FAILED_PRECONDITION, f"table {table.name!r} refused the row: {text}")
    if isinstance(exc, sqlite3.IntegrityError):  # a mailbox row refused (a trigger, a constraint)
        return PrismError(grpc.StatusCode.FAILED_PRECONDITION, f"the mailbox row was refused: {text}")
    if isinstance(exc, (sqlite3.InterfaceError, sqlite3.DataError, OverflowError)):
        return invalid_argument("row", f"a value SQLite cannot store ({text})")
    if isinstance(exc, sqlite3.OperationalError):
        if write is not None and ("no such" in text or "has no column" in text):
            return schema_mismatch(write.table, f"changed since the gateway checked it ({text})")
        return unavailable("sqlite", exc)  # locked past the deadline, disk full or unreadable
    log.error("sqlite transact statement failed", exc_info=exc)
    return internal()


# --- The adapter ----------------------------------------------------------------------------------


class SqliteTransact(TransactAdapter):
    capabilities = frozenset({Capability.DURABLE, Capability.SHARED})

    def __init__(
        self,
        worker: SqliteWorker,
        *,
        max_transactions: int = 16,
        key_window: float = KEY_WINDOW_SECONDS,
        poll_seconds: float = 0.05,
    ) -> None:
        self.worker = worker  # the backend's connection, shared with its other patterns: Writes run here
        self.max_transactions = max_transactions
        self.key_window_ns = int(key_window * 1e9)
        self.poll_seconds = poll_seconds  # how often data_version is read while a listener watches
        self.watchers = Watchers(self._follow)
        self._schema: asyncio.Task[None] | None = None
        self._prepared: set[Table] = set()
        self._idle: list[tuple[SqliteWorker, sqlite3.Connection]] = []
        self._open: set[SqliteTransaction] = set()
        self._opening = 0  # begins waiting for their connection
        self._keyed = 0  # keyed Writes so far, for the expired-key sweep

    async def _run(self, job: Callable[..., T], *args: Any) -> T:
        try:
            return await self.worker.run(lambda c: job(c, *args))
        except sqlite3.Error as exc:
            raise mapped(exc) from exc

    async def _ready(self, table: Table | None = None) -> None:
        """The mailbox tables exist, and ``table`` matches its declaration (checked once)."""
        schema = self._schema
        if schema is not None and schema.done() and not schema.cancelled() and schema.exception() is None:
            if table is None or table in self._prepared:
                return  # every call after the first: nothing to wait for
        if self._schema is None or (self._schema.done() and (self._schema.cancelled() or self._schema.exception())):
            self._schema = asyncio.ensure_future(self._run(_create_schema))
        await asyncio.shield(self._schema)
        if table is not None and table not in self._prepared:
            await self._run(_describe, table)
            self._prepared.add(table)

    async def prepare(self, table: Table) -> None:
        await self._ready(table)

    async def close(self) -> None:
        await self.watchers.close()
        for transaction in list(self._open):
            await transaction.rollback()
        while self._idle:
            worker, _ = self._idle.pop()
            await worker.close()

    async def write(
        self,
        namespace: str,
        data: DataWrite,
        mailbox: MailboxWrite,
        *,
        isolation: Isolation,
        time_limit: float,
        idempotency_key: str = "",
        fingerprint: bytes = b"",
    ) -> WriteResult:
        deadline = time.monotonic() + time_limit
        check_row(data.table, data.operation, data.row)
        check_mailbox(mailbox)
        await self._ready(data.table)
        purge = False
        if idempotency_key:
            self._keyed += 1
            purge = self._keyed % PURGE_EVERY == 1
        job = _Write(namespace, data, mailbox, idempotency_key, fingerprint, deadline, self.key_window_ns, purge)
        pause = LOCK_WAIT / 5
        while True:
            try:
                seq, committed_ns, replayed = await self.worker.run_grouped(_write_batch, job)
                if not replayed:
                    self.watchers.notify()
                return WriteResult(seq, committed_ns, replayed)
            except _Expired:
                raise timed_out("write", time_limit) from None
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise self._mapped(exc, data) from exc
                if time.monotonic() + pause >= deadline:
                    raise timed_out("write", time_limit) from exc  # the write lock was not granted in time
            except (sqlite3.Error, OverflowError) as exc:
                raise self._mapped(exc, data) from exc
            # Another connection holds the write lock: let the thread serve others meanwhile.
            await asyncio.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 4 * LOCK_WAIT)

    def _mapped(self, exc: BaseException, data: DataWrite) -> PrismError:
        if "no such" in str(exc):
            self._prepared.discard(data.table)
        return mapped(exc, data)

    async def begin(self, namespace: str, *, isolation: Isolation, time_limit: float) -> Transaction:
        await self._ready()
        if len(self._open) + self._opening >= self.max_transactions:
            raise too_many(self.max_transactions)
        self._opening += 1  # holds its place while its connection opens
        try:
            worker, handle = await self._connection()
        finally:
            self._opening -= 1
        transaction = SqliteTransaction(self, namespace, worker, handle, time_limit)
        self._open.add(transaction)
        return transaction

    async def _connection(self) -> tuple[SqliteWorker, sqlite3.Connection]:
        if self._idle:
            return self._idle.pop()
        worker = SqliteWorker(self.worker.path, self.worker.pragmas)
        try:
            await worker.start()
            handle = await worker.run(lambda c: c)  # for interrupt(), which any thread may call
        except BaseException as exc:  # a failed open, or a caller cancelled meanwhile: no stray thread
            await asyncio.shield(worker.close())
            if isinstance(exc, sqlite3.Error):
                raise unavailable("sqlite", exc) from exc
            raise
        return worker, handle

    async def _give_back(self, transaction: SqliteTransaction, broken: bool) -> None:
        """Reuse the connection only if it is certainly outside a transaction."""
        self._open.discard(transaction)
        worker = transaction.worker
        if not broken:
            try:
                broken = await worker.run(lambda c: c.in_transaction)
            except sqlite3.Error:
                broken = True
        if broken or len(self._idle) >= IDLE_CONNECTIONS:
            await worker.close()
        else:
            self._idle.append((worker, transaction.handle))

    async def mailbox_rows(self, namespace: str, mailbox: str, after: int = 0, limit: int = 100) -> Sequence[MailboxRow]:
        await self._ready()
        return await self._run(_mailbox_rows, namespace, mailbox, after, limit)

    # --- The listener's side ------------------------------------------------------------------

    async def claim(
        self, holder: str, routes: Routes, *, lease: float, rows: int, max_bytes: int, mailboxes: int
    ) -> Claim:
        await self._ready()
        job = _ClaimJob(holder, _routes(routes), int(lease * 1e9), rows, max_bytes, mailboxes)
        try:
            return await self.worker.run(lambda c: _claim(c, job))
        except _Busy:  # another connection is writing: look again shortly
            return Claim((), time.time_ns() + int(LOCK_WAIT * 1e9))
        except sqlite3.Error as exc:
            raise mapped(exc) from exc

    async def mark_delivered(
        self,
        holder: str,
        namespace: str,
        mailbox: str,
        sequences: Sequence[int],
        *,
        retry_after: float = 0.0,
        failure: Failure | None = None,
    ) -> None:
        await self._ready()
        patience = time.monotonic() + MARK_PATIENCE
        job = _MarkJob(holder, namespace, mailbox, sequences, int(retry_after * 1e9), failure)
        while True:
            try:
                await self.worker.run_grouped(_mark_group, job)
                return
            except _Busy as exc:
                if time.monotonic() > patience:
                    raise unavailable("sqlite", exc) from None
            except sqlite3.Error as exc:
                raise mapped(exc) from exc
            await asyncio.sleep(random.uniform(0, LOCK_WAIT))

    async def delete_delivered(self, namespace: str, *, before_ns: int, limit: int) -> int:
        await self._ready()
        try:
            return await self.worker.run(lambda c: _with_write_lock(c, lambda c: _delete_delivered(c, namespace, before_ns, limit)))
        except _Busy:  # another connection is writing: the next sweep deletes them
            return 0
        except sqlite3.Error as exc:
            raise mapped(exc) from exc

    async def watch(self) -> Changes:
        await self._ready()
        return await self.watchers.add()

    async def _follow(self, watchers: Watchers) -> None:
        """While watched: wake the watchers when another connection committed to the file."""
        version: int | None = None
        while watchers.watched:
            try:
                current = await self.worker.run(_data_version)
            except sqlite3.Error as exc:  # the next round tries again; claims report the outage
                log.warning("sqlite transact: cannot watch for changes: %s", exc)
                current = version
            if version is not None and current != version:
                watchers.notify()
            version = current
            await asyncio.sleep(self.poll_seconds)


class SqliteTransaction(Transaction):
    def __init__(
        self, adapter: SqliteTransact, namespace: str, worker: SqliteWorker, handle: sqlite3.Connection, timeout: float
    ) -> None:
        super().__init__(timeout)
        self.adapter, self.namespace, self.worker, self.handle = adapter, namespace, worker, handle
        self.written: list[tuple[str, int]] = []  # (mailbox, sequence) rows, stamped at commit
        self._broken = False
        self._monotonic_deadline = time.monotonic() + timeout

    async def _run(self, job: Callable[..., T], *args: Any, write: DataWrite | None = None) -> T:
        try:
            return await self.worker.run(lambda c: job(c, *args))
        except (sqlite3.Error, OverflowError) as exc:
            if write is not None and "no such" in str(exc):
                self.adapter._prepared.discard(write.table)
            raise mapped(exc, write) from exc

    def _begin(self, c: sqlite3.Connection) -> None:
        """The write lock, taken with the first write and waited for until the deadline at most."""
        if not c.in_transaction:
            left = min(BUSY_CAP, self._monotonic_deadline - time.monotonic())
            c.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000)):d}")
            c.execute("BEGIN IMMEDIATE")

    async def _data(self, write: DataWrite) -> int:
        await self.adapter._ready(write.table)

        def job(c: sqlite3.Connection) -> int:
            self._begin(c)
            return _apply(c, write)

        return await self._run(job, write=write)

    async def _mailbox(self, write: MailboxWrite) -> int:
        def job(c: sqlite3.Connection) -> int:
            self._begin(c)
            return _append(c, self.namespace, write, time.time_ns())

        seq = await self._run(job)
        self.written.append((write.mailbox, seq))
        return seq

    async def _commit(self) -> int:
        written = list(self.written)
        namespace = self.namespace

        def job(c: sqlite3.Connection) -> int:
            now = time.time_ns()
            if c.in_transaction:
                c.executemany(
                    "UPDATE prism_transact_mailbox SET committed_ns=? WHERE namespace=? AND mailbox=? AND seq=?",
                    [(now, namespace, mailbox, seq) for mailbox, seq in written],
                )
                c.execute("COMMIT")
            return now

        committed = await self._run(job)
        if written:
            self.adapter.watchers.notify()
        return committed

    async def _rollback(self) -> None:
        def job(c: sqlite3.Connection) -> None:
            if c.in_transaction:
                c.execute("ROLLBACK")

        await self.worker.run(job)

    def _interrupt(self) -> None:
        self.handle.interrupt()  # thread-safe; a no-op when no statement runs

    def _abandon(self) -> None:
        self._broken = True  # closed on release: closing the connection rolls back

    async def _release(self) -> None:
        await self.adapter._give_back(self, self._broken)
