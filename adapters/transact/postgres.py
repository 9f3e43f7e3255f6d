"""PostgreSQL Transact: the data tables and the mailbox in the backend's database, on the
instance's shared pool.

    prism_transact_heads    (namespace, mailbox) → the next sequence it hands out
    prism_transact_mailbox  mailbox rows by (namespace, mailbox, sequence), with the listener's
                            columns (delivered_ns, lease holder and deadline, attempts, refusals,
                            dead_ns and last_error: dead letters)
    prism_transact_keys     Write idempotency keys (bytea: a client's string may hold NUL):
                            fingerprint and the first result, until expiry
    prism_transact_cursors  the listener's, per mailbox: delivered up to, lease holder and deadline

A mailbox row's sequence comes from its head row, updated in the same transaction
(``INSERT … ON CONFLICT DO UPDATE SET next = next + 1``): the row lock is held until commit, so
sequences of a mailbox commit in order and a reader never finds a gap filled in later. (A
``bigserial`` would not do: its values are handed out in call order, not commit order.)

Values are bound as text and cast to each column's type as the catalog names it (``format_type``,
without the type modifier, so the column's own length or precision check applies on assignment):
PostgreSQL's input functions then parse them as they would a literal — numbers, booleans,
timestamps, UUIDs — and json/jsonb columns take the JSON of any value.

A **Write** is one statement (``write_statement``): the data write, the head row's increment
and the mailbox row as data-modifying CTEs, the mailbox's taking their row
from the data write's (an UPDATE or DELETE that finds no row writes nothing). At READ COMMITTED
without an idempotency key that statement is its own transaction: one round trip. It checks
that its implicit transaction really runs at READ COMMITTED (the sessions' default, which a
database or role may set otherwise) and writes nothing if not; the adapter then runs every
Write as BEGIN (the namespace's isolation level), the statement, COMMIT — as it always does at
the other levels, and with an idempotency key, whose claim comes between BEGIN and the
statement (which also records the result under the key). A serialization failure or deadlock
(SQLSTATE 40001, 40P01) is retried while the deadline allows: the whole Write is one
transaction, so a retry is safe. An **interactive transaction** holds one
pooled connection until it ends; at most ``max_transactions`` (half the pool) are open at once,
so they never starve the other patterns of connections. No connection goes back to the pool
inside a transaction: every failure path runs ROLLBACK, or terminates the connection when that
fails (the server then rolls back).

**The listener's side.** A commit that added mailbox rows wakes this process's listeners at
once, and other processes' by ``NOTIFY prism_transact`` sent after it (``committed``): one for
all the commits of the last few milliseconds, in a transaction of its own that does not wait for
its WAL flush. Not inside the Write: PostgreSQL serializes the commits of transactions that
NOTIFY on one database-wide lock held until their commit is flushed, so every Write would wait
for the one before's flush. (A crash between a commit and its NOTIFY costs a listener elsewhere
its ``poll_seconds``, never a row.) A watching adapter holds one LISTEN connection of its own
(not from the pool, reopened when lost) and wakes its listeners on each notification but its
own (the payload names the sending adapter), so a listener waits for commits, not a polling
interval. A claim looks first without locking (most wake-ups find nothing to take), then, in
one statement alone in its transaction (``CLAIM_ROWS``, whatever the number of mailboxes),
locks the cursor rows of the mailboxes it takes ``FOR UPDATE SKIP LOCKED`` — two listeners
claiming at once take different mailboxes, and one re-checks a cursor another just leased
(PostgreSQL re-evaluates the lease condition on the row it locks) — and takes and leases their
rows. Marks that arrive together — a claim's mailboxes are delivered together — go in one
statement (``MARKS``), whose commit does not wait for its WAL flush: a mark the database
forgets in a crash is a delivery made again (at least once). Cursors live apart from the
heads, so a claim never waits for a writer holding a head (an open Transaction holds its
mailbox's head until it ends), and a writer never waits for the listener. Claims, marks and
sweeps join the mailbox rows, a table that fills and drains: their transactions plan them for
it as it is at every run (``adapters/postgres_plans.py``), never with a plan cached while it was
empty. Lease deadlines are the gateway's clock (unix ns), as the Queue's: listeners sharing a
database must keep their clocks in step (NTP).
Delivered rows are deleted in batches (``delete_delivered``): each one statement that locks only
the rows it deletes, ``SKIP LOCKED``, which no writer touches, so it waits for nobody and nobody
waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from adapters.capabilities import Capability
from adapters.keyvalue.postgres import SCHEMA_LOCK
from adapters.postgres_notify import AfterCommitNotifier
from adapters.postgres_plans import abort, custom_plans
from adapters.transact.base import (
    KEY_WINDOW_SECONDS,
    Batcher,
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

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.postgres import PostgresPool

log = logging.getLogger("prism.adapters.transact")

# Applied in order; prism_schema remembers how many ran. Never edit a released entry: append.
MIGRATIONS = [
    """
    CREATE TABLE prism_transact_heads (
        namespace text NOT NULL, mailbox text NOT NULL, next bigint NOT NULL,
        PRIMARY KEY (namespace, mailbox))
    """,
    """
    CREATE TABLE prism_transact_mailbox (
        namespace text NOT NULL, mailbox text NOT NULL, seq bigint NOT NULL,
        payload bytea NOT NULL, headers text NOT NULL, destination text NOT NULL, committed_ns bigint NOT NULL,
        delivered_ns bigint, lease_holder text, lease_until_ns bigint NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, mailbox, seq))
    """,
    """
    CREATE INDEX prism_transact_pending ON prism_transact_mailbox (namespace, mailbox, seq)
        WHERE delivered_ns IS NULL
    """,
    """
    CREATE TABLE prism_transact_keys (
        namespace text NOT NULL, key bytea NOT NULL, fingerprint bytea NOT NULL,
        seq bigint, committed_ns bigint, expires_ns bigint NOT NULL,
        PRIMARY KEY (namespace, key))
    """,
    "CREATE INDEX prism_transact_keys_expiry ON prism_transact_keys (expires_ns)",
    """
    CREATE TABLE prism_transact_cursors (
        namespace text NOT NULL, mailbox text NOT NULL,
        delivered bigint NOT NULL DEFAULT 0, holder text, lease_until_ns bigint NOT NULL DEFAULT 0,
        epoch text NOT NULL DEFAULT replace(gen_random_uuid()::text, '-', ''),
        PRIMARY KEY (namespace, mailbox))
    """,
    # Dead letters (rule 7): a constant default, so no table rewrite.
    """
    ALTER TABLE prism_transact_mailbox ADD COLUMN refusals integer NOT NULL DEFAULT 0,
        ADD COLUMN dead_ns bigint, ADD COLUMN last_error text
    """,
    # Retention: a namespace's delivered rows, oldest first. Built once on upgrade (writers wait
    # for the build).
    """
    CREATE INDEX prism_transact_delivered ON prism_transact_mailbox (namespace, delivered_ns)
        WHERE delivered_ns IS NOT NULL
    """,
]

BEGIN = {
    Isolation.READ_COMMITTED: "BEGIN ISOLATION LEVEL READ COMMITTED",
    Isolation.REPEATABLE_READ: "BEGIN ISOLATION LEVEL REPEATABLE READ",
    Isolation.SERIALIZABLE: "BEGIN ISOLATION LEVEL SERIALIZABLE",
}
CHANNEL = "prism_transact"  # NOTIFY channel of committed mailbox rows; the payload is the sending adapter's id
APPEND = (
    "WITH head AS (INSERT INTO prism_transact_heads (namespace, mailbox, next) VALUES ($1, $2, 2) "
    "ON CONFLICT (namespace, mailbox) DO UPDATE SET next = prism_transact_heads.next + 1 RETURNING next - 1 AS seq), "
    "row AS (INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, committed_ns) "
    "SELECT $1, $2, head.seq, $3, $4, $5, $6 FROM head RETURNING seq) "
    "SELECT seq FROM row"
)
CLAIM = (
    "INSERT INTO prism_transact_keys (namespace, key, fingerprint, expires_ns) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (namespace, key) DO UPDATE SET fingerprint = excluded.fingerprint, seq = NULL, "
    "committed_ns = NULL, expires_ns = excluded.expires_ns WHERE prism_transact_keys.expires_ns < $5 RETURNING true"
)
PURGE = (
    "DELETE FROM prism_transact_keys WHERE (namespace, key) IN "
    "(SELECT namespace, key FROM prism_transact_keys WHERE expires_ns < $1 LIMIT 1000)"
)
STAMP = (
    "UPDATE prism_transact_mailbox m SET committed_ns = $2 FROM unnest($3::text[], $4::bigint[]) AS w(mailbox, seq) "
    "WHERE m.namespace = $1 AND m.mailbox = w.mailbox AND m.seq = w.seq"
)
# --- The listener's statements ($1 namespaces and $2, $3 (namespace, mailbox) pairs: the routes)
ROUTED = "(h.namespace = ANY($1::text[]) OR (h.namespace, h.mailbox) IN (SELECT * FROM unnest($2::text[], $3::text[])))"
# Mailboxes with undelivered rows and no live lease ($4: now), least recently leased first; the
# look without a lock (a mailbox the listener has not seen yet has no cursor row).
# (Its one value: whether one of them has no cursor yet, so the claim must make cursors first.)
LOOK = (
    "SELECT c.namespace IS NULL FROM prism_transact_heads h LEFT JOIN prism_transact_cursors c "
    "ON c.namespace = h.namespace AND c.mailbox = h.mailbox "
    f"WHERE h.next - 1 > coalesce(c.delivered, 0) AND (c.holder IS NULL OR c.lease_until_ns <= $4) AND {ROUTED} "
    "ORDER BY 1 DESC LIMIT 1"
)
NEW_CURSORS = (
    "INSERT INTO prism_transact_cursors (namespace, mailbox) SELECT h.namespace, h.mailbox "
    f"FROM prism_transact_heads h WHERE {ROUTED} AND NOT EXISTS (SELECT 1 FROM prism_transact_cursors c "
    "WHERE c.namespace = h.namespace AND c.mailbox = h.mailbox) "
    "ORDER BY h.namespace, h.mailbox ON CONFLICT DO NOTHING"  # in key order: two claimers never deadlock here
)
NEXT_LEASE_END = (
    "SELECT min(c.lease_until_ns) FROM prism_transact_cursors c JOIN prism_transact_heads h "
    "ON h.namespace = c.namespace AND h.mailbox = c.mailbox "
    f"WHERE h.next - 1 > c.delivered AND c.holder IS NOT NULL AND c.lease_until_ns > $4 AND {ROUTED}"
)
# A claim, one statement (alone in its transaction). ``picked``: at most $5 mailboxes with undelivered
# rows and no live lease, least recently leased first, their cursors locked FOR UPDATE SKIP
# LOCKED (two claims at once take different mailboxes; a cursor another claim leased or a mark
# moved since the statement's snapshot is checked again as it is now: PostgreSQL re-evaluates the
# condition on the row it locks). Then their lowest undelivered rows: at most $6 in all, shared
# between the mailboxes (each its ceil(share)), within $7 bytes of payload counted in that order
# (the claim's first row whatever its size), leased to $8 until $9 and counted; their cursors
# leased to the same. The rows are read in the statement's snapshot, which may predate another
# holder's mark; the UPDATE checks each row again as it updates it (still undelivered, not
# dead), so a row delivered meanwhile is not taken again. A picked mailbox without an
# undelivered row has had all its rows delivered (or dead-lettered): its cursor lagged and
# catches up to its head.
CLAIM_ROWS = (
    "WITH picked AS MATERIALIZED (SELECT c.namespace, c.mailbox, h.next - 1 AS head, c.epoch, c.lease_until_ns AS since "
    "FROM prism_transact_cursors c JOIN prism_transact_heads h ON h.namespace = c.namespace AND h.mailbox = c.mailbox "
    f"WHERE h.next - 1 > c.delivered AND (c.holder IS NULL OR c.lease_until_ns <= $4) AND {ROUTED} "
    "ORDER BY c.lease_until_ns, c.namespace, c.mailbox LIMIT $5 FOR UPDATE OF c SKIP LOCKED), "
    "p AS MATERIALIZED (SELECT namespace, mailbox, head, epoch, row_number() OVER (ORDER BY since, namespace, mailbox) AS k, "
    "count(*) OVER () AS mailboxes FROM picked), "
    "first AS (SELECT p.k, p.namespace, p.mailbox, x.seq, octet_length(x.payload) AS size FROM p CROSS JOIN LATERAL "
    "(SELECT seq, payload FROM prism_transact_mailbox m WHERE m.namespace = p.namespace AND m.mailbox = p.mailbox "
    "AND m.delivered_ns IS NULL AND m.dead_ns IS NULL ORDER BY seq LIMIT ceil($6::float8 / p.mailboxes)::int8) x), "
    "ranked AS (SELECT k, namespace, mailbox, seq, row_number() OVER w AS n, sum(size) OVER w AS total FROM first "
    "WINDOW w AS (ORDER BY k, seq)), "
    "taken AS (UPDATE prism_transact_mailbox m SET lease_holder = $8, lease_until_ns = $9, attempts = m.attempts + 1 "
    "FROM ranked r WHERE r.n <= $6 AND (r.total <= $7 OR r.n = 1) "
    "AND m.namespace = r.namespace AND m.mailbox = r.mailbox AND m.seq = r.seq AND m.delivered_ns IS NULL AND m.dead_ns IS NULL "
    "RETURNING r.k, m.seq, m.payload, m.headers, m.destination, m.committed_ns, m.attempts, m.refusals), "
    "leased AS (UPDATE prism_transact_cursors c SET holder = $8, lease_until_ns = $9 FROM p "
    "WHERE c.namespace = p.namespace AND c.mailbox = p.mailbox AND p.k IN (SELECT k FROM taken)), "
    "caught AS (UPDATE prism_transact_cursors c SET delivered = greatest(c.delivered, p.head) FROM p "
    "WHERE c.namespace = p.namespace AND c.mailbox = p.mailbox AND p.k NOT IN (SELECT k FROM first)) "
    "SELECT t.k, p.namespace, p.mailbox, p.epoch, t.seq, t.payload, t.headers, t.destination, t.committed_ns, "
    "t.attempts, t.refusals FROM taken t JOIN p ON p.k = t.k"
)
# The marks that came together, one statement ($1 … $11: one array element per mark; alone in
# its transaction). The cursors' UPDATE runs first (a data-modifying CTE the query does not read runs
# last), so a mark locks cursors then rows, as a claim does: the two never deadlock. ``failed``
# records a Failure on a mark's row ``failed`` (none: 0) — its error, more refusals,
# dead-lettered when ``dead`` — only while ``holder`` holds the mailbox (the statement's
# snapshot, before the cursors' UPDATE gives it back). Its commit does not wait for its WAL flush
# (``set_config``, for this transaction only): a mark a crash of the database forgets leaves its
# rows leased and undelivered, and they are delivered again once the lease runs out — as after
# a listener's crash (at least once).
MARKS = (
    "WITH m AS MATERIALIZED (SELECT u.*, set_config('synchronous_commit', 'off', true) AS unflushed FROM unnest("
    "$1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::int8[], $8::int8[], $9::text[], "
    "$10::int4[], $11::bool[]) AS u(namespace, mailbox, now, first, last, holder, retry, failed, error, refusals, dead)), "
    "done AS (UPDATE prism_transact_mailbox t SET delivered_ns = m.now FROM m WHERE t.namespace = m.namespace "
    "AND t.mailbox = m.mailbox AND t.seq BETWEEN m.first AND m.last AND t.delivered_ns IS NULL), "
    "failed AS (UPDATE prism_transact_mailbox t SET last_error = m.error, refusals = t.refusals + m.refusals, "
    "dead_ns = CASE WHEN m.dead THEN m.now END FROM m WHERE m.failed > 0 AND t.namespace = m.namespace "
    "AND t.mailbox = m.mailbox AND t.seq = m.failed AND t.delivered_ns IS NULL AND t.dead_ns IS NULL "
    "AND EXISTS (SELECT 1 FROM prism_transact_cursors c WHERE c.namespace = m.namespace AND c.mailbox = m.mailbox "
    "AND c.holder = m.holder)) "
    "UPDATE prism_transact_cursors c SET delivered = greatest(c.delivered, m.last), "
    "holder = CASE WHEN c.holder = m.holder AND m.retry = 0 THEN NULL ELSE c.holder END, "
    "lease_until_ns = CASE WHEN c.holder = m.holder AND m.retry > 0 THEN m.now + m.retry ELSE c.lease_until_ns END "
    "FROM m WHERE c.namespace = m.namespace AND c.mailbox = m.mailbox"
)
# Retention: at most $3 of namespace $1's rows delivered before $2, oldest first (a range of
# prism_transact_delivered); rows another transaction has locked are left for the next batch.
# The rows to delete chosen once (a materialized CTE): as a subquery of the join, the planner
# may run it again for each row it joins, and a LIMIT over tied delivery times then picks other
# rows each time — more than ``limit`` went.
DELETE_DELIVERED = (
    "WITH old AS MATERIALIZED (SELECT mailbox, seq FROM prism_transact_mailbox "
    "WHERE namespace = $1 AND delivered_ns < $2 ORDER BY delivered_ns, mailbox, seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "DELETE FROM prism_transact_mailbox m USING old "
    "WHERE m.namespace = $1 AND m.mailbox = old.mailbox AND m.seq = old.seq"
)
RETRIES = 5  # serialization failures a Write retries (while its deadline allows)
PURGE_EVERY = 1000  # keyed Writes between two sweeps of expired keys
STATEMENTS_KEPT = 1000  # data statement texts remembered per adapter (then forgotten all at once)
CONFLICT_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
UNAVAILABLE_CLASSES = ("08", "53", "57")  # as adapters/backends/postgres.py (but 57014 is a timeout)


@dataclass(frozen=True, slots=True)
class Column:
    type: str  # format_type without modifier: what a bound text value is cast to
    json: bool  # json or jsonb: every value goes in as JSON


async def migrate(con: asyncpg.Connection) -> None:
    """Bring the Transact tables to the latest version, under the advisory lock the other
    patterns' migrations take, so processes starting together take turns."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await con.execute("CREATE TABLE IF NOT EXISTS prism_schema (component text PRIMARY KEY, version integer NOT NULL)")
        done = await con.fetchval("SELECT version FROM prism_schema WHERE component = 'transact'") or 0
        for statement in MIGRATIONS[done:]:
            await con.execute(statement)
        if done < len(MIGRATIONS):
            await con.execute(
                "INSERT INTO prism_schema (component, version) VALUES ('transact', $1) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                len(MIGRATIONS),
            )


