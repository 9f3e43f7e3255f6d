"""Authorization, rate limits and audit through real gateways, over gRPC and REST.

The matrix: for every role × KeyValue operation × namespace, the call is allowed exactly where
the policy says, and refused with PERMISSION_DENIED / 403 naming the operation and namespace
everywhere else.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterator

import pytest

from app import pii
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import session_pb2
from tests.clients import CallError, GrpcClient, RestClient
from tests.gateway_process import GatewayProcess, start_gateway

KEYS = {"reader": "reader-key-0123456789", "writer": "writer-key-0123456789", "admin": "admin-key-0123456789"}
KV_OPERATIONS = {
    "Get": kv.GetRequest(key="k"),
    "Set": kv.SetRequest(key="k", value=b"v"),
    "Delete": kv.DeleteRequest(key="k"),
    "Exists": kv.ExistsRequest(key="k"),
    "BatchGet": kv.BatchGetRequest(keys=["k"]),
    "BatchSet": kv.BatchSetRequest(entries=[kv.SetRequest(key="k", value=b"v")]),
    "BatchDelete": kv.BatchDeleteRequest(keys=["k"]),
    "Scan": kv.ScanRequest(prefix="k"),
}
READS = {"Get", "Exists", "BatchGet", "Scan"}
# The policy under test, as the expected answer: role → namespace → allowed KV operations.
EXPECTED = {
    "reader": {"alpha": READS, "beta": set()},
    "writer": {"alpha": set(KV_OPERATIONS), "beta": {"Set", "BatchSet"}},
    "admin": {"alpha": set(KV_OPERATIONS), "beta": set(KV_OPERATIONS)},
}


def config_yaml(audit_path: pathlib.Path) -> str:
    keys = "\n".join(
        f"    - {{identity: {role}-client, sha256: {hashlib.sha256(key.encode()).hexdigest()}, roles: [{role}]}}"
        for role, key in KEYS.items()
    )
    return f"""
backends:
  local: {{type: sqlite}}
configs:
  - {{name: kv-alpha, pattern: KEY_VALUE, backend: local, namespace: alpha}}
  - {{name: kv-beta, pattern: KEY_VALUE, backend: local, namespace: beta}}
  - {{name: kv-limited-grpc, pattern: KEY_VALUE, backend: local, namespace: limited-grpc}}
  - {{name: kv-limited-rest, pattern: KEY_VALUE, backend: local, namespace: limited-rest}}
namespaces:
  - {{name: alpha}}
  - {{name: beta}}
  - {{name: limited-grpc, rate_limit: {{requests_per_second: 0.5, burst: 3}}}}
  - {{name: limited-rest, rate_limit: {{requests_per_second: 0.5, burst: 3}}}}
auth:
  api_keys:
{keys}
policies:
  - {{role: reader, namespaces: [alpha], operations: ["SESSION.*", "KEY_VALUE.Get", "KEY_VALUE.Exists", "KEY_VALUE.BatchGet", "KEY_VALUE.Scan"]}}
  - {{role: reader, namespaces: [beta], operations: ["SESSION.*"]}}
  - {{role: writer, namespaces: [alpha], operations: ["SESSION.*", "KEY_VALUE.*"]}}
  - {{role: writer, namespaces: [beta], operations: ["SESSION.*", "KEY_VALUE.Set", "KEY_VALUE.BatchSet"]}}
  - {{role: admin, namespaces: ["*"], operations: ["*"]}}
audit: {{sink: {audit_path}}}
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, pathlib.Path]]:
    tmp = tmp_path_factory.mktemp("secured")
    audit = tmp / "audit.jsonl"
    process = start_gateway(tmp, "granian", config_yaml=config_yaml(audit))
    yield process, audit
    process.stop()


def client_for(transport: str, gateway: GatewayProcess, key: str):
    headers = {"x-api-key": key}
    if transport == "grpc":
        return GrpcClient(gateway.grpc_target, metadata=headers)
    return RestClient(gateway.base_url, headers=headers)


