"""schemathesis against a real gateway: the OpenAPI document says exactly what REST answers.

Every phase (examples, coverage, fuzzing, stateful) and every check runs against a `prism serve`
process over HTTP, with the session token each operation needs on every request, for a fixed
number of generated requests from a fixed seed. A failure is either the document
(app/transports/openapi.py) or the gateway being wrong; neither is papered over here.

Only the routes of RPCs that are not implemented yet are left out, by name, and the test checks
that they still answer 501 so the list cannot go stale. Two facts the document can only state in
words are taught to the run, each for its one place: a page token is opaque (the generator sends
the empty, first-page one), and a configuration is checked against this server's namespaces and
backends (a schema-valid one may be refused with 400 by the two operations that take one).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.engine import events
from schemathesis.engine.statistic import Statistic
from schemathesis.specs.openapi.formats import unregister_string_format

from tests.gateway_process import GatewayProcess, start_gateway

SEED = 20240601
MIN_REQUESTS = 3_000
SESSION_HEADER = "x-prism-session"

# A configuration named inline (CreateSession) or registered (RegisterConfig) is checked against
# this server's namespaces, backends and their capabilities, which no static document can list:
# the document says so in words, and a refusal of a schema-valid one (400 naming the violation,
# as ValidateConfig reports it) is what these two operations may answer besides the usual.
CHECKED_BY_THE_SERVER = ("SessionService_CreateSession", "ConfigService_RegisterConfig")
# An offset is checked against the partition's offsets, which no static document knows: one
# beyond them is OUT_OF_RANGE (400).
CHECKED_AGAINST_OFFSETS = ("QueueService_Commit", "QueueService_Seek")
# Field names (projection, order, filter) are checked against the collection's declared and
# introspected schema, operands against each field's kind, and a cursor is opaque: none of it is
# in a static document, so a schema-valid Reader request may be INVALID_ARGUMENT (400).
CHECKED_AGAINST_THE_COLLECTION = ("ReaderService_Read", "ReaderService_Query", "ReaderService_Count")
# A Write's table and columns are checked against the server configuration's declaration, which
# no static document lists: a schema-valid row for an undeclared table is INVALID_ARGUMENT (400).
CHECKED_AGAINST_THE_DECLARATION = ("TransactService_Write",)
# A start position needs a backend that keeps history (capability replay), which the session's
# configuration picks and no static document knows: elsewhere it is FAILED_PRECONDITION (400).
CHECKED_AGAINST_THE_BACKEND = ("PubSubService_Subscribe", "PubSubService_SubscribeBatches")
# Streams whose first event waits for a message: schemathesis reads one event of a stream, and a
# Queue subscription to an empty topic has none (its headers and pings come, its first event
# never does), so the call would only time out. PubSub's first event confirms the subscription.
SILENT_STREAMS = ("QueueService_Subscribe", "QueueService_SubscribeBatches")
POSITIVE_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' default

# Which named configuration a data service's session needs; everything else gets a KeyValue one.
SESSION_CONFIG_BY_TAG = {
    "PubSubService": "events", "QueueService": "queue", "TransactService": "transact", "ReaderService": "reader",
}

CONFIG: dict[str, Any] = {
    "seed": SEED,
    "workers": 1,
    "generation": {
        "mode": "all",  # valid and invalid data
        "max-examples": 140,
        "database": "none",  # no example database: the same run every time
        "unique-inputs": True,
    },
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": True, "max-steps": 10},
    },
    "checks": {"enabled": True, "max_response_time": 10.0},
    # A subscription streams until the client leaves: the first event shows its shape.
    "max-stream-events": 1,
    "request-timeout": 15,
    "continue-on-failure": True,
    "operations": [
        {
            "include-operation-id": [
                *CHECKED_BY_THE_SERVER, *CHECKED_AGAINST_OFFSETS, *CHECKED_AGAINST_THE_DECLARATION,
                *CHECKED_AGAINST_THE_COLLECTION, *CHECKED_AGAINST_THE_BACKEND,
            ],
            "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE_STATUSES, "400"]}},
        }
    ],
    "output": {"sanitization": {"enabled": False}, "truncation": {"enabled": False}},
}


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway of its own: the run writes keys, registers configurations and closes sessions."""
    process = start_gateway(tmp_path_factory.mktemp("schemathesis"), "hypercorn")
    yield process
    process.stop()


