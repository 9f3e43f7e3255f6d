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
from adapters.reader.base import DEMO_FIELDS, Collection
from adapters.registry import UnknownBackendType, backend_settings, lookup
from adapters.transact.base import Isolation, Table
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


class MetricsSettings(Strict):
    """Gauges that are a store's or backend's answer (active sessions, pool connections,
    queue depth and consumer lag: ``app/gauges.py``) are sampled every ``sample_interval_seconds``."""

    sample_interval_seconds: float = Field(default=10.0, gt=0)


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


class TransactTable(Strict):
    """A table a namespace's Transact clients may write (``adapters/transact/base.py``)."""

    key: list[str] = Field(min_length=1)  # the columns of its primary key or a unique index
    columns: list[str] = Field(min_length=1)  # the writable columns, the key's included
    create: bool = False  # create it at start-up when missing, with untyped columns (demos, tests)


MAILBOX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,248}$"  # a mailbox name (adapters/transact/base.py, NAME)


class TransactMailbox(Strict):
    deliver_to: str  # a QUEUE or PUBSUB config of `configs`


class MailboxListenerSettings(Strict):
    """The mailbox listener (``app/listener.py``): it runs in every gateway process unless
    ``in_gateway`` is false (then ``prism listener`` runs it alone); any number share the work."""

    in_gateway: bool = True
    lease_seconds: float = Field(default=30.0, gt=0, le=3600)  # a claimed mailbox is one holder's this long
    batch_rows: int = Field(default=500, gt=0, le=10_000)  # rows per claim, over all its mailboxes
    batch_bytes: int = Field(default=4 * 1024 * 1024, gt=0)  # payload bytes per claim (one row at least)
    batch_mailboxes: int = Field(default=16, gt=0, le=1000)  # mailboxes per claim, delivered concurrently
    poll_seconds: float = Field(default=5.0, gt=0)  # a look without a wake-up: the safety net, not the way
    max_retry_seconds: float = Field(default=30.0, gt=0)  # the longest pause before retrying a failed delivery
    # Refusals (not outages) of one row before it is dead-lettered and its mailbox goes on; 0: never.
    max_delivery_attempts: int = Field(default=5, ge=0)
    retain_delivered_seconds: float = Field(default=86_400.0, gt=0)  # delivered rows are deleted after this


class TransactNamespace(Strict):
    """What one namespace's Transact sessions may write, and how: the tables live in
    ``backend``'s database; every transaction runs at ``isolation`` and ends within
    ``timeout_seconds`` (a Write's whole call; the longest a Transaction stays open, which a
    client's Begin may only shorten)."""

    backend: str  # name of an entry in `backends`
    isolation: Isolation = Isolation.READ_COMMITTED
    timeout_seconds: float = Field(default=5.0, gt=0, le=3600)
    tables: dict[str, TransactTable] = Field(min_length=1)
    # Where the mailbox listener delivers this namespace's rows (README, Transact): a QUEUE or
    # PUBSUB config of `configs`, for every mailbox, and per mailbox. Neither: the rows stay in
    # the mailbox table for a reader of its own. Only `mailboxes`: a Write names one of them.
    deliver_to: str | None = None
    mailboxes: dict[Annotated[str, Field(pattern=MAILBOX)], TransactMailbox] = {}

    def route(self, mailbox: str) -> str | None:
        """The config the listener delivers ``mailbox``'s rows to (None: not delivered)."""
        spec = self.mailboxes.get(mailbox)
        return spec.deliver_to if spec is not None else self.deliver_to

    @property
    def delivered(self) -> bool:
        """Whether the listener delivers (some of) this namespace's mailboxes."""
        return self.deliver_to is not None or bool(self.mailboxes)

    @model_validator(mode="after")
    def _tables(self) -> TransactNamespace:
        for name in self.tables:
            try:
                self.table(name)
            except ValueError as exc:
                raise ValueError(f"tables.{name}: {exc}") from None
        return self

    def table(self, name: str) -> Table:
        """The declaration as the adapters take it (ValueError naming what is wrong)."""
        spec = self.tables[name]
        return Table(name, tuple(spec.key), tuple(spec.columns), spec.create)


