"""Sessions in a SQLite file: several worker processes on one machine share them.

One row per session, keyed by the token digest. Resolving a token is one primary-key SELECT
on the store's worker thread; activity is written back at most once a second per session
(``TOUCH_INTERVAL``), never moving a deadline backwards when several workers write it.
"""

from __future__ import annotations

import pathlib
import sqlite3
from typing import Any

from adapters.sqlite_worker import SqliteWorker
from app.sessions.base import SessionRecord, SessionStore, roles_of, roles_text
from prism.v1 import config_pb2

TABLE = """CREATE TABLE IF NOT EXISTS prism_sessions (
    token_hash TEXT PRIMARY KEY, session_id TEXT NOT NULL, identity TEXT NOT NULL,
    config BLOB NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    last_activity_at REAL NOT NULL, roles TEXT NOT NULL DEFAULT '[]'
)"""
INDEX = "CREATE INDEX IF NOT EXISTS prism_sessions_expires_at ON prism_sessions (expires_at)"
CONFIGS = "CREATE TABLE IF NOT EXISTS prism_configs (name TEXT PRIMARY KEY, config BLOB NOT NULL)"
STREAMS = """CREATE TABLE IF NOT EXISTS prism_streams (
    stream_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, end_requested INTEGER NOT NULL DEFAULT 0
)"""
COLUMNS = "session_id, identity, config, created_at, expires_at, last_activity_at, roles"


def _create_schema(connection: sqlite3.Connection) -> None:
    """Once, whichever worker gets here first; a file from before roles were kept gains them."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(TABLE)
        if "roles" not in {row[1] for row in connection.execute("PRAGMA table_info(prism_sessions)")}:
            connection.execute("ALTER TABLE prism_sessions ADD COLUMN roles TEXT NOT NULL DEFAULT '[]'")
        connection.execute(INDEX)
        connection.execute(CONFIGS)
        connection.execute(STREAMS)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


class SqliteSessionStore(SessionStore):
    shared = True

    def __init__(self, path: pathlib.Path, **lifecycle: Any) -> None:
        super().__init__(**lifecycle)
        self.worker = SqliteWorker(path, ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=5000"])

    async def start(self) -> None:
        await self.worker.start()
        await self.worker.run(_create_schema)

    async def close_store(self) -> None:
        await super().close_store()
        await self.worker.close()

    async def _execute(self, sql: str, *params: object) -> None:
        await self.worker.run(lambda connection: connection.execute(sql, params).close())

    async def _insert(self, r: SessionRecord) -> None:
        await self._execute(
            f"INSERT INTO prism_sessions (token_hash, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            r.digest,
            r.session_id,
            r.identity,
            r.config.SerializeToString(),
            r.created_at,
            r.expires_at,
            r.last_activity_at,
            roles_text(r.roles),
        )

    async def _load(self, digest: str) -> SessionRecord | None:
        row = await self.worker.run(
            lambda connection: connection.execute(
                f"SELECT {COLUMNS} FROM prism_sessions WHERE token_hash = ?", (digest,)
            ).fetchone()
        )
        if row is None:
            return None
        config = config_pb2.ClientConfig.FromString(row[2])
        return SessionRecord(
            row[0], row[1], config, row[3], row[4], row[5], digest, roles_of(row[6]), self.streams
        )

    async def _touch(self, r: SessionRecord) -> bool:
        updated = await self.worker.run(
            lambda connection: (
                connection.execute(
                    "UPDATE prism_sessions SET last_activity_at = max(last_activity_at, ?), "
                    "expires_at = max(expires_at, ?) WHERE token_hash = ?",
                    (r.last_activity_at, r.expires_at, r.digest),
                ).rowcount
            )
        )
        return updated > 0

    async def _delete(self, digest: str) -> None:
        await self._execute("DELETE FROM prism_sessions WHERE token_hash = ?", digest)

    async def _sweep(self, expired_before: float) -> None:
        await self._execute("DELETE FROM prism_sessions WHERE expires_at < ?", expired_before)
        # Streams a killed worker never closed go with their session.
        await self._execute("DELETE FROM prism_streams WHERE session_id NOT IN (SELECT session_id FROM prism_sessions)")

    async def active_count(self) -> int:
        now = self.clock()
        return await self.worker.run(  # the expires_at index answers it
            lambda connection: connection.execute("SELECT count(*) FROM prism_sessions WHERE expires_at > ?", (now,)).fetchone()[0]
        )

    async def register_config(self, name: str, config: bytes) -> bool:
        inserted = await self.worker.run(
            lambda connection: connection.execute(
                "INSERT OR IGNORE INTO prism_configs (name, config) VALUES (?, ?)", (name, config)
            ).rowcount
        )
        return inserted > 0

    async def registered_config(self, name: str) -> bytes | None:
        row = await self.worker.run(
            lambda connection: connection.execute(
                "SELECT config FROM prism_configs WHERE name = ?", (name,)
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def registered_configs(self) -> list[bytes]:
        rows = await self.worker.run(
            lambda connection: connection.execute("SELECT config FROM prism_configs ORDER BY name").fetchall()
        )
        return [bytes(row[0]) for row in rows]

    async def stream_opened(self, stream_id: str, session_id: str) -> None:
        await self._execute(
            "INSERT OR REPLACE INTO prism_streams (stream_id, session_id) VALUES (?, ?)", stream_id, session_id
        )

    async def stream_closed(self, stream_id: str) -> None:
        await self._execute("DELETE FROM prism_streams WHERE stream_id = ?", stream_id)

    async def stream_owner(self, stream_id: str) -> str | None:
        row = await self.worker.run(
            lambda connection: connection.execute(
                "SELECT session_id FROM prism_streams WHERE stream_id = ?", (stream_id,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def request_stream_end(self, stream_id: str) -> None:
        await self._execute("UPDATE prism_streams SET end_requested = 1 WHERE stream_id = ?", stream_id)

    async def ends_requested(self, stream_ids: list[str]) -> list[str]:
        if not stream_ids:
            return []
        marks = ", ".join("?" * len(stream_ids))
        rows = await self.worker.run(
            lambda connection: connection.execute(
                f"SELECT stream_id FROM prism_streams WHERE end_requested = 1 AND stream_id IN ({marks})", stream_ids
            ).fetchall()
        )
        return [str(row[0]) for row in rows]
