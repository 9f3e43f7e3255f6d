"""Tracing with OpenTelemetry, off unless the server config names an exporter.

Every call, on every transport and both gRPC paths, gets a SERVER span named after its RPC
(``prism.v1.KeyValueService/Get``, RPC semantic conventions), continuing the client's trace
from W3C ``traceparent`` / ``tracestate`` (HTTP headers and gRPC metadata alike). Its children
are the pipeline steps that wait on something (``authenticate``: credentials or the session
store) and the method itself (``execute``), under which the database clients' own instrumentation (asyncpg, redis) records
each backend call. A stream's span lasts as long as the stream. Messages carry the trace:
``inject`` writes the current context into a message's headers, and ``consumed`` records a
CONSUMER span in that trace when the message is delivered.

Off (the default) the pipeline holds ``None`` instead of a :class:`Tracing` and takes no span
at all. On, spans leave through a batching processor (a background thread): to an OTLP/gRPC
collector (``exporter: otlp``, ``endpoint`` or the standard ``OTEL_EXPORTER_OTLP_*`` variables)
or as JSON lines to a file (``exporter: file``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import IO, Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("prism.tracing")

# The W3C trace-context headers a message carries.
TRACE_HEADERS = ("traceparent", "tracestate")
NOT_RECORDED = contextlib.nullcontext()  # reusable: it holds no state


class TracingSettings(BaseModel):
    """``tracing:`` in the server config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # discard: spans made and dropped in process (trace ids in logs without a collector; the
    # cost measured by benchmarks/tracing_cost.py)
    exporter: Literal["none", "otlp", "file", "discard"] = "none"
    endpoint: str | None = None  # otlp: the collector (else OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4317)
    file: str | None = None  # file: where spans go, one JSON object a line
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # of traces the gateway starts; a client's choice is kept
    service_name: str = "prism"


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines, appended to a file (several workers may share it: one write a line)."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n" for span in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


class DiscardExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _exporter(settings: TracingSettings) -> SpanExporter:
    if settings.exporter == "discard":
        return DiscardExporter()
    if settings.exporter == "file":
        if not settings.file:
            raise ValueError("tracing.file: the path spans are written to is required with exporter: file")
        return JsonLinesExporter(settings.file)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()


def _instrument_clients() -> None:
    """Database clients' own spans, under the call's ``execute`` span, where installed."""
    for module, name in (
        ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor"),
        ("opentelemetry.instrumentation.redis", "RedisInstrumentor"),
    ):
        with contextlib.suppress(ImportError):
            instrumentor = getattr(__import__(module, fromlist=[name]), name)()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument()


class Tracing:
    def __init__(self, settings: TracingSettings) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
        trace.set_tracer_provider(self.provider)  # for the clients' instrumentation
        self.tracer = self.provider.get_tracer("prism")
        _instrument_clients()

    @classmethod
    def of(cls, settings: TracingSettings | None) -> Tracing | None:
        """None when tracing is off: callers skip every span with one ``is None`` check."""
        if settings is None or settings.exporter == "none":
            return None
        return cls(settings)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued

    def server_span(self, path: str, service: str, method: str, transport: str, metadata: Mapping[str, str]) -> Span:
        """A call's span, a child of the client's trace when its metadata carries one."""
        parent = propagate.extract(metadata)
        return self.tracer.start_span(
            path.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "prism.transport": transport},
        )

    @contextlib.contextmanager
    def current(self, span: Span) -> Iterator[Span]:
        """``span`` as the current one for what runs inside (child spans, injected headers)."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        finally:
            otel_context.detach(token)

    def step(self, name: str) -> contextlib.AbstractContextManager[object]:
        """A child span of the current one; none under a call its sampler left out (it would
        be left out too, and making it costs as much as a recorded one's start)."""
        if not trace.get_current_span().is_recording():
            return NOT_RECORDED
        return self.tracer.start_as_current_span(name)

    @staticmethod
    def end(span: Span, code: str) -> None:
        span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()

    @staticmethod
    def inject(headers: MutableMapping[str, str]) -> None:
        """The current trace into a message's headers (a client's own trace headers win)."""
        if not any(header in headers for header in TRACE_HEADERS):
            propagate.inject(headers)

    def consumed(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> None:
        """A message delivered to a consumer: a CONSUMER span in the trace it carries."""
        if not any(header in headers for header in TRACE_HEADERS):
            return
        span = self.tracer.start_span(name, context=propagate.extract(headers), kind=SpanKind.CONSUMER, attributes=attributes)
        span.end()
