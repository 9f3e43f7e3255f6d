"""A cancellation that arrives as a driver's call finishes reaches the caller.

On Python 3.11 ``asyncio.wait_for`` returns the result of an awaitable that finished in the
same loop turn as its task was cancelled, and the cancellation is gone. redis-py sends every
command under ``wait_for``: a Queue consumer's task cancelled while acknowledging then waited
in its next ``take`` for ever (seen as a hung conformance test). Each network backend's
``errors()`` raises such a dropped cancellation after the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from adapters.backends import cancellation_kept
from adapters.backends.kafka import KafkaConnection, KafkaSettings
from adapters.backends.nats import NatsConnection, NatsSettings
from adapters.backends.redis import RedisClient, RedisSettings

GUARDS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "cancellation_kept": cancellation_kept,
    "redis": RedisClient(RedisSettings(url="redis://127.0.0.1:1")).errors,
    "nats": NatsConnection(NatsSettings(url="nats://127.0.0.1:1")).errors,
    "kafka": KafkaConnection(KafkaSettings(bootstrap_servers="127.0.0.1:1")).errors,
}


async def call_finishing_as_cancelled(guard: Callable[[], AbstractContextManager[None]]) -> str:
    """A task inside ``guard`` awaiting a reply under ``wait_for``; the reply comes and the task
    is cancelled in the same loop turn. What the task got to do."""
    reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def call() -> str:
        with guard():
            await asyncio.wait_for(reply, 5)  # as redis-py's send and nats-py's request do
        return "ran on after its cancellation"

    task = asyncio.create_task(call())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    reply.set_result(None)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


@pytest.mark.parametrize("guard", list(GUARDS))
async def test_a_cancellation_dropped_inside_a_call_is_raised_after_it(guard: str) -> None:
    assert await call_finishing_as_cancelled(GUARDS[guard]) == "cancelled"


async def test_without_the_guard_python_drops_it_or_keeps_it_itself() -> None:
    """What the guard is for: on 3.11 the bare call runs on; from 3.12 wait_for keeps the
    cancellation and the guard has nothing to do."""

    @contextlib.contextmanager
    def bare() -> Iterator[None]:
        yield

    expected = "ran on after its cancellation" if sys.version_info < (3, 12) else "cancelled"
    assert await call_finishing_as_cancelled(bare) == expected


async def test_a_cancellation_delivered_inside_is_not_raised_twice() -> None:
    """A call that was cancelled and handled its cancellation (``uncancel``) leaves nothing
    to raise; nor does a timeout inside the block."""
    with cancellation_kept():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
