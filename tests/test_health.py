"""The health monitor in-process, over backends whose answers the test controls: each backend's
own state, ``required`` deciding readiness, a hanging probe bounded by the timeout, and
grpc.health.v1 statuses following every change. (tests/faults/test_health.py does the same
against the real PostgreSQL server stopped under a running gateway.)"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import pytest
from grpc_health.v1 import health, health_pb2

from adapters.backends import BackendType
from adapters.registry import register
from app.backends import Backends
from app.health import HealthMonitor
from app.settings import Settings
from tests import dict_backend

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class SwitchableSettings(dict_backend.DictSettings):
    type: Literal["switchable-test"] = "switchable-test"  # type: ignore[assignment]
    mode: Literal["up", "down", "hang"] = "up"


class Switchable(dict_backend.DictStore):
    """Answers, fails or hangs, as the test says (``mode``)."""

    def __init__(self, settings: SwitchableSettings) -> None:
        super().__init__(settings)
        self.mode = settings.mode

    async def ping(self) -> None:
        if self.mode == "down":
            raise ConnectionRefusedError("refused")
        if self.mode == "hang":
            await asyncio.sleep(3600)


register(
    BackendType(
        name="switchable-test",
        settings=SwitchableSettings,
        connect=lambda settings, environment: Switchable(settings),
        adapters=dict_backend.BACKEND.adapters,
    )
)


@dataclass
class Rig:
    monitor: HealthMonitor
    servicer: health.aio.HealthServicer
    flaky: Switchable

    async def status(self, service: str) -> int:
        reply = await self.servicer.Check(health_pb2.HealthCheckRequest(service=service), None)  # type: ignore[arg-type]
        return reply.status


@pytest.fixture
async def rig(tmp_path: pathlib.Path) -> AsyncIterator[Rig]:
    settings = Settings(
        data_dir=tmp_path,
        backends={"flaky": {"type": "switchable-test", "required": True}, "local": {"type": "memory"}},
        configs=[],
    )
    backends = Backends(settings)
    await backends.start()
    monitor = HealthMonitor(
        backends, {"prism.v1.KeyValueService": "KEY_VALUE", "prism.v1.SessionService": None}, interval=3600, timeout=0.2
    )
    await monitor.start()
    servicer = health.aio.HealthServicer()
    await monitor.serve_grpc(servicer, ["prism.v1.KeyValueService", "prism.v1.SessionService"])
    try:
        yield Rig(monitor, servicer, backends.instances["flaky"].connection)  # type: ignore[arg-type]
    finally:
        await monitor.close()
        await backends.close()


async def test_a_required_backend_down_makes_the_gateway_unready(rig: Rig) -> None:
    assert rig.monitor.current.status == "ok" and rig.monitor.current.ready
    assert await rig.status("") == SERVING
    rig.flaky.mode = "down"
    health = await rig.monitor.check()
    assert (health.status, health.ready) == ("unready", False)
    assert health.checks() == {"backend/flaky": "down: ConnectionRefusedError: refused", "backend/local": "ok"}
    assert [await rig.status(s) for s in ("", "prism.v1.KeyValueService", "prism.v1.SessionService")] == [NOT_SERVING] * 3
    rig.flaky.mode = "up"
    health = await rig.monitor.check()
    assert health.status == "ok" and await rig.status("") == SERVING


async def test_a_hanging_backend_is_down_after_the_timeout(rig: Rig) -> None:
    rig.flaky.mode = "hang"
    started = asyncio.get_running_loop().time()
    health = await rig.monitor.check()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert health.checks()["backend/flaky"] == "down: no answer within 0.2s"


async def test_an_optional_backend_down_is_degraded(tmp_path: pathlib.Path) -> None:
    settings = Settings(data_dir=tmp_path, backends={"flaky": {"type": "switchable-test", "mode": "down"}}, configs=[])
    backends = Backends(settings)
    await backends.start()
    monitor = HealthMonitor(backends, {"prism.v1.KeyValueService": "KEY_VALUE"}, interval=3600, timeout=0.2)
    try:
        await monitor.start()
        assert (monitor.current.status, monitor.current.ready) == ("degraded", True)
        body = monitor.current.to_json()
        assert body["status"] == "degraded" and body["backends"]["flaky"]["state"] == "degraded"
        # Ready as a whole, but no backend of KEY_VALUE answers: that service is not serving.
        assert monitor.current.serving(None) and not monitor.current.serving("KEY_VALUE")
    finally:
        await monitor.close()
        await backends.close()
