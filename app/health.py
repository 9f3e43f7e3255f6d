"""Backend health, one source for every surface: ``GET /readyz``, ``prism.v1.HealthService.Ready``
and ``grpc.health.v1`` all read :attr:`HealthMonitor.current`.

A background task asks every backend a trivial request (``Connection.ping``) each interval,
all at once and each under a timeout, so one hanging backend neither delays the others' reports
nor the loop; a surface reads the last result and never waits on a backend.

    state of the gateway   when                                    /readyz   grpc.health.v1
    ok                     every backend answers                   200       SERVING
    degraded               an optional backend does not            200       SERVING
    unready                a ``required: true`` backend does not   503       NOT_SERVING
    starting               before the first round, after closing   503       NOT_SERVING

A Prism service of an access pattern is also NOT_SERVING on grpc.health.v1 when no backend of
its pattern answers (its every call would fail), even while the gateway as a whole is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from grpc_health.v1 import health, health_pb2

from app import metrics
from app.backends import Backends, Instance

log = logging.getLogger("prism.health")

Listener = Callable[["Health"], Awaitable[None]]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class BackendHealth:
    name: str
    required: bool
    patterns: frozenset[str]  # the access patterns it serves
    problem: str | None = None  # None: it answered the last probe
    since: float = field(default_factory=time.time)  # when it last went up or down (unix seconds)

    @property
    def state(self) -> str:
        """"ok"; else "down" when the gateway cannot be ready without it, "degraded" otherwise."""
        if self.problem is None:
            return "ok"
        return "down" if self.required else "degraded"


@dataclass(frozen=True)
class Health:
    """One round of probes: what every surface reports until the next."""

    started: bool
    backends: dict[str, BackendHealth]

    @property
    def ready(self) -> bool:
        return self.started and all(b.problem is None for b in self.backends.values() if b.required)

    @property
    def status(self) -> str:
        if not self.started:
            return "starting"
        if not self.ready:
            return "unready"
        return "ok" if all(b.problem is None for b in self.backends.values()) else "degraded"

    def checks(self) -> dict[str, str]:
        """Per backend, "ok" or its state and why: ``{"backend/pg": "down: no answer within 2s"}``."""
        return {
            f"backend/{b.name}": b.state if b.problem is None else f"{b.state}: {b.problem}"
            for b in self.backends.values()
        }

    def serving(self, pattern: str | None) -> bool:
        """For grpc.health.v1: the gateway is ready and, for a service of ``pattern``, some
        backend of that pattern answers (or none is configured: its calls are refused anyway)."""
        if not self.ready:
            return False
        serving = [b for b in self.backends.values() if pattern in b.patterns]
        return not serving or any(b.problem is None for b in serving)

    def to_json(self) -> dict[str, Any]:
        """The body of /readyz."""
        return {
            "status": self.status,
            "backends": {
                b.name: {
                    "state": b.state,
                    "required": b.required,
                    "since": round(b.since, 3),
                    **({"problem": b.problem} if b.problem else {}),
                }
                for b in self.backends.values()
            },
        }


class HealthMonitor:
    """Probes the backends in the background and holds the last result (:attr:`current`).
    ``service_patterns`` maps each Prism service to its access pattern (None for the others),
    for the per-service statuses of grpc.health.v1."""

    def __init__(
        self, backends: Backends, service_patterns: dict[str, str | None], *, interval: float, timeout: float
    ) -> None:
        self.backends = backends
        self.service_patterns = service_patterns
        self.interval = interval
        self.timeout = timeout
        self.current = Health(started=False, backends={})
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """A first round now, so the gateway answers truthfully from its first request; then
        one round every interval, in the background."""
        await self.check()
        self._task = asyncio.create_task(self._run(), name="prism-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.current = Health(started=False, backends=self.current.backends)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a listener's bug must not end the monitor
                log.exception("health check round failed")

    async def check(self) -> Health:
        """One round: every backend probed at once; listeners told when a state changed."""
        instances = list(self.backends.instances.values())
        problems = await asyncio.gather(*(self.backends.probe(i.name, self.timeout) for i in instances))
        before = self.current
        health = Health(
            started=self.backends.started,
            backends={
                i.name: self._next(before.backends.get(i.name), i, problem)
                for i, problem in zip(instances, problems, strict=True)
            },
        )
        self.current = health
        for name, problem in zip((i.name for i in instances), problems, strict=True):
            metrics.BACKEND_UP.labels(name).set(1 if problem is None else 0)
        states = {name: b.state for name, b in health.backends.items()}
        if health.status != before.status or states != {name: b.state for name, b in before.backends.items()}:
            for listener in list(self._listeners):
                await listener(health)
        return health

    @staticmethod
    def _next(previous: BackendHealth | None, instance: Instance, problem: str | None) -> BackendHealth:
        """The backend's new health; ``since`` moves only when it goes up or down."""
        if previous is not None and (previous.problem is None) == (problem is None):
            return replace(previous, problem=problem)
        if previous is not None or problem is not None:
            log.warning("backend %r %s", instance.name, "answers again" if problem is None else f"does not answer: {problem}")
        return BackendHealth(instance.name, instance.settings.required, frozenset(instance.adapters), problem)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every change of state from now on; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def serve_grpc(self, servicer: health.aio.HealthServicer, services: Iterable[str]) -> None:
        """Keep ``servicer`` (grpc.health.v1) in step with :attr:`current`: the overall status
        (service "") and each of ``services``, set now and on every change."""
        names = ["", *services]

        async def update(health: Health) -> None:
            for name in names:
                serving = health.serving(self.service_patterns.get(name)) if name else health.ready
                await servicer.set(name, SERVING if serving else NOT_SERVING)

        await update(self.current)
        self.subscribe(update)