def _default_transact() -> dict[str, Any]:
    """The embedded default's demo: an orders table in the SQLite file, written by sessions of
    the ``transact`` config (README, Transact)."""
    orders = {"key": ["id"], "columns": ["id", "customer", "total", "status"], "create": True}
    return {"default": {"backend": "sqlite", "tables": {"orders": orders}, "deliver_to": "queue"}}


# --- Reader: the collections each namespace exposes (adapters/reader/base.py) --------------------


class ReaderCollection(Strict):
    """A table or view a namespace's Reader sessions may read, under the collection's name."""

    table: str  # a table or view; "schema.table" on PostgreSQL
    key: list[str] = Field(min_length=1)  # unique and not null: the tie-breaker of every order
    fields: list[str] = Field(min_length=1)  # the readable columns, the key's included
    demo: bool = False  # create and fill the demo table when missing (the embedded default)


class Reader(Strict):
    """Reader collections per namespace, and the bounds of every read."""

    # namespace → collection name → declaration. Without `configs` or `reader.collections` in the
    # configuration: the demo collection the default `reader` config reads.
    collections: dict[
        Annotated[str, Field(pattern=NAME)], dict[Annotated[str, Field(pattern=NAME)], ReaderCollection]
    ] = {}
    default_page_size: int = Field(default=100, gt=0)  # rows, when a request says 0
    max_page_size: int = Field(default=1000, gt=0)
    default_page_bytes: int = Field(default=1024 * 1024, gt=0)  # encoded page, when a request says 0
    max_page_bytes: int = Field(default=4 * 1024 * 1024, gt=0)  # within a gRPC client's default 4 MiB
    # A Read or Query stream ends, with a cursor to resume from, when its next page would come
    # later than this after the request; Count fails with DEADLINE_EXCEEDED.
    deadline_seconds: float = Field(default=60.0, gt=0)
    cursor_ttl_seconds: float = Field(default=86400.0, gt=0)  # a continuation cursor is refused after this

    @model_validator(mode="after")
    def _declarations(self) -> Reader:
        for namespace, collections in self.collections.items():
            for name in collections:
                try:
                    self.collection(namespace, name)
                except ValueError as exc:
                    raise ValueError(f"collections.{namespace}.{name}: {exc}") from None
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size: above max_page_size")
        if self.default_page_bytes > self.max_page_bytes:
            raise ValueError("default_page_bytes: above max_page_bytes")
        return self

    def collection(self, namespace: str, name: str) -> Collection:
        """The declaration as the adapters take it (ValueError naming what is wrong)."""
        spec = self.collections[namespace][name]
        return Collection(name, spec.table, tuple(spec.key), tuple(spec.fields), spec.demo)


def _default_reader_collections() -> dict[str, Any]:
    """The embedded default's demo: orders in the SQLite file, read by the `reader` config."""
    orders = {"table": "demo_orders", "key": ["id"], "fields": list(DEMO_FIELDS), "demo": True}
    return {"default": {"orders": orders}}


def _default_backends() -> dict[str, BackendSettings]:
    return {"sqlite": backend_settings({"type": "sqlite"}), "memory": backend_settings({"type": "memory"})}