async def create_session(client, config_name: str) -> str:
    response = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config_name))
    return response.token


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("role", sorted(EXPECTED))
async def test_authorization_matrix(secured, transport: str, role: str) -> None:
    gateway, _ = secured
    client = client_for(transport, gateway, KEYS[role])
    try:
        for namespace, allowed in EXPECTED[role].items():
            token = await create_session(client, f"kv-{namespace}")
            for operation, request in KV_OPERATIONS.items():
                try:
                    await client.call(f"/prism.v1.KeyValueService/{operation}", request, token)
                    outcome = "allowed"
                except CallError as exc:
                    outcome = "denied" if exc.code == "PERMISSION_DENIED" else f"other {exc.code}"
                    if exc.code == "PERMISSION_DENIED":
                        assert f"KEY_VALUE.{operation}" in exc.message and repr(namespace) in exc.message
                        if transport == "rest":
                            assert exc.http_status == 403
                    elif exc.code == "NOT_FOUND" and operation == "Get":
                        outcome = "allowed"  # allowed, the key just is not there
                expected = "allowed" if operation in allowed else "denied"
                assert outcome == expected, (role, namespace, operation)
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_session_in_a_namespace_without_permission_is_refused(secured, transport: str) -> None:
    gateway, _ = secured
    client = client_for(transport, gateway, KEYS["reader"])
    try:
        with pytest.raises(CallError) as denied:
            await create_session(client, f"kv-limited-{transport}")
        assert denied.value.code == "PERMISSION_DENIED"
        assert "SESSION.CreateSession" in denied.value.message and f"'limited-{transport}'" in denied.value.message
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_unknown_api_key_and_no_credentials_are_unauthenticated(secured, transport: str) -> None:
    gateway, _ = secured
    for headers in ({"x-api-key": "revoked-or-unknown"}, {}):
        client = (
            GrpcClient(gateway.grpc_target, metadata=headers)
            if transport == "grpc"
            else RestClient(gateway.base_url, headers=headers)
        )
        try:
            with pytest.raises(CallError) as refused:
                await create_session(client, "kv-alpha")
            assert refused.value.code == "UNAUTHENTICATED"
            if transport == "rest":
                assert refused.value.http_status == 401
        finally:
            await client.close()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_namespace_rate_limit(secured, transport: str) -> None:
    gateway, _ = secured
    client = client_for(transport, gateway, KEYS["admin"])
    try:
        token = await create_session(client, f"kv-limited-{transport}")
        outcomes = []
        for _ in range(4):
            try:
                await client.call("/prism.v1.KeyValueService/Exists", kv.ExistsRequest(key="k"), token)
                outcomes.append("ok")
            except CallError as exc:
                outcomes.append(exc.code)
                last = exc
        assert outcomes[:3] == ["ok", "ok", "ok"] and outcomes[3] == "RESOURCE_EXHAUSTED"
        assert "retry in" in last.message
        if transport == "rest":
            assert last.http_status == 429
    finally:
        await client.close()


async def test_audit_log_records_operations_never_values(secured) -> None:
    gateway, audit = secured
    client = client_for("rest", gateway, KEYS["writer"])
    secret = b"very-secret-value-\x01"
    try:
        token = await create_session(client, "kv-alpha")
        await client.call("/prism.v1.KeyValueService/Set", kv.SetRequest(key="audited", value=secret), token)
        with pytest.raises(CallError):
            await client.call("/prism.v1.KeyValueService/Delete", kv.DeleteRequest(key="audited"), "bad-token")
    finally:
        await client.close()
    import asyncio

    for _ in range(50):  # the writer thread flushes asynchronously
        text = audit.read_text() if audit.exists() else ""
        if '"operation":"KEY_VALUE.Set"' in text:
            break
        await asyncio.sleep(0.1)
    records = [json.loads(line) for line in text.splitlines()]
    writer = pii.pseudonym_under((audit.parent / "data" / "secret.key").read_bytes(), "writer-client")  # app/pii.py
    sets = [r for r in records if r["operation"] == "KEY_VALUE.Set" and r["identity"] == writer]
    assert sets and sets[-1]["outcome"] == "OK" and sets[-1]["namespace"] == "alpha" and sets[-1]["session_id"]
    assert {"time", "transport", "resource"} <= set(sets[-1])
    assert any(r["operation"] == "SESSION.CreateSession" and r["outcome"] == "OK" for r in records)
    assert any(r["outcome"] == "UNAUTHENTICATED" for r in records)
    import base64

    assert "very-secret-value" not in text and base64.b64encode(secret).decode() not in text
