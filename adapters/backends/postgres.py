"""PostgreSQL: one asyncpg pool per backend instance, lent to every pattern's adapter on it, so
they can share a transaction (a Transact outbox with a Queue) and the server sees one pool.

Failures to reach the server (refused, reset, shutting down, starting up, too many clients,
timeouts) become UNAVAILABLE within ``connect_timeout`` / ``command_timeout``; the pool drops
broken connections and opens new ones on the next call, so it recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator
from typing import Literal

import asyncpg
import grpc
from pydantic import Field

from adapters.backends import BackendType, Environment, NetworkSettings, PoolUse
from adapters.backends import Connection as BackendConnection
from adapters.keyvalue.base import unavailable
from adapters.keyvalue.postgres import PostgresKeyValue
from adapters.queue.postgres import PostgresQueue
from adapters.reader.postgres import PostgresReader
from adapters.transact.postgres import PostgresTransact
from prism.errors import PrismError, internal

log = logging.getLogger("prism.adapters.postgres")

# SQLSTATE classes that mean "the server cannot serve now": connection exception,
# insufficient resources (too many connections), operator intervention (shutdown, starting up).
UNAVAILABLE_CLASSES = ("08", "53", "57")


class PostgresSettings(NetworkSettings):
    type: Literal["postgres"] = "postgres"
    dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    # Seconds a connection keeps a prepared statement, and so the plan PostgreSQL cached for it,
    # before preparing it again: a plan made while a table was small (a point lookup planned as
    # a scan of its one page) is made again for its size at most this long after it grew.
    # Statistics alone are no cure: ANALYZE, where autovacuum runs it, comes after 10% growth.
    # 0: kept as long as the connection lives.
    statement_lifetime: float = Field(default=10.0, ge=0)


def where(dsn: str) -> str:
    """host:port/database of a DSN, without credentials, for messages."""
    parts = urllib.parse.urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in UNAVAILABLE_CLASSES


class PostgresPool(BackendConnection):
    """The instance's pool; :meth:`connection` is how every adapter borrows from it."""

    def __init__(self, settings: PostgresSettings, name: str = "postgres") -> None:
        self.settings = settings
        self.name = name
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        settings = self.settings
        try:
            self._pool = await asyncpg.create_pool(
                settings.dsn,
                min_size=1,
                max_size=settings.pool_size,
                timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout,
                max_cached_statement_lifetime=settings.statement_lifetime,
                server_settings={"application_name": "prism"},
                reset=_keep_session,
            )
        except Exception as exc:
            if is_unavailable(exc):
                raise PrismError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"backend {self.name!r}: postgres at {where(settings.dsn)} unreachable at start-up: "
                    f"{type(exc).__name__}: {exc}",
                ) from exc
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(self.settings.command_timeout):
                    await pool.close()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    def pool_use(self) -> PoolUse | None:
        if self._pool is None:
            return None
        idle = self._pool.get_idle_size()
        return PoolUse(self._pool.get_size() - idle, idle)

    async def ping(self) -> None:
        async with self.connection() as con:
            await con.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, with every driver failure mapped at the boundary: the server
        not answering is UNAVAILABLE, any other database error is logged and INTERNAL."""
        if self._pool is None:
            raise RuntimeError(f"postgres backend {self.name!r} used before start()")
        pool = self._pool
        try:
            # The deadline around the wait, not acquire(timeout=): asyncpg runs a timed wait as
            # a task of its own, one more task and loop turn on every statement.
            async with asyncio.timeout(self.settings.command_timeout):
                con = await pool.acquire()
            try:
                yield con
            except asyncpg.InternalClientError:
                # The protocol lost track of the connection's state (seen when the server
                # terminates it mid-call): never hand that connection out again.
                con.terminate()
                raise
            finally:
                await _release(pool, con)
        except PrismError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable("postgres", exc) from exc
            if isinstance(exc, asyncpg.PostgresError):
                log.exception("postgres statement failed")
                raise internal() from exc
            raise


async def _release(pool: asyncpg.Pool, con: asyncpg.Connection) -> None:
    """Return ``con`` to the pool. A failure here (resetting a connection the server is closing)
    must not replace the statement's own outcome: the pool has already terminated that
    connection, and a committed write stays acknowledged."""
    try:
        await pool.release(con)
    except Exception as exc:
        log.debug("postgres connection dropped on release: %s: %s", type(exc).__name__, exc)


async def _keep_session(con: asyncpg.Connection) -> None:
    """What the pool runs on release besides rolling back an open transaction (which asyncpg
    always does): nothing. Its default reset query (advisory unlock, ``CLOSE ALL``,
    ``UNLISTEN *``, ``RESET ALL``) is a round trip on every release, ~0.4 ms a call here, and
    undoes state no adapter leaves on a pooled connection: settings are ``SET LOCAL`` /
    ``set_config(..., true)``, locks ``pg_advisory_xact_lock``, and LISTEN runs on connections
    of their own, never the pool's."""


def connect(settings: PostgresSettings, environment: Environment) -> PostgresPool:
    return PostgresPool(settings, environment.name)


BACKEND = BackendType(
    name="postgres",
    settings=PostgresSettings,
    connect=connect,
    adapters={
        "KEY_VALUE": lambda pool, environment: PostgresKeyValue(pool),
        "QUEUE": lambda pool, environment: PostgresQueue(pool),
        "READER": lambda pool, environment: PostgresReader(pool),
        "TRANSACT": lambda pool, environment: PostgresTransact(pool),
    },
)
