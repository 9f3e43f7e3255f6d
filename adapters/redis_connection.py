"""One way to open Redis for every Prism component (KeyValue adapter, session store): a bounded
pool that fails fast — redis-py's default retries for seconds, which would make calls hang
while the server is down — checked with a PING at start-up."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Iterator

import grpc
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from prism.errors import PrismError, internal

log = logging.getLogger("prism.redis")

# Driver errors that mean "the server is not answering": mapped to UNAVAILABLE.
UNAVAILABLE_ERRORS = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.TryAgainError, OSError, TimeoutError)


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Driver errors inside as PrismErrors: the server not answering is UNAVAILABLE naming
    ``what``; anything else is logged and INTERNAL."""
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        if isinstance(exc, UNAVAILABLE_ERRORS):
            raise PrismError(grpc.StatusCode.UNAVAILABLE, f"{what} unavailable: {type(exc).__name__}") from exc
        log.error("%s: redis command failed: %r", what, exc)
        raise internal() from exc


async def connect(url: str, *, pool_size: int, connect_timeout: float, command_timeout: float, what: str) -> aioredis.Redis:
    no_retry = Retry(NoBackoff(), 0)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=command_timeout,  # waiting for a free connection
        socket_connect_timeout=connect_timeout,
        socket_timeout=command_timeout,
        retry=no_retry,
    )
    client = aioredis.Redis(connection_pool=pool, retry=no_retry)
    try:
        await client.ping()
    except UNAVAILABLE_ERRORS as exc:
        await client.aclose()
        where = urllib.parse.urlsplit(url)
        raise PrismError(
            grpc.StatusCode.UNAVAILABLE,
            f"{what}: redis at {where.hostname}:{where.port or 6379} unreachable at start-up: {type(exc).__name__}: {exc}",
        ) from exc
    return client
