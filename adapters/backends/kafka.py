"""Kafka: one producer and one admin client per backend instance, lent to every pattern's
adapter on it; adapters open their own readers (consumers without a Kafka group) through
:meth:`KafkaConnection.reader`, and PubSub's queue-group members (consumers in a Kafka group)
through :meth:`KafkaConnection.member`, so every Kafka client of an instance shares its settings.

aiokafka reconnects by itself once started; the first connection is tried again until
``connect_timeout`` has passed, so an unreachable cluster at start-up is UNAVAILABLE naming it. ``ping``
fetches the cluster's metadata. Driver errors are mapped at the boundary (:meth:`errors`):
the cluster not answering is UNAVAILABLE, anything else is logged and INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import aiokafka.errors as kerr
import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.fetch import FetchRequest
from pydantic import Field

from adapters.backends import BackendSettings, BackendType, Connection, Environment, cancellation_kept
from adapters.pubsub.kafka import KafkaPubSub
from adapters.queue.kafka import KafkaQueue
from prism.errors import PrismError, internal

log = logging.getLogger("prism.kafka")

READ_UNCOMMITTED = 0  # a Fetch's isolation level: every record the leader has

# Driver errors that mean "the cluster is not answering (or not ready yet)".
UNAVAILABLE_ERRORS = (
    kerr.KafkaConnectionError,
    kerr.KafkaTimeoutError,
    kerr.NodeNotReadyError,
    kerr.RequestTimedOutError,
    kerr.NotLeaderForPartitionError,
    kerr.LeaderNotAvailableError,
    kerr.BrokerNotAvailableError,
    kerr.KafkaUnavailableError,
    kerr.NoBrokersAvailable,
    kerr.ProducerClosed,
    kerr.ConsumerStoppedError,
    kerr.NotEnoughReplicasError,
    kerr.NotEnoughReplicasAfterAppendError,
    kerr.CoordinatorNotAvailableError,
    OSError,
    TimeoutError,
)


class KafkaSettings(BackendSettings):
    type: Literal["kafka"] = "kafka"
    bootstrap_servers: str = "127.0.0.1:9092"  # host:port[,host:port …]
    client_id: str = Field(default="prism", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    connect_timeout: float = Field(default=5.0, gt=0)  # seconds, for the first connection
    command_timeout: float = Field(default=5.0, gt=0)  # seconds per request
    # Names of the topics Prism makes start with it: gateways with different prefixes share a
    # cluster without seeing each other's topics.
    topic_prefix: str = Field(default="prism", pattern=r"^[A-Za-z0-9]{1,32}$")
    partitions: int = Field(default=4, ge=1, le=1000)  # of each topic Prism creates
    replication_factor: int = Field(default=1, ge=1, le=16)
    # Seconds the Queue remembers a publish's idempotency token.
    dedup_window: float = Field(default=120.0, gt=0, le=7 * 86400)
    max_message_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)  # a produce request's bound
    # Seconds a reader's fetch waits at the broker for new records (the latency of a change
    # made by another process, and the cost of an idle reader).
    fetch_wait: float = Field(default=0.05, gt=0, le=5)
    # Seconds between two looks at the cluster's topics, for PubSub patterns: a subject's topic
    # made by another process reaches this one's pattern subscriptions that much later (its
    # messages are not lost: they are read from its start). Each look reads the metadata of
    # every topic of the cluster.
    pubsub_refresh: float = Field(default=2.0, gt=0, le=3600)
    # Seconds a PubSub queue-group member may go silent before its Kafka group gives its
    # partitions to the others (a broker refuses values outside its own bounds: Apache Kafka's
    # are 6 to 1800 by default). Heartbeats go every tenth of it.
    group_session_timeout: float = Field(default=10.0, ge=1, le=1800)


class KafkaConnection(Connection):
    """The instance's :attr:`producer` and :attr:`admin` client, and the factories of the
    clients an adapter owns (:meth:`reader`, :meth:`writer`)."""

    def __init__(self, settings: KafkaSettings, name: str = "kafka") -> None:
        self.settings = settings
        self.name = name
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError(f"kafka backend {self.name!r} used before start()")
        return self._producer

    @property
    def admin(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            raise RuntimeError(f"kafka backend {self.name!r} used before start()")
        return self._admin

    def _common(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "bootstrap_servers": settings.bootstrap_servers.split(","),
            "client_id": settings.client_id,
            "request_timeout_ms": int(settings.command_timeout * 1000),
            # aiokafka's 100 ms is what a consumer waits for the metadata of a topic it has not
            # seen yet (a group joining a topic): short, so a join takes milliseconds.
            "retry_backoff_ms": 20,
        }

    def reader(self) -> AIOKafkaConsumer:
        """A consumer outside any Kafka group (partitions assigned by hand), not yet started."""
        return AIOKafkaConsumer(
            **self._common(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=int(self.settings.fetch_wait * 1000),
            max_partition_fetch_bytes=self.settings.max_message_bytes,
        )

    def member(self, group_id: str) -> AIOKafkaConsumer:
        """A consumer in Kafka group ``group_id`` (partitions assigned by the group, positions
        committed now and then and when it stops), not yet started."""
        session_ms = int(self.settings.group_session_timeout * 1000)
        return AIOKafkaConsumer(
            **{**self._common(), "request_timeout_ms": max(int(self.settings.command_timeout * 1000), session_ms + 5000)},
            group_id=group_id,
            enable_auto_commit=True,
            auto_commit_interval_ms=1000,
            auto_offset_reset="latest",
            fetch_max_wait_ms=int(self.settings.fetch_wait * 1000),
            max_partition_fetch_bytes=self.settings.max_message_bytes,
            session_timeout_ms=session_ms,
            rebalance_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 10, 100),
        )

    def writer(self) -> AIOKafkaProducer:
        """A producer, not yet started: records sent while a request is out share the next
        one (aiokafka's batching), each acknowledged by every in-sync replica."""
        return AIOKafkaProducer(
            **self._common(), acks="all", linger_ms=0, max_request_size=self.settings.max_message_bytes
        )

    async def high_offsets(self, consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's high watermark (the offset its next record gets).

        ListOffsets (``consumer.end_offsets``) is where Kafka's tools read it, but Tansu 0.6
        answers it with the first offset of the partition's last batch + 1, short of the end
        when that batch held several records. A Fetch from that offset carries the right one in
        its answer (on Apache Kafka the two agree); it waits at most a millisecond, as Tansu
        answers a Fetch that may not wait at all with no partitions. A partition whose leader is
        unknown or whose fetch fails keeps ListOffsets' answer."""
        listed = await consumer.end_offsets(list(tps))
        client = self.producer.client
        by_leader: dict[int, list[TopicPartition]] = {}
        for tp in tps:
            leader = client.cluster.leader_for_partition(tp)
            if leader is not None and leader >= 0:
                by_leader.setdefault(leader, []).append(tp)
        highs = dict(listed)
        for leader, members in by_leader.items():
            topics: dict[str, list[tuple[int, int, int]]] = {}
            for tp in members:
                topics.setdefault(tp.topic, []).append((tp.partition, listed[tp], 1))
            answer = await client.send(leader, FetchRequest(1, 0, 1, READ_UNCOMMITTED, list(topics.items())))
            for topic, partitions in answer.topics:
                for partition, error_code, high, *_ in partitions:
                    tp = TopicPartition(topic, partition)
                    if not error_code and tp in highs:
                        highs[tp] = max(highs[tp], high)
        return highs

    async def start(self) -> None:
        """Connect, trying again until ``connect_timeout`` has passed (a broker starting up
        may refuse its first connections, or close them before it can answer)."""
        settings = self.settings
        deadline = time.monotonic() + settings.connect_timeout
        while True:
            producer = self.writer()
            admin = AIOKafkaAdminClient(**self._common())
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    await producer.start()
                    await admin.start()
                self._producer, self._admin = producer, admin
                return
            except (*UNAVAILABLE_ERRORS, kerr.KafkaError) as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                with contextlib.suppress(Exception):
                    await admin.close()
                if time.monotonic() + 0.1 < deadline and not isinstance(exc, TimeoutError):
                    await asyncio.sleep(0.1)
                    continue
                why = (
                    f"no answer within {settings.connect_timeout:g}s"
                    if isinstance(exc, TimeoutError)
                    else f"{type(exc).__name__}: {exc}"
                )
                raise PrismError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"backend {self.name!r}: kafka at {settings.bootstrap_servers} unreachable at start-up: {why}",
                ) from exc

    async def close(self) -> None:
        producer, admin, self._producer, self._admin = self._producer, self._admin, None, None
        if producer is not None:
            with contextlib.suppress(Exception):  # closing: nothing to report to anyone
                await producer.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def ping(self) -> None:
        try:
            await self.producer.client.fetch_all_metadata()
        except kerr.KafkaError as exc:  # aiokafka's plain KafkaError: no broker answered
            raise PrismError(grpc.StatusCode.UNAVAILABLE, f"kafka backend unavailable: {exc}") from exc

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Driver errors inside as PrismErrors: the cluster not answering is UNAVAILABLE;
        anything else is logged and INTERNAL."""
        with cancellation_kept():
            try:
                yield
            except PrismError:
                raise
            except (kerr.KafkaError, OSError, TimeoutError) as exc:
                if isinstance(exc, UNAVAILABLE_ERRORS) or getattr(exc, "retriable", False):
                    raise PrismError(grpc.StatusCode.UNAVAILABLE, f"kafka backend unavailable: {type(exc).__name__}") from exc
                log.error("kafka backend %r: request failed: %r", self.name, exc)
                raise internal() from exc


def connect(settings: KafkaSettings, environment: Environment) -> KafkaConnection:
    return KafkaConnection(settings, environment.name)


BACKEND = BackendType(
    name="kafka",
    settings=KafkaSettings,
    connect=connect,
    adapters={
        "QUEUE": lambda connection, environment: KafkaQueue(connection),
        "PUBSUB": lambda connection, environment: KafkaPubSub(connection, environment.stream_buffer),
    },
)
