"""The gateway object: settings → backends, sessions, services, method table and pipeline.

One instance per worker process, created by the ASGI app and started in its lifespan together
with the embedded gRPC server, so HTTP and gRPC share one event loop and one service layer.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from adapters.capabilities import Capability
from adapters.keyvalue.encrypted import Keyring
from app import pii
from app.audit import AuditLog
from app.auth.authenticator import Authenticator
from app.auth.mtls import grpc_server_credentials
from app.backends import Backends
from app.configs import ConfigRegistry, ConfigService
from app.gauges import GaugeSampler
from app.health import HealthMonitor
from app.listener import MailboxListeners
from app.methods import Method, all_methods, bind
from app.pipeline import Pipeline
from app.policy import Authorizer
from app.ratelimit import RateLimiter
from app.services.keyvalue import KeyValueService
from app.services.plugin import HealthService, MetricsService, PluginInfoService
from app.services.pubsub import PubSubService
from app.services.queue import QueueService
from app.services.reader import ReaderService
from app.services.session import SessionService
from app.services.transact import TransactService
from app.sessions import MemorySessionStore, SessionStore, SqliteSessionStore
from app.settings import Settings
from app.tracing import Tracing
from app.transports.grpc_native import start_grpc_server
from app.transports.grpc_standard import StandardServices
from prism.v1 import config_pb2

log = logging.getLogger("prism")


class Gateway:
    def __init__(self, settings: Settings, *, workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers
        pii.configure(settings.signing_key() if settings.mask_pii else None)
        methods = all_methods()
        self.backends = Backends(settings, workers)
        self.health = HealthMonitor(
            self.backends,
            _service_patterns(methods),
            interval=settings.health.interval_seconds,
            timeout=settings.health.timeout_seconds,
        )
        self.sessions = _session_store(settings, shared=workers > 1)
        self.authenticator = Authenticator(settings.auth)
        self.audit = AuditLog(settings.audit.sink)
        authorizer = Authorizer(settings.policies)
        configs = ConfigRegistry(settings, self.backends, self.sessions)
        self.transact = TransactService(self.backends.for_transact, settings)
        self.tracing = Tracing.of(settings.tracing)
        queues = QueueService(self.backends.for_queue, settings.limits, self.tracing)
        self.gauges = GaugeSampler(self.sessions, self.backends, queues, settings.metrics.sample_interval_seconds)
        self.methods: list[Method] = bind(
            methods,
            [
                SessionService(self.sessions, configs),
                ConfigService(configs, authorizer),
                KeyValueService(self.backends, settings.limits, settings.signing_key(), _encryption(settings)),
                PubSubService(self.backends, settings.limits, self.sessions),
                queues,
                ReaderService(self.backends.for_reader, settings.reader, settings.signing_key()),
                self.transact,
                HealthService(self.health),
                MetricsService(),
                PluginInfoService(self.backends),
            ],
        )
        self.pipeline = Pipeline(
            self.sessions,
            self.authenticator,
            authorizer,
            RateLimiter(),
            self.audit,
            {n.name: n.rate_limit for n in settings.namespaces if n.rate_limit is not None},
            self.methods,
            self.tracing,
        )
        self.grpc_server: grpc.aio.Server | None = None
        self.listeners: MailboxListeners | None = None  # Transact mailbox delivery (app/listener.py)
        self.started = False
        # Reflection and grpc.health.v1, for every path that serves native gRPC.
        self.services = sorted({m.service for m in self.methods})
        self.standard = StandardServices(self.services)

    async def start(self) -> None:
        if self.settings.dev_mode:
            log.warning(
                "no authentication configured: dev mode, loopback only, every caller is 'anonymous'"
            )
        try:
            self.audit.start()
            await self.authenticator.start()
            await self.sessions.start()
            await self.backends.start()
            await self.transact.prepare(self.backends.adapters("TRANSACT"))  # declared tables match
            if self.settings.mailbox_listener.in_gateway:
                self.listeners = await MailboxListeners.start(self.settings, self.backends, self.tracing)
            self._warn_per_process()
            await self.health.start()
            await self.health.serve_grpc(self.standard.health, self.services)
            self.gauges.start()
            if self.settings.grpc.server == "asgi":  # the ASGI server listens on the gRPC port too
                self.started = True
                return
            self.grpc_server = await start_grpc_server(
                self.methods,
                self.pipeline,
                self.standard,
                address=f"{self.settings.grpc.host}:{self.settings.grpc.port}",
                max_message_bytes=self.settings.limits.max_request_bytes,
                reuse_port=self.workers > 1,  # each worker binds the same gRPC port
                credentials=self._grpc_credentials(),
            )
            self.started = True
        except BaseException:
            await self.close()  # no half-started worker: its threads would keep the process alive
            raise

    def _warn_per_process(self) -> None:
        """Adapters that do not declare ``shared`` keep a copy per worker process."""
        if self.workers == 1:
            return
        per_process = sorted(
            f"{name} ({pattern})"
            for name, instance in self.backends.instances.items()
            for pattern, adapter in instance.adapters.items()
            if Capability.SHARED not in adapter.capabilities
        )
        if per_process:
            log.warning(
                "backends %s are in-process: with %d workers each worker has its own copy",
                ", ".join(per_process),
                self.workers,
            )

    def _grpc_credentials(self) -> grpc.ServerCredentials | None:
        """TLS with the HTTP port's certificate; with mTLS configured, client certificates required."""
        tls = self.settings.tls
        if tls is None:
            return None
        key, chain = tls.keyfile.read_bytes(), tls.certfile.read_bytes()
        auth = self.settings.auth
        if auth is not None and auth.mtls is not None:
            return grpc_server_credentials(key, chain, auth.mtls.ca_file)
        return grpc.ssl_server_credentials([(key, chain)])

    async def close(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)
            self.grpc_server = None
        await self.health.close()
        await self.gauges.close()
        if self.listeners is not None:  # before the backends it reads and publishes to
            await self.listeners.close()
            self.listeners = None
        await self.backends.close()
        await self.sessions.close_store()
        await self.authenticator.close()
        await asyncio.to_thread(self.audit.close)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still queued


def _service_patterns(methods: list[Method]) -> dict[str, str | None]:
    """Each service's access pattern ("KEY_VALUE"), None for the others (sessions, configs)."""
    return {
        m.service: config_pb2.AccessPattern.Name(m.pattern).removeprefix("ACCESS_PATTERN_") if m.pattern else None
        for m in methods
    }


def _session_store(settings: Settings, *, shared: bool) -> SessionStore:
    """In-process for one worker, SQLite when several worker processes share sessions, Redis
    when several gateway instances do."""
    config = settings.sessions
    lifecycle = {"idle_timeout": config.idle_timeout_seconds, "max_lifetime": config.max_lifetime_seconds}
    kind = config.store if config.store != "auto" else ("sqlite" if shared else "memory")
    if kind == "redis":
        from app.sessions.redis import RedisSessionStore  # the driver loads only when configured

        return RedisSessionStore(config.redis_url, **lifecycle)
    if kind == "sqlite":
        return SqliteSessionStore(settings.data_dir / "sessions.db", **lifecycle)
    return MemorySessionStore(**lifecycle)


def _encryption(settings: Settings) -> tuple[Keyring, frozenset[str]] | None:
    """The keyring and the namespaces whose values it encrypts, if any namespace is PII."""
    pii = frozenset(n.name for n in settings.namespaces if n.pii)
    if not pii or settings.encryption is None:
        return None
    return settings.encryption.keyring(), pii
