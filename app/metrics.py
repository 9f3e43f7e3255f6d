"""The gateway's Prometheus metrics, correct with any number of worker processes.

With one process, the families live in prometheus-client's default registry. With several
(``--workers N``, or pyvoy serving the gRPC port), ``prism serve`` gives every worker one
``PROMETHEUS_MULTIPROC_DIR`` before they start (``app/cli.py``, before anything imports
prometheus-client, whose value store is chosen at import): each worker
writes its values to files there, and a scrape of any worker adds up all of them
(:func:`exposition`), so counts from every worker are in every answer. Gauges of things a
worker holds (open streams) are summed over the live workers.

Names and units follow the Prometheus conventions: ``_total`` counters, ``_seconds`` and
base units. Label values come from closed sets (method table, status codes, transports, a
fixed list of failure reasons), so no client input can make a family's cardinality grow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Sub-millisecond to tens of seconds: a cache hit to a slow backend.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CALLS = Counter(
    "prism_rpc_calls", "Calls answered, by method, transport and status code", ["service", "method", "transport", "code"]
)
LATENCY = Histogram(
    "prism_rpc_duration_seconds",
    "Time to answer a unary call, or to refuse a stream (streams' durations are their lifetimes)",
    ["service", "method", "transport"],
    buckets=LATENCY_BUCKETS,
)
STREAMS = Gauge(
    "prism_streams_open", "Server or bidirectional streams open now", ["service", "method", "transport"],
    multiprocess_mode="livesum",
)
AUTH_FAILURES = Counter("prism_auth_failures", "Calls refused UNAUTHENTICATED, by reason", ["reason"])
RATE_LIMITED = Counter("prism_rate_limited", "Calls refused RESOURCE_EXHAUSTED by a rate limit", ["scope"])
BACKEND_ERRORS = Counter(
    "prism_backend_errors", "Calls a backend failed (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED)", ["backend", "code"]
)

# Sampled in every worker by app/gauges.py; the store or backend answers, so any worker's value is the value.
SESSIONS_ACTIVE = Gauge(
    "prism_sessions_active", "Sessions open now (neither closed nor past a deadline), as the session store counts them",
    multiprocess_mode="livemostrecent",
)
POOL_CONNECTIONS = Gauge(
    "prism_backend_pool_connections", "Connections the gateway's pools hold to a backend, by state (in_use, idle)",
    ["backend", "state"], multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "prism_queue_depth_messages", "Messages a Queue topic holds (high minus low offset, over its partitions)",
    ["namespace", "topic"], multiprocess_mode="livemostrecent",
)
QUEUE_LAG = Gauge(
    "prism_queue_consumer_lag_messages", "Messages of a Queue topic a consumer group has not finished yet",
    ["namespace", "topic", "group"], multiprocess_mode="livemostrecent",
)

# Messages by access pattern ("queue", "pubsub") and namespace (configured, so bounded).
PUBLISHED = Counter("prism_messages_published", "Messages accepted by Publish or PublishBatch", ["pattern", "namespace"])
DELIVERED = Counter(
    "prism_messages_delivered", "Messages streamed to subscribers: every copy and every redelivery", ["pattern", "namespace"]
)
REDELIVERED = Counter("prism_messages_redelivered", "Queue deliveries after the first of a message", ["namespace"])
ACKNOWLEDGED = Counter("prism_messages_acknowledged", "Queue messages acknowledged (first acknowledgement only)", ["namespace"])

BACKEND_UP = Gauge(
    "prism_backend_up", "1 while the backend answers the health monitor's probe, else 0", ["backend"],
    multiprocess_mode="livemin",  # down as soon as one worker finds it down
)

# The worker that answered a scrape: never aggregated, so tests and operators see which one it was.
_WORKER_REGISTRY = CollectorRegistry()
WORKER = Info("prism_worker", "The gateway worker process that answered this scrape", registry=_WORKER_REGISTRY)

# Session failures by the store's message (app/sessions/base.py), as bounded reasons.
_SESSION_REASONS = {
    "unknown or closed session token": "session_unknown",
    "session expired (idle)": "session_idle",
    "session reached its maximum lifetime": "session_lifetime",
    "session closed": "session_closed",
}


def exposition() -> bytes:
    """The text a scrape answers: every worker's families added up, and this worker's info."""
    if os.environ.get(MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(_WORKER_REGISTRY)
    return generate_latest(REGISTRY) + generate_latest(_WORKER_REGISTRY)


def auth_failure_reason(metadata: Mapping[str, str], message: str, session_bound: bool) -> str:
    """A bounded label for an UNAUTHENTICATED refusal: what was presented, or why it failed."""
    if session_bound:
        return _SESSION_REASONS.get(message, "no_session")
    if "x-api-key" in metadata or metadata.get("authorization", "").lower().startswith("apikey"):
        return "api_key"
    if metadata.get("authorization", "").lower().startswith("bearer"):
        return "jwt"
    if "authorization" in metadata:
        return "scheme"
    return "no_credentials"
