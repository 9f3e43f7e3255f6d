"""The OpenAPI document: derived from the method table, committed, and faithful to proto JSON."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import pytest

from app.methods import Method, all_methods
from app.transports.openapi import build_openapi, schema_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "openapi" / "prism.v1.json"
ERROR_STATUSES = ["400", "401", "404", "409", "413", "429", "500", "501", "503"]


def _generate_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "openapi_generate", ROOT / "openapi" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def methods() -> list[Method]:
    return all_methods()


@pytest.fixture(scope="module")
def doc(methods: list[Method]) -> dict[str, Any]:
    return build_openapi(methods)


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def test_committed_document_is_current() -> None:
    fresh = _generate_module().render()
    assert COMMITTED.exists(), "openapi/prism.v1.json is missing: run `make openapi`"
    assert COMMITTED.read_text() == fresh, (
        "openapi/prism.v1.json drifted from the proto contract: run `make openapi` "
        "(python openapi/generate.py) and commit the result"
    )


def test_build_is_deterministic(methods: list[Method]) -> None:
    first = json.dumps(build_openapi(methods))
    assert json.dumps(build_openapi(all_methods())) == first


def test_every_http_method_has_its_operation(doc: dict[str, Any], methods: list[Method]) -> None:
    bound = [m for m in methods if m.http is not None]
    assert bound
    for m in bound:
        assert m.http is not None
        operation = doc["paths"][m.http.openapi_path][m.http.verb.lower()]
        short = m.service.removeprefix("prism.v1.")
        assert operation["operationId"] == f"{short}_{m.name}"
        assert operation["tags"] == [short]
        for status in ERROR_STATUSES:
            assert status in operation["responses"]


def test_grpc_only_methods_are_listed_not_routed(
    doc: dict[str, Any], methods: list[Method]
) -> None:
    grpc_only = [m for m in methods if m.http is None]
    assert any(m.name == "Transaction" for m in grpc_only)
    ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    for m in grpc_only:
        assert f"{m.service.removeprefix('prism.v1.')}_{m.name}" not in ids
        assert m.path in doc["info"]["description"]
    assert "gRPC only" in doc["info"]["description"]


def test_server_streaming_answers_event_stream(doc: dict[str, Any], methods: list[Method]) -> None:
    streaming = [m for m in methods if m.server_streaming and m.http is not None]
    assert streaming
    for m in streaming:
        assert m.http is not None
        operation = doc["paths"][m.http.openapi_path][m.http.verb.lower()]
        ok = operation["responses"]["200"]
        assert list(ok["content"]) == ["text/event-stream"]
        data = ok["content"]["text/event-stream"]["schema"]["properties"]["data"]
        assert data["$ref"].endswith("/" + schema_name(m.response_type.DESCRIPTOR.full_name))
        for word in ("event: message", "event: end", "event: error", ": ping", "prism_session"):
            assert word in ok["description"]
        assert {"PrismSessionQuery": []} in operation["security"]


def test_unary_answers_json(doc: dict[str, Any]) -> None:
    ok = doc["paths"]["/v1/kv/{key}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GetResponse"
    }


def test_bytes_field_is_base64_string(doc: dict[str, Any]) -> None:
    value = _schema(doc, "GetResponse")["properties"]["value"]
    assert value == {"type": "string", "format": "byte"}


def test_int64_field_is_string(doc: dict[str, Any]) -> None:
    count = _schema(doc, "CountResponse")["properties"]["count"]
    assert count["type"] == "string"
    assert count["format"] == "int64"
    assert _schema(doc, "QueueMessage")["properties"]["partition"]["type"] == "integer"


def test_json_names_and_well_known_types(doc: dict[str, Any]) -> None:
    props = _schema(doc, "GetResponse")["properties"]
    assert "ttlRemaining" in props and "ttl_remaining" not in props
    assert _schema(doc, "google.protobuf.Duration")["type"] == "string"
    assert _schema(doc, "google.protobuf.Timestamp")["format"] == "date-time"
    assert _schema(doc, "google.protobuf.Struct")["type"] == "object"
    assert "type" not in _schema(doc, "google.protobuf.Value")
    assert "@type" in _schema(doc, "google.protobuf.Any")["properties"]
    assert _schema(doc, "FilterOperator")["enum"][1] == "FILTER_OPERATOR_EQ"


def test_required_fields(doc: dict[str, Any]) -> None:
    assert _schema(doc, "FieldCondition")["required"] == ["field", "op"]
    assert _schema(doc, "SetRequest")["required"] == ["key"]
    assert _schema(doc, "BatchGetRequest")["required"] == ["keys"]
    # The path carries `topic`, so the body needs only the rest.
    body = doc["paths"]["/v1/topics/{topic}:publish"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["required"] == ["entry"]
    assert "topic" not in body["content"]["application/json"]["schema"]["properties"]
    query = doc["paths"]["/v1/topics/{topic}:subscribe"]["get"]["parameters"]
    assert {
        "name": "consumerGroup",
        "in": "query",
        "required": True,
        "schema": {"type": "string"},
    } in query


def test_recursive_messages_use_refs(doc: dict[str, Any]) -> None:
    assert _schema(doc, "Filter")["properties"]["and"] == {
        "$ref": "#/components/schemas/FilterList"
    }
    items = _schema(doc, "FilterList")["properties"]["filters"]["items"]
    assert items == {"$ref": "#/components/schemas/Filter"}


def test_paths_parameters_and_bodies(doc: dict[str, Any]) -> None:
    get = doc["paths"]["/v1/kv/{key}"]["get"]
    key = get["parameters"][0]
    assert key["in"] == "path" and key["required"] and "slashes" in key["description"]
    scan = {p["name"]: p for p in doc["paths"]["/v1/kv"]["get"]["parameters"]}
    assert set(scan) == {"prefix", "pageSize", "pageToken", "keysOnly"}
    register = doc["paths"]["/v1/configs"]["post"]["requestBody"]
    assert register["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ClientConfig"
    }


def test_session_security_and_errors(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    header = schemes["PrismSession"]
    assert (header["type"], header["in"], header["name"]) == ("apiKey", "header", "x-prism-session")
    query = schemes["PrismSessionQuery"]
    assert (query["type"], query["in"], query["name"]) == ("apiKey", "query", "prism_session")
    assert doc["paths"]["/v1/kv/{key}"]["get"]["security"] == [{"PrismSession": []}]
    assert "security" not in doc["paths"]["/v1/sessions"]["post"]
    error = _schema(doc, "Error")
    assert error["required"] == ["code", "message", "details"]
    assert "INVALID_ARGUMENT" in error["properties"]["code"]["enum"]


def test_probes(doc: dict[str, Any]) -> None:
    for path in ("/healthz", "/readyz"):
        responses = doc["paths"][path]["get"]["responses"]
        assert set(responses) == {"200", "503"}


def test_document_validates(doc: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(json.loads(json.dumps(doc)))