async def describe(con: asyncpg.Connection, table: Table) -> dict[str, Column]:
    """The declaration against the real table (created first with ``create``: jsonb columns);
    the declared columns' types."""
    name = quoted(table.name)  # to_regclass takes it quoted: exactly as declared, in the search_path
    oid = await con.fetchval("SELECT to_regclass($1)::oid", name)
    if oid is None and table.create:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            columns = ", ".join(f"{quoted(c)} jsonb" for c in table.columns)
            await con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}, PRIMARY KEY ({', '.join(map(quoted, table.key))}))")
        oid = await con.fetchval("SELECT to_regclass($1)::oid", name)
    if oid is None:
        raise schema_mismatch(table, "no such table (create it, or declare it with create: true)")
    rows = await con.fetch(
        "SELECT a.attname, format_type(a.atttypid, NULL), t.typname IN ('json', 'jsonb') FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
        oid,
    )
    real = {r[0]: Column(r[1], r[2]) for r in rows}
    if missing := [c for c in table.columns if c not in real]:
        raise schema_mismatch(table, f"declared column {missing[0]!r} is not in the table")
    uniques = await con.fetch(
        "SELECT ARRAY(SELECT a.attname FROM unnest(i.indkey) AS k(n) JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = k.n) FROM pg_index i "
        "WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
        oid,
    )
    if set(table.key) not in [set(r[0]) for r in uniques]:
        raise schema_mismatch(table, f"no primary key or unique index on exactly its key ({', '.join(table.key)})")
    return {c: real[c] for c in table.columns}


