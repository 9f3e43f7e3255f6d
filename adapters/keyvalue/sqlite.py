"""SQLite KeyValue store: the embedded default, one file under the data directory.

aiosqlite runs every statement on its own thread, so the event loop never waits on disk. WAL
mode and a busy timeout let several gateway worker processes share the file.
"""

from __future__ import annotations

import pathlib
import sqlite3

import aiosqlite

from adapters.capabilities import Capability
from adapters.keyvalue.base import (
    KeyValueAdapter,
    Record,
    already_exists,
    etag_mismatch,
    new_etag,
    unavailable,
)

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
        self.path = pathlib.Path(path)
        self._db: aiosqlite.Connection | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute(SCHEMA)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteKeyValue used before start()")
        return self._db

    async def _fetchone(self, sql: str, *params: object) -> sqlite3.Row | None:
        try:
            async with self.db.execute(sql, params) as cursor:
                return await cursor.fetchone()
        except sqlite3.Error as exc:
            raise unavailable("sqlite", exc) from exc

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
        try:
            rows = await self.db.execute_fetchall(
                sql if exclusive else sql.replace("key > ?", "key >= ?"),
                (namespace, start_after if exclusive else prefix, len(prefix.encode()), prefix, self.clock(), limit),
            )
        except sqlite3.Error as exc:
            raise unavailable("sqlite", exc) from exc
        return [(r[0], Record(r[1], r[2], r[3])) for r in rows]

    async def get_many(self, namespace: str, keys: list[str]) -> list[Record | None]:  # type: ignore[override]
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        try:
            rows = await self.db.execute_fetchall(
                f"SELECT key, value, etag, expires_at FROM prism_kv "
                f"WHERE namespace=? AND key IN ({marks}) AND {LIVE}",
                (namespace, *keys, self.clock()),
            )
        except sqlite3.Error as exc:
            raise unavailable("sqlite", exc) from exc
        found = {r[0]: Record(r[1], r[2], r[3]) for r in rows}
        return [found.get(k) for k in keys]
