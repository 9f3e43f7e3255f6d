"""Plans made for the table as it is now, for the statements that read a table that fills and
drains.

PostgreSQL plans a prepared statement afresh for its first five runs, then caches a generic plan
costed at the table's size at that moment, and keeps it until the statement is prepared again
(``PostgresSettings.statement_lifetime``) or the table's statistics change (ANALYZE, or
autovacuum where the server runs it). Mailbox rows and a topic's backlog fill and drain: their
table is near empty when a gateway starts, or at the last VACUUM, so the cached plan of a claim
scans it — cheap then, and a scan of every row for each row claimed once the table holds many
(seen: a claim of 100 rows took 36 ms on a 20,000-row mailbox table, on a server without
autovacuum). Those statements — the listener's claims, marks and sweeps, a consumer's claims —
therefore run in a transaction with ``plan_cache_mode = force_custom_plan``: planned at every run
for the table's current size. Each takes many rows, so planning costs little per row. Per-call
statements (a Write, a publish, a Get) keep their cached plans: their lookups are ``ON CONFLICT``
probes of a unique index, which no plan turns into a scan, or point lookups that
``statement_lifetime`` has planned again soon after a table grew.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from adapters.transact.base import ROLLBACK_SECONDS

BEGIN_CUSTOM = "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL plan_cache_mode = force_custom_plan"


async def abort(con: asyncpg.Connection) -> None:
    """Leave the connection outside any transaction before the pool gets it back: ROLLBACK, or
    terminate it (the server rolls back) when that fails or is interrupted."""
    try:
        async with asyncio.timeout(ROLLBACK_SECONDS):
            await con.execute("ROLLBACK")  # harmless outside a transaction (a server warning)
    except BaseException:
        con.terminate()
        raise


@contextlib.asynccontextmanager
async def custom_plans(con: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """One READ COMMITTED transaction on ``con`` whose statements are planned at every run:
    committed when the block ends, rolled back (or the connection closed) when it fails. The
    setting is ``SET LOCAL``, so it ends with the transaction: pooled connections keep no
    session state."""
    await con.execute(BEGIN_CUSTOM)  # one round trip: a simple query of two statements
    try:
        yield con
    except BaseException:
        with contextlib.suppress(Exception):  # a failed ROLLBACK closed the connection: the first error stands
            await asyncio.shield(abort(con))
        raise
    await con.execute("COMMIT")
