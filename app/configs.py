"""Client configurations (RFC §3): named ones from the server configuration, inline ones sent
by clients, and registered ones; one validator refuses a bad one with the field it names."""

from __future__ import annotations

import re

import grpc

from adapters.capabilities import Capability
from app.backends import Backends
from app.methods import ANY_NAMESPACE
from app.pipeline import Call
from app.policy import Authorizer
from app.sessions import SessionStore
from app.settings import NAME, NamedConfig, Settings
from prism.errors import PrismError, invalid_argument, not_found
from prism.v1 import config_pb2

_NAME = re.compile(NAME)
PROBE_SECONDS = 2.0  # a registration waits this long at most for its backend to answer


def proto_type(backend_type: str) -> config_pb2.BackendType.ValueType:
    """The contract's number for a backend type; BACKEND_TYPE_UNSPECIFIED for a type the
    contract does not name (a plugin's), which clients then select by instance name."""
    name = f"BACKEND_TYPE_{backend_type.upper()}"
    return config_pb2.BackendType.Value(name) if name in config_pb2.BackendType.keys() else config_pb2.BACKEND_TYPE_UNSPECIFIED


def from_settings(named: NamedConfig, settings: Settings) -> config_pb2.ClientConfig:
    config = config_pb2.ClientConfig(
        name=named.name,
        version="1",
        pattern=config_pb2.AccessPattern.Value(f"ACCESS_PATTERN_{named.pattern}"),
        backend=config_pb2.BackendConfig(type=proto_type(settings.backends[named.backend].type), instance=named.backend),
        consistency=config_pb2.ConsistencyConfig(level=config_pb2.ConsistencyLevel.Value(f"CONSISTENCY_LEVEL_{named.consistency}")),
        namespace=named.namespace,
    )
    if named.max_staleness_seconds is not None:
        config.consistency.max_staleness.FromNanoseconds(int(named.max_staleness_seconds * 1e9))
    if named.cache is not None:
        config.cache.enabled = True
        config.cache.ttl.FromNanoseconds(int(named.cache.ttl_seconds * 1e9))
        config.cache.max_entries = named.cache.max_entries
    return config


class ConfigRegistry:
    """Named configurations: those of the server configuration, then those registered through
    ConfigService, which the session store keeps (shared by every worker and instance that
    shares the sessions). A registered configuration never changes, so once read it is kept."""

    def __init__(self, settings: Settings, backends: Backends, store: SessionStore) -> None:
        self.settings = settings
        self.backends = backends
        self.store = store
        self.named = {c.name: from_settings(c, settings) for c in settings.configs}
        self._registered: dict[str, config_pb2.ClientConfig] = {}

    async def get(self, name: str) -> config_pb2.ClientConfig:
        if (config := self.named.get(name) or self._registered.get(name)) is not None:
            return config
        if (stored := await self.store.registered_config(name)) is not None:
            config = self._registered[name] = config_pb2.ClientConfig.FromString(stored)
            return config
        known = ", ".join(c.name for c in await self.all())
        raise not_found(f"no configuration named {name!r} (known: {known})")

    async def all(self) -> list[config_pb2.ClientConfig]:
        """Every named configuration, in name order."""
        registered = [config_pb2.ClientConfig.FromString(c) for c in await self.store.registered_configs()]
        merged = {c.name: c for c in registered} | self.named
        return [config for _, config in sorted(merged.items())]

    async def register(self, config: config_pb2.ClientConfig) -> None:
        """ALREADY_EXISTS when the name is taken, here or by any process sharing the store."""
        if config.name in self.named or not await self.store.register_config(config.name, config.SerializeToString()):
            raise PrismError(grpc.StatusCode.ALREADY_EXISTS, f"a configuration named {config.name!r} exists")
        self._registered[config.name] = config

    async def violations(self, config: config_pb2.ClientConfig) -> list[config_pb2.ConfigViolation]:
        """Every reason to refuse ``config``; it is completed in place (backend instance)."""
        found: list[config_pb2.ConfigViolation] = []

        def refuse(field: str, description: str) -> None:
            found.append(config_pb2.ConfigViolation(field=field, description=description))

        if not _NAME.match(config.name):
            refuse("name", f"{config.name!r} is not a name (lower-case letters, digits, '_.-', at most 63)")
        if config.pattern == config_pb2.ACCESS_PATTERN_UNSPECIFIED:
            refuse("pattern", "is required")
        # Enum numbers the contract does not define arrive intact (proto3 keeps them).
        if config.pattern not in config_pb2.AccessPattern.values():
            refuse("pattern", f"{config.pattern} is not an access pattern")
            return found
        if config.backend.type not in config_pb2.BackendType.values():
            refuse("backend.type", f"{config.backend.type} is not a backend type")
            return found
        if config.consistency.level not in config_pb2.ConsistencyLevel.values():
            refuse("consistency.level", f"{config.consistency.level} is not a consistency level")
            return found
        pattern = config_pb2.AccessPattern.Name(config.pattern).removeprefix("ACCESS_PATTERN_")
        instance = self._instance(config, refuse)
        if instance is not None and config.pattern:
            if not self.backends.serves(instance, pattern):
                refuse("backend.type", f"a {self.settings.backends[instance].type} backend cannot serve {pattern}")
            else:
                await self._check_backend(config, pattern, instance, refuse)
            if pattern == "TRANSACT" and (problem := self.settings.transact_problem(config.namespace, instance)):
                refuse("namespace", problem)  # tables come from the server configuration only
        if config.namespace not in self.settings.known_namespaces:
            refuse("namespace", f"unknown namespace {config.namespace!r}")
        rate = config.rate_limit
        if config.HasField("rate_limit"):
            if rate.requests_per_second <= 0:
                refuse("rateLimit.requestsPerSecond", "must be positive")
            elif rate.requests_per_second > self.settings.max_rate_limit_rps:
                refuse("rateLimit.requestsPerSecond", f"above the server's cap of {self.settings.max_rate_limit_rps:g}/s")
            if rate.burst < 1:
                refuse("rateLimit.burst", "must be at least 1")
        consistency = config.consistency
        if consistency.level == config_pb2.CONSISTENCY_LEVEL_BOUNDED_STALENESS and consistency.max_staleness.ToNanoseconds() <= 0:
            refuse("consistency.maxStaleness", "must be positive for BOUNDED_STALENESS")
        if config.cache.enabled:
            if config.pattern != config_pb2.ACCESS_PATTERN_KEY_VALUE:
                refuse("cache.enabled", "a read cache is offered for KEY_VALUE only")
            if config.cache.ttl.ToNanoseconds() <= 0:
                refuse("cache.ttl", "must be positive when the cache is enabled")
            if config.cache.max_entries <= 0:
                refuse("cache.maxEntries", "must be positive when the cache is enabled")
        return found

    def _instance(self, config: config_pb2.ClientConfig, refuse) -> str | None:  # type: ignore[no-untyped-def]
        backend = config.backend
        if backend.instance:
            if backend.instance not in self.settings.backends:
                refuse("backend.instance", f"no backend named {backend.instance!r}")
                return None
            spec_type = proto_type(self.settings.backends[backend.instance].type)
            if backend.type and backend.type != spec_type:
                refuse("backend.type", f"backend {backend.instance!r} is {config_pb2.BackendType.Name(spec_type)}")
                return None
            backend.type = spec_type
            return backend.instance
        if not backend.type:
            refuse("backend.type", "is required (or backend.instance)")
            return None
        for name, spec in sorted(self.settings.backends.items()):
            if proto_type(spec.type) == backend.type:
                backend.instance = name
                return name
        refuse("backend.type", f"no {config_pb2.BackendType.Name(backend.type)} backend is configured")
        return None

    async def _check_backend(self, config: config_pb2.ClientConfig, pattern: str, instance: str, refuse) -> None:  # type: ignore[no-untyped-def]
        adapter = self.backends.adapters(pattern).get(instance)
        if adapter is None:
            refuse("backend.instance", f"backend {instance!r} is not running")
            return
        needed = [n.strip() for n in config.backend.options.get("requires", "").split(",") if n.strip()]
        for need in needed:
            if need not in Capability.__members__.values():
                refuse("backend.options.requires", f"unknown capability {need!r}")
            elif Capability(need) not in adapter.capabilities:
                refuse("backend.options.requires", f"backend {instance!r} lacks {need}")
        if (down := await self.backends.probe(instance, PROBE_SECONDS)) is not None:
            refuse("backend.instance", f"backend {instance!r} unreachable: {down}")

    async def validated(self, config: config_pb2.ClientConfig) -> config_pb2.ClientConfig:
        """The config completed, or INVALID_ARGUMENT naming the first bad field."""
        checked = config_pb2.ClientConfig()
        checked.CopyFrom(config)
        if violations := await self.violations(checked):
            first = violations[0]
            raise invalid_argument(f"config.{first.field}", first.description)
        return checked


