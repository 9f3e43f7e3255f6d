"""`prism serve` as a user runs it: start-up checks, reflection, health, TLS and workers."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import ssl
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from app.settings import SettingsError, load_settings
from prism.v1 import config_pb2
from prism.v1 import keyvalue_pb2 as kv
from tests.clients import GrpcClient, RestClient
from tests.conftest import open_session
from tests.gateway_process import ROOT, free_port, start_gateway

KV = "/prism.v1.KeyValueService/"


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_bad_config_file_exits_naming_the_key(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text("http:\n  port: not-a-port\nconfigs:\n  - {name: a, pattern: KEY_VALUE, backend: nowhere}\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert "http.port" in result.stderr


def test_unknown_backend_in_config_is_named(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text("configs:\n  - {name: a, pattern: KEY_VALUE, backend: nowhere}\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert "configs.a.backend" in result.stderr and "nowhere" in result.stderr


def test_mtls_without_tls_is_refused_at_start(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text(f"auth:\n  mtls: {{ca_file: {tmp_path / 'ca.pem'}}}\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert "auth.mtls" in result.stderr and "tls" in result.stderr


@pytest.mark.parametrize(
    ("forwarded", "named"),
    [("{trusted_proxies: []}", "trusted_proxies"), ("{trusted_proxies: [10.0.0.300/8]}", "trusted_proxies")],
)
def test_forwarded_certificates_need_trusted_proxies(tmp_path: pathlib.Path, forwarded: str, named: str) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text(f"auth:\n  mtls: {{ca_file: {tmp_path / 'ca.pem'}, forwarded: {forwarded}}}\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert f"auth.mtls.forwarded.{named}" in result.stderr, result.stderr


def test_refuses_public_bind_without_authentication_saying_what_to_do() -> None:
    result = run_serve("--host", "0.0.0.0")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "prism: invalid configuration:"
    (problem,) = lines[1:]
    assert problem.strip().startswith("http.host: refusing to bind 0.0.0.0 with no authentication"), problem
    assert "`auth:`" in problem and "--config" in problem  # the fix, not only the refusal
    assert "Value error" not in problem and "(top level)" not in problem


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        # a field's own validator: the key, then its message without pydantic's prefix
        (
            "policies:\n  - {role: r, namespaces: [x], operations: [bad op]}\n",
            "policies.0.operations: 'bad op': expected '*', 'PATTERN.*' or 'PATTERN.Method'",
        ),
        # a model's validator, which names the key itself
        (
            "configs:\n  - {name: a, pattern: KEY_VALUE, backend: nowhere}\n",
            "configs.a.backend: no backend named 'nowhere' (known: memory, sqlite)",
        ),
        # pydantic's own messages are kept as they are
        ("http: {port: x}\n", "http.port: Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_configuration_errors_name_the_key_without_pydantic_prefixes(
    tmp_path: pathlib.Path, yaml_text: str, expected: str
) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SettingsError) as refused:
        load_settings(config, environ={})
    assert str(refused.value) == f"invalid configuration:\n  {expected}"


def test_taken_grpc_port_fails_loudly(tmp_path: pathlib.Path, hypercorn_gateway) -> None:
    result = run_serve("--port", str(free_port()), "--grpc-port", str(hypercorn_gateway.grpc_port), "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "could not bind" in result.stdout + result.stderr


async def test_grpc_reflection_lists_and_describes_every_service(hypercorn_gateway) -> None:
    async with grpc.aio.insecure_channel(hypercorn_gateway.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask(**kwargs):
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kwargs)]))
            return await anext(aiter(responses))

        listed = await ask(list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {"prism.v1.KeyValueService", "prism.v1.PubSubService", "grpc.health.v1.Health"} <= names
        described = await ask(file_containing_symbol="prism.v1.KeyValueService")
        assert described.file_descriptor_response.file_descriptor_proto


async def test_grpc_health_service(hypercorn_gateway) -> None:
    async with grpc.aio.insecure_channel(hypercorn_gateway.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "prism.v1.KeyValueService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_http_health_docs_and_cors(hypercorn_gateway) -> None:
    async with httpx.AsyncClient(base_url=hypercorn_gateway.base_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        assert "swagger" in (await http.get("/docs")).text.lower()
        document = (await http.get("/openapi.json")).json()
        assert "/v1/kv/{key}" in document["paths"]
        preflight = await http.options(
            "/prism.v1.KeyValueService/Get",
            headers={
                "origin": "http://example.test",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,x-prism-session",
            },
        )
        assert preflight.status_code == 200
        assert "x-prism-session" in preflight.headers["access-control-allow-headers"].lower()
        answer = await http.get("/healthz", headers={"origin": "http://example.test"})
        assert "grpc-status" in answer.headers["access-control-expose-headers"]


def _self_signed(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
async def test_tls_on_both_ports(tmp_path: pathlib.Path, server: str) -> None:
    cert, key = _self_signed(tmp_path)
    gateway = start_gateway(tmp_path, server, extra_args=("--certfile", str(cert), "--keyfile", str(key)), wait=False)
    try:
        url = f"https://127.0.0.1:{gateway.http_port}"
        async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), http2=True) as http:
            for _ in range(100):
                try:
                    ready = await http.get("/readyz")
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)
            assert ready.status_code == 200 and ready.http_version == "HTTP/2"
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(gateway.grpc_target, credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gateway.stop()


def _children(pid: int) -> list[str]:
    return pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
async def test_workers_share_sessions_and_sqlite(tmp_path: pathlib.Path, server: str) -> None:
    """With --workers 2 a session opened on one connection works on every other connection,
    whichever worker serves it; the SQLite store is shared, and so are registered configs."""
    gateway = start_gateway(tmp_path, server, extra_args=("--workers", "2"))
    try:
        creator = RestClient(gateway.base_url)
        token = await open_session(creator, "kv")
        await creator.call(KV + "Set", kv.SetRequest(key="shared", value=b"v"), token)
        registered = config_pb2.ClientConfig(
            name="registered", pattern=config_pb2.ACCESS_PATTERN_KEY_VALUE, namespace="default",
            backend=config_pb2.BackendConfig(type=config_pb2.BACKEND_TYPE_SQLITE),
        )
        await creator.call("/prism.v1.ConfigService/RegisterConfig", config_pb2.RegisterConfigRequest(config=registered))
        await creator.close()
        for _ in range(12):  # fresh connections land on both workers
            reader = GrpcClient(gateway.grpc_target)
            assert (await reader.call(KV + "Get", kv.GetRequest(key="shared"), token)).value == b"v"
            by_registered_name = await open_session(reader, "registered")
            assert (await reader.call(KV + "Get", kv.GetRequest(key="shared"), by_registered_name)).value == b"v"
            await reader.close()
            rest = RestClient(gateway.base_url)
            assert (await rest.call(KV + "Get", kv.GetRequest(key="shared"), token)).value == b"v"
            await rest.close()
        assert len(_children(gateway.process.pid)) >= 2, "expected one child process per worker"
    finally:
        gateway.stop()


def test_grpc_port_on_the_asgi_server_needs_trailers(tmp_path: pathlib.Path) -> None:
    result = run_serve("--server", "granian", "--data-dir", str(tmp_path), env={"PRISM_GRPC__SERVER": "asgi"})
    assert result.returncode == 2
    assert "grpc.server asgi needs an HTTP server with HTTP/2 trailers" in result.stderr


@pytest.mark.parametrize("server", ["hypercorn", "pyvoy"])
async def test_the_asgi_server_can_serve_the_grpc_port(tmp_path: pathlib.Path, server: str) -> None:
    """grpc.server asgi: no grpc.aio; the ASGI server answers the gRPC port (HTTP there too, so
    /healthz answers). A session made over REST on the HTTP port works over gRPC on the gRPC
    port — under pyvoy another process, so the session store is the shared one."""
    gateway = start_gateway(tmp_path, server, env={"PRISM_GRPC__SERVER": "asgi"})
    try:
        async with httpx.AsyncClient(timeout=5) as http:  # under pyvoy another process: it may start later
            for _ in range(100):
                with contextlib.suppress(httpx.ConnectError):
                    if (await http.get(f"http://127.0.0.1:{gateway.grpc_port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            assert (await http.get(f"http://127.0.0.1:{gateway.grpc_port}/healthz")).status_code == 200
        rest, client = RestClient(gateway.base_url), GrpcClient(gateway.grpc_target)
        try:
            token = await open_session(rest, "kv")
            await client.call(KV + "Set", kv.SetRequest(key="on-asgi", value=b"v"), token)
            got = await client.call(KV + "Get", kv.GetRequest(key="on-asgi"), token)
        finally:
            await rest.close()
            await client.close()
        assert got.value == b"v"
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gateway.stop()
