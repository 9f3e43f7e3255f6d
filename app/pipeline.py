"""The one request pipeline every transport goes through, in one order of checks.

    transport ─► Pipeline.unary / Pipeline.stream (method, decode, metadata)
                   ├─ credentials, or the session (x-prism-session)     UNAUTHENTICATED
                   ├─ the method is implemented                          UNIMPLEMENTED
                   ├─ decode() reads and parses the request              INVALID_ARGUMENT
                   ├─ REQUIRED fields (google.api.field_behavior)        INVALID_ARGUMENT
                   ├─ the session's access pattern                       FAILED_PRECONDITION
                   ├─ authorization (RBAC)                               PERMISSION_DENIED
                   ├─ rate limits                                        RESOURCE_EXHAUSTED
                   └─ the service method; audit records the outcome
    transport encodes ◄─ response message(s) or PrismError

Transports pass a ``decode`` callable rather than a message, so nobody without credentials
learns about the API, and no request body is read for a caller already refused.

Client-streaming and bidirectional methods enter through ``Pipeline.stream_in`` with an
iterator of requests instead: the call is admitted once when it opens, before a request is
read (credentials, session, pattern, authorization, limits: the steps that judge the call),
and each request is checked as the method reads it (the steps that judge a message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from opentelemetry.trace import Span

from app import logs, metrics, pii
from app.audit import AuditLog
from app.auth.authenticator import Authenticator
from app.auth.identity import Identity
from app.methods import ANY_NAMESPACE, Method
from app.policy import Authorizer, operation_name
from app.ratelimit import RateLimiter
from app.sessions import SessionRecord, SessionStore
from app.settings import RateLimit
from app.tracing import Tracing
from prism.errors import PrismError, failed_precondition, internal, unauthenticated
from prism.v1 import config_pb2

log = logging.getLogger("prism.pipeline")

SESSION_HEADER = "x-prism-session"
UNTRACED = nullcontext()  # reusable: what a step runs in with tracing off
# Status codes that, after a call was admitted, mean its backend failed it.
BACKEND_FAILURES = frozenset({"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"})

# Reads and parses a call's request message, once the pipeline has admitted the caller.
Decode = Callable[[], Awaitable[Message]]


@dataclass(slots=True)
class Call:
    """What a service method knows about the call besides its request."""

    method: Method
    session: SessionRecord | None
    token: str
    transport: str  # "grpc", "rest", "sse" or "grpc-web"
    identity: Identity
    operation: str  # "KEY_VALUE.Get", "SESSION.CreateSession", ...
    resource: Any = None  # what a method's authorization scope resolved (a config), kept for the method

    @property
    def config(self) -> config_pb2.ClientConfig:
        assert self.session is not None, "only session-bound methods read call.config"
        return self.session.config


# One check on an authenticated call and its decoded request; raises PrismError to refuse.
# A call step gets None for the request when a client-streaming call opens.
Step = Callable[[Call, Message | None], Awaitable[None]]
Requests = AsyncIterator[Message]


# Probes answer without credentials.
PUBLIC_SERVICES = frozenset({"prism.v1.HealthService"})


def policy_gaps(methods: list[Method]) -> list[str]:
    """Implemented methods the authorization step could not place in a namespace: neither
    public, nor session-bound, nor given a scope by their service."""
    return [
        m.path
        for m in methods
        if m.handler is not None
        and m.service not in PUBLIC_SERVICES
        and not m.requires_session
        # A scope reads the request; a client stream is authorized before its first one.
        and (m.scope is None or m.client_streaming)
    ]
NOBODY = Identity(name="anonymous", roles=frozenset(), method="anonymous")


class Pipeline:
    def __init__(
        self,
        sessions: SessionStore,
        authenticator: Authenticator,
        authorizer: Authorizer,
        limiter: RateLimiter,
        audit: AuditLog,
        namespace_limits: Mapping[str, RateLimit],
        methods: list[Method],
        tracing: Tracing | None = None,
    ) -> None:
        self.sessions = sessions
        self.tracing = tracing
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.limiter = limiter
        self.audit = audit
        self.namespace_limits = dict(namespace_limits)
        self.operations = {m.path: operation_name(m) for m in methods}
        # Labelled metric children, found once per (method, transport[, code]) rather than per call.
        self._calls: dict[tuple[str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}
        if gaps := policy_gaps(methods):
            raise ValueError(f"methods without an authorization scope: {', '.join(gaps)}")
        # After authentication and decoding, in this order; tracing, metrics and PII masking
        # take their places in these lists. Message steps judge one request; call steps the
        # call as a whole (once per call, also for a stream of requests).
        self.message_steps: list[Step] = [self._check_request]
        self.call_steps: list[Step] = [self._check_pattern, self._authorize, self._rate_limit]
        # A stream of requests (client streaming, bidirectional) opens with the call steps but
        # the rate limit, and each request counts against the rate limit as a call would.
        self.stream_steps = [step for step in self.call_steps if step != self._rate_limit]
        self.request_steps = [*self.message_steps, self._rate_limit]

    def asgi_peer(self, scope: Mapping[str, Any]) -> str | None:
        """The verified client-certificate identity of an HTTP request, for ``peer``."""
        return self.authenticator.asgi_peer(scope)

    def grpc_peer(self, context: grpc.aio.ServicerContext) -> str | None:
        """The verified client-certificate identity of a native gRPC call, for ``peer``."""
        return self.authenticator.grpc_peer(context)

    async def begin(
        self, method: Method, metadata: Mapping[str, str], transport: str, peer: str | None = None
    ) -> Call:
        """The first checks, before the request is even read: credentials and session
        (UNAUTHENTICATED), then the method (UNIMPLEMENTED). A caller without credentials
        learns nothing about the API, and a refused request body is never buffered."""
        operation = self.operations[method.path]
        if not method.requires_session:
            if method.service in PUBLIC_SERVICES:
                call = Call(method, None, "", transport, NOBODY, operation)
            else:
                identity = await self.authenticator.authenticate(metadata, peer)
                call = Call(method, None, "", transport, identity, operation)
        else:
            token = metadata.get(SESSION_HEADER, "")
            if not token:
                raise unauthenticated(
                    f"{method.service}/{method.name} needs a session: send the token from "
                    f"CreateSession as {SESSION_HEADER}"
                )
            session = await self.sessions.resolve(token)
            identity = Identity(session.identity, session.roles, "session")
            call = Call(method, session, token, transport, identity, operation)
        logs.bind_call(call.session.session_id if call.session else "", pii.identity(call.identity.name))
        if method.handler is None:
            raise PrismError(grpc.StatusCode.UNIMPLEMENTED, f"{method.service}/{method.name} is not implemented yet")
        return call

    async def refuse_unknown(
        self, error: PrismError, metadata: Mapping[str, str], peer: str | None = None
    ) -> NoReturn:
        """Answer a call to no known method: UNAUTHENTICATED first, like any other call, then
        ``error`` (NOT_FOUND for a REST route, UNIMPLEMENTED for an RPC)."""
        token = metadata.get(SESSION_HEADER, "")
        try:
            if token:
                await self.sessions.resolve(token)
            else:
                await self.authenticator.authenticate(metadata, peer)
        except PrismError as refused:
            if refused.code is grpc.StatusCode.UNAUTHENTICATED:
                metrics.AUTH_FAILURES.labels(metrics.auth_failure_reason(metadata, refused.message, bool(token))).inc()
            raise
        raise error

    async def admit(self, call: Call, request: Message) -> None:
        """The checks that need the request, in order: the steps folded at start-up."""
        for step in self.message_steps:
            await step(call, request)
        for step in self.call_steps:
            await step(call, request)

    async def _check_request(self, call: Call, request: Message | None) -> None:
        if call.method.required_fields is not None and request is not None:
            call.method.required_fields.check(request)

    async def _check_pattern(self, call: Call, request: Message | None) -> None:
        method = call.method
        if call.session is None or not method.pattern:
            return
        config = call.session.config
        if config.pattern != method.pattern:
            raise failed_precondition(
                f"session config {config.name!r} is for "
                f"{config_pb2.AccessPattern.Name(config.pattern)}, but "
                f"{method.service}/{method.name} needs "
                f"{config_pb2.AccessPattern.Name(method.pattern)}"
            )

    async def _authorize(self, call: Call, request: Message | None) -> None:
        """Every method but the public probes, by one rule: the operation in the namespace the
        call touches — its session's, or the one its scope resolves from the request."""
        method = call.method
        if method.service in PUBLIC_SERVICES:
            return
        if call.session is not None:
            namespace: str | None = call.session.config.namespace
        else:
            assert method.scope is not None, "checked at start-up by policy_gaps()"
            namespace = await method.scope(request, call)
        if namespace is ANY_NAMESPACE:
            if not self.authorizer.allowed_somewhere(call.identity, call.operation):
                raise PrismError(
                    grpc.StatusCode.PERMISSION_DENIED, f"{call.identity.name!r} may not {call.operation} in any namespace"
                )
            return
        self.authorizer.check(call.identity, call.operation, namespace)

    async def _rate_limit(self, call: Call, request: Message | None) -> None:
        if call.session is not None:
            self._limit(call.session.config)

    def _limit(self, config: config_pb2.ClientConfig) -> None:
        namespace = config.namespace
        if (limit := self.namespace_limits.get(namespace)) is not None:
            self._check_limit("namespace", f"ns:{namespace}", limit.requests_per_second, limit.burst, f"namespace {namespace!r}")
        if config.HasField("rate_limit"):
            rate = config.rate_limit
            self._check_limit("config", f"config:{namespace}:{config.name}", rate.requests_per_second, rate.burst, f"config {config.name!r}")

    def _check_limit(self, scope: str, key: str, rate: float, burst: int, what: str) -> None:
        try:
            self.limiter.check(key, rate, burst, what)
        except PrismError:
            metrics.RATE_LIMITED.labels(scope).inc()
            raise

    def _refused(
        self,
        call: Call | None,
        method: Method,
        transport: str,
        error: PrismError,
        metadata: Mapping[str, str],
        started: float,
        span: Span | None,
    ) -> None:
        """A call refused before its method ran (or a unary one the method failed)."""
        if error.code is grpc.StatusCode.UNAUTHENTICATED and call is None:
            message = error.message
            metrics.AUTH_FAILURES.labels(metrics.auth_failure_reason(metadata, message, method.requires_session)).inc()
        self._finish(call, method, transport, error.code.name, started, span)

    def _finish(
        self,
        call: Call | None,
        method: Method,
        transport: str,
        outcome: str,
        started: float | None,
        span: Span | None,
        event: str = "call",
    ) -> None:
        """Count, trace and audit a call's outcome (``started``: time it, as unary calls are)."""
        log.debug("%s over %s: %s", method.path, transport, outcome)
        calls = self._calls.get((method.path, transport, outcome))
        if calls is None:
            calls = self._calls[method.path, transport, outcome] = metrics.CALLS.labels(method.service, method.name, transport, outcome)
        calls.inc()
        if started is not None:
            latency = self._latencies.get((method.path, transport))
            if latency is None:
                latency = self._latencies[method.path, transport] = metrics.LATENCY.labels(method.service, method.name, transport)
            latency.observe(time.perf_counter() - started)
        if outcome in BACKEND_FAILURES and call is not None and call.session is not None:
            metrics.BACKEND_ERRORS.labels(call.session.config.backend.instance, outcome).inc()
        if span is not None:
            Tracing.end(span, outcome)
        if self.audit.enabled:
            self._audit(call, method, transport, outcome, event)

    def _audit(self, call: Call | None, method: Method, transport: str, outcome: str, event: str) -> None:
        session = call.session if call is not None else None
        self.audit.record(
            event=event,
            operation=self.operations[method.path],
            session_id=session.session_id if session else "",
            identity=pii.identity(call.identity.name) if call is not None else "",
            namespace=session.config.namespace if session else "",
            resource=f"{method.service}/{method.name}",
            transport=transport,
            outcome=outcome,
        )

    def _span(self, method: Method, transport: str, metadata: Mapping[str, str]) -> Span | None:
        if self.tracing is None:
            return None
        return self.tracing.server_span(method.path, method.service, method.name, transport, metadata)

    def _current(self, span: Span | None) -> AbstractContextManager[object]:
        return UNTRACED if span is None or self.tracing is None else self.tracing.current(span)

    def _step(self, name: str) -> AbstractContextManager[object]:
        """A child span for a pipeline step, when tracing is on."""
        return UNTRACED if self.tracing is None else self.tracing.step(name)

    async def unary(
        self, method: Method, decode: Decode, metadata: Mapping[str, str], transport: str, peer: str | None = None
    ) -> Message:
        """``decode`` reads and parses the request; it runs only once the caller is known."""
        started = time.perf_counter()
        span = self._span(method, transport, metadata)
        call: Call | None = None
        try:
            with self._current(span):
                with self._step("authenticate"):
                    call = await self.begin(method, metadata, transport, peer)
                request = await decode()  # in-memory work: no span of its own
                await self.admit(call, request)
                with self._step("execute"):
                    response = await method.handler(request, call)  # type: ignore[misc]
        except PrismError as error:
            self._refused(call, method, transport, error, metadata, started, span)
            raise
        except Exception as exc:
            log.exception("%s failed", method.path)
            self._finish(call, method, transport, "INTERNAL", started, span)
            raise internal() from exc
        self._finish(call, method, transport, "OK", started, span)
        return response

    async def stream(
        self, method: Method, decode: Decode, metadata: Mapping[str, str], transport: str, peer: str | None = None
    ) -> AsyncIterator[Message]:
        """Checks eagerly, so errors surface before the first message."""
        started = time.perf_counter()
        span = self._span(method, transport, metadata)
        call: Call | None = None
        try:
            with self._current(span):
                with self._step("authenticate"):
                    call = await self.begin(method, metadata, transport, peer)
                request = await decode()  # in-memory work: no span of its own
                await self.admit(call, request)
        except PrismError as error:
            self._refused(call, method, transport, error, metadata, started, span)
            raise
        with self._current(span):  # what the method does before its first response
            responses = method.handler(request, call)
        return self._guarded(call, responses, span)  # type: ignore[arg-type]

    async def stream_in(
        self, method: Method, requests: Requests, metadata: Mapping[str, str], transport: str, peer: str | None = None
    ) -> AsyncIterator[Message]:
        """A client-streaming or bidirectional call: admitted when it opens, before a request is
        read, so a refusal comes before the first response; ``requests`` (which raises
        PrismError for a request it cannot decode) is checked message by message as the
        method reads it. A client-streaming method's one response is the stream's only one."""
        started = time.perf_counter()
        span = self._span(method, transport, metadata)
        call: Call | None = None
        try:
            with self._current(span):
                with self._step("authenticate"):
                    call = await self.begin(method, metadata, transport, peer)
                for step in self.stream_steps:
                    await step(call, None)
        except PrismError as error:
            self._refused(call, method, transport, error, metadata, started, span)
            raise
        checked = self._checked(call, requests)
        if method.server_streaming:
            responses: AsyncIterator[Message] = method.handler(checked, call)  # type: ignore[assignment,misc]
        else:
            responses = _one(method.handler(checked, call))  # type: ignore[arg-type,misc]
        return self._guarded(call, responses, span)

    async def _checked(self, call: Call, requests: Requests) -> AsyncIterator[Message]:
        try:
            async for request in requests:
                for step in self.request_steps:
                    await step(call, request)
                yield request
        finally:
            await requests.aclose()  # type: ignore[attr-defined]

    async def _guarded(self, call: Call, responses: AsyncIterator[Message], span: Span | None) -> AsyncIterator[Message]:
        """An admitted stream: open from the first ``anext`` (a transport that never starts it
        opened nothing) until it ends, counted and audited at both ends."""
        method = call.method
        open_streams = metrics.STREAMS.labels(method.service, method.name, call.transport)
        if self.audit.enabled:
            self._audit(call, method, call.transport, "OK", "stream-open")
        open_streams.inc()
        outcome = "OK"
        try:
            if span is None:
                async for response in responses:
                    yield response
            else:
                while True:
                    with self._current(span):  # the method's work in the stream's span; never across a yield
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                    yield response
        except PrismError as error:
            outcome = error.code.name
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception as exc:
            outcome = "INTERNAL"
            log.exception("%s failed", method.path)
            raise internal() from exc
        finally:
            open_streams.dec()
            await responses.aclose()  # type: ignore[attr-defined]
            self._finish(call, method, call.transport, outcome, None, span, event="stream-close")


async def _one(response: Awaitable[Message]) -> AsyncIterator[Message]:
    yield await response


def status_of(exc: BaseException) -> PrismError:
    """Any exception as the PrismError a client may see."""
    if isinstance(exc, PrismError):
        return exc
    log.error("unhandled error", exc_info=exc)
    return PrismError(grpc.StatusCode.INTERNAL, internal().message)
