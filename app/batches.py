"""A response stream read ahead into batches, so a transport writes everything that is ready
in one send instead of one send per message.

A transport's cost per send (an ASGI message through the server, a CancelScope, a frame) is
paid per message when it writes a stream message by message; with a subscriber that is
behind — a fan-out, a Queue backlog — many messages are ready at once. :func:`batches` runs
the stream in a task of its own that stays at most ``READ_AHEAD`` messages ahead of the
writer; each batch is what it produced while the writer's previous send was under way. With a
writer that keeps up, every batch is a single message, as before. Backpressure is kept: a
writer that stops stops the reading after ``READ_AHEAD`` more messages.

A stream of pages (a Reader's: responses that carry a ``next_cursor``) is not read ahead: a page
is a batch already, and the Reader reads at most one page ahead of the client itself. Nor is a
stream of message batches (SubscribeBatches): each holds what was waiting when it was made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from app.methods import Method

T = TypeVar("T")

READ_AHEAD = 64  # messages read from the stream and not yet sent, at most


def read_ahead(method: Method) -> int:
    """How far a transport may read ``method``'s responses ahead of the client: none for pages
    and for batches of messages, which hold what was ready already (read ahead, a stalled
    client's batches would hold up to READ_AHEAD times ``max_batch`` messages)."""
    fields = method.response_type.DESCRIPTOR.fields_by_name
    return 0 if "next_cursor" in fields or "messages" in fields else READ_AHEAD


class _End(Generic[T]):
    """The stream's end (``error`` None) or its failure, after every message before it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


async def batches(stream: AsyncIterator[T], read_ahead: int = READ_AHEAD) -> AsyncIterator[list[T]]:
    """``stream``'s messages, in order, in non-empty lists of at most ``read_ahead``; its
    error raised after the messages before it. Closing this closes ``stream``. With
    ``read_ahead`` 0, one message a list, each read when the previous list was taken."""
    if read_ahead == 0:
        try:
            async for item in stream:
                yield [item]
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    ready: asyncio.Queue[T | _End[T]] = asyncio.Queue(read_ahead)

    async def read() -> None:
        try:
            async for item in stream:
                await ready.put(item)
        except Exception as exc:  # cancellation is not an end to report
            await ready.put(_End(exc))
        else:
            await ready.put(_End(None))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    reader = asyncio.create_task(read())
    try:
        while True:
            batch: list[T] = []
            item = await ready.get()
            while True:
                if isinstance(item, _End):
                    if batch:
                        yield batch
                    if item.error is not None:
                        raise item.error
                    return
                batch.append(item)
                if ready.empty() or len(batch) >= read_ahead:
                    break
                item = ready.get_nowait()
            yield batch
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
