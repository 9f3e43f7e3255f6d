"""Real JavaScript clients against a real gateway, with nothing but this repository's proto/.

- Code generation: protoc (grpcio-tools) with ``@bufbuild/protoc-gen-es`` and ``-I proto`` alone
  writes the TypeScript; ``tsc`` type-checks and compiles it for the clients below.
- Connect-ES (``frontend-examples/node-clients/connect-client.mjs``) over gRPC-Web and the Connect
  protocol, JSON and binary (HTTP/1.1, the HTTP port), and gRPC (HTTP/2, the native gRPC port):
  sessions, KeyValue, error details, refusals, streams.
- ``@grpc/grpc-js`` with ``@grpc/proto-loader`` reading proto/ at run time
  (``grpc-js-client.mjs``): unary calls, a server stream and a bidirectional Transaction.

Needs Node.js and ``npm ci`` in frontend-examples/node-clients (``make test-deps``); skipped
without them, which ``PRISM_REQUIRE_BACKENDS=1`` turns into a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tests.gateway_process import ROOT, GatewayProcess

NODE_CLIENTS = ROOT / "frontend-examples" / "node-clients"
PROTO = ROOT / "proto"
PROTOC_GEN_ES = NODE_CLIENTS / "node_modules" / ".bin" / "protoc-gen-es"
TSC = NODE_CLIENTS / "node_modules" / ".bin" / "tsc"
NEEDED = ("@connectrpc/connect-node", "@grpc/grpc-js", "@grpc/proto-loader")


@dataclass
class Generated:
    ts: pathlib.Path  # protoc-gen-es output
    js: pathlib.Path  # the same compiled by tsc, what the clients import


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    missing = [p for p in (PROTOC_GEN_ES, TSC, *(NODE_CLIENTS / "node_modules" / n for n in NEEDED)) if not p.exists()]
    if node is None or missing:
        pytest.skip("node or frontend-examples/node-clients/node_modules missing: run `make test-deps`")
    return node


@pytest.fixture(scope="module")
def generated(node: str, tmp_path_factory: pytest.TempPathFactory) -> Generated:
    out = tmp_path_factory.mktemp("protoc-gen-es")
    ts, js = out / "ts", out / "js"
    ts.mkdir()
    sources = sorted(str(p.relative_to(PROTO)) for p in PROTO.glob("**/*.proto"))
    # `python -m grpc_tools.protoc` adds only its bundled google/protobuf types to `-I proto`.
    protoc = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
        f"--plugin=protoc-gen-es={PROTOC_GEN_ES}", f"--es_out={ts}", "--es_opt=target=ts,import_extension=js",
        *sources,
    ]
    run(protoc, cwd=out)
    # Compiled with the example's own tsconfig; imports resolve from its node_modules.
    (out / "node_modules").symlink_to(NODE_CLIENTS / "node_modules", target_is_directory=True)
    (out / "package.json").write_text('{"type": "module"}\n')
    tsconfig = {"extends": str(NODE_CLIENTS / "tsconfig.json"), "compilerOptions": {"rootDir": "ts", "outDir": "js"}, "include": ["ts/**/*.ts"]}
    (out / "tsconfig.json").write_text(json.dumps(tsconfig))
    run([node, str(TSC), "-p", str(out)], cwd=out)
    return Generated(ts, js)


def run(command: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, env={"PATH": os.environ["PATH"], **(env or {})}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{command[:3]} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_typescript_is_generated_from_the_repo_alone(generated: Generated) -> None:
    for proto in sorted(PROTO.glob("prism/v1/*.proto")):
        code = (generated.ts / "prism" / "v1" / f"{proto.stem}_pb.ts").read_text()
        assert f'@generated from file prism/v1/{proto.name}' in code
        for service in re.findall(r"^service (\w+)", proto.read_text(), re.MULTILINE):
            assert f"export const {service}: GenService<" in code, (proto.name, service)
    assert "export const BadRequestSchema" in (generated.ts / "google" / "rpc" / "error_details_pb.ts").read_text()
    assert (generated.js / "prism" / "v1" / "keyvalue_pb.js").exists()


CONNECT_TRANSPORTS = ("grpc-web", "grpc", "connect", "connect-proto")


def connect(node: str, generated: Generated, gateway: GatewayProcess, transport: str, scenario: str) -> Any:
    base_url = f"http://{gateway.grpc_target}" if transport == "grpc" else gateway.base_url
    env = {"TRANSPORT": transport, "BASE_URL": base_url, "GEN_DIR": str(generated.js)}
    return json.loads(run([node, "connect-client.mjs", scenario], NODE_CLIENTS, env))


@pytest.mark.parametrize("transport", CONNECT_TRANSPORTS)
def test_connect_es_sets_and_gets_a_value(node: str, generated: Generated, gateway: GatewayProcess, transport: str) -> None:
    seen = connect(node, generated, gateway, transport, "kv")
    assert seen["value"] == [0, 1, 2, 127, 128, 253, 254, 255]
    assert seen["etag"] and seen["etag"] == seen["setEtag"]


@pytest.mark.parametrize("transport", CONNECT_TRANSPORTS)
def test_connect_es_receives_the_bad_request_field_violation(
    node: str, generated: Generated, gateway: GatewayProcess, transport: str
) -> None:
    seen = connect(node, generated, gateway, transport, "invalidArgument")
    assert seen["code"] == "InvalidArgument", seen
    assert seen["detailTypes"] == ["google.rpc.BadRequest"], seen
    [violation] = seen["badRequests"][0]["fieldViolations"]
    assert violation["field"] == "key" and violation["description"]


@pytest.mark.parametrize("transport", CONNECT_TRANSPORTS)
def test_connect_es_sees_a_refusal_and_keeps_working(
    node: str, generated: Generated, gateway: GatewayProcess, transport: str
) -> None:
    """A call refused before its body is read (no session) must reach the client as such, and
    the client's next call, on the same keep-alive connection, must work."""
    seen = connect(node, generated, gateway, transport, "refusedThenOk")
    assert seen["refused"]["code"] == "Unauthenticated", seen
    assert "x-prism-session" in seen["refused"]["message"]
    assert seen["after"] == {"code": "OK"}


