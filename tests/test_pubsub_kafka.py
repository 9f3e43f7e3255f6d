"""Kafka PubSub specifics (``adapters/pubsub/kafka.py``) against the Tansu broker the tests
start: the subject ↔ topic mapping, what a plain Kafka client reads and writes, message ids,
a queue group going on where it left off, and nothing left running after unsubscribing. The
contract itself is ``tests/conformance/test_pubsub*.py``'s."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from adapters.backends.kafka import KafkaConnection, KafkaSettings
from adapters.pubsub.base import Delivery, FromTime, Subscription
from adapters.pubsub.kafka import KafkaPubSub, MessageId, escape, topic_digest, unescape
from prism.errors import PrismError
from tests.kafka_broker import KAFKA_BOOTSTRAP, kafka_broker  # noqa: F401 (a fixture)

WAIT = 10.0  # seconds; bound on every wait for something that must happen


def test_names_read_back_and_never_collide() -> None:
    tokens = ["a", "A9", "a-b", "a_b", "-2d", "ключ🙂", "[ab]", "%", "\\", "x" * 40]
    names = [escape(t) for t in tokens]
    assert [unescape(n) for n in names] == tokens
    assert len(set(names)) == len(tokens)
    assert not any(c in n for n in names for c in "._"), "no '.' (the separator) nor '_' (Kafka's metrics read it as '.')"
    for foreign in ["a_b", "-zz", "", "a.b"]:
        with pytest.raises(ValueError):
            unescape(foreign)


@pytest.fixture
async def adapter(kafka_broker: str) -> AsyncIterator[KafkaPubSub]:  # noqa: F811 (the fixture imported above)
    settings = KafkaSettings(
        bootstrap_servers=kafka_broker, topic_prefix=f"k{uuid.uuid4().hex[:8]}", pubsub_refresh=0.2, group_session_timeout=2
    )
    connection = KafkaConnection(settings)
    await connection.start()
    made = KafkaPubSub(connection)
    yield made
    await made.close()
    await connection.close()


async def take(subscription: Subscription, count: int) -> list[Delivery]:
    return [await asyncio.wait_for(anext(subscription), WAIT) for _ in range(count)]


async def test_a_subject_too_long_for_a_topic_name_is_refused_naming_it(adapter: KafkaPubSub) -> None:
    subject = ("orders", "ключ" * 25)  # 4 bytes a letter pair: 300 characters once escaped
    for call in (adapter.publish("ns", subject, b"", {}), adapter.subscribe("ns", subject)):
        with pytest.raises(PrismError) as refused:
            await call
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.message.startswith("subject: too long for a Kafka topic name"), refused.value.message


async def test_a_plain_kafka_client_reads_and_writes_the_same_topics(adapter: KafkaPubSub) -> None:
    """A message is a record of the subject's topic (data as its value, the client's headers
    after Prism's one); its id names that record. A record a plain client produces reaches
    subscribers with its headers as they are and its timestamp as the publish time."""
    ns = f"n{uuid.uuid4().hex[:8]}"
    subscription = await adapter.subscribe(ns, ("plain", ">"))
    message_id = await adapter.publish(ns, ("plain", "from-prism"), b"data", {"trace": "t-1"})
    topic = adapter.topic(ns, ("plain", "from-prism"))
    assert topic == f"{adapter.root}{ns}.plain.from-2dprism"
    where = MessageId.parse(message_id, "id")
    assert where.digest == topic_digest(topic)

    reader = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, group_id=None)
    await reader.start()
    try:
        tp = TopicPartition(topic, where.partition)
        reader.assign([tp])
        reader.seek(tp, where.offset)
        record = (await reader.getmany(tp, timeout_ms=int(WAIT * 1000)))[tp][0]
    finally:
        await reader.stop()
    assert (record.value, record.key, record.offset) == (b"data", None, where.offset)
    assert record.headers[1:] == (("trace", b"t-1"),) and record.headers[0][0] == "_prism-ns"

    writer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await writer.start()
    try:
        sent = await writer.send_and_wait(topic, b"foreign", headers=[("source", b"kafka-cli")])
    finally:
        await writer.stop()
    mine, foreign = await take(subscription, 2)
    assert (mine.message_id, mine.subject, mine.data, dict(mine.headers)) == (message_id, "plain.from-prism", b"data", {"trace": "t-1"})
    assert (foreign.subject, foreign.data, dict(foreign.headers)) == ("plain.from-prism", b"foreign", {"source": "kafka-cli"})
    assert abs(foreign.published_at - sent.timestamp / 1000) < 0.001
    assert MessageId.parse(foreign.message_id, "id").offset == sent.offset


async def test_a_replay_hands_on_its_history_in_publish_order(adapter: KafkaPubSub) -> None:
    """A fetch brings at most 1 MiB of a partition, and a broker may answer with some
    partitions only: a replay merges them, so its history (three subjects, four partitions
    each, 15 MiB) arrives in publish order, then what is published next."""
    ns = f"n{uuid.uuid4().hex[:8]}"
    data = b"h" * 65536
    history = [await adapter.publish(ns, ("h", f"s{i % 3}"), data, {}) for i in range(240)]
    replay = await adapter.subscribe(ns, ("h", "*"), start=FromTime(0))
    live = await adapter.publish(ns, ("h", "s0"), b"live", {})
    assert [d.message_id for d in await take(replay, 241)] == [*history, live]
    await replay.close()


async def test_a_queue_group_goes_on_where_it_left_off(adapter: KafkaPubSub) -> None:
    """A queue group is a Kafka consumer group: what was published while it had no member
    comes to its next member, and nothing it already had comes again."""
    ns = f"n{uuid.uuid4().hex[:8]}"
    first = await adapter.subscribe(ns, ("jobs",), "workers")
    had = [await adapter.publish(ns, ("jobs",), b"", {}) for _ in range(3)]
    assert sorted(d.message_id for d in await take(first, 3)) == sorted(had)
    await first.close()  # its positions are committed as it leaves
    missed = [await adapter.publish(ns, ("jobs",), b"", {}) for _ in range(3)]
    second = await adapter.subscribe(ns, ("jobs",), "workers")
    assert sorted(d.message_id for d in await take(second, 3)) == sorted(missed)
    later = await adapter.publish(ns, ("jobs",), b"", {})
    assert [d.message_id for d in await take(second, 1)] == [later]
    await second.close()


async def test_unsubscribing_stops_every_consumer_and_task(adapter: KafkaPubSub) -> None:
    """Closing every subscription stops the replaying and queue-group readers (their consumers
    and tasks) and leaves the shared one idle, reading nothing; the topic watcher stops too."""
    ns = f"n{uuid.uuid4().hex[:8]}"
    await adapter.publish(ns, ("t", "a"), b"", {})
    subscriptions = [
        await adapter.subscribe(ns, ("t", "*")),
        await adapter.subscribe(ns, ("t", ">"), start=FromTime(0)),
        await adapter.subscribe(ns, ("t", "a"), "group"),
    ]
    readers = set(adapter.readers)
    assert len(readers) == 3 and adapter.live in readers
    for subscription in subscriptions:
        await subscription.close()
    assert adapter.readers == set() and adapter.subscriptions == {}
    for reader in readers - {adapter.live}:
        assert reader.consumer._closed and reader.task is not None and reader.task.done()
    live = adapter.live
    assert live is not None and live.positions == {} and not live.reading.is_set() and not live.task.done()
    watcher = adapter._watcher
    assert watcher is not None
    await asyncio.wait_for(watcher, WAIT)  # it ends at its next look, finding no reader
    await adapter.close()
    assert live.consumer._closed and live.task.done()  # the idle reader's consumer is not left open
