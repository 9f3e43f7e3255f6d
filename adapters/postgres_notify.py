"""NOTIFY after a commit, not inside it, coalesced: how the Postgres adapters tell other
gateways' listeners that something committed.

PostgreSQL holds one database-wide lock from the commit of a transaction that notified until
its WAL flush ends, so a ``pg_notify`` inside every Write or publish makes their commits take
turns. Here the payloads a commit makes due are sent afterwards, in one statement of their own
that does not wait for its WAL flush (nothing in it needs to survive a crash), at most every
``every`` seconds: the payloads due meanwhile share it. A crash between a commit and its NOTIFY
costs the other gateways their polling interval, never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the pool's module imports the adapters that import this one
    from adapters.backends.postgres import PostgresPool

log = logging.getLogger("prism.adapters.postgres")

NOTIFY = "SELECT pg_notify($1, p), set_config('synchronous_commit', 'off', true) FROM unnest($2::text[]) AS p"
EVERY = 0.02  # seconds: at most one NOTIFY statement this often


class AfterCommitNotifier:
    def __init__(self, pool: PostgresPool, channel: str, name: str, every: float = EVERY) -> None:
        self.pool, self.channel, self.name, self.every = pool, channel, name, every
        self._due: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def notify(self, payload: str) -> None:
        """``payload`` goes out with the next NOTIFY (call it once the change has committed)."""
        self._due.add(payload)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-notify")

    async def close(self) -> None:
        """Wait for the NOTIFY under way, so the last commits' goes out before the pool closes."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._due:
                payloads, self._due = sorted(self._due), set()
                started = loop.time()
                try:
                    async with self.pool.connection() as con:
                        await con.execute(NOTIFY, self.channel, payloads)
                except Exception as exc:  # the database is down: the listeners elsewhere poll
                    if not self._failed:
                        log.warning("%s: cannot notify other gateways (%s: %s)", self.name, type(exc).__name__, exc)
                    self._failed = True
                else:
                    self._failed = False
                await asyncio.sleep(max(0.0, started + self.every - loop.time()))
        finally:
            self._task = None