class ConfigService:
    SERVICE = "prism.v1.ConfigService"

    def __init__(self, configs: ConfigRegistry, authorizer: Authorizer) -> None:
        self.configs = configs
        self.authorizer = authorizer
        # Authorization's scope of each method: the namespace of the configuration it touches.
        self.scopes = {
            "ListConfigs": self._any_namespace,
            "GetConfig": self._named_namespace,
            "RegisterConfig": self._validated_namespace,
            "ValidateConfig": self._candidate_namespace,
        }

    async def _any_namespace(self, request: config_pb2.ListConfigsRequest, call: Call) -> None:
        return ANY_NAMESPACE  # the listing shows only the namespaces the caller may list

    async def _named_namespace(self, request: config_pb2.GetConfigRequest, call: Call) -> str:
        call.resource = await self.configs.get(request.name)
        return call.resource.namespace

    async def _validated_namespace(self, request: config_pb2.RegisterConfigRequest, call: Call) -> str:
        call.resource = await self.configs.validated(request.config)
        return call.resource.namespace

    async def _candidate_namespace(self, request: config_pb2.ValidateConfigRequest, call: Call) -> str:
        return request.config.namespace

    async def ListConfigs(self, request: config_pb2.ListConfigsRequest, call: Call) -> config_pb2.ListConfigsResponse:
        configs = [
            c
            for c in await self.configs.all()
            if request.pattern in (0, c.pattern) and self.authorizer.allowed(call.identity, call.operation, c.namespace)
        ]
        return config_pb2.ListConfigsResponse(configs=configs)

    async def GetConfig(self, request: config_pb2.GetConfigRequest, call: Call) -> config_pb2.GetConfigResponse:
        return config_pb2.GetConfigResponse(config=call.resource or await self.configs.get(request.name))

    async def ValidateConfig(
        self, request: config_pb2.ValidateConfigRequest, call: Call
    ) -> config_pb2.ValidateConfigResponse:
        candidate = config_pb2.ClientConfig()
        candidate.CopyFrom(request.config)
        violations = await self.configs.violations(candidate)
        return config_pb2.ValidateConfigResponse(valid=not violations, violations=violations)

    async def RegisterConfig(
        self, request: config_pb2.RegisterConfigRequest, call: Call
    ) -> config_pb2.RegisterConfigResponse:
        """Adds a named configuration, kept in the session store: every worker and instance
        sharing it can open sessions by the name."""
        config = call.resource or await self.configs.validated(request.config)
        await self.configs.register(config)
        return config_pb2.RegisterConfigResponse(config=config)
