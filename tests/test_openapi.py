"""The OpenAPI document: derived from the method table, committed, and faithful to proto JSON.

Besides its shape, the document's schemas are checked against the codec itself: every message the
gateway writes validates against its answer schema, and the patterns (integers, base64,
durations, timestamps) accept exactly what protobuf writes. tests/test_schemathesis.py checks the
rest against a running gateway.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import pathlib
import random
import re
from typing import Any

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from app.methods import Method, all_methods
from app.transports import json_codec
from app.transports.openapi import build_openapi, integer_pattern, schema_name
from tests.test_json_encoder import all_message_types, fill

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "openapi" / "prism.v1.json"
ERROR_STATUSES = ["400", "401", "403", "404", "409", "429", "500", "501", "503"]
INT64 = (-(2**63), 2**63 - 1)


def _generate_module() -> Any:
    spec = importlib.util.spec_from_file_location("openapi_generate", ROOT / "openapi" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def methods() -> list[Method]:
    return all_methods()


@functools.cache
def _document() -> dict[str, Any]:
    return build_openapi(all_methods())


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return _document()


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of ``schema`` whose $refs resolve in ``doc``."""
    return Draft202012Validator({**schema, "components": doc["components"]}, format_checker=FormatChecker())


def _operation(doc: dict[str, Any], m: Method) -> dict[str, Any]:
    assert m.http is not None
    return doc["paths"][m.http.openapi_path][m.http.verb.lower()]


# --- the document as a whole -------------------------------------------------------------------


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


