"""Redis: one client (a bounded connection pool) per backend instance, lent to every pattern's
adapter on it, and the one way any Prism component opens Redis (the session store too).

The pool fails fast — redis-py's default retries for seconds, which would make calls hang while
the server is down — and is checked with a PING at start-up. Connection failures and timeouts
become UNAVAILABLE at once; the pool replaces broken connections on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Literal

import grpc
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.backends import (
    BackendType,
    Connection,
    Environment,
    NetworkSettings,
    PoolUse,
    cancellation_kept,
)
from adapters.keyvalue.redis import RedisKeyValue
from adapters.pubsub.redis import RedisPubSub
from adapters.queue.redis import RedisQueue
from prism.errors import PrismError, internal

log = logging.getLogger("prism.redis")

# Driver errors that mean "the server is not answering": mapped to UNAVAILABLE.
UNAVAILABLE_ERRORS = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.TryAgainError, OSError, TimeoutError)


class RedisSettings(NetworkSettings):
    type: Literal["redis"] = "redis"
    url: str = "redis://127.0.0.1:6379/0"


class RedisClient(Connection):
    """A started :attr:`redis` client for ``settings``; ``what`` names its user in messages.
    Its users run commands inside :meth:`errors`, so no driver exception crosses a contract."""

    def __init__(self, settings: RedisSettings, what: str = "redis backend") -> None:
        self.settings = settings
        self.what = what
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError(f"{self.what} used before start()")
        return self._redis

    async def start(self) -> None:
        settings, no_retry = self.settings, Retry(NoBackoff(), 0)
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.pool_size,
            timeout=settings.command_timeout,  # waiting for a free connection
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.command_timeout,
            retry=no_retry,
        )
        client = aioredis.Redis(connection_pool=pool, retry=no_retry)
        try:
            await client.ping()
        except UNAVAILABLE_ERRORS as exc:
            await client.aclose(close_connection_pool=True)
            where = urllib.parse.urlsplit(settings.url)
            raise PrismError(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.what}: redis at {where.hostname}:{where.port or 6379} unreachable at start-up: "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        self._redis = client

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose(close_connection_pool=True)

    def pool_use(self) -> PoolUse | None:
        if self._redis is None:
            return None
        pool = self._redis.connection_pool  # redis-py keeps no public count of these
        return PoolUse(len(getattr(pool, "_in_use_connections", ())), len(getattr(pool, "_available_connections", ())))

    async def ping(self) -> None:
        with self.errors():
            await self.redis.ping()

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Driver errors inside as PrismErrors: the server not answering is UNAVAILABLE naming
        ``what``; anything else is logged and INTERNAL."""
        with cancellation_kept():
            try:
                yield
            except (rex.RedisError, OSError) as exc:
                if isinstance(exc, UNAVAILABLE_ERRORS):
                    raise PrismError(grpc.StatusCode.UNAVAILABLE, f"{self.what} unavailable: {type(exc).__name__}") from exc
                log.error("%s: redis command failed: %r", self.what, exc)
                raise internal() from exc


def connect(settings: RedisSettings, environment: Environment) -> RedisClient:
    return RedisClient(settings, "redis backend")


BACKEND = BackendType(
    name="redis",
    settings=RedisSettings,
    connect=connect,
    adapters={
        "KEY_VALUE": lambda client, environment: RedisKeyValue(client),
        "QUEUE": lambda client, environment: RedisQueue(client),
        "PUBSUB": lambda client, environment: RedisPubSub(client, environment.stream_buffer),
    },
)
