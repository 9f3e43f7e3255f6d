from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from prism.v1 import session_pb2
from tests.clients import ConnectClient, GrpcClient, GrpcWebClient, RestClient
from tests.gateway_process import GatewayProcess, start_gateway

SERVERS = ("hypercorn", "granian", "pyvoy")
# "grpc-http": native gRPC on the HTTP port, through the ASGI app (servers with HTTP/2 trailers).
TRANSPORTS = ("grpc", "grpc-http", "rest", "rest-h2c", "grpc-web", "grpc-web-text", "connect", "connect-proto")
TRAILERS_SERVERS = frozenset({"hypercorn", "pyvoy"})

Client = GrpcClient | RestClient | GrpcWebClient | ConnectClient


@pytest.fixture(scope="session", params=SERVERS)
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One real `prism serve` process per HTTP server, shared by the tests that use it."""
    process = start_gateway(tmp_path_factory.mktemp(request.param), request.param)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def hypercorn_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway for suites whose subject is not the HTTP server."""
    process = start_gateway(tmp_path_factory.mktemp("hypercorn-only"), "hypercorn")
    yield process
    process.stop()


def make_client(transport: str, gateway: GatewayProcess) -> Client:
    if transport == "grpc":
        return GrpcClient(gateway.grpc_target)
    if transport == "grpc-http":
        assert gateway.server in TRAILERS_SERVERS, "deselected by pytest_collection_modifyitems"
        return GrpcClient(f"127.0.0.1:{gateway.http_port}")
    if transport.startswith("connect"):
        return ConnectClient(gateway.base_url, binary=transport == "connect-proto")
    if transport == "rest":
        return RestClient(gateway.base_url)
    if transport == "rest-h2c":
        client = RestClient(gateway.base_url, http2=True)
        client.name = "rest-h2c"
        return client
    return GrpcWebClient(gateway.base_url, text=transport == "grpc-web-text")


async def open_session(client: Client, config_name: str) -> str:
    response = await client.call(
        "/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config_name)
    )
    return response.token  # type: ignore[attr-defined]


