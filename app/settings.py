"""Server configuration: one YAML file plus ``PRISM_*`` environment variables, validated once
at start-up. With no file at all the gateway runs on the embedded default (SQLite + in-process
pub/sub) on loopback.

Environment variables override the file: ``PRISM_HTTP__PORT=9000`` sets ``http.port``
(double underscore separates levels); one that names no setting is a warning naming it.
Each backend entry is validated by its type's own settings model (``adapters/registry.py``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import secrets
import time
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters.backends import BackendSettings
from adapters.keyvalue.encrypted import Keyring
from adapters.registry import UnknownBackendType, backend_settings, lookup
from app.tracing import TracingSettings

log = logging.getLogger("prism.settings")

NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listener(Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class HttpListener(Listener):
    port: int = Field(default=8080, ge=0, le=65535)


class GrpcListener(Listener):
    port: int = Field(default=8980, ge=0, le=65535)
    # What serves the native gRPC port: the embedded grpc.aio server, or the ASGI server that
    # serves the HTTP port (it needs HTTP/2 trailers: pyvoy or Hypercorn). README, Performance,
    # says which is faster where and why grpc.aio stays the default.
    server: Literal["grpc.aio", "asgi"] = "grpc.aio"


class TLS(Strict):
    certfile: pathlib.Path
    keyfile: pathlib.Path


# A backend entry: the settings model of its ``type``, found in the backend registry (built-in
# types in adapters/backends/, plugins by entry point), so each type declares its own keys.
Backend = Annotated[SerializeAsAny[BackendSettings], PlainValidator(backend_settings)]


class HealthChecks(Strict):
    """How the gateway watches its backends (``app/health.py``): every ``interval_seconds``
    each backend is asked a trivial request, and counts as down when it fails or takes longer
    than ``timeout_seconds``."""

    interval_seconds: float = Field(default=1.0, gt=0)
    timeout_seconds: float = Field(default=2.0, gt=0)


class NamedCache(Strict):
    ttl_seconds: float = Field(gt=0)
    max_entries: int = Field(default=10_000, gt=0)


class NamedConfig(Strict):
    """A ClientConfig template clients open sessions with by name (RFC §3.3)."""

    name: str = Field(pattern=NAME)
    pattern: Literal["KEY_VALUE", "QUEUE", "PUBSUB", "READER", "TRANSACT"]
    backend: str  # name of an entry in `backends`
    namespace: str = Field(default="default", pattern=NAME)
    consistency: Literal["STRONG", "EVENTUAL", "BOUNDED_STALENESS"] = "STRONG"
    max_staleness_seconds: float | None = Field(default=None, gt=0)  # BOUNDED_STALENESS
    cache: NamedCache | None = None  # a read cache; STRONG reads never use it

    @model_validator(mode="after")
    def _staleness(self) -> NamedConfig:
        if self.consistency == "BOUNDED_STALENESS" and self.max_staleness_seconds is None:
            raise ValueError("max_staleness_seconds: required for BOUNDED_STALENESS")
        return self


class Limits(Strict):
    max_value_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # KeyValue values above this are stored in chunks of this size and reassembled on read.
    chunk_bytes: int = Field(default=1024 * 1024, gt=0)
    max_batch_keys: int = Field(default=1000, gt=0)
    stream_buffer: int = Field(default=1024, gt=0)
    sse_ping_seconds: float = Field(default=15.0, gt=0)  # keep-alive comment on idle SSE streams

    @property
    def max_request_bytes(self) -> int:
        """A request may carry one value base64-encoded in JSON, plus headroom."""
        return self.max_value_bytes * 4 // 3 + 64 * 1024


class Sessions(Strict):
    """Session lifetime and where sessions live."""

    # "auto": in-process with one worker, SQLite (in data_dir) with several; "redis" for several
    # gateway instances (redis_url).
    store: Literal["auto", "memory", "sqlite", "redis"] = "auto"
    redis_url: str = "redis://127.0.0.1:6379/0"
    idle_timeout_seconds: float = Field(default=900.0, gt=0)  # no call or heartbeat for this long ends it
    max_lifetime_seconds: float = Field(default=86400.0, gt=0)  # absolute, heartbeats cannot extend past it


class ApiKey(Strict):
    """A machine client's key, kept only as its SHA-256 hex digest
    (`printf %s "$KEY" | sha256sum`)."""

    identity: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: list[str] = []


class Jwt(Strict):
    """OAuth2 bearer tokens (JWT) checked against a JWKS."""

    jwks_url: str
    issuer: str
    audience: str
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]] = ["RS256", "ES256"]
    identity_claim: str = "sub"
    roles_claim: str = "roles"
    leeway_seconds: float = Field(default=30.0, ge=0)
    jwks_cache_seconds: float = Field(default=300.0, gt=0)


class ForwardedCertificate(Strict):
    """A TLS-terminating proxy in front of the HTTP port passes on the client certificate it
    received, URL-encoded PEM in ``header`` (nginx ``$ssl_client_escaped_cert``, AWS ALB
    ``X-Amzn-Mtls-Clientcert``, Envoy ``x-forwarded-client-cert`` ``Cert="…"``). Honoured only
    from ``trusted_proxies``; the certificate is verified again against ``ca_file``."""

    header: str = Field(default="x-forwarded-client-cert", pattern=r"^[a-z0-9-]+$")
    trusted_proxies: list[IPvAnyNetwork] = Field(min_length=1)


class Mtls(Strict):
    """Client certificates signed by ``ca_file``; the subject CN is the identity."""

    ca_file: pathlib.Path
    roles: dict[str, list[str]] = {}  # identity (CN) → roles
    forwarded: ForwardedCertificate | None = None


class Auth(Strict):
    api_keys: list[ApiKey] = []
    jwt: Jwt | None = None
    mtls: Mtls | None = None


class RateLimit(Strict):
    requests_per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


class Namespace(Strict):
    name: str = Field(pattern=NAME)
    rate_limit: RateLimit | None = None
    # Its KeyValue values are stored encrypted (`encryption`), and every call on it is audited.
    pii: bool = False


class Encryption(Strict):
    """AES-GCM keys for PII namespaces (adapters/keyvalue/encrypted.py): key id → the key in
    base64 (16, 24 or 32 bytes). ``current`` encrypts new writes; every key listed still
    decrypts, so a key is rotated by adding the new one, making it current, and dropping the
    old one only once nothing is stored under it. From the environment:
    PRISM_ENCRYPTION__CURRENT=k2, PRISM_ENCRYPTION__KEYS__K2=<base64> (ids are lower-cased)."""

    keys: dict[str, str] = Field(min_length=1)
    current: str

    @model_validator(mode="after")
    def _keys(self) -> Encryption:
        self.keyring()  # a bad key or id is refused at start-up, naming it
        return self

    def keyring(self) -> Keyring:
        return Keyring.from_base64(self.keys, self.current)


OPERATION = r"^(\*|[A-Z_]+\.(\*|[A-Za-z]+))$"  # "*", "KEY_VALUE.*", "KEY_VALUE.Get"


class Policy(Strict):
    """Who may do what where: a role, the namespaces ("*" for all) and the operations."""

    role: str = Field(min_length=1)
    namespaces: list[str] = Field(min_length=1)
    operations: list[str] = Field(min_length=1)

    @field_validator("operations")
    @classmethod
    def _operations(cls, operations: list[str]) -> list[str]:
        import re

        for op in operations:
            if not re.match(OPERATION, op):
                raise ValueError(f"{op!r}: expected '*', 'PATTERN.*' or 'PATTERN.Method'")
        return operations


class Audit(Strict):
    """JSON lines, one per session event and operation; never values."""

    sink: str | None = None  # None: off; "-": stderr; else a file path


def _default_backends() -> dict[str, BackendSettings]:
    return {"sqlite": backend_settings({"type": "sqlite"}), "memory": backend_settings({"type": "memory"})}


def _default_configs() -> list[NamedConfig]:
    return [
        NamedConfig(name="kv", pattern="KEY_VALUE", backend="sqlite"),
        NamedConfig(name="kv-memory", pattern="KEY_VALUE", backend="memory"),
        NamedConfig(name="events", pattern="PUBSUB", backend="memory"),
        NamedConfig(name="queue", pattern="QUEUE", backend="sqlite"),
    ]


class Settings(Strict):
    http: HttpListener = HttpListener()
    grpc: GrpcListener = GrpcListener()
    tls: TLS | None = None
    data_dir: pathlib.Path = pathlib.Path("data")
    backends: dict[str, Backend] = Field(default_factory=_default_backends)
    configs: list[NamedConfig] = Field(default_factory=_default_configs)
    limits: Limits = Limits()
    cors_origins: list[str] = ["*"]
    # Signs opaque cursors; all workers and instances must share it. Unset: a random key kept
    # in data_dir/secret.key.
    secret_key: str | None = Field(default=None, min_length=32)
    sessions: Sessions = Sessions()
    # None: dev mode (loopback only, every caller "anonymous" with every permission).
    auth: Auth | None = None
    namespaces: list[Namespace] = [Namespace(name="default")]
    policies: list[Policy] = []
    max_rate_limit_rps: float = Field(default=100_000.0, gt=0)  # cap for client-config rate limits
    audit: Audit = Audit()
    tracing: TracingSettings = TracingSettings()  # off unless it names an exporter
    encryption: Encryption | None = None
    health: HealthChecks = HealthChecks()

    @field_validator("configs")
    @classmethod
    def _unique_names(cls, configs: list[NamedConfig]) -> list[NamedConfig]:
        names = [c.name for c in configs]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"duplicate config names: {', '.join(dupes)}")
        return configs

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for config in self.configs:
            if config.backend not in self.backends:
                raise ValueError(
                    f"configs.{config.name}.backend: no backend named {config.backend!r} "
                    f"(known: {', '.join(sorted(self.backends))})"
                )
        for namespace in self.namespaces:
            if namespace.pii and self.encryption is None:
                raise ValueError(f"namespaces.{namespace.name}.pii: needs `encryption` (keys and current) to store its values")
            if namespace.pii and self.audit.sink is None:
                raise ValueError(f"namespaces.{namespace.name}.pii: needs `audit.sink`: calls on a PII namespace are audited")
        mtls = self.auth.mtls if self.auth is not None else None
        if mtls is not None and self.tls is None and mtls.forwarded is None:
            raise ValueError(
                "auth.mtls: client certificates need tls (certfile, keyfile), or auth.mtls.forwarded "
                "for a TLS-terminating proxy in front of the HTTP port"
            )
        if self.auth is None:
            for key, listener in (("http.host", self.http), ("grpc.host", self.grpc)):
                if not listener.loopback:
                    raise ValueError(
                        f"{key}: refusing to bind {listener.host} with no authentication "
                        "configured (dev mode serves loopback only). To serve other hosts, add an "
                        "`auth:` section (API keys, JWT or client certificates) to a server config "
                        "and pass it with --config FILE or PRISM_CONFIG (README, \"Serving other hosts\")"
                    )
        return self

    @property
    def known_namespaces(self) -> set[str]:
        """Declared namespaces and those of the named configurations."""
        return {n.name for n in self.namespaces} | {c.namespace for c in self.configs}

    @property
    def dev_mode(self) -> bool:
        return self.auth is None

    def signing_key(self) -> bytes:
        """The configured secret, else one created once in the data directory (race-free)."""
        if self.secret_key is not None:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        for _ in range(50):  # another worker may be between create and write
            if len(key := path.read_bytes()) == 32:
                return key
            time.sleep(0.01)
        raise SettingsError(f"{path}: expected a 32-byte key")


class SettingsError(Exception):
    """A configuration problem, with the offending key in the message."""


# Variables for the process, not the settings tree.
PROCESS_VARIABLES = frozenset(
    {"PRISM_CONFIG", "PRISM_REQUIRE_BACKENDS", "PRISM_WORKERS", "PRISM_SERVER", "PRISM_LOG_FORMAT", "PRISM_LOG_LEVEL"}
)


def _env_overrides(environ: dict[str, str], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings tree the ``PRISM_*`` variables spell. A variable that names no setting
    (a typo, or one meant for another program) is logged as a warning naming it and left out:
    the environment is shared, and a stray variable must not stop the gateway. ``data``, the
    file's settings, tells which type's keys a backend entry has."""
    paths = {
        name: name[len("PRISM_"):].lower().split("__")
        for name in sorted(environ)
        if name.startswith("PRISM_") and name not in PROCESS_VARIABLES
    }
    merged = _merge(data or {}, _tree(paths, environ))
    unknown = {name for name, path in paths.items() if not _names_a_setting(Settings, path, merged)}
    for name in sorted(unknown - _WARNED):
        _WARNED.add(name)
        log.warning("%s: no setting %s; the variable is ignored", name, ".".join(paths[name]))
    return _tree({name: path for name, path in paths.items() if name not in unknown}, environ)


