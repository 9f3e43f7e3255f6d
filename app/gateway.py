"""The gateway object: settings → backends, sessions, services, method table and pipeline.

One instance per worker process, created by the ASGI app and started in its lifespan together
with the embedded gRPC server, so HTTP and gRPC share one event loop and one service layer.
"""

from __future__ import annotations

import logging

import grpc

from app.backends import Backends
from app.methods import Method, all_methods, bind
from app.pipeline import Pipeline
from app.services.keyvalue import KeyValueService
from app.services.plugin import HealthService, PluginInfoService
from app.services.pubsub import PubSubService
from app.services.session import ConfigRegistry, ConfigService, SessionService
from app.sessions import SessionStore
from app.settings import Settings
from app.transports.grpc_native import start_grpc_server

log = logging.getLogger("prism")


class Gateway:
    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.backends = Backends(settings)
        self.sessions = SessionStore(lifetime=settings.limits.session_lifetime_seconds)
        configs = ConfigRegistry(settings)
        self.methods: list[Method] = bind(
            all_methods(),
            [
                SessionService(self.sessions, configs),
                ConfigService(configs),
                KeyValueService(self.backends, settings.limits),
                PubSubService(self.backends, settings.limits),
                HealthService(self.backends),
                PluginInfoService(self.backends),
            ],
        )
        self.pipeline = Pipeline(self.sessions)
        self.grpc_server: grpc.aio.Server | None = None

    async def start(self) -> None:
        if self.settings.dev_mode:
            log.warning(
                "no authentication configured: dev mode, loopback only, every caller is 'anonymous'"
            )
        await self.backends.start()
        tls = None
        if self.settings.tls is not None:
            tls = (self.settings.tls.keyfile.read_bytes(), self.settings.tls.certfile.read_bytes())
        listener = self.settings.grpc
        self.grpc_server = await start_grpc_server(
            self.methods,
            self.pipeline,
            address=f"{listener.host}:{listener.port}",
            max_message_bytes=self.settings.limits.max_request_bytes,
            reuse_port=self.reuse_port,
            tls=tls,
        )

    async def close(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)
            self.grpc_server = None
        await self.backends.close()