def _default_configs() -> list[NamedConfig]:
    return [
        NamedConfig(name="kv", pattern="KEY_VALUE", backend="sqlite"),
        NamedConfig(name="kv-memory", pattern="KEY_VALUE", backend="memory"),
        NamedConfig(name="events", pattern="PUBSUB", backend="memory"),
        NamedConfig(name="queue", pattern="QUEUE", backend="sqlite"),
        NamedConfig(name="reader", pattern="READER", backend="sqlite"),
        NamedConfig(name="transact", pattern="TRANSACT", backend="sqlite"),
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
    # Values the contract tags `pii` (the caller's identity) as keyed pseudonyms in logs, traces
    # and audit records (app/pii.py); false: in clear, for development.
    mask_pii: bool = True
    tracing: TracingSettings = TracingSettings()  # off unless it names an exporter
    encryption: Encryption | None = None
    health: HealthChecks = HealthChecks()
    metrics: MetricsSettings = MetricsSettings()
    reader: Reader = Reader()  # Reader collections and page bounds
    # Namespace → the tables its Transact sessions may write. Without `configs` or `transact`
    # in the configuration: the demo that the default `transact` config uses.
    transact: dict[Annotated[str, Field(pattern=NAME)], TransactNamespace] = {}
    mailbox_listener: MailboxListenerSettings = MailboxListenerSettings()  # delivers Transact mailboxes

    @model_validator(mode="before")
    @classmethod
    def _default_transact(cls, data: Any) -> Any:
        """The default configs come with the demo table their `transact` config writes."""
        if isinstance(data, dict) and "configs" not in data and "transact" not in data:
            return {**data, "transact": _default_transact()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_reader(cls, data: Any) -> Any:
        """The default configs come with the demo collection their `reader` config reads."""
        if isinstance(data, dict) and "configs" not in data:
            reader = data.get("reader")
            if reader is None or (isinstance(reader, dict) and "collections" not in reader):
                return {**data, "reader": {**(reader or {}), "collections": _default_reader_collections()}}
        return data

    @model_validator(mode="after")
    def _reader_namespaces(self) -> Settings:
        """Collections of known namespaces only; a READER config on a backend that serves READER,
        for a namespace that exposes collections."""
        for namespace in self.reader.collections:
            if namespace not in self.known_namespaces:
                raise ValueError(
                    f"reader.collections.{namespace}: unknown namespace (known: {', '.join(sorted(self.known_namespaces))})"
                )
        for config in self.configs:
            if config.pattern != "READER" or config.backend not in self.backends:
                continue  # an unknown backend is reported by _check
            kind = self.backends[config.backend].type
            if "READER" not in lookup(kind).patterns:
                raise ValueError(f"configs.{config.name}.backend: a {kind} backend cannot serve READER")
            if not self.reader.collections.get(config.namespace):
                raise ValueError(
                    f"configs.{config.name}: namespace {config.namespace!r} exposes no collections "
                    f"(declare them under reader.collections.{config.namespace})"
                )
        return self

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
        self._check_transact()
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

    def _check_transact(self) -> None:
        for namespace, spec in self.transact.items():
            if spec.backend not in self.backends:
                raise ValueError(
                    f"transact.{namespace}.backend: no backend named {spec.backend!r} "
                    f"(known: {', '.join(sorted(self.backends))})"
                )
            kind = self.backends[spec.backend].type
            if "TRANSACT" not in lookup(kind).patterns:
                raise ValueError(f"transact.{namespace}.backend: a {kind} backend cannot serve TRANSACT")
        for config in self.configs:
            if config.pattern == "TRANSACT" and (problem := self.transact_problem(config.namespace, config.backend)):
                raise ValueError(f"configs.{config.name}: {problem}")
        self._check_mailbox_routes()

    def _check_mailbox_routes(self) -> None:
        """Every mailbox route names a QUEUE or PUBSUB config of `configs`."""
        named = {c.name: c for c in self.configs}
        for namespace, spec in self.transact.items():
            routes = [(f"transact.{namespace}.deliver_to", spec.deliver_to)]
            routes += [(f"transact.{namespace}.mailboxes.{m}.deliver_to", r.deliver_to) for m, r in spec.mailboxes.items()]
            for key, name in routes:
                if name is None:
                    continue
                config = named.get(name)
                if config is None:
                    raise ValueError(f"{key}: no config named {name!r} (known: {', '.join(sorted(named))})")
                if config.pattern not in ("QUEUE", "PUBSUB"):
                    raise ValueError(f"{key}: config {name!r} is {config.pattern}; the listener delivers to QUEUE or PUBSUB")

    def transact_problem(self, namespace: str, backend: str) -> str | None:
        """Why a TRANSACT configuration of ``namespace`` on ``backend`` cannot work, or None."""
        spec = self.transact.get(namespace)
        if spec is None:
            return f"namespace {namespace!r} exposes no tables (declare them under transact.{namespace})"
        if spec.backend != backend:
            return f"namespace {namespace!r} keeps its tables on backend {spec.backend!r}, not {backend!r}"
        return None

    @property
    def known_namespaces(self) -> set[str]:
        """Declared namespaces, those of the named configurations and of the Transact tables."""
        return {n.name for n in self.namespaces} | {c.namespace for c in self.configs} | set(self.transact)

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