def test_document_validates(doc: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(json.loads(json.dumps(doc)))


def test_every_http_method_has_its_operation(doc: dict[str, Any], methods: list[Method]) -> None:
    bound = [m for m in methods if m.http is not None]
    assert bound
    for m in bound:
        operation = _operation(doc, m)
        short = m.service.removeprefix("prism.v1.")
        assert operation["operationId"] == f"{short}_{m.name}"
        assert operation["tags"] == [short]
        statuses = set(operation["responses"])
        if m.service == "prism.v1.HealthService":  # public probes: nobody to refuse
            assert statuses.isdisjoint({"401", "403", "429"})
        else:
            assert set(ERROR_STATUSES) <= statuses
        assert ({"413", "415"} <= statuses) == ("requestBody" in operation)


def test_grpc_only_methods_are_listed_not_routed(doc: dict[str, Any], methods: list[Method]) -> None:
    grpc_only = [m for m in methods if m.http is None]
    assert any(m.name == "Transaction" for m in grpc_only)
    ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    for m in grpc_only:
        assert f"{m.service.removeprefix('prism.v1.')}_{m.name}" not in ids
        assert m.path in doc["info"]["description"]
    assert "gRPC only" in doc["info"]["description"]


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
    assert error["additionalProperties"] is False
    assert "INVALID_ARGUMENT" in error["properties"]["code"]["enum"]
    unauthenticated = doc["components"]["responses"]["Unauthenticated"]
    assert unauthenticated["headers"]["WWW-Authenticate"]["required"] is True


def test_probes(doc: dict[str, Any]) -> None:
    assert set(doc["paths"]["/healthz"]["get"]["responses"]) == {"200"}
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    readiness = _validator(doc, {"$ref": "#/components/schemas/Readiness"})
    backend = {"state": "down", "required": True, "since": 1.5, "problem": "no answer within 2s"}
    assert readiness.is_valid({"status": "unready", "backends": {"pg": backend}})
    assert not readiness.is_valid({"status": "ok"})


# --- operations ------------------------------------------------------------------------------


def test_server_streaming_answers_event_stream(doc: dict[str, Any], methods: list[Method]) -> None:
    streaming = [m for m in methods if m.server_streaming and m.http is not None]
    assert streaming
    for m in streaming:
        operation = _operation(doc, m)
        ok = operation["responses"]["200"]
        assert list(ok["content"]) == ["text/event-stream"]
        message, end, error = ok["content"]["text/event-stream"]["schema"]["oneOf"]
        assert message["properties"]["event"] == {"const": "message"}
        data = message["properties"]["data"]
        assert data["type"] == "string" and data["contentMediaType"] == "application/json"
        assert data["contentSchema"]["$ref"].endswith("/" + schema_name(m.response_type.DESCRIPTOR.full_name))
        assert end["properties"]["event"] == {"const": "end"}
        assert error["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/Error"}
        for word in ("event: message", "event: end", "event: error", ": ping", "prism_session"):
            assert word in ok["description"]
        assert {"PrismSessionQuery": []} in operation["security"]


def test_server_sent_events_validate(doc: dict[str, Any]) -> None:
    """Events as a client parses them: data is JSON text of the message, {} or an Error."""
    ok = doc["paths"]["/v1/subjects/{subject}:subscribe"]["get"]["responses"]["200"]
    event = ok["content"]["text/event-stream"]["schema"]
    valid = [
        {"event": "message", "id": "1", "data": '{"subscriptionId":"abc"}'},
        {"event": "end", "id": "1", "data": "{}"},
        {"event": "error", "data": '{"code":"UNAUTHENTICATED","message":"session closed","details":[]}'},
    ]
    validator = _validator(doc, event)
    for item in valid:
        assert validator.is_valid(item), item
    assert not validator.is_valid({"event": "message", "data": '{"subscriptionId":"abc"}'})  # no id
    assert not validator.is_valid({"event": "other", "data": "{}"})


def test_unary_answers_json(doc: dict[str, Any]) -> None:
    ok = doc["paths"]["/v1/kv/{key}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GetResponse"}


def test_paths_parameters_and_bodies(doc: dict[str, Any]) -> None:
    get = doc["paths"]["/v1/kv/{key}"]["get"]
    key = get["parameters"][0]
    assert key["in"] == "path" and key["required"] and "slashes" in key["description"]
    assert key["schema"]["minLength"] == 1 and key["schema"]["maxLength"] == 1024
    scan = {p["name"]: p for p in doc["paths"]["/v1/kv"]["get"]["parameters"]}
    assert set(scan) == {"prefix", "pageSize", "pageToken", "keysOnly"}
    assert scan["pageSize"]["schema"] == {
        "type": "integer",
        "format": "int32",
        "minimum": 0,
        "maximum": 2**31 - 1,
    }
    assert {"type": "boolean"} in scan["keysOnly"]["schema"]["anyOf"]  # or 1, 0, TRUE, ...
    register = doc["paths"]["/v1/configs"]["post"]["requestBody"]
    assert register["required"] is True
    assert (
        register["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ClientConfigInput"
    )
    # A body whose message has no REQUIRED field may be left out: it reads as an empty message.
    assert doc["paths"]["/v1/session:heartbeat"]["post"]["requestBody"]["required"] is False


def test_int64_query_parameter_is_a_decimal(doc: dict[str, Any]) -> None:
    read = {p["name"]: p for p in doc["paths"]["/v1/collections/{collection}:read"]["get"]["parameters"]}
    schema = read["maxPageBytes"]["schema"]
    assert schema["type"] == "integer" and (schema["minimum"], schema["maximum"]) == INT64


def test_links_for_stateful_testing(doc: dict[str, Any]) -> None:
    """Operations on one resource lead to each other; an answer's name or ETag feeds the next."""
    links = doc["paths"]["/v1/kv/{key}"]["put"]["responses"]["200"]["links"]
    assert links["Get"] == {
        "operationId": "KeyValueService_Get",
        "parameters": {"path.key": "$request.path.key"},
    }
    assert links["Delete"]["parameters"]["query.ifMatch"] == "$response.body#/etag"
    registered = doc["paths"]["/v1/configs"]["post"]["responses"]["200"]["links"]
    assert registered["GetConfig"]["parameters"] == {"path.name": "$response.body#/config/name"}


# --- schemas ---------------------------------------------------------------------------------


def _objects(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


def test_message_objects_are_closed(doc: dict[str, Any]) -> None:
    """The gateway refuses unknown fields, and writes none: every message object is closed."""
    for name, schema in doc["components"]["schemas"].items():
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not name.startswith("google.protobuf.")
        ):
            assert schema["additionalProperties"] is False, name
    for item in doc["paths"].values():
        for operation in item.values():
            for obj in _objects(operation.get("requestBody", {})):
                assert obj.get("additionalProperties") is False or "@type" in obj["properties"]


def test_answers_carry_every_field_without_presence(doc: dict[str, Any]) -> None:
    props = _schema(doc, "GetResponse")
    assert props["required"] == ["key", "value", "etag"]  # ttlRemaining is a message: only when set
    assert _schema(doc, "PubSubSubscribeResponse")["required"] == ["subscriptionId"]


def test_bytes_are_base64(doc: dict[str, Any]) -> None:
    out = _schema(doc, "GetResponse")["properties"]["value"]
    assert out["type"] == "string" and out["format"] == "byte"
    accepted = _schema(doc, "SetRequest")["properties"]["value"]
    assert accepted["type"] == ["string", "null"] and accepted["format"] == "byte"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40))
