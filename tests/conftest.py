from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

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