@pytest.mark.parametrize("transport", CONNECT_TRANSPORTS)
def test_connect_es_server_stream(node: str, generated: Generated, gateway: GatewayProcess, transport: str) -> None:
    seen = connect(node, generated, gateway, transport, "pubsub")
    assert seen["subscriptionId"]
    assert seen["subject"] == f"connect_es.{transport.replace('-', '_')}.orders"
    assert seen["data"] == "hello" and seen["headers"] == {"from": "connect-es"}


def grpc_js(node: str, gateway: GatewayProcess, scenario: str, target: str = "") -> Any:
    env = {"GRPC_TARGET": target or gateway.grpc_target}
    return json.loads(run([node, "grpc-js-client.mjs", scenario], NODE_CLIENTS, env))


@pytest.mark.parametrize("path", ["grpc-port", "http-port"])
def test_grpc_js_bidirectional_transaction(node: str, hypercorn_gateway: GatewayProcess, path: str) -> None:
    """TransactService/Transaction, a bidirectional stream, on both native gRPC paths: the
    grpc.aio port and the ASGI app on the HTTP port (Hypercorn, HTTP/2 trailers)."""
    target = hypercorn_gateway.grpc_target if path == "grpc-port" else f"127.0.0.1:{hypercorn_gateway.http_port}"
    seen = grpc_js(node, hypercorn_gateway, "transaction", target)
    assert seen["transactionId"] and seen["rowsAffected"] == 1 and seen["mailboxSequence"] >= 1, seen
    assert seen["committed"] and seen["updatedRows"] == 1 and seen["rolledBack"] is True, seen


@pytest.mark.parametrize("path", ["grpc-port", "http-port"])
def test_grpc_js_client_streaming_publish(node: str, hypercorn_gateway: GatewayProcess, path: str) -> None:
    """PubSubService/PublishStream, client streaming, on both native gRPC paths: one answer
    for the whole stream, every message delivered in order, a bad one refused by its place."""
    target = hypercorn_gateway.grpc_target if path == "grpc-port" else f"127.0.0.1:{hypercorn_gateway.http_port}"
    seen = grpc_js(node, hypercorn_gateway, "publishStream", target)
    assert seen["published"] == 3 and seen["lastMessageId"], seen
    assert seen["received"] == ["grpc_js.stream.a", "grpc_js.stream.b", "grpc_js.stream.c"], seen
    assert seen["refused"]["code"] == "INVALID_ARGUMENT" and seen["refused"]["message"].startswith("request[1].subject"), seen
    assert seen["after"] == "grpc_js.stream.d", "the message before the refused one stays published"


def test_grpc_js_unary_calls_with_proto_loader(node: str, gateway: GatewayProcess) -> None:
    seen = grpc_js(node, gateway, "unary")
    assert seen["value"] == [0, 1, 254, 255] and seen["etag"]
    refused = seen["refused"]
    assert refused["code"] == "INVALID_ARGUMENT" and "key" in refused["message"] and refused["hasStatusDetails"], seen


def test_grpc_js_server_stream(node: str, gateway: GatewayProcess) -> None:
    seen = grpc_js(node, gateway, "subscribe")
    assert seen["subscriptionId"]
    assert (seen["subject"], seen["data"]) == ("grpc_js.orders.eu", "hello")