def _text(value: Value, column: Column) -> str | None:
    """A JSON value as the text a column type's input function reads."""
    if value is None:
        return None
    if column.json or isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # ints as digits; floats as Python writes them (12.5, 1e+20), which numeric reads


def data_statement(write: DataWrite, columns: Mapping[str, Column]) -> tuple[str, list[str]]:
    """The SQL (declared names, quoted; catalog types) and the order of its bound columns."""
    table, row = write.table, write.row
    names = table.ordered(row)
    t = quoted(table.name)
    order: list[str] = []

    def param(name: str) -> str:
        order.append(name)
        return f"${len(order)}::text::{columns[name].type}"

    if write.operation in (Operation.INSERT, Operation.UPSERT):
        values = ", ".join(param(n) for n in names)
        sql = f"INSERT INTO {t} ({', '.join(map(quoted, names))}) VALUES ({values})"
        if write.operation is Operation.UPSERT:
            sets = [n for n in names if n not in table.key] or [table.key[0]]
            sql += f" ON CONFLICT ({', '.join(map(quoted, table.key))}) DO UPDATE SET "
            sql += ", ".join(f"{quoted(n)} = excluded.{quoted(n)}" for n in sets)
        return sql, order
    if write.operation is Operation.UPDATE:
        sets = ", ".join(f"{quoted(n)} = {param(n)}" for n in names if n not in table.key)
        where = " AND ".join(f"{quoted(k)} = {param(k)}" for k in table.key)
        return f"UPDATE {t} SET {sets} WHERE {where}", order
    where = " AND ".join(f"{quoted(k)} = {param(k)}" for k in table.key)
    return f"DELETE FROM {t} WHERE {where}", order