def test_base64_patterns(data: bytes) -> None:
    doc = _document()
    written = re.compile(_schema(doc, "GetResponse")["properties"]["value"]["pattern"])
    read = re.compile(_schema(doc, "SetRequest")["properties"]["value"]["pattern"])
    standard = base64.b64encode(data).decode()
    url_safe = base64.urlsafe_b64encode(data).decode()
    assert written.match(standard) and read.match(standard)
    assert read.match(url_safe) and read.match(url_safe.rstrip("="))
    if len(data) % 3:
        assert not written.match(standard.rstrip("="))
        assert not read.match(standard.rstrip("=") + "=" * (len(data) % 3))  # wrong padding
    assert not read.match(standard + "A")  # a dangling sixth bit


def test_int64_is_a_string_with_a_pattern(doc: dict[str, Any]) -> None:
    count = _schema(doc, "CountResponse")["properties"]["count"]
    assert count["type"] == "string" and count["format"] == "int64"
    assert re.match(count["pattern"], "-9223372036854775808") and not re.match(count["pattern"], "")
    assert _schema(doc, "QueueMessage")["properties"]["partition"] == {
        "type": "integer",
        "format": "int32",
        "minimum": -(2**31),
        "maximum": 2**31 - 1,
    }
    # A request reads a 64-bit integer from a string or a number.
    max_entries = _schema(doc, "CacheConfigInput")["properties"]["maxEntries"]["anyOf"]
    assert {s["type"] for s in max_entries} == {"string", "integer", "null"}


@pytest.mark.parametrize(
    ("low", "high"), [(-(2**63), 2**63 - 1), (0, 2**64 - 1), (-(2**31), 2**31 - 1), (0, 9), (0, 10)]
)
def test_integer_pattern_bounds(low: int, high: int) -> None:
    pattern = re.compile(integer_pattern(low, high))
    for inside in (low, high, 0, 1, high // 2, high - 1, low + 1, 7):
        if low <= inside <= high:
            assert pattern.match(str(inside)), inside
    for outside in (low - 1, high + 1, high * 10):
        assert not pattern.match(str(outside)), outside
    for text in ("", "-0", "01", "+1", " 1", "1.0", "1e3", "0x1"):
        assert not pattern.match(text), text


@settings(max_examples=300, deadline=None)
@given(value=st.integers(-(2**70), 2**70))
def test_int64_pattern_is_the_range(value: int) -> None:
    pattern = re.compile(integer_pattern(*INT64))
    assert bool(pattern.match(str(value))) == (INT64[0] <= value <= INT64[1])


def test_enums_by_name_and_number(doc: dict[str, Any]) -> None:
    assert _schema(doc, "AccessPattern")["enum"][1] == "ACCESS_PATTERN_KEY_VALUE"
    # proto3 enums are open: a request may give any int32 number, which is read and kept.
    names, numbers = _schema(doc, "AccessPatternInput")["anyOf"]
    assert names["enum"][1] == "ACCESS_PATTERN_KEY_VALUE"
    assert numbers == {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
    assert _schema(doc, "ClientConfig")["properties"]["pattern"] == {
        "$ref": "#/components/schemas/AccessPattern"
    }


def test_json_names_and_well_known_types(doc: dict[str, Any]) -> None:
    props = _schema(doc, "GetResponse")["properties"]
    assert "ttlRemaining" in props and "ttl_remaining" not in props
    assert _schema(doc, "google.protobuf.Duration")["type"] == "string"
    assert _schema(doc, "google.protobuf.Timestamp")["format"] == "date-time"
    assert _schema(doc, "google.protobuf.Struct")["type"] == "object"
    assert "type" not in _schema(doc, "google.protobuf.Value")
    assert "@type" in _schema(doc, "google.protobuf.Any")["properties"]


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(-315_576_000_000, 315_576_000_000), nanos=st.integers(0, 999_999_999))
def test_duration_patterns(seconds: int, nanos: int) -> None:
    doc = _document()
    if seconds < 0:
        nanos = -nanos
    duration = duration_pb2.Duration(seconds=seconds, nanos=nanos)
    text = duration.ToJsonString()
    assert re.match(_schema(doc, "google.protobuf.Duration")["pattern"], text), text
    assert re.match(_schema(doc, "google.protobuf.DurationInput")["pattern"], text), text


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(-62135596800, 253402300799), nanos=st.integers(0, 999_999_999))
def test_timestamp_patterns(seconds: int, nanos: int) -> None:
    doc = _document()
    text = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()
    assert re.match(_schema(doc, "google.protobuf.Timestamp")["pattern"], text), text
    assert re.match(_schema(doc, "google.protobuf.TimestampInput")["pattern"], text), text
    assert re.match(_schema(doc, "google.protobuf.TimestampInput")["pattern"], text.replace("Z", "+01:00"))


