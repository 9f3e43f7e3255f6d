"""The plugin contract (Health, PluginInfo) as served by the gateway itself."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import ClassVar

from app import metrics
from app.backends import Backends
from app.health import HealthMonitor
from app.methods import Scope, global_scope
from app.pipeline import Call
from prism.v1 import plugin_pb2

try:
    VERSION = version("prism-gateway")
except PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.0.0"


class HealthService:
    """Readiness as the health monitor last saw it (the same source as /readyz and
    grpc.health.v1): answering never waits on a backend."""

    SERVICE = "prism.v1.HealthService"

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    async def Live(self, request: plugin_pb2.LiveRequest, call: Call) -> plugin_pb2.LiveResponse:
        return plugin_pb2.LiveResponse(live=True)

    async def Ready(self, request: plugin_pb2.ReadyRequest, call: Call) -> plugin_pb2.ReadyResponse:
        health = self.monitor.current
        return plugin_pb2.ReadyResponse(ready=health.ready, checks=health.checks())


class MetricsService:
    """Prometheus text exposition of the gateway's metrics, every worker's added up (also
    served at GET /metrics)."""

    SERVICE = "prism.v1.MetricsService"
    scopes: ClassVar[dict[str, Scope]] = {"GetMetrics": global_scope}

    async def GetMetrics(self, request: plugin_pb2.MetricsRequest, call: Call) -> plugin_pb2.MetricsResponse:
        return plugin_pb2.MetricsResponse(text=(await asyncio.to_thread(metrics.exposition)).decode())


class PluginInfoService:
    SERVICE = "prism.v1.PluginInfoService"
    scopes: ClassVar[dict[str, Scope]] = {"GetInfo": global_scope}

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    async def GetInfo(self, request: plugin_pb2.InfoRequest, call: Call) -> plugin_pb2.InfoResponse:
        response = plugin_pb2.InfoResponse(name="prism-gateway", version=VERSION, role=plugin_pb2.PLUGIN_ROLE_GATEWAY)
        for name, instance in sorted(self.backends.instances.items()):
            for pattern, adapter in sorted(instance.adapters.items()):
                response.backends.add(
                    name=name, pattern=pattern, type=instance.kind.name, capabilities=sorted(adapter.capabilities)
                )
        return response
