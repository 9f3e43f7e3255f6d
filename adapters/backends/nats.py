"""NATS with JetStream: one client connection per backend instance (NATS multiplexes every
request, subscription and publish over it), lent to every pattern's adapter on it together
with its JetStream context.

The client reconnects for ever once it has connected (its requests fail fast meanwhile), but
the first connection is bounded by ``connect_timeout``: an unreachable server at start-up is
UNAVAILABLE naming it. ``ping`` asks JetStream itself (account info), so a server running
without JetStream shows as down. Driver errors are mapped at the boundary (:meth:`errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Literal

import grpc
import nats.errors as nerr
import nats.js.errors as jerr
from nats.aio.client import Client
from nats.js import JetStreamContext
from pydantic import Field, model_validator

from adapters.backends import BackendSettings, BackendType, Connection, Environment, cancellation_kept
from adapters.pubsub.nats import NatsHistoryPubSub, NatsPubSub
from adapters.queue.nats import NatsQueue
from prism.errors import PrismError, internal

log = logging.getLogger("prism.nats")

# Driver errors that mean "the server is not answering (or JetStream is not ready)".
UNAVAILABLE_ERRORS = (
    nerr.TimeoutError,
    nerr.NoRespondersError,
    nerr.ConnectionClosedError,
    nerr.ConnectionReconnectingError,
    nerr.ConnectionDrainingError,
    nerr.StaleConnectionError,
    nerr.OutboundBufferLimitError,
    nerr.NoServersError,
    jerr.NoStreamResponseError,
    jerr.ServiceUnavailableError,
    OSError,
    TimeoutError,
)


class NatsSettings(BackendSettings):
    type: Literal["nats"] = "nats"
    url: str = "nats://127.0.0.1:4222"
    connect_timeout: float = Field(default=2.0, gt=0)  # seconds, for the first connection
    command_timeout: float = Field(default=5.0, gt=0)  # seconds per JetStream request
    # Names of the streams, consumers and key-value buckets Prism makes start with it: gateways
    # with different prefixes share a NATS server without seeing each other's topics.
    prefix: str = Field(default="PRISMQ", pattern=r"^[A-Za-z0-9-]{1,32}$")
    # Seconds JetStream remembers a publish's idempotency token (the stream's duplicate window).
    dedup_window: float = Field(default=120.0, gt=0, le=7 * 86400)
    # PubSub history: a JetStream stream (<prefix>_pubsub, file storage) keeps what is published
    # to this backend's PubSub subjects, so a subscription may start in the past (replay). Kept
    # for at most ``pubsub_max_age`` seconds and ``pubsub_max_bytes`` bytes, the oldest
    # discarded first (0: no such limit; not both). Every gateway on a prefix should agree.
    pubsub_history: bool = False
    pubsub_max_age: float = Field(default=86400.0, ge=0)
    pubsub_max_bytes: int = Field(default=1 << 30, ge=0)

    @model_validator(mode="after")
    def _history_is_bounded(self) -> NatsSettings:
        if self.pubsub_history and not self.pubsub_max_age and not self.pubsub_max_bytes:
            raise ValueError("pubsub_history needs a limit: pubsub_max_age or pubsub_max_bytes above 0")
        return self


def where(url: str) -> str:
    """host:port of a NATS URL, without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 4222}"


class NatsConnection(Connection):
    """The instance's client (:attr:`nc`) and JetStream context (:attr:`js`)."""

    def __init__(self, settings: NatsSettings, name: str = "nats") -> None:
        self.settings = settings
        self.name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError(f"nats backend {self.name!r} used before start()")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError(f"nats backend {self.name!r} used before start()")
        return self._js

    async def start(self) -> None:
        settings, client = self.settings, Client()
        try:
            # max_reconnect_attempts=-1 also retries the first connection for ever: bounded here.
            async with asyncio.timeout(settings.connect_timeout):
                await client.connect(
                    settings.url,
                    name=f"prism {self.name}",
                    connect_timeout=settings.connect_timeout,
                    reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1,
                    error_cb=self._error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                )
            js = client.jetstream(timeout=settings.command_timeout)
            await js.account_info()
        except (*UNAVAILABLE_ERRORS, jerr.APIError) as exc:
            await client.close()
            why = f"no answer within {settings.connect_timeout:g}s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise PrismError(
                grpc.StatusCode.UNAVAILABLE,
                f"backend {self.name!r}: nats at {where(settings.url)} unreachable (or without JetStream) at start-up: {why}",
            ) from exc
        self._nc, self._js = client, js

    async def close(self) -> None:
        if self._nc is not None:
            client, self._nc, self._js = self._nc, None, None
            await client.close()  # no warning: _disconnected sees _nc gone

    async def ping(self) -> None:
        with self.errors():
            await self.js.account_info()

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Driver errors inside as PrismErrors: the server not answering is UNAVAILABLE;
        anything else is logged and INTERNAL."""
        with cancellation_kept():
            try:
                yield
            except PrismError:
                raise
            except (nerr.Error, OSError, TimeoutError) as exc:
                if isinstance(exc, UNAVAILABLE_ERRORS) or (isinstance(exc, jerr.APIError) and exc.code == 503):
                    raise PrismError(grpc.StatusCode.UNAVAILABLE, f"nats backend unavailable: {type(exc).__name__}") from exc
                log.error("nats backend %r: request failed: %r", self.name, exc)
                raise internal() from exc

    async def _error(self, exc: Exception) -> None:
        log.warning("nats backend %r: %s: %s", self.name, type(exc).__name__, exc)

    async def _disconnected(self) -> None:
        if self._nc is None:  # closing
            return
        log.warning("nats backend %r: disconnected from %s", self.name, where(self.settings.url))

    async def _reconnected(self) -> None:
        log.info("nats backend %r: reconnected", self.name)


def connect(settings: NatsSettings, environment: Environment) -> NatsConnection:
    return NatsConnection(settings, environment.name)


BACKEND = BackendType(
    name="nats",
    settings=NatsSettings,
    connect=connect,
    adapters={
        "QUEUE": lambda connection, environment: NatsQueue(connection),
        "PUBSUB": lambda connection, environment: (
            NatsHistoryPubSub if connection.settings.pubsub_history else NatsPubSub
        )(connection, environment.stream_buffer),
    },
)