# A Write's statement: the data write and the mailbox row in one statement (``write_statement``).
# ``gate`` holds one row when the statement may write: always inside an explicit BEGIN; without
# one (the statement is its own transaction) only if that transaction runs at READ COMMITTED —
# the session's default, checked by the statement itself, so a database whose default is
# another level gets the explicit path instead and nothing is written at the wrong level.
GATE_IMPLICIT = "gate AS (SELECT 1 WHERE current_setting('transaction_isolation') = 'read committed')"
GATE_EXPLICIT = "gate AS (SELECT 1)"
MAILBOX_PARAMS = 6  # namespace, mailbox, payload, headers, destination, committed_ns (then the key, if any)


def write_statement(write: DataWrite, columns: Mapping[str, Column], *, implicit: bool, keyed: bool) -> tuple[str, list[str]]:
    """A Write as one statement, and the order of its bound data columns (the mailbox's values
    follow them, then the idempotency key). Its one result row, when ``gate`` passed: the
    mailbox sequence — NULL when the data write found no row (UPDATE, DELETE), and then nothing
    was written: the mailbox CTEs take their row from the data write's. No row at all: the gate
    refused (not READ COMMITTED without BEGIN), nothing written. The data write runs first (the
    head reads its result), so locks are taken as the separate statements took them: the data
    row, then the mailbox's head row (held until commit: sequences commit in order)."""
    table, row = write.table, write.row
    names = table.ordered(row)
    t = quoted(table.name)
    order: list[str] = []

    def param(name: str) -> str:
        order.append(name)
        return f"${len(order)}::text::{columns[name].type}"

    if write.operation in (Operation.INSERT, Operation.UPSERT):
        values = ", ".join(param(n) for n in names)
        data = f"INSERT INTO {t} ({', '.join(map(quoted, names))}) SELECT {values} FROM gate"
        if write.operation is Operation.UPSERT:
            sets = [n for n in names if n not in table.key] or [table.key[0]]
            data += f" ON CONFLICT ({', '.join(map(quoted, table.key))}) DO UPDATE SET "
            data += ", ".join(f"{quoted(n)} = excluded.{quoted(n)}" for n in sets)
    elif write.operation is Operation.UPDATE:
        sets = ", ".join(f"{quoted(n)} = {param(n)}" for n in names if n not in table.key)
        where = " AND ".join(f"{quoted(k)} = {param(k)}" for k in table.key)
        data = f"UPDATE {t} SET {sets} WHERE {where} AND EXISTS (SELECT FROM gate)"
    else:
        where = " AND ".join(f"{quoted(k)} = {param(k)}" for k in table.key)
        data = f"DELETE FROM {t} WHERE {where} AND EXISTS (SELECT FROM gate)"
    n = len(order)
    ns, mailbox, payload, headers, destination, now = (f"${n + i}" for i in range(1, MAILBOX_PARAMS + 1))
    parts = [
        GATE_IMPLICIT if implicit else GATE_EXPLICIT,
        f"data AS ({data} RETURNING 1)",
        f"head AS (INSERT INTO prism_transact_heads (namespace, mailbox, next) SELECT {ns}::text, {mailbox}::text, 2 "
        "WHERE EXISTS (SELECT FROM data) ON CONFLICT (namespace, mailbox) DO UPDATE SET next = prism_transact_heads.next + 1 "
        "RETURNING next - 1 AS seq)",
        "row AS (INSERT INTO prism_transact_mailbox (namespace, mailbox, seq, payload, headers, destination, committed_ns) "
        f"SELECT {ns}::text, {mailbox}::text, head.seq, {payload}::bytea, {headers}::text, {destination}::text, {now}::int8 "
        "FROM head RETURNING seq)",
    ]
    if keyed:
        key = f"${n + MAILBOX_PARAMS + 1}"
        parts.append(
            f"result AS (UPDATE prism_transact_keys k SET seq = row.seq, committed_ns = {now}::int8 FROM row "
            f"WHERE k.namespace = {ns}::text AND k.key = {key}::bytea)"
        )
    sql = f"WITH {', '.join(parts)} SELECT (SELECT seq FROM row) AS seq FROM gate"
    return sql, order