def test_required_fields(doc: dict[str, Any]) -> None:
    condition = _schema(doc, "FieldCondition")
    assert condition["required"] == ["field", "op"]
    assert condition["properties"]["field"]["minLength"] == 1  # an empty string is "not set"
    assert _schema(doc, "BatchGetRequest")["required"] == ["keys"]
    assert _schema(doc, "BatchGetRequest")["properties"]["keys"]["minItems"] == 1
    # Batch entries fail on their own, reported per entry: REQUIRED is not the call's to check.
    assert "required" not in _schema(doc, "SetRequest")
    assert "required" not in _schema(doc, "FieldConditionItem")
    # The path carries `topic`, so the body needs only the rest.
    body = doc["paths"]["/v1/topics/{topic}:publish"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["required"] == ["entry"]
    assert "topic" not in body["content"]["application/json"]["schema"]["properties"]
    query = {p["name"]: p for p in doc["paths"]["/v1/topics/{topic}:subscribe"]["get"]["parameters"]}
    assert query["consumerGroup"]["required"] is True
    assert query["consumerGroup"]["schema"] == {
        "type": "string",
        "minLength": 1,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,248}$",  # app/services/queue.py check_name
        "description": "1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit.",
    }


def test_not_set_reads_as_null(doc: dict[str, Any]) -> None:
    """The JSON mapping reads null as "not set": any field but a REQUIRED one may be null."""
    config = _schema(doc, "ClientConfigInput")["properties"]
    assert config["name"]["type"] == ["string", "null"]
    assert {"type": "null"} in config["backend"]["anyOf"]
    keys = _schema(doc, "BatchGetRequest")["properties"]["keys"]
    assert keys["type"] == "array"  # REQUIRED: not null


def test_call_constraints(doc: dict[str, Any]) -> None:
    """What the services check beyond types and REQUIRED is in the document too."""
    publish = doc["paths"]["/v1/subjects/{subject}:publish"]["post"]["parameters"][0]["schema"]
    subscribe = doc["paths"]["/v1/subjects/{subject}:subscribe"]["get"]["parameters"][0]["schema"]
    for subject in ("a", "events.user.created", "ü.ß"):
        assert re.match(publish["pattern"], subject) and re.match(subscribe["pattern"], subject)
    for pattern in ("events.*", "events.>", "*", ">", "*.b.>"):
        assert re.match(subscribe["pattern"], pattern) and not re.match(publish["pattern"], pattern)
    for bad in ("", "a..b", ".a", "a.", "a b", "a\u2003b", "a.>.b", "a*.b", "a.b>"):
        assert not re.match(subscribe["pattern"], bad), bad
    set_body = doc["paths"]["/v1/kv/{key}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    ttl = set_body["properties"]["ttl"]["anyOf"][0]["allOf"][1]["pattern"]
    for good in ("1s", "0.5s", "315360000s", "0.000000001s"):
        assert re.match(ttl, good), good
    for bad in ("0s", "0.0s", "-1s", "315360001s", "315360000.5s"):
        assert not re.match(ttl, bad), bad
    batch = _schema(doc, "BatchSetRequest")["properties"]["entries"]
    assert batch["maxItems"] == 1000
    assert batch["items"]["allOf"][1]["properties"]["idempotencyToken"] == {"maxLength": 0}


def test_recursive_messages_use_refs(doc: dict[str, Any]) -> None:
    and_ = _schema(doc, "Filter")["properties"]["and"]["anyOf"]
    assert {"$ref": "#/components/schemas/FilterList"} in and_
    items = _schema(doc, "FilterList")["properties"]["filters"]["items"]
    assert items == {"$ref": "#/components/schemas/FilterItem"}


# --- the codec against the document ----------------------------------------------------------


def _answer_schemas(doc: dict[str, Any]) -> set[str]:
    """The component schemas answers use: those the 200 responses reach through $refs."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/") and (name := ref.rsplit("/", 1)[1]) not in found:
                found.add(name)
                visit(doc["components"]["schemas"][name])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    for item in doc["paths"].values():
        for operation in item.values():
            visit(operation["responses"]["200"])
    return found


def test_every_written_message_validates(doc: dict[str, Any]) -> None:
    """Random messages of every type answers hold, as the REST codec writes them, are valid
    against their answer schema: no field missing, extra or in another form."""
    rng = random.Random(8)
    answers = _answer_schemas(doc)
    types = {schema_name(cls.DESCRIPTOR.full_name): cls for cls in all_message_types()}
    checked = sorted(name for name in answers if name in types and not name.startswith("google.protobuf."))
    assert len(checked) > 30
    for name in checked:
        validator = _validator(doc, {"$ref": f"#/components/schemas/{name}"})
        for _ in range(20):
            message = types[name]()
            fill(message, rng)
            written = json.loads(json_codec.to_json(message))
            errors = sorted(validator.iter_errors(written), key=str)
            assert not errors, f"{name}: {errors[0].message} in {written}"
