"""app/batches.py: a stream read ahead into batches keeps order, bounds what it
reads ahead, reports an error after the messages before it, and closes the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.batches import batches


class Source:
    """An async generator's stand-in that records how far it was read and whether it closed."""

    def __init__(self, count: int, error: Exception | None = None, ready: asyncio.Event | None = None) -> None:
        self.count, self.error, self.ready = count, error, ready
        self.produced = 0
        self.closed = False

    async def generate(self) -> AsyncIterator[int]:
        try:
            for i in range(self.count):
                if self.ready is not None:
                    await self.ready.wait()
                self.produced += 1
                yield i
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def test_messages_keep_their_order_and_ready_ones_come_together() -> None:
    source = Source(200)
    got: list[list[int]] = []
    async for batch in batches(source.generate(), read_ahead=16):
        got.append(batch)
        await asyncio.sleep(0.001)  # a slow send: the reader gets ahead
    assert [i for batch in got for i in batch] == list(range(200))
    assert max(len(b) for b in got) == 16, "a writer behind gets what was ready, up to read_ahead"
    assert source.closed


async def test_reading_ahead_is_bounded_while_the_writer_waits() -> None:
    source = Source(10_000)
    stream = batches(source.generate(), read_ahead=8)
    first = await anext(stream)
    await asyncio.sleep(0.05)  # the writer stalls
    assert source.produced <= len(first) + 8 + 1, "a stalled writer stops the reading"
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    assert source.closed, "closing the batches closes the stream"


async def test_an_error_comes_after_the_messages_before_it() -> None:
    source = Source(3, error=ValueError("backend gone"))
    got = []
    with pytest.raises(ValueError, match="backend gone"):
        async for batch in batches(source.generate()):
            got += batch
    assert got == [0, 1, 2]
    assert source.closed


async def test_cancelling_the_writer_closes_the_stream() -> None:
    ready = asyncio.Event()  # never set: the stream waits for its next message
    source = Source(3, ready=ready)

    async def write() -> None:
        async for _ in batches(source.generate()):
            pass

    writer = asyncio.create_task(write())
    await asyncio.sleep(0.01)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert source.closed


async def test_without_read_ahead_each_message_is_read_when_the_previous_was_taken() -> None:
    source = Source(100)
    stream = batches(source.generate(), read_ahead=0)
    assert await anext(stream) == [0]
    await asyncio.sleep(0.02)
    assert source.produced == 1, "nothing read beyond what was taken"
    assert await anext(stream) == [1]
    await stream.aclose()  # type: ignore[attr-defined]
    assert source.closed