def _count(status: str) -> int:
    """Rows affected, from a command tag ("INSERT 0 1", "UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


def mapped(exc: BaseException, write: DataWrite | None = None) -> PrismError:
    """A driver error as the contract's PrismError (``write``: the data write it came from)."""
    if isinstance(exc, PrismError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        what = f"table {write.table.name!r}" if write is not None else "the mailbox"
        if state in CONFLICT_STATES:
            return conflict(str(exc))
        if state == "57014":
            return PrismError(grpc.StatusCode.DEADLINE_EXCEEDED, "the statement was cancelled at its deadline; rolled back")
        if state == "23505" and write is not None:
            return row_exists(write.table, write.row)
        if state == "23502" and write is not None and getattr(exc, "column_name", None):
            return invalid_argument(f"row.{exc.column_name}", f"{what} requires a value")  # type: ignore[attr-defined]
        if state.startswith("22"):  # data exception: a value the column's type does not take
            return invalid_argument("row", f"{what} refused a value: {exc}")
        if state.startswith("23") or state == "P0001" or state == "428C9":  # constraints, triggers, generated columns
            return PrismError(grpc.StatusCode.FAILED_PRECONDITION, f"{what} refused the row: {exc}")
        if state in ("42P01", "42703") and write is not None:
            return schema_mismatch(write.table, f"changed since the gateway checked it ({exc})")
    if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)) or (
        isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in UNAVAILABLE_CLASSES
    ):
        return unavailable("postgres", exc)
    log.error("postgres transact statement failed", exc_info=exc)
    return internal()


