"""SQLite KeyValue store: the embedded default, one file under the data directory.

Statements run on a :class:`SqliteWorker` thread, so the event loop never waits on disk. WAL
mode and a busy timeout let several gateway worker processes share the file.
"""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Sequence

from adapters.capabilities import Capability
from adapters.keyvalue.base import (
    KeyValueAdapter,
    Record,
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

    def __init__(self, path: str | pathlib.Path, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.worker = SqliteWorker(
            pathlib.Path(path), ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000"]
        )

    async def start(self) -> None:
        await self.worker.start()
        await self._rows(SCHEMA)

    async def close(self) -> None:
        await self.worker.close()

    async def _rows(self, sql: str, *params: object) -> list[sqlite3.Row]:
        """All rows of one statement, in one trip to the worker thread."""
        try:
            return await self.worker.run(lambda connection: connection.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise unavailable("sqlite", exc) from exc

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

    async def set(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_match: str = "",
        if_absent: bool = False,
    ) -> str:
        etag, now = new_etag(), self.clock()
        if if_match:
            # Compare-and-set in one statement: only the live row with that ETag changes.
            row = await self._fetchone(
                f"UPDATE prism_kv SET value=?, etag=?, expires_at=? "
                f"WHERE namespace=? AND key=? AND etag=? AND {LIVE} RETURNING 1",
                value, etag, expires_at, namespace, key, if_match, now,
            )
            if row is None:
                raise etag_mismatch(key)
            return etag
        # An expired row counts as absent: the conflict clause may only overwrite it.
        guard = "WHERE prism_kv.expires_at IS NOT NULL AND prism_kv.expires_at <= ?" if if_absent else ""
        params: tuple[object, ...] = (namespace, key, value, etag, expires_at)
        row = await self._fetchone(
            "INSERT INTO prism_kv (namespace, key, value, etag, expires_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value, etag=excluded.etag, "
            f"expires_at=excluded.expires_at {guard} RETURNING 1",
            *((*params, now) if if_absent else params),
        )
        if row is None:
            raise already_exists(key)
        return etag

    async def delete(self, namespace: str, key: str, *, if_match: str = "") -> bool:
        now = self.clock()
        if if_match:
            row = await self._fetchone(
                f"DELETE FROM prism_kv WHERE namespace=? AND key=? AND etag=? AND {LIVE} RETURNING 1",
                namespace, key, if_match, now,
            )
            if row is None:
                raise etag_mismatch(key)
            return True
        row = await self._fetchone(
            "DELETE FROM prism_kv WHERE namespace=? AND key=? RETURNING expires_at", namespace, key
        )
        return row is not None and self.live(row[0])

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