def _tree(paths: dict[str, list[str]], environ: dict[str, str]) -> dict[str, Any]:
    """The nested settings the variables spell (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for name, path in paths.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(environ[name]) if environ[name] else environ[name]
    return tree


_WARNED: set[str] = set()  # each unknown variable is reported once per process, not per load


def _names_a_setting(model: type[BaseModel], path: list[str], tree: Any) -> bool:
    """Whether ``path`` leads to a field of ``model`` (``tree``: the settings so far, for the
    type of a backend entry)."""
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    below = tree.get(path[0]) if isinstance(tree, dict) else None
    return len(path) == 1 or _value_has(field.annotation, path[1:], below)


def _value_has(annotation: Any, path: list[str], tree: Any) -> bool:
    """Whether a value of type ``annotation`` has the setting ``path``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _value_has(args[0], path, tree)
    if origin in (typing.Union, types.UnionType):
        return any(_value_has(arg, path, tree) for arg in args if arg is not type(None))
    if origin is dict:  # any key; the value's type decides what lies below it
        below = tree.get(path[0]) if isinstance(tree, dict) else None
        return len(path) == 1 or _value_has(args[1], path[1:], below)
    if isinstance(annotation, type) and issubclass(annotation, BackendSettings):
        kind = tree.get("type") if isinstance(tree, dict) else None
        try:
            annotation = lookup(str(kind)).settings
        except UnknownBackendType:
            return True  # validation names the type as the problem
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _names_a_setting(annotation, path, tree)
    return False  # a scalar or a list has no keys below it


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("PRISM_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: the top level must be a mapping")
    try:
        return Settings.model_validate(_merge(data, _env_overrides(environ, data)))
    except ValidationError as exc:
        problems = [_problem(err) for err in exc.errors()]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems)) from exc


def _problem(err: Any) -> str:
    """One line per problem, naming the key. Our validators' messages are shown as raised,
    without pydantic's "Value error, " prefix; those of the model as a whole name their key
    themselves, so they get no location."""
    where = ".".join(str(part) for part in err["loc"])
    error = err.get("ctx", {}).get("error")
    message = str(error) if err["type"] == "value_error" and error is not None else err["msg"]
    return f"{where}: {message}" if where else message