class PostgresTransact(TransactAdapter):
    capabilities = frozenset({Capability.DURABLE, Capability.SHARED})

    def __init__(
        self,
        pool: PostgresPool,
        *,
        max_transactions: int | None = None,
        key_window: float = KEY_WINDOW_SECONDS,
        keepalive_seconds: float = 5.0,
    ) -> None:
        self.pool = pool  # the backend's, shared with its other patterns
        self.id = uuid.uuid4().hex  # names this adapter's LISTEN connection (application_name)
        self.keepalive_seconds = keepalive_seconds  # how often the LISTEN connection is checked
        self.watchers = Watchers(self._follow)
        self.max_transactions = max_transactions or max(1, pool.settings.pool_size // 2)
        self.key_window_ns = int(key_window * 1e9)
        self._schema: asyncio.Task[None] | None = None
        self._tables: dict[Table, dict[str, Column]] = {}
        self._statements: dict[tuple[Table, Operation, tuple[str, ...], str], tuple[str, list[str]]] = {}
        # Whether a READ COMMITTED Write without a key runs as one statement without BEGIN: until
        # the database says its sessions' default isolation is another level (the gate refuses).
        self._implicit = True
        self._marks: Batcher[tuple[Any, ...], None] = Batcher(self._mark_batch, "postgres-transact-marks")
        self._notifier = AfterCommitNotifier(pool, CHANNEL, "postgres-transact")
        self._open: set[PostgresTransaction] = set()
        self._opening = 0  # begins waiting for a connection
        self._keyed = 0

    # --- Schema and declarations ----------------------------------------------------------------

    async def _migrate(self) -> None:
        async with self.pool.connection() as con:
            await migrate(con)

    async def _ready(self, table: Table | None = None) -> dict[str, Column]:
        """The mailbox tables exist (created on first use), and ``table``'s column types."""
        if self._schema is None or (self._schema.done() and (self._schema.cancelled() or self._schema.exception())):
            self._schema = asyncio.ensure_future(self._migrate())
        await asyncio.shield(self._schema)
        if table is None:
            return {}
        if (columns := self._tables.get(table)) is None:
            async with self.pool.connection() as con:
                try:
                    columns = await describe(con, table)
                except asyncpg.PostgresError as exc:
                    raise mapped(exc) from exc
            self._tables[table] = columns
        return columns

    def _migrated(self) -> bool:
        schema = self._schema
        return schema is not None and schema.done() and not schema.cancelled() and schema.exception() is None

    async def prepare(self, table: Table) -> None:
        await self._ready(table)

    def statement(self, write: DataWrite, columns: Mapping[str, Column], kind: str = "step") -> tuple[str, list[Any]]:
        """The data write's SQL (remembered by shape) and its bound values: ``step`` the data
        statement alone (a Transaction's), ``implicit``/``explicit``/``keyed`` a Write's whole
        statement (``write_statement``; the mailbox's values go after these)."""
        shape = (write.table, write.operation, tuple(write.table.ordered(write.row)), kind)
        if (found := self._statements.get(shape)) is None:
            if len(self._statements) >= STATEMENTS_KEPT:
                self._statements.clear()
            if kind == "step":
                found = data_statement(write, columns)
            else:
                found = write_statement(write, columns, implicit=kind == "implicit", keyed=kind == "keyed")
            self._statements[shape] = found
        sql, order = found
        row = write.row
        return sql, [_text(row[name], columns[name]) for name in order]

    def forget(self, table: Table) -> None:
        """The table changed under us: check it again on next use."""
        self._tables.pop(table, None)
        self._statements = {shape: s for shape, s in self._statements.items() if shape[0] != table}

    async def close(self) -> None:
        await self.watchers.close()
        for transaction in list(self._open):
            await transaction.rollback()
        await self._notifier.close()

    # --- Write ----------------------------------------------------------------------------------

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        check_row(data.table, data.operation, data.row)
        check_mailbox(mailbox)
        purge = False
        if idempotency_key:
            self._keyed += 1
            purge = self._keyed % PURGE_EVERY == 1
        headers = headers_text(mailbox.headers)
        for attempt in range(RETRIES + 1):
            try:
                async with asyncio.timeout_at(deadline):
                    columns = self._tables.get(data.table) if self._migrated() else None
                    if columns is None:
                        columns = await self._ready(data.table)
                    return await self._write_once(namespace, data, columns, mailbox, headers, isolation, idempotency_key, fingerprint, purge)
            except TimeoutError:
                raise timed_out("write", time_limit) from None
            except PrismError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == RETRIES:
                    raise
                # Another transaction won a conflict: back off a little, then run it all again.
                pause = random.uniform(0, 0.005 * 2**attempt)
                if loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _write_once(
        self,
        namespace: str,
        data: DataWrite,
        columns: Mapping[str, Column],
        mailbox: MailboxWrite,
        headers: str,
        isolation: Isolation,
        key: str,
        fingerprint: bytes,
        purge: bool,
    ) -> WriteResult:
        """One try. Without a key at READ COMMITTED: one statement, its own transaction (one
        round trip). Otherwise BEGIN at the isolation level, the key's claim, the statement,
        COMMIT."""
        async with self.pool.connection() as con:
            try:
                now = time.time_ns()
                common = (namespace, mailbox.mailbox, mailbox.payload, headers, mailbox.destination, now)
                if not key and isolation is Isolation.READ_COMMITTED and self._implicit and not con.is_in_transaction():
                    sql, values = self.statement(data, columns, "implicit")
                    found = await self._run(con, data, sql, *values, *common)
                    if found is not None:  # the gate passed: committed (or nothing, NOT_FOUND)
                        return self._written(data, found[0], now)
                    self._implicit = False  # the sessions' default is another level: BEGIN from now on
                    log.info("postgres transact: sessions do not default to READ COMMITTED; Writes run BEGIN … COMMIT")
                await con.execute(BEGIN[isolation])
                if key:
                    raw_key = key.encode()
                    if not await con.fetchval(CLAIM, namespace, raw_key, fingerprint, now + self.key_window_ns, now):
                        found = await con.fetchrow(
                            "SELECT fingerprint, seq, committed_ns FROM prism_transact_keys WHERE namespace=$1 AND key=$2",
                            namespace, raw_key,
                        )
                        await con.execute("ROLLBACK")
                        if found["fingerprint"] != fingerprint:
                            raise key_reused()
                        if found["seq"] is None:  # never committed without its result; a guard
                            raise conflict("an earlier write with this idempotency key is unfinished")
                        return WriteResult(found["seq"], found["committed_ns"], replayed=True)
                    if purge:
                        await con.execute(PURGE, now)
                    sql, values = self.statement(data, columns, "keyed")
                    found = await self._run(con, data, sql, *values, *common, raw_key)
                else:
                    sql, values = self.statement(data, columns, "explicit")
                    found = await self._run(con, data, sql, *values, *common)
                if found is None or found[0] is None:  # nothing written: leave the transaction as it came
                    await con.execute("ROLLBACK")
                    raise no_row(data.table, data.row)
                await con.execute("COMMIT")
                return self._written(data, found[0], now)
            except BaseException as exc:
                # A refusal answered outside a transaction (the one statement's own rolled back,
                # or ROLLBACK already sent) leaves nothing to undo; anything else is rolled back,
                # or the connection closed.
                if not isinstance(exc, PrismError) or con.is_in_transaction():
                    await asyncio.shield(abort(con))
                if isinstance(exc, Exception) and not isinstance(exc, PrismError):
                    raise mapped(exc) from exc
                raise

    async def _run(self, con: asyncpg.Connection, data: DataWrite, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await con.fetchrow(sql, *args)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in ("42P01", "42703"):
                self.forget(data.table)
            # A constraint of the mailbox tables (none refuses a well-formed row) is not the data row's.
            table = getattr(exc, "table_name", None) or ""
            raise mapped(exc, None if table.startswith("prism_transact_") else data) from exc

    def _written(self, data: DataWrite, seq: int | None, now: int) -> WriteResult:
        if seq is None:  # the data write found no row (UPDATE, DELETE): nothing was written
            raise no_row(data.table, data.row)
        self.committed()
        return WriteResult(seq, now, replayed=False)

    def committed(self) -> None:
        """A mailbox row committed: this process's listeners are woken at once, other
        processes' by a NOTIFY after it (``adapters/postgres_notify.py``)."""
        self.watchers.notify()
        self._notifier.notify(self.id)

    # --- Interactive transactions ---------------------------------------------------------------

    async def begin(self, namespace: str, *, isolation: Isolation, time_limit: float) -> Transaction:
        await self._ready()
        if len(self._open) + self._opening >= self.max_transactions:
            raise too_many(self.max_transactions)
        self._opening += 1  # holds its place while it waits for a connection
        stack = contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(time_limit):
                con = await stack.enter_async_context(self.pool.connection())
                try:
                    await con.execute(BEGIN[isolation])
                except BaseException:
                    await asyncio.shield(abort(con))
                    raise
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, TimeoutError):
                raise timed_out("begin", time_limit) from None
            if isinstance(exc, Exception):
                raise mapped(exc) from exc
            raise
        finally:
            self._opening -= 1
        transaction = PostgresTransaction(self, namespace, con, stack, time_limit)
        self._open.add(transaction)
        return transaction

    async def mailbox_rows(self, namespace: str, mailbox: str, after: int = 0, limit: int = 100) -> Sequence[MailboxRow]:
        await self._ready()
        async with self.pool.connection() as con:
            rows = await con.fetch(
                "SELECT seq, payload, headers, destination, committed_ns, delivered_ns, attempts, refusals, dead_ns, "
                "coalesce(last_error, '') FROM prism_transact_mailbox WHERE namespace=$1 AND mailbox=$2 AND seq > $3 "
                "ORDER BY seq LIMIT $4",
                namespace, mailbox, after, limit,
            )
        return [MailboxRow(mailbox, r[0], r[1], headers_of(r[2]), *r[3:]) for r in rows]

    # --- The listener's side ------------------------------------------------------------------

    async def claim(
        self, holder: str, routes: Routes, *, lease: float, rows: int, max_bytes: int, mailboxes: int
    ) -> Claim:
        await self._ready()
        pairs = sorted(routes.mailboxes)
        now = time.time_ns()
        routed = (sorted(routes.namespaces), [ns for ns, _ in pairs], [mailbox for _, mailbox in pairs])
        async with self.pool.connection() as con:
            try:
                found = await con.fetchrow(LOOK, *routed, now)
                if found is None:  # most wake-ups: nothing to take
                    return Claim((), await con.fetchval(NEXT_LEASE_END, *routed, now))
                if found[0]:  # a mailbox seen for the first time: its cursor first
                    await con.execute(NEW_CURSORS, *routed)
                until = now + int(lease * 1e9)
                async with custom_plans(con):
                    taken = await con.fetch(CLAIM_ROWS, *routed, time.time_ns(), mailboxes, rows, max_bytes, holder, until)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                raise mapped(exc) from exc
        batches: dict[int, tuple[str, str, str, list[MailboxRow]]] = {}
        for k, ns, mailbox, epoch, seq, payload, headers, destination, committed_ns, attempts, refusals in taken:
            row = MailboxRow(mailbox, seq, payload, headers_of(headers), destination, committed_ns, None, attempts, refusals)
            batches.setdefault(k, (ns, mailbox, epoch, []))[3].append(row)
        return Claim(tuple(
            Claimed(ns, mailbox, tuple(sorted(found, key=lambda row: row.sequence)), epoch)
            for ns, mailbox, epoch, found in (batches[k] for k in sorted(batches))
        ))  # fmt: skip

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
        if not self._migrated():
            await self._ready()
        first, last = (min(sequences), max(sequences)) if sequences else (1, 0)
        failed = (failure.sequence, failure.text, int(failure.refused), failure.dead) if failure else (0, None, 0, False)
        # (namespace, mailbox, now, first, last, holder, retry, failed, error, refusals, dead): MARKS' columns
        await self._marks.submit((namespace, mailbox, time.time_ns(), first, last, holder, int(retry_after * 1e9), *failed))

    async def _mark_batch(self, marks: list[tuple[Any, ...]]) -> list[None]:
        """The marks that came together (a claim's mailboxes, delivered concurrently): one
        statement in one transaction, in key order. (Two marks of one mailbox in a batch — two
        holders' — go in statements one after the other, in that transaction: a statement
        updates a row once.)"""
        rounds: list[list[tuple[Any, ...]]] = []
        seen: dict[tuple[str, str], int] = {}
        for mark in sorted(marks, key=lambda mark: (mark[0], mark[1])):
            turn = seen[(mark[0], mark[1])] = seen.get((mark[0], mark[1]), -1) + 1
            if turn == len(rounds):
                rounds.append([])
            rounds[turn].append(mark)
        async with self.pool.connection() as con:
            try:
                async with custom_plans(con):
                    for batch in rounds:
                        await con.execute(MARKS, *(list(column) for column in zip(*batch, strict=True)))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                raise mapped(exc) from exc
        return [None] * len(marks)

    async def delete_delivered(self, namespace: str, *, before_ns: int, limit: int) -> int:
        await self._ready()
        async with self.pool.connection() as con:
            try:
                async with custom_plans(con):
                    return _count(await con.execute(DELETE_DELIVERED, namespace, before_ns, limit))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                raise mapped(exc) from exc

    async def watch(self) -> Changes:
        await self._ready()
        return await self.watchers.add()

    async def _follow(self, watchers: Watchers) -> None:
        """While watched: hold a LISTEN connection, reopened whenever it is lost, and wake the
        watchers on every notification (and after each reconnection: what committed meanwhile)."""
        settings = self.pool.settings
        pause = 0.1
        while watchers.watched:
            con: asyncpg.Connection | None = None
            try:
                con = await asyncpg.connect(
                    settings.dsn,
                    timeout=settings.connect_timeout,
                    command_timeout=settings.command_timeout,
                    server_settings={"application_name": f"prism-transact-listener {self.id}"},
                )
                lost = asyncio.Event()
                con.add_termination_listener(lambda _, lost=lost: lost.set())
                await con.add_listener(CHANNEL, lambda _con, _pid, _channel, sender: sender != self.id and watchers.notify())
                pause = 0.1
                watchers.notify()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.keepalive_seconds):
                            await lost.wait()
                    if not lost.is_set():  # a connection the OS has not reported dead yet
                        await con.fetchval("SELECT 1")
                log.warning("postgres transact: notification connection lost; reconnecting")
            except Exception as exc:  # whatever ended the connection, open another: this task must live on
                log.warning("postgres transact: cannot listen for commits (%s: %s); retrying", type(exc).__name__, exc)
            finally:
                if con is not None:
                    con.terminate()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


