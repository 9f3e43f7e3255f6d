"""A key's messages one at a time, and an idle consumer's wake-up, per Queue backend (on demand).

A consumer that handles a partition key's messages in order acknowledges each before the next
is delivered (a key's next message waits for that). What it waits is the adapter's round trip
from an Acknowledge to the next delivery, paid once per message; and a consumer idle on its
topic waits the adapter's wake-up for a message another call publishes. Both are measured on
each adapter directly (no gateway, no transport), on the servers the Queue section uses and a
Tansu broker of its own, in the section's namespace, removed afterwards:

    keyed     50 messages of one key published, then taken one at a time: the next delivery
              awaited, then acknowledged; each wait and each acknowledgement timed
    wake-up   20 times: 0.2 s idle, then one message published through a second adapter on
              its own connection (as from another gateway process), timed until delivered

    python -m benchmarks.queue_keyed
"""

from __future__ import annotations

import asyncio
import pathlib
import statistics
import tempfile
import time
import uuid
from typing import cast

from adapters.queue.base import ConsumeOptions, Entry, QueueAdapter, Start
from app.backends import Backends
from app.settings import load_settings
from benchmarks import kafka_broker, queue

KEYED, WAKES = 50, 20
IDLE = 0.2  # seconds a consumer waits with nothing to take before each wake-up
WAIT = 10.0  # seconds: the bound on every delivery


async def _opened(workdir: pathlib.Path) -> Backends:
    """Every backend of the Queue section, opened as a gateway process opens them."""
    settings = load_settings(queue.write_config(workdir / "prism.yaml"), {"PRISM_DATA_DIR": str(workdir)})
    backends = Backends(settings)
    try:
        await backends.start()
    except BaseException:
        await backends.close()
        raise
    return backends


def _ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.2f} / {1000 * max(seconds):.2f}"


async def measure(backend: str, here_backends: Backends, there_backends: Backends) -> dict[str, str]:
    here = cast(QueueAdapter, here_backends.adapters("QUEUE")[backend])
    there = cast(QueueAdapter, there_backends.adapters("QUEUE")[backend])
    ns, topic = queue.NAMESPACE, f"keyed-{uuid.uuid4().hex[:10]}"
    await here.publish(ns, topic, [Entry(f"{i}".encode(), "k") for i in range(KEYED)])
    consumer = await here.consume(ns, topic, ConsumeOptions("g", start=Start.EARLIEST, ack_deadline=30))
    try:
        nexts, acks = [], []
        for i in range(KEYED):
            started = time.perf_counter()
            delivery = await asyncio.wait_for(anext(consumer), WAIT)
            delivered = time.perf_counter()
            if delivery.payload != f"{i}".encode():
                raise RuntimeError(f"{backend}: message {delivery.payload!r} where {i} was due")
            if await here.acknowledge(ns, topic, "g", [delivery.message_id]) != 1:
                raise RuntimeError(f"{backend}: message {i} not acknowledged")
            nexts.append(delivered - started)
            acks.append(time.perf_counter() - delivered)
        wakes = []
        for _ in range(WAKES):
            await asyncio.sleep(IDLE)
            started = time.perf_counter()
            await there.publish(ns, topic, [Entry(b"w", "")])
            delivery = await asyncio.wait_for(anext(consumer), WAIT)
            wakes.append(time.perf_counter() - started)
            await here.acknowledge(ns, topic, "g", [delivery.message_id])
    finally:
        await consumer.close()
    return {"backend": queue.BACKENDS[backend].label, "next": _ms(nexts), "ack": _ms(acks), "wake": _ms(wakes)}


async def main() -> None:
    broker = kafka_broker.Broker(kafka_broker.free_port(), name=queue.TANSU_NAME)
    broker.start()
    queue.KAFKA.bootstrap = broker.bootstrap
    try:
        with tempfile.TemporaryDirectory() as scratch:
            here = await _opened(pathlib.Path(scratch))
            there = await _opened(pathlib.Path(scratch))  # another process's connections
            try:
                rows = [await measure(backend, here, there) for backend in queue.BACKENDS]
            finally:
                await here.close()
                await there.close()
    finally:
        await queue.cleanup()
        broker.stop()
    print("| backend | keyed: next delivery after the ack, p50 / max ms | the acknowledgement, p50 / max ms "
          "| idle → published elsewhere → delivered, p50 / max ms |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['next']} | {row['ack']} | {row['wake']} |")


if __name__ == "__main__":
    asyncio.run(main())