@pytest.fixture
async def client_factory() -> AsyncIterator:
    made: list[Client] = []

    def make(transport: str, gateway: GatewayProcess) -> Client:
        client = make_client(transport, gateway)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """With PRISM_REQUIRE_BACKENDS=1 (CI), a skipped test is a failure: nothing is skipped silently."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("PRISM_REQUIRE_BACKENDS") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped under PRISM_REQUIRE_BACKENDS=1: {report.longrepr}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Native gRPC on the HTTP port runs only under servers with HTTP/2 trailers; the others'
    clear refusal is tested in tests/test_grpc_asgi.py."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("transport") == "grpc-http" and params.get("gateway", "hypercorn") not in TRAILERS_SERVERS:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# --- parallel runs (pytest-xdist: `make test` runs `pytest -n 2`) ---------------------------------

FAULTS = "tests/faults/"
# Tests run at the end with nothing else running, with tests/faults: they stop and restart
# PostgreSQL and Redis, or they measure a gateway's memory, which a busy CPU skews (gRPC core reads
# ahead of a starved handler).
ALONE = (FAULTS, "tests/test_grpc_native.py::test_refused_large_calls_leave_worker_memory_flat")
LAST = "(alone, last)"
# Test modules that take minutes rather than seconds (`--durations`), handed out first so that no
# worker starts one while the other has nothing left to do. A name not collected is ignored.
LONG_FIRST = (
    "tests/test_schemathesis.py",
    "tests/test_listener_crash.py",
    "tests/conformance/test_queue.py",
    "tests/conformance/test_pubsub.py",
    "tests/test_slow_reader.py",
    "tests/conformance/test_reader.py",
    "tests/conformance/test_queue_adapter.py",
    "tests/test_reader_million.py",
    "tests/test_queue_crash.py",
)


def _module_scheduling() -> type:
    from xdist.scheduler import LoadScopeScheduling

    class ModulesThenFaults(LoadScopeScheduling):
        """Each test module is one unit of work, so its module-scoped gateways start in one worker
        only; a free worker takes the next unit, the long modules first. The ALONE tests are one
        last unit, handed to the last worker standing once every other worker has finished and
        exited."""

        def _split_scope(self, nodeid: str) -> str:
            return LAST if nodeid.startswith(ALONE) else nodeid.split("::", 1)[0]

        def schedule(self) -> None:
            assert self.collection_is_completed
            if self.collection is None:
                if not self._check_nodes_have_same_collection():
                    self.log("**Different tests collected, aborting run**")
                    return
                self.collection = list(next(iter(self.registered_collections.values())))
                units: dict[str, dict[str, bool]] = {}
                for nodeid in self.collection:
                    units.setdefault(self._split_scope(nodeid), {})[nodeid] = False
                rank = {module: i for i, module in enumerate(LONG_FIRST)}
                for scope in sorted(units, key=lambda s: (s == LAST, rank.get(s, len(rank)))):
                    self.workqueue[scope] = units[scope]
            for node in self.nodes:
                self._reschedule(node)
                self._reschedule(node)  # a second unit when the first is two tests or fewer

        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 2:
                return
            if next(iter(self.workqueue)) != LAST:
                self._assign_work_unit(node)
                return
            # Only the ALONE tests are left: every other worker finishes and exits, the last one runs them.
            others = [other for other in self.assigned_work if other is not node]
            if any(not other.shutting_down for other in others):
                node.shutdown()
            elif not others:
                self._assign_work_unit(node)
            # else: wait for the others to exit (remove_node)

        def remove_node(self, node: Any) -> str | None:
            crashed = super().remove_node(node)
            for other in self.nodes:
                self._reschedule(other)
            return crashed

    return ModulesThenFaults


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`-n N` (`--dist load`, the default): whole modules per worker, the ALONE tests at the end."""
    if config.getvalue("dist") != "load":
        return None
    return _module_scheduling()(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The controller collects nothing itself, so tests/faults/conftest.py's notice is printed
    here, once, before the first test runs."""
    config = node.config
    if getattr(config, "_prism_faults_announced", False) or not any(i.startswith(FAULTS) for i in ids):
        return
    config._prism_faults_announced = True  # type: ignore[attr-defined]
    from tests.faults.conftest import ANNOUNCEMENT

    config.pluginmanager.get_plugin("terminalreporter").write_line(ANNOUNCEMENT)


# The conformance matrix (tests/conformance/conftest.py) is kept where the tests run: each worker
# sends its cases to the controller, which prints the one table.


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    conformance = sys.modules.get("tests.conformance.conftest")
    if workeroutput is None or conformance is None:
        return
    matrix = conformance.COLLECTED
    workeroutput["conformance"] = {
        "columns": list(matrix.columns.items()),
        "cases": [(n, c.pattern, c.group, c.backends, c.outcome) for n, c in matrix.cases.items()],
    }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    exported = getattr(node, "workeroutput", {}).get("conformance")
    if not exported:
        return
    from tests.conformance import conftest as conformance

    matrix = conformance.COLLECTED
    for pattern, backends in exported["columns"]:
        matrix.columns.setdefault(pattern, list(backends))
    for nodeid, pattern, group, backends, outcome in exported["cases"]:
        case = matrix.cases.setdefault(nodeid, conformance.Case(pattern, group, list(backends)))
        if conformance.OUTCOME_RANK[outcome] > conformance.OUTCOME_RANK[case.outcome]:
            case.outcome, case.backends = outcome, list(backends)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """In the controller, which never loads tests/conformance/conftest.py as a conftest."""
    conformance = sys.modules.get("tests.conformance.conftest")
    if conformance is not None and not terminalreporter.config.pluginmanager.is_registered(conformance):
        conformance.pytest_terminal_summary(terminalreporter)
