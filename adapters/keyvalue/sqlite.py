"""SQLite KeyValue store: the embedded default, one file under the data directory.

Statements run on the backend's :class:`SqliteWorker` thread (``adapters/backends/sqlite.py``
opens it, with WAL mode and a busy timeout so several gateway worker processes share the
file), so the event loop never waits on disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from adapters.capabilities import Capability
from adapters.keyvalue.base import (
    KeyValueAdapter,
    Record,
    Write,
    already_exists,
    etag_mismatch,
    new_etag,
    unavailable,
)
from adapters.sqlite_worker import SqliteWorker

SCHEMA = """
CREATE TABLE IF NOT EXISTS prism_kv (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    etag       TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID
"""

LIVE = "(expires_at IS NULL OR expires_at > ?)"
T = TypeVar("T")


def _reported(prefix: bytes | None) -> str:
    """The SQL for a row's value when it starts with ``prefix`` (a literal: never a client's
    bytes), else NULL."""
    if prefix is None:
        return "NULL"
    return f"CASE WHEN substr(value, 1, {len(prefix)}) = X'{prefix.hex()}' THEN value END"


Statement = tuple[str, tuple[object, ...]]


def _read_then_write(connection: sqlite3.Connection, read: Statement, write: Statement) -> tuple[bool, bytes | None]:
    """The value ``read`` finds and whether ``write`` wrote, in one transaction, so no other
    worker process writes the row in between."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        before = connection.execute(*read).fetchall()
        written = bool(connection.execute(*write).fetchall())
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return written, (before[0][0] if before and written else None)


class SqliteKeyValue(KeyValueAdapter):
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

    def __init__(self, worker: SqliteWorker, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker = worker  # the backend's connection, shared with its other patterns

    async def start(self) -> None:
        await self._rows(SCHEMA)

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """``job`` on the worker thread. The file being locked, full or unreadable is UNAVAILABLE;
        any other driver error is a bug here, left to surface as INTERNAL (and be logged)."""
        try:
            return await self.worker.run(job)
        except sqlite3.OperationalError as exc:
            raise unavailable("sqlite", exc) from exc

    async def _rows(self, sql: str, *params: object) -> list[sqlite3.Row]:
        """All rows of one statement, in one trip to the worker thread."""
        return await self._run(lambda connection: connection.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, *params: object) -> sqlite3.Row | None:
        rows = await self._rows(sql, *params)
        return rows[0] if rows else None

    async def get(self, namespace: str, key: str) -> Record | None:
        row = await self._fetchone(
            f"SELECT value, etag, expires_at FROM prism_kv WHERE namespace=? AND key=? AND {LIVE}",
            namespace,
            key,
            self.clock(),
        )
        return Record(row[0], row[1], row[2]) if row else None

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        etag, now = new_etag(), self.clock()
        if write.if_match:
            # Compare-and-set in one statement: only the live row with that ETag changes.
            statement = (
                f"UPDATE prism_kv SET value=?, etag=?, expires_at=? "
                f"WHERE namespace=? AND key=? AND etag=? AND {LIVE} RETURNING 1",
                (write.value, etag, write.expires_at, namespace, key, write.if_match, now),
            )
        else:
            # An expired row counts as absent: the conflict clause may only overwrite it.
            guard = "WHERE prism_kv.expires_at IS NOT NULL AND prism_kv.expires_at <= ?" if write.if_absent else ""
            params: tuple[object, ...] = (namespace, key, write.value, etag, write.expires_at)
            statement = (
                "INSERT INTO prism_kv (namespace, key, value, etag, expires_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value, etag=excluded.etag, "
                f"expires_at=excluded.expires_at {guard} RETURNING 1",
                (*params, now) if write.if_absent else params,
            )
        if write.previous_prefix is None:
            written, previous = bool(await self._rows(statement[0], *statement[1])), None
        else:
            read = (
                f"SELECT {_reported(write.previous_prefix)} FROM prism_kv WHERE namespace=? AND key=? AND {LIVE}",
                (namespace, key, now),
            )
            written, previous = await self._run(lambda connection: _read_then_write(connection, read, statement))
        if not written:
            raise etag_mismatch(key) if write.if_match else already_exists(key)
        return etag, previous

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        now = self.clock()
        reported = _reported(previous_prefix)
        if if_match:
            row = await self._fetchone(
                f"DELETE FROM prism_kv WHERE namespace=? AND key=? AND etag=? AND {LIVE} RETURNING {reported}",
                namespace, key, if_match, now,
            )
            if row is None:
                raise etag_mismatch(key)
            return True, row[0]
        row = await self._fetchone(
            f"DELETE FROM prism_kv WHERE namespace=? AND key=? RETURNING {reported}, expires_at", namespace, key
        )
        if row is None or not self.live(row[1]):
            return False, None
        return True, row[0]

    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        # Prefix as a key range, not LIKE: no wildcard in a key is ever interpreted.
        sql = (
            f"SELECT key, value, etag, expires_at FROM prism_kv WHERE namespace=? AND key > ? "
            f"AND substr(CAST(key AS BLOB), 1, ?) = CAST(? AS BLOB) AND {LIVE} ORDER BY key LIMIT ?"
        )
        exclusive = bool(start_after) and start_after >= prefix
        rows = await self._rows(
            sql if exclusive else sql.replace("key > ?", "key >= ?"),
            namespace, start_after if exclusive else prefix, len(prefix.encode()), prefix, self.clock(), limit,
        )
        return [(r[0], Record(r[1], r[2], r[3])) for r in rows]

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        rows = await self._rows(
            f"SELECT key, value, etag, expires_at FROM prism_kv WHERE namespace=? AND key IN ({marks}) AND {LIVE}",
            namespace, *keys, self.clock(),
        )
        found = {r[0]: Record(r[1], r[2], r[3]) for r in rows}
        return [found.get(k) for k in keys]