class PostgresTransaction(Transaction):
    def __init__(
        self,
        adapter: PostgresTransact,
        namespace: str,
        con: asyncpg.Connection,
        stack: contextlib.AsyncExitStack,
        timeout: float,
    ) -> None:
        super().__init__(timeout)
        self.adapter, self.namespace, self.con, self._stack = adapter, namespace, con, stack
        self.written: list[tuple[str, int]] = []  # (mailbox, sequence) rows, stamped at commit

    async def _data(self, write: DataWrite) -> int:
        columns = await self.adapter._ready(write.table)
        sql, values = self.adapter.statement(write, columns)
        try:
            return _count(await self.con.execute(sql, *values))
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in ("42P01", "42703"):
                self.adapter.forget(write.table)
            raise mapped(exc, write) from exc
        except (OSError, asyncpg.InterfaceError) as exc:
            raise mapped(exc, write) from exc

    async def _mailbox(self, write: MailboxWrite) -> int:
        headers = headers_text(write.headers)
        try:
            seq: int = await self.con.fetchval(
                APPEND, self.namespace, write.mailbox, write.payload, headers, write.destination, time.time_ns()
            )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise mapped(exc) from exc
        self.written.append((write.mailbox, seq))
        return seq

    async def _commit(self) -> int:
        now = time.time_ns()
        try:
            if self.written:
                mailboxes, sequences = zip(*self.written, strict=True)
                await self.con.execute(STAMP, self.namespace, now, list(mailboxes), list(sequences))
            await self.con.execute("COMMIT")
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise mapped(exc) from exc
        if self.written:
            self.adapter.committed()
        return now

    async def _rollback(self) -> None:
        await abort(self.con)

    def _abandon(self) -> None:
        self.con.terminate()

    async def _release(self) -> None:
        self.adapter._open.discard(self)
        await self._stack.aclose()
