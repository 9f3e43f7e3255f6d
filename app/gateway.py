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
from app.sessions import MemorySessionStore, SessionStore, SqliteSessionStore
from app.settings import Settings
from app.transports.grpc_native import start_grpc_server

log = logging.getLogger("prism")


class Gateway:
    def __init__(self, settings: Settings, *, workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers
        self.backends = Backends(settings)
        self.sessions = _session_store(settings, shared=workers > 1)
        configs = ConfigRegistry(settings)
        self.methods: list[Method] = bind(
            all_methods(),
            [
                SessionService(self.sessions, configs),
                ConfigService(configs),
                KeyValueService(self.backends, settings.limits, settings.signing_key()),
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
        if self.workers > 1:
            per_process = sorted(n for n, b in self.settings.backends.items() if b.type == "memory")
            if per_process:
                log.warning(
                    "backends %s are in-process: with %d workers each worker has its own copy "
                    "(a message published on one worker reaches only that worker's subscribers)",
                    per_process,
                    self.workers,
                )
        try:
            await self.sessions.start()
            await self.backends.start()
            self.grpc_server = await start_grpc_server(
                self.methods,
                self.pipeline,
                address=f"{self.settings.grpc.host}:{self.settings.grpc.port}",
                max_message_bytes=self.settings.limits.max_request_bytes,
                reuse_port=self.workers > 1,  # each worker binds the same gRPC port
                tls=self._tls(),
            )
        except BaseException:
            await self.close()  # no half-started worker: its threads would keep the process alive
            raise

    def _tls(self) -> tuple[bytes, bytes] | None:
        tls = self.settings.tls
        return None if tls is None else (tls.keyfile.read_bytes(), tls.certfile.read_bytes())

    async def close(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)
            self.grpc_server = None
        await self.backends.close()
        await self.sessions.close_store()


def _session_store(settings: Settings, *, shared: bool) -> SessionStore:
    """In-process for one worker; SQLite when several worker processes must share sessions."""
    lifetime = settings.sessions.idle_timeout_seconds
    kind = settings.sessions.store if settings.sessions.store != "auto" else ("sqlite" if shared else "memory")
    if kind == "sqlite":
        return SqliteSessionStore(settings.data_dir / "sessions.db", lifetime)
    return MemorySessionStore(lifetime)
