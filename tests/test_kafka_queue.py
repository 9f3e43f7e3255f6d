"""What the Kafka Queue adds beyond the contract (``adapters/queue/kafka.py``): the ledger's
state machine replays to the same state everywhere, names stay injective within Kafka's
alphabet, positions are mirrored into Kafka's committed offsets, and an unreachable cluster
is UNAVAILABLE. The contract itself is checked by ``tests/conformance/test_queue*.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from adapters.backends.kafka import KafkaConnection, KafkaSettings
from adapters.queue.base import NAME, ConsumeOptions, Entry, Start
from adapters.queue.kafka import LEASED, WAITING, KafkaQueue, Ledger, group_id, topic_name
from adapters.registry import backend_settings, lookup
from prism.errors import PrismError
from tests.kafka_broker import KAFKA_BOOTSTRAP, free_port, kafka_broker  # noqa: F401 (a fixture)

# --- The ledger, without a broker -----------------------------------------------------------


class Log:
    """Commands as the ledger topic would order them, applied to several replicas."""

    def __init__(self, replicas: int = 2) -> None:
        self.replicas = [Ledger() for _ in range(replicas)]
        self.offset = -1
        self.clock = 1_000_000

    def __call__(self, op: str, **fields: Any) -> Any:
        self.offset += 1
        command = {"op": op, "id": f"test.{self.offset}", "now": fields.pop("now", self.clock), **fields}
        results = [replica.apply(dict(command), self.offset) for replica in self.replicas]
        assert all(r == results[0] for r in results), results
        return results[0]

    def take(self, consumer: str, room: int, re: list[list[int]] | None = None, new: list[Any] | None = None, **f: Any) -> Any:
        fields = {"t": "T", "g": "g", "c": consumer, "ack": 1000, "r": room, "m": 0, "re": re or [], "new": new or []}
        return self("take", **(fields | f))


def started() -> Log:
    log = Log()
    assert log("topic", t="T", n=2) == 2
    assert log("topic", t="T", n=5) == 2, "the first registration wins"
    assert log("join", t="T", g="g", b=[[0, 0, 10], [1, 0, 0]], s="earliest")
    return log


def test_a_key_is_held_back_while_its_earlier_message_is_pending() -> None:
    log = started()
    outcome = log.take("c1", room=10, new=[[0, 0, [[0, "a"], [1, "a"], [2, None], [3, "b"]]]])
    assert [g[:2] for g in outcome["granted"]] == [[0, 0], [0, 2], [0, 3]]
    part = log.replicas[0].group("T", "g")[0]  # type: ignore[index]
    assert part.marks[1].state == WAITING and part.cursor == 4
    assert log.take("c2", room=10, re=[[0, 1]])["granted"] == [], "a1 waits for a0"
    assert log("ack", t="T", g="g", ids=[[0, 0]]) == 1
    assert part.position == 1, "the position moves over the acknowledged head"
    assert log.take("c2", room=10, re=[[0, 1]])["granted"] == [[0, 1, 1, False]]


def test_a_lease_runs_out_at_its_deadline_by_the_ledger_s_clock() -> None:
    log = started()
    log.take("c1", room=1, new=[[0, 0, [[0, "a"]]]])
    assert log.take("c2", room=1, re=[[0, 0]], now=log.clock + 999)["granted"] == []
    assert log.take("c2", room=1, re=[[0, 0]], now=log.clock + 1000)["granted"] == [[0, 0, 2, False]]
    assert log.take("c3", room=1, re=[[0, 0]], now=log.clock)["granted"] == [], "the clock never goes back"


def test_leaving_releases_leases_and_unseen_ones_are_not_deliveries() -> None:
    log = started()
    log.take("c1", room=2, new=[[0, 0, [[0, None], [1, None]]]])
    lease = log.offset
    assert log("leave", t="T", g="g", c="c1", unseen=[[0, 1, lease]]) == 2
    marks = log.replicas[0].group("T", "g")[0].marks  # type: ignore[index]
    assert (marks[0].state, marks[0].attempts, marks[1].attempts) == (WAITING, 1, 0)


def test_dead_letter_leases_after_max_attempts() -> None:
    log = started()
    log.take("c1", room=1, new=[[0, 0, [[0, "k"]]]], m=1)
    assert log("nack", t="T", g="g", ids=[[0, 0]]) == 1
    assert log.take("c1", room=1, re=[[0, 0]], m=1)["granted"] == [[0, 0, 1, True]], "for dead-lettering"
    assert log("nack", t="T", g="g", ids=[[0, 0]]) == 0, "a dead-letter lease is not given back"


def test_commit_backwards_replays_and_seek_forgets() -> None:
    log = started()
    log.take("c1", room=3, new=[[0, 0, [[0, None], [1, None], [2, None]]]])
    assert log("ack", t="T", g="g", ids=[[0, 0], [0, 1], [0, 2], [0, 9]]) == 3
    part = log.replicas[0].group("T", "g")[0]  # type: ignore[index]
    assert (part.position, part.cursor) == (3, 3)
    log("commit", t="T", g="g", p=0, o=1)
    assert (part.position, part.cursor, part.marks) == (1, 1, {})
    log.take("c1", room=1, new=[[0, 1, [[1, None], [2, None]]]])
    assert part.marks[1].state == LEASED and 2 not in part.marks, "no room: 2 is left for later"
    log("seek", t="T", g="g", p=0, o=0)
    assert (part.position, part.cursor, part.marks) == (0, 0, {})
    assert log("ack", t="T", g="g", ids=[[0, 1]]) == 0, "forgotten by the seek"


def test_a_take_from_behind_the_cursor_takes_what_is_past_it() -> None:
    log = started()
    log.take("c1", room=1, new=[[0, 0, [[0, None]]]])
    assert log.take("c2", room=1, new=[[0, 0, [[0, None], [2, None]]]]) == {"granted": [[0, 2, 1, False]], "moved": True}
    assert 1 not in log.replicas[0].group("T", "g")[0].marks, "offset 1 is not in the partition"  # type: ignore[index]
    log("seek", t="T", g="g", p=0, o=0)
    assert log.take("c1", room=1, new=[[0, 2, [[2, None]]]]) == {"granted": [], "moved": False}, "a seek moved it back"


def test_idempotency_tokens() -> None:
    log = started()
    claim = {"t": "T", "k": "tok", "fp": "f1", "w": 60_000}
    assert log("claim", **claim) == {"s": "mine"}
    by = f"test.{log.offset}"
    assert log("claim", **claim) == {"s": "busy"}
    assert log("claim", **(claim | {"fp": "f2"})) == {"s": "reused"}
    assert log("stored", t="T", k="tok", by="someone else", p=1, o=7) is False
    assert log("stored", t="T", k="tok", by=by, p=1, o=7) is True
    assert log("claim", **claim) == {"s": "stored", "p": 1, "o": 7}
    assert log("claim", **claim, now=log.clock + 60_001) == {"s": "mine"}, "forgotten after the window"
    assert log("release", t="T", k="tok", by=f"test.{log.offset}") is True


def test_a_snapshot_continues_as_the_replay_does() -> None:
    log = started()
    log.take("c1", room=2, new=[[0, 0, [[0, "a"], [1, "a"], [2, None]]]])
    log("ack", t="T", g="g", ids=[[0, 2]])
    log("claim", t="T", k="tok", fp="f", w=60_000)
    log("join", t="T", g="other", b=[[0, 0, 3], [1, 0, 0]], s="latest")
    restored = Ledger.load(json.loads(json.dumps(log.replicas[0].dump())))
    log.replicas.append(restored)  # from here on it must answer as the others do
    log("ack", t="T", g="g", ids=[[0, 0]])
    log.take("c2", room=5, re=[[0, 1]], new=[[0, 3, [[3, "a"], [4, "b"]]]])
    log("leave", t="T", g="g", c="c2", unseen=[[0, 4, log.offset]])
    log("claim", t="T", k="tok", fp="f", w=60_000)
    log("commit", t="T", g="g", p=0, o=1)
    assert restored.dump() == log.replicas[0].dump()


def test_names_are_kafka_names_and_injective() -> None:
    names = {
        topic_name("prism", ns, t)
        for ns, t in [("a.b", "c"), ("a", "b.c"), ("a_b", "c"), ("ключ", "c"), ("n", "x" * 249), ("h" * 64, "t")]
    }
    assert len(names) == 6
    assert all(NAME.match(n) and len(n) <= 249 for n in names)
    assert group_id("prism", "a.b", "g") != group_id("prism", "a", "b.g")


# --- Settings and connection ------------------------------------------------------------------


def test_the_backend_type_is_found_and_checks_its_settings() -> None:
    assert lookup("kafka").settings is KafkaSettings
    settings = backend_settings({"type": "kafka", "bootstrap_servers": "h:1", "partitions": 8})
    assert isinstance(settings, KafkaSettings) and settings.partitions == 8
    with pytest.raises(ValueError, match="topic_prefix"):
        backend_settings({"type": "kafka", "topic_prefix": "a.b"})
    with pytest.raises(ValueError, match="not a setting of a kafka backend"):
        backend_settings({"type": "kafka", "url": "x"})


async def test_an_unreachable_cluster_is_unavailable_at_start() -> None:
    connection = KafkaConnection(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", connect_timeout=1.0))
    started_at = time.monotonic()
    with pytest.raises(PrismError) as caught:
        await connection.start()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started_at < 5
    await connection.close()


# --- With the broker ------------------------------------------------------------------------------


@pytest.mark.usefixtures("kafka_broker")
async def test_high_offsets_count_every_record_of_a_batch() -> None:
    """Records sent together share a produce request; the high offset counts them all, though
    Tansu's ListOffsets answers with the last batch's first offset + 1."""
    connection = KafkaConnection(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    await connection.start()
    reader = connection.reader()
    name = topic_name("prism", "highs", uuid.uuid4().hex[:8])
    try:
        await connection.admin.create_topics([NewTopic(name, 2, 1)])
        sent = [await connection.producer.send(name, b"x", partition=0) for _ in range(10)]
        offsets = [m.offset for m in await asyncio.gather(*sent)]
        assert offsets == list(range(10))
        await reader.start()
        tps = [TopicPartition(name, 0), TopicPartition(name, 1)]
        assert await connection.high_offsets(reader, tps) == {tps[0]: 10, tps[1]: 0}
    finally:
        await reader.stop()
        await connection.close()


@pytest.mark.usefixtures("kafka_broker")
async def test_a_read_leaves_no_records_holding_back_the_other_partitions() -> None:
    """One consumer reads every partition (the ledger's and the topics'), a few records at a
    time. Records a fetch brought beyond a read's count, left in aiokafka's fetcher, would hold
    back the fetches of every other partition for its prefetch backoff (100 ms): each
    acknowledgement (a ledger read) after a delivery took that long. Whitebox: aiokafka keeps
    them in its fetcher's ``_records``."""
    connection = KafkaConnection(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    await connection.start()
    queue = KafkaQueue(connection)
    await queue.start()
    try:
        published = await queue.publish("leftovers", "t", [Entry(f"{i}".encode(), "k") for i in range(30)])
        tp = TopicPartition(topic_name("prism", "leftovers", "t"), published[0].partition)  # type: ignore[union-attr]
        for offset in (0, 1, 10):
            (record,) = await queue.read(tp, offset, 1)
            assert (record.offset, record.value) == (offset, f"{offset}".encode())
            assert tp not in queue.fetcher._fetcher._records, "records left in the fetcher after a read"
    finally:
        await queue.close()
        await connection.close()


@pytest.mark.usefixtures("kafka_broker")
async def test_positions_are_mirrored_into_kafka_committed_offsets() -> None:
    bootstrap = KAFKA_BOOTSTRAP
    connection = KafkaConnection(KafkaSettings(bootstrap_servers=bootstrap))
    await connection.start()
    queue = KafkaQueue(connection)
    await queue.start()
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id("prism", "mirror", "g"), enable_auto_commit=False)
    try:
        published = await queue.publish("mirror", "orders", [Entry(b"a", "k"), Entry(b"b", "k")])
        partition = published[0].partition  # type: ignore[union-attr]
        consumer = await queue.consume("mirror", "orders", ConsumeOptions("g", start=Start.EARLIEST))
        delivery = await asyncio.wait_for(anext(consumer), 10)
        assert await queue.acknowledge("mirror", "orders", "g", [delivery.message_id]) == 1
        await reader.start()
        tp = TopicPartition(topic_name("prism", "mirror", "orders"), partition)
        deadline = time.monotonic() + 10
        while await reader.committed(tp) != 1:
            assert time.monotonic() < deadline, "the position never reached Kafka"
            await asyncio.sleep(0.05)
        await consumer.close()
    finally:
        await reader.stop()
        await queue.close()
        await connection.close()


