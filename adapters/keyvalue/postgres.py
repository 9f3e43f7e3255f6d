"""PostgreSQL KeyValue store over an asyncpg connection pool.

Namespaces and keys are stored as their UTF-8 bytes (``bytea``): Postgres ``text`` cannot hold
NUL, which both client keys and the service's reserved idempotency namespace contain, and
``bytea`` compares by ``memcmp`` — the same UTF-8 byte order every other backend scans in, with
no collation involved. A prefix scan is a key range on the primary key, never ``LIKE``.

Every conditional write is one statement, so the check and the write are atomic without an
explicit transaction. The schema is created or migrated at start-up under a transaction-scoped
advisory lock, so gateway processes starting together take turns.

Statements run on the backend instance's pool (``adapters/backends/postgres.py``), which maps
every driver failure at its boundary: the server not answering is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from adapters.capabilities import Capability
from adapters.keyvalue.base import (
    KeyValueAdapter,
    Record,
    Write,
    already_exists,
    etag_mismatch,
    new_etag,
    prefix_end,
)
from prism.errors import PrismError

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.postgres import PostgresPool

log = logging.getLogger("prism.adapters.postgres")

# Held while the schema is checked or migrated; any fixed bigint unique to Prism.
SCHEMA_LOCK = 0x7072_6973_6D6B_76  # "prismkv"

# Applied in order; prism_schema remembers how many ran. Never edit a released entry: append.
MIGRATIONS = [
    """
    CREATE TABLE prism_kv (
        namespace  bytea NOT NULL,
        key        bytea NOT NULL,
        value      bytea NOT NULL,
        etag       text NOT NULL,
        expires_at double precision,  -- unix seconds; NULL never expires
        PRIMARY KEY (namespace, key)
    )
    """,
    "CREATE INDEX prism_kv_expiry ON prism_kv (expires_at) WHERE expires_at IS NOT NULL",
]



def live(param: int) -> str:
    """The row has not expired at the time bound to parameter ``$param``."""
    return f"(expires_at IS NULL OR expires_at > ${param})"

SWEEP_BATCH = 1000


def _reported(prefix: bytes | None) -> str:
    """The SQL for a row's value when it starts with ``prefix`` (a literal: never a client's
    bytes), else NULL."""
    if prefix is None:
        return "NULL::bytea"
    return f"CASE WHEN substring(value from 1 for {len(prefix)}) = decode('{prefix.hex()}', 'hex') THEN value END"

class PostgresKeyValue(KeyValueAdapter):
    capabilities = frozenset(
        {
            Capability.TTL,
            Capability.ETAG,
            Capability.CREATE_ONLY,
            Capability.SCAN,
            Capability.DURABLE,
            Capability.SHARED,
        }
    )

    def __init__(self, pool: PostgresPool, *, sweep_interval: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool = pool  # the backend's, shared with its other patterns
        self.sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self.pool.connection() as con:
            await migrate(con)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="prism-postgres-kv-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        async with self.pool.connection() as con:
            return await con.fetchrow(sql, *args)

    async def get(self, namespace: str, key: str) -> Record | None:
        row = await self._fetchrow(
            f"SELECT value, etag, expires_at FROM prism_kv WHERE namespace=$1 AND key=$2 AND {live(3)}",
            namespace.encode(), key.encode(), self.clock(),
        )
        return Record(row[0], row[1], row[2]) if row else None

    async def exists(self, namespace: str, key: str) -> bool:
        row = await self._fetchrow(
            f"SELECT 1 FROM prism_kv WHERE namespace=$1 AND key=$2 AND {live(3)}",
            namespace.encode(), key.encode(), self.clock(),
        )
        return row is not None

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        etag, now = new_etag(), self.clock()
        args: list[object] = [namespace.encode(), key.encode(), write.value, etag, write.expires_at, now]
        # The replaced value, read in the same statement as the write, from its snapshot. (Not
        # FOR UPDATE: the CTE runs when RETURNING first reads it, after the write, and would skip
        # the row this statement just changed.) A writer committing in between makes this the
        # value before theirs: its chunks, already dropped by them, are dropped again, and theirs
        # are left as unreachable garbage, as the KeyValue service allows.
        reading = write.previous_prefix is not None and not write.if_absent  # if_absent replaces nothing live
        old = (
            f"WITH old AS (SELECT {_reported(write.previous_prefix)} AS previous FROM prism_kv "
            f"WHERE namespace=$1 AND key=$2 AND {live(6)}) "
            if reading
            else ""
        )
        returning = "RETURNING (SELECT previous FROM old)" if reading else "RETURNING NULL::bytea"
        upsert = (
            "INSERT INTO prism_kv (namespace, key, value, etag, expires_at) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value, etag=excluded.etag, "
            "expires_at=excluded.expires_at"
        )
        if write.if_match:
            # Compare-and-set in one statement: only the live row with that ETag changes.
            sql = (
                f"{old}UPDATE prism_kv SET value=$3, etag=$4, expires_at=$5 "
                f"WHERE namespace=$1 AND key=$2 AND etag=$7 AND {live(6)} {returning}"
            )
            args.append(write.if_match)
        elif write.if_absent:
            # Create-only: the conflict branch may replace an expired row only; a live one makes
            # the statement return nothing.
            sql = f"{upsert} WHERE prism_kv.expires_at <= $6 {returning}"
        elif reading:
            sql = f"{old}{upsert} {returning}"
        else:
            sql, args = f"{upsert} {returning}", args[:5]
        row = await self._fetchrow(sql, *args)
        if row is None:
            raise etag_mismatch(key) if write.if_match else already_exists(key)
        return etag, row[0]

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        ns, k, now = namespace.encode(), key.encode(), self.clock()
        reported = _reported(previous_prefix)
        if if_match:
            row = await self._fetchrow(
                f"DELETE FROM prism_kv WHERE namespace=$1 AND key=$2 AND etag=$4 AND {live(3)} RETURNING {reported}",
                ns, k, now, if_match,
            )
            if row is None:
                raise etag_mismatch(key)
            return True, row[0]
        row = await self._fetchrow(
            f"DELETE FROM prism_kv WHERE namespace=$1 AND key=$2 RETURNING {live(3)}, {reported}", ns, k, now
        )
        if row is None or not row[0]:
            return False, None
        return True, row[1]

    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        low, after = prefix.encode(), start_after.encode()
        exclusive = bool(after) and after >= low
        # A key range on the primary key: no wildcard in a key or prefix is ever interpreted,
        # and the index range scan stops where the prefix ends.
        sql = (
            f"SELECT key, value, etag, expires_at FROM prism_kv WHERE namespace=$1 "
            f"AND key {'>' if exclusive else '>='} $2 AND {live(3)} "
        )
        args: list[object] = [namespace.encode(), after if exclusive else low, self.clock(), limit]
        end = prefix_end(low)
        if end is not None:
            sql += "AND key < $5 "
            args.append(end)
        async with self.pool.connection() as con:
            rows = await con.fetch(sql + "ORDER BY key LIMIT $4", *args)
        return [(r[0].decode(), Record(r[1], r[2], r[3])) for r in rows]

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        if not keys:
            return []
        async with self.pool.connection() as con:
            rows = await con.fetch(
                f"SELECT key, value, etag, expires_at FROM prism_kv "
                f"WHERE namespace=$1 AND key = ANY($2::bytea[]) AND {live(3)}",
                namespace.encode(), [k.encode() for k in keys], self.clock(),
            )
        found = {r[0]: Record(r[1], r[2], r[3]) for r in rows}
        return [found.get(k.encode()) for k in keys]

    async def sweep(self) -> int:
        """Delete up to a batch of expired rows (reads already ignore them); returns how many."""
        async with self.pool.connection() as con:
            result = await con.execute(
                "DELETE FROM prism_kv WHERE (namespace, key) IN ("
                "  SELECT namespace, key FROM prism_kv WHERE expires_at <= $1"
                "  LIMIT $2 FOR UPDATE SKIP LOCKED"
                ") AND expires_at <= $1",  # rechecked if a writer renewed the row meanwhile
                self.clock(), SWEEP_BATCH,
            )
        return int(result.split()[-1])

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                while await self.sweep() == SWEEP_BATCH:
                    pass
            except PrismError as exc:
                log.warning("expired-row sweep skipped: %s", exc.message)


async def migrate(con: asyncpg.Connection) -> None:
    """Bring the schema to the latest version; safe when several processes run it at once."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await con.execute(
            "CREATE TABLE IF NOT EXISTS prism_schema (component text PRIMARY KEY, version integer NOT NULL)"
        )
        done = await con.fetchval("SELECT version FROM prism_schema WHERE component = 'keyvalue'") or 0
        for statement in MIGRATIONS[done:]:
            await con.execute(statement)
        if done < len(MIGRATIONS):
            await con.execute(
                "INSERT INTO prism_schema (component, version) VALUES ('keyvalue', $1) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                len(MIGRATIONS),
            )