def create_session(base_url: str, config_name: str) -> str:
    response = httpx.post(f"{base_url}/v1/sessions", json={"configName": config_name}, timeout=10)
    response.raise_for_status()
    return response.json()["token"]


@pytest.fixture
def page_tokens() -> Iterator[None]:
    """An opaque page token is either empty (the first page) or one the gateway issued: the
    document says so with a format of its own, and the generator learns that format here."""
    schemathesis.openapi.format("prism-page-token", st.just(""))
    yield
    unregister_string_format("prism-page-token")


def test_schemathesis(own_gateway: GatewayProcess, page_tokens: None) -> None:
    base_url = own_gateway.base_url
    tokens = {name: create_session(base_url, name) for name in {"kv", *SESSION_CONFIG_BY_TAG.values()}}
    config = schemathesis.Config.from_dict({**CONFIG, "base-url": base_url})
    # The document this gateway serves (the committed one, as test_openapi.py checks).
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    schema = schema.exclude(operation_id=list(SILENT_STREAMS))
    expected = {
        f"{verb.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for verb, op in item.items()
        if op["operationId"] not in SILENT_STREAMS
    }

    @schema.auth(refresh_interval=None)
    class PrismSession:
        """The session token each operation needs: its service's pattern; a fresh one to close."""

        def get(self, case: Any, context: Any) -> str:
            operation = context.operation
            if operation.definition.raw.get("operationId") == "SessionService_CloseSession":
                return create_session(base_url, "kv")  # closing the shared session ends the run
            tags = operation.definition.raw.get("tags", [])
            return tokens[next((SESSION_CONFIG_BY_TAG[t] for t in tags if t in SESSION_CONFIG_BY_TAG), "kv")]

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), SESSION_HEADER: data}

    run = Run()
    run.collect(schemathesis.engine.from_schema(schema).execute())
    print(run.summary())
    assert not run.errors, "\n".join(run.errors)
    assert run.statistic.total_failures == 0 and not run.run_failures, run.failures()
    assert run.requests >= MIN_REQUESTS, f"only {run.requests} requests"
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        assert run.phases.get(phase) == "success", run.phases
    assert run.statistic.tested_operations == expected, expected ^ run.statistic.tested_operations
    # Every RPC with a route is implemented: none answers 501.
    assert 501 not in run.statuses, run.statuses


@dataclass
class Run:
    """What a schemathesis run did: requests by phase and status, failures, errors."""

    statistic: Statistic = field(default_factory=Statistic)
    requests: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    run_failures: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    def collect(self, stream: Iterable[events.EngineEvent]) -> None:
        started = time.monotonic()
        for event in stream:
            if isinstance(event, events.ScenarioFinished):
                self.statistic.on_scenario_finished(event.recorder)
                for interaction in event.recorder.interactions.values():
                    if interaction.response is not None:
                        self.requests += 1
                        phase, status = event.phase.value, interaction.response.status_code
                        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
                        self.statuses[status] = self.statuses.get(status, 0) + 1
            elif isinstance(event, events.PhaseFinished):
                self.phases[event.phase.name.value] = event.status.value
            elif isinstance(event, events.NonFatalError):
                self.errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
            elif isinstance(event, events.FatalError):
                self.errors.append(f"fatal: {event.exception!r}")
            elif isinstance(event, events.EngineFinished):
                self.run_failures = list(event.failures)
        self.seconds = time.monotonic() - started

    def summary(self) -> str:
        return (
            f"\nschemathesis: {self.requests} requests in {self.seconds:.0f}s, "
            f"{self.statistic.total_failures} failures; by phase {self.by_phase}; "
            f"statuses {dict(sorted(self.statuses.items()))}; phases {self.phases}\n{self.failures()}"
        )

    def failures(self) -> str:
        lines = [str(failure) for failure in self.run_failures]
        for label, groups in sorted(self.statistic.failures.items()):
            for group in groups.values():
                lines.extend(
                    f"- {label}: {failure.title}: {failure.message}".rstrip() for failure in group.failures
                )
                if group.code_sample:
                    lines.append("    " + group.code_sample.replace("\n", "\n    "))
        return "\n".join(lines)
