"""The gauges that are an answer rather than a count: sessions the store holds, connections
the backend pools hold, and the depth and consumer lag of Queue topics.

Nothing happens per call for these; every worker samples them every
``metrics.sample_interval_seconds``. Sessions and topics are shared state, so each worker's
sample is the whole value and the metrics keep the most recent one (``livemostrecent``); pools
belong to a worker, so their connections add up over workers (``livesum``).
Queue topics sampled are the ones used through this worker lately (``QueueService.watched``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app import metrics
from app.backends import Backends
from app.services.queue import QueueService
from app.sessions import SessionStore
from prism.errors import PrismError

log = logging.getLogger("prism.metrics")


class GaugeSampler:
    def __init__(self, sessions: SessionStore, backends: Backends, queues: QueueService, interval: float) -> None:
        self.sessions, self.backends, self.queues = sessions, backends, queues
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prism-gauges")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a bug here must not end the sampling, nor anything else
                log.exception("sampling the gauges failed")
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """One round; a store or backend that does not answer keeps its last value."""
        with contextlib.suppress(PrismError):
            metrics.SESSIONS_ACTIVE.set(await self.sessions.active_count())
        for name, instance in self.backends.instances.items():
            use = instance.connection.pool_use()
            if use is not None:
                metrics.POOL_CONNECTIONS.labels(name, "in_use").set(use.in_use)
                metrics.POOL_CONNECTIONS.labels(name, "idle").set(use.idle)
        for (namespace, topic, group), queue in list(self.queues.watched.items()):
            try:
                partitions = await queue.topic_info(namespace, topic, group)
            except PrismError as exc:  # gone, or its backend is down: the next round tries again
                log.debug("queue gauges of %s/%s: %s", namespace, topic, exc.message)
                continue
            metrics.QUEUE_DEPTH.labels(namespace, topic).set(sum(p.high_offset - p.low_offset for p in partitions))
            if group:
                metrics.QUEUE_LAG.labels(namespace, topic, group).set(sum(p.lag for p in partitions))