@pytest.mark.usefixtures("kafka_broker")
async def test_an_adapter_starts_from_the_latest_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first adapter writes a snapshot every few records; one started later restores it
    and holds the same state as the one that replayed everything."""
    settings = KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP, topic_prefix="snap")
    opened: list[tuple[KafkaQueue, KafkaConnection]] = []

    async def open_queue() -> KafkaQueue:
        connection = KafkaConnection(settings)
        await connection.start()
        queue = KafkaQueue(connection, snapshot_every=4)
        await queue.start()
        opened.append((queue, connection))
        return queue

    try:
        first = await open_queue()
        await first.publish("snap", "t", [Entry(f"{i}".encode(), "k") for i in range(3)])
        consumer = await first.consume("snap", "t", ConsumeOptions("g", start=Start.EARLIEST))
        for _ in range(3):
            delivery = await asyncio.wait_for(anext(consumer), 10)
            assert await first.acknowledge("snap", "t", "g", [delivery.message_id]) == 1
        snapshots = TopicPartition(first.snapshot_topic, 0)
        deadline = time.monotonic() + 10
        while (await first.fetcher.end_offsets([snapshots]))[snapshots] == 0:
            assert time.monotonic() < deadline, "no snapshot was written"
            await asyncio.sleep(0.05)
        restored: list[int] = []
        load = Ledger.load.__func__  # type: ignore[attr-defined]

        def spy(cls: type[Ledger], data: dict[str, Any]) -> Ledger:
            restored.append(data["clock"])
            return load(cls, data)

        monkeypatch.setattr(Ledger, "load", classmethod(spy))
        second = await open_queue()
        assert restored, "the second adapter did not start from the snapshot"
        await second._caught_up()  # a barrier: from here on both have read the same ledger …
        while first._applied < second._applied:  # … once the first reads on to it
            assert time.monotonic() < deadline, "the first adapter stopped reading the ledger"
            await asyncio.sleep(0.01)
        assert (first._applied, first.ledger.dump()) == (second._applied, second.ledger.dump())
        await first.publish("snap", "t", [Entry(b"3", "k")])
        delivery = await asyncio.wait_for(anext(consumer), 10)
        assert await second.acknowledge("snap", "t", "g", [delivery.message_id]) == 1
        (info,) = [p for p in await second.topic_info("snap", "t", "g") if p.high_offset]
        assert info.committed_offset == 4
        await consumer.close()
    finally:
        for queue, connection in opened:
            await queue.close()
            await connection.close()
