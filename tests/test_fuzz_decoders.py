"""Property-based: no client input makes a request decoder fail other than with INVALID_ARGUMENT.

For every method of the method table (and ``ALL_TYPES``, which holds every kind of field),
hypothesis builds request bodies from the request descriptor: valid ones by the canonical JSON
mapping, which must decode to what ``json_format`` reads; and mutated ones (wrong JSON types,
nulls, bad base64, huge and negative numbers, unknown fields, deep nesting, odd unicode), which
must decode or be refused with INVALID_ARGUMENT naming a field. gRPC-Web frames get the same
treatment. The last test sends a few hundred such requests to a real gateway: no answer may be
a server error (5xx other than 501 and 503), and a stored record must survive them.

Deterministic: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import struct
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import cache
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.methods import Method, all_methods
from app.transports import json_codec
from app.transports.grpc_web import frame, parse_request
from prism.errors import PrismError
from tests.clients import decode_grpc_web_text, grpc_web_frames
from tests.test_json_decoding import ALL_TYPES

F = FieldDescriptor
METHODS = all_methods()
SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(examples: int) -> settings:
    return settings(SETTINGS, max_examples=examples)


MAX_NESTING = 3  # messages inside messages in generated bodies (Filter is recursive)

# --- valid JSON by the canonical mapping ------------------------------------------------------

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}  # fmt: skip
_TEXT = st.text(max_size=8)


def _base64(data: bytes, urlsafe: bool, padded: bool) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    return text if padded else text.rstrip("=")


def _integers(low: int, high: int) -> st.SearchStrategy[Any]:
    numbers = st.integers(low, high) | st.sampled_from([low, high, 0])
    return numbers | numbers.map(str)


def _scalar(kind: int) -> st.SearchStrategy[Any]:
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    if kind == F.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from(
            ["Infinity", "-Infinity", "1.5"]
        )
    if kind == F.TYPE_DOUBLE:
        return st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
            ["Infinity", "-Infinity", "-2.5e10"]
        )
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return _TEXT
    if kind == F.TYPE_BYTES:
        return st.builds(_base64, st.binary(max_size=12), st.booleans(), st.booleans())
    raise AssertionError(kind)


_JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


def _duration(nanos: int) -> str:
    value = duration_pb2.Duration()
    value.FromNanoseconds(nanos)
    return value.ToJsonString()


def _timestamp(seconds: int, nanos: int) -> str:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()


_WELL_KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "google.protobuf.Duration": st.integers(-(10**15), 10**15).map(_duration),
    "google.protobuf.Timestamp": st.builds(
        _timestamp, st.integers(-62_135_596_800, 253_402_300_799), st.integers(0, 999_999_999)
    ),
    "google.protobuf.FieldMask": st.lists(
        st.from_regex(r"[a-z][a-zA-Z0-9]{0,5}(\.[a-z][a-zA-Z0-9]{0,3})?", fullmatch=True), max_size=3
    ).map(",".join),
    "google.protobuf.Value": _JSON,
    "google.protobuf.Struct": st.dictionaries(_TEXT, _JSON, max_size=3),
    "google.protobuf.ListValue": st.lists(_JSON, max_size=3),
    "google.protobuf.Empty": st.builds(dict),
    "google.protobuf.Any": st.one_of(
        st.builds(dict),
        st.integers(-(10**12), 10**12).map(
            lambda n: {"@type": "type.googleapis.com/google.protobuf.Duration", "value": _duration(n)}
        ),
        _TEXT.map(lambda key: {"@type": "type.googleapis.com/prism.v1.GetRequest", "key": key}),
        _JSON.map(lambda value: {"@type": "type.googleapis.com/google.protobuf.Value", "value": value}),
    ),
    "google.protobuf.DoubleValue": _scalar(F.TYPE_DOUBLE),
    "google.protobuf.FloatValue": _scalar(F.TYPE_FLOAT),
    "google.protobuf.Int64Value": _scalar(F.TYPE_INT64),
    "google.protobuf.UInt64Value": _scalar(F.TYPE_UINT64),
    "google.protobuf.Int32Value": _scalar(F.TYPE_INT32),
    "google.protobuf.UInt32Value": _scalar(F.TYPE_UINT32),
    "google.protobuf.BoolValue": st.booleans(),
    "google.protobuf.StringValue": _TEXT,
    "google.protobuf.BytesValue": _scalar(F.TYPE_BYTES),
}


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_MESSAGE:
        return message_json(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:
        values = field.enum_type.values
        return st.sampled_from([v.name for v in values]) | st.sampled_from([v.number for v in values])
    return _scalar(field.type)


def _map_key(field: FieldDescriptor) -> st.SearchStrategy[str]:
    if field.type == F.TYPE_STRING:
        return _TEXT
    if field.type == F.TYPE_BOOL:
        return st.sampled_from(["true", "false"])
    return st.integers(*_INT_RANGES[field.type]).map(str)


def _one_per_oneof(descriptor: Descriptor, body: dict[str, Any]) -> dict[str, Any]:
    for oneof in descriptor.oneofs:
        members = [f.json_name for f in oneof.fields if f.json_name in body]
        for extra in members[1:]:
            del body[extra]
    return body


@cache
def message_json(descriptor: Descriptor, depth: int = 1) -> st.SearchStrategy[Any]:
    """Canonical JSON of a ``descriptor`` message, nested messages at most MAX_NESTING deep."""
    if descriptor.full_name in _WELL_KNOWN:
        return _WELL_KNOWN[descriptor.full_name]
    if depth > MAX_NESTING:
        return st.builds(dict)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.json_name] = st.dictionaries(_map_key(key), _single(value, depth), max_size=2)
        elif field.is_repeated:
            optional[field.json_name] = st.lists(_single(field, depth), max_size=2)
        else:
            optional[field.json_name] = _single(field, depth)
    return _some_fields(descriptor, optional)


@st.composite
def _some_fields(
    draw: st.DrawFn, descriptor: Descriptor, fields: dict[str, st.SearchStrategy[Any]]
) -> dict[str, Any]:
    """Up to 8 of the fields: small bodies, and every field in some of them (AllTypes has 150)."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8)) if fields else []
    return _one_per_oneof(descriptor, {name: draw(fields[name]) for name in names})


# --- mutations --------------------------------------------------------------------------------


def _deep_list(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _deep_object(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


_ODD_TEXT = st.sampled_from(
    [
        "\ud800", "a\udfffb", "\udbff\udc00", "\x00", "\u202e\u2066", "😀", "\ufeff", "ｆｕｌｌ", "١٢", "𝟙𝟚",
        "NaN", "nan", "Infinity", "inf", "-0", "1e999", "1e-999", "0x10", " 1", "1 ", "+1", "01", "1_000", "1.",
        ".5", "1.0", "true", "True", "null", "", "=", "==", "AA=A", "A", "hello world!", "-_+/", "Zm9v\n",
        "1.5s", "-1s", "1s ", "99999999999999s", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00", "0000-01-01T00:00:00Z",
        "type.googleapis.com/", "type.googleapis.com/google.protobuf.Value", "a_b", "COLOUR_RED", "FILTER_OPERATOR_EQ",
        "x" * 300,
    ]
) | st.text(max_size=8) | st.text(st.characters(categories=["Cs", "Co", "Cn", "Cc", "Zs"]), max_size=4)  # fmt: skip
_ODD_NUMBER = st.sampled_from(
    [2**31, -(2**31) - 1, 2**32, 2**63, -(2**63) - 1, 2**64, -1, 10**30, 10**400, -(10**400), 1e308, -1e308, 3.5e38,
     1e39, 1.5, -0.0, 5e-324, math.inf, -math.inf, math.nan]
) | st.integers() | st.floats()  # fmt: skip
EVIL = st.one_of(
    st.none(),
    st.booleans(),
    _ODD_NUMBER,
    _ODD_TEXT,
    st.lists(st.none() | st.integers() | _ODD_TEXT, max_size=3),
    st.dictionaries(_ODD_TEXT, st.none() | st.integers() | _ODD_TEXT, max_size=3),
    st.integers(40, 260).map(_deep_list),
    st.integers(40, 260).map(_deep_object),
    st.fixed_dictionaries({"@type": st.integers()}),
    st.fixed_dictionaries(
        {"@type": st.just("type.googleapis.com/prism.v1.GetRequest"), "nope": st.integers()}
    ),
)  # every value a new object: mutations change what was drawn, never a shared one


@cache
def _field_names(descriptor: Descriptor) -> list[str]:
    """JSON and proto names of every field reachable from ``descriptor``."""
    names: set[str] = set()
    pending, seen = [descriptor], set()
    while pending:
        current = pending.pop()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        for field in current.fields:
            names.update((field.json_name, field.name))
            if field.message_type is not None:
                pending.append(field.message_type)
    return sorted(names)


def _slots(body: Any, limit: int = 200) -> Iterator[tuple[Any, Any]]:
    """(container, key or index) for the values inside ``body``, breadth first, bounded."""
    pending, count = [body], 0
    while pending and count < limit:
        node = pending.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            count += 1
            yield node, key
            if isinstance(value, (dict, list)):
                pending.append(value)


def _containers(body: Any) -> list[dict[str, Any]]:
    return [body] + [c[k] for c, k in _slots(body) if isinstance(c[k], dict)]


@st.composite
def mutated_json(draw: st.DrawFn, descriptor: Descriptor) -> dict[str, Any]:
    body = draw(message_json(descriptor))
    names = _field_names(descriptor)
    for _ in range(draw(st.integers(1, 3))):
        slots = list(_slots(body))
        if slots and draw(st.booleans()):
            container, key = draw(st.sampled_from(slots))
            container[key] = draw(EVIL)
        else:
            container = draw(st.sampled_from(_containers(body)))
            key = draw(st.sampled_from(names) | _ODD_TEXT if names else _ODD_TEXT)
            container[key] = draw(EVIL | _ODD_TEXT)
    return body


@st.composite
def query_params(draw: st.DrawFn, descriptor: Descriptor) -> list[tuple[str, str]]:
    names = [*_field_names(descriptor), "a.b", "", "."]
    dotted = st.lists(st.sampled_from(names), min_size=1, max_size=3).map(".".join)
    return draw(st.lists(st.tuples(dotted, _ODD_TEXT | _TEXT), max_size=4))


# --- the decoder's contract -------------------------------------------------------------------

FALLBACK = b'{"code":"INTERNAL","message":"failed to encode error","details":[]}'


def decode_or_refuse(
    data: dict[str, Any], message_type: type[Message], where: str = "body"
) -> Message | None:
    """The decoded message, or None when refused with INVALID_ARGUMENT naming a field."""
    try:
        message = json_codec.parse_message(data, message_type, where)
    except PrismError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.field and error.message.startswith(f"{error.field}: "), error.message
        assert error.to_json() != FALLBACK and json.loads(error.to_json())["code"] == "INVALID_ARGUMENT"
        error.to_status().SerializeToString()
        return None
    assert isinstance(message, message_type)
    assert message_type.FromString(message.SerializeToString()) == message  # protobuf can re-read it
    return message


def parse_raw_or_refuse(raw: bytes, message_type: type[Message]) -> Message | None:
    try:
        body = json_codec.parse_body(raw)
    except PrismError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "body", error
        return None
    return decode_or_refuse(body, message_type)


TYPES = [pytest.param(m.request_type, id=m.path.lstrip("/")) for m in METHODS]
TYPES.append(pytest.param(ALL_TYPES, id="AllTypes"))


@pytest.mark.parametrize("message_type", TYPES)
@fuzz(30)
@given(data=st.data())
def test_valid_json_decodes_as_json_format_reads_it(message_type, data):
    body = data.draw(message_json(message_type.DESCRIPTOR))
    message = decode_or_refuse(copy.deepcopy(body), message_type)
    assert message is not None, body
    assert message == json_format.ParseDict(copy.deepcopy(body), message_type())
    assert parse_raw_or_refuse(json.dumps(body).encode(), message_type) == message


@pytest.mark.parametrize("message_type", TYPES)
@fuzz(40)
@given(data=st.data())
def test_mutated_json_decodes_or_is_refused(message_type, data):
    descriptor = message_type.DESCRIPTOR
    body = data.draw(mutated_json(descriptor))
    raw = json.dumps(body).encode()  # NaN and Infinity become the bare words JSON lacks
    decode_or_refuse(body, message_type)
    parse_raw_or_refuse(raw, message_type)
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        byte = data.draw(st.binary(min_size=0, max_size=2))
        parse_raw_or_refuse(raw[:at] + byte + raw[at + 1 :], message_type)
    params = data.draw(query_params(descriptor))
    try:
        fields = json_codec.text_params(descriptor, params)
    except PrismError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field
        return
    decode_or_refuse(fields, message_type, "query")


# --- gRPC-Web frames --------------------------------------------------------------------------


@st.composite
def grpc_web_body(draw: st.DrawFn, message_type: type[Message]) -> tuple[bytes, bool, Message | None]:
    """(request body, -text variant, the message it carries when left valid)."""
    message = json_codec.parse_message(draw(message_json(message_type.DESCRIPTOR)), message_type)
    payload = message.SerializeToString()
    framed = frame(payload)
    kind = draw(st.sampled_from(["valid", "random", "flip", "truncate", "extend", "flag", "length", "deep"]))
    if kind == "random":
        framed = frame(draw(st.binary(max_size=64)))
    elif kind == "flip" and payload:
        at = draw(st.integers(0, len(framed) - 1))
        framed = framed[:at] + bytes([framed[at] ^ draw(st.integers(1, 255))]) + framed[at + 1 :]
    elif kind == "truncate":
        framed = framed[: draw(st.integers(0, max(0, len(framed) - 1)))]
    elif kind == "extend":
        framed += draw(st.binary(min_size=1, max_size=16))
    elif kind == "flag":
        framed = bytes([draw(st.integers(1, 255))]) + framed[1:]
    elif kind == "length":
        framed = framed[:1] + struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + framed[5:]
    elif kind == "deep":  # a length-delimited field 1 nested in itself, deeper than any decoder allows
        inner = b""
        for _ in range(draw(st.integers(90, 400))):
            inner = b"\x0a" + _varint(len(inner)) + inner
        framed = frame(inner)
    text = draw(st.booleans())
    body = base64.b64encode(framed) if text else framed
    if text and draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"!", b"=", b"\n", b"\xff", b"A"])) + body[at:]
        kind = "text"
    return body, text, message if kind == "valid" else None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("message_type", TYPES)
@fuzz(30)
@given(data=st.data())
def test_grpc_web_frames_decode_or_are_refused(message_type, data):
    body, text, expected = data.draw(grpc_web_body(message_type))
    try:
        payload = parse_request(body, text)
    except PrismError as error:
        assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED), error
        assert expected is None
        return
    try:
        message = message_type.FromString(payload)  # the transport maps DecodeError to INVALID_ARGUMENT
    except DecodeError:
        assert expected is None
        return
    message.SerializeToString()
    if expected is not None:
        assert message == expected


# --- end to end -------------------------------------------------------------------------------

ORIGINAL = b"stored before the fuzzing \x00\xff"
SERVER_ERRORS_ALLOWED = {501, 503}  # UNIMPLEMENTED (no handler yet), UNAVAILABLE
GRPC_SERVER_ERRORS = {
    grpc.StatusCode.UNKNOWN.value[0],
    grpc.StatusCode.INTERNAL.value[0],
    grpc.StatusCode.DATA_LOSS.value[0],
}
KV_KEYS = {"key", "keys", "prefix"}


def _fence(body: Any) -> Any:
    """Keys the fuzzer writes, deletes or scans start with "fuzz/", away from other tests' data."""
    for container, key in list(_slots(body)):
        if key in KV_KEYS and isinstance(container[key], str):
            container[key] = "fuzz/" + container[key]
        elif key in KV_KEYS and isinstance(container[key], list):
            container[key] = ["fuzz/" + k if isinstance(k, str) else k for k in container[key]]
    return body


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate goes out as the bytes it would be


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


def _query(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    pairs = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            pairs += _query(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            pairs += [(prefix + key, _text(item)) for item in value]
        else:
            pairs.append((prefix + key, _text(value)))
    return pairs


def rest_request(
    method: Method, body: dict[str, Any]
) -> tuple[str, str, list[tuple[str, str]], bytes | None]:
    """(verb, path, query, JSON body) for ``body``, as the method's http annotation places it."""
    rule = method.http
    assert rule is not None
    path = rule.openapi_path
    descriptor = method.request_type.DESCRIPTOR
    for name in rule.path_fields:
        field = descriptor.fields_by_name[name]
        value = body.pop(field.json_name, None)
        body.pop(field.name, None)
        segment = _text(value) if value not in (None, "") else "x"
        path = path.replace("{" + name + "}", urllib.parse.quote(_wire(segment), safe=""))
    if rule.body == "":
        return rule.verb, path, _query(body), None
    if rule.body != "*":
        body = body.get(descriptor.fields_by_name[rule.body].json_name, {})
    return rule.verb, path, [], json.dumps(body).encode()


def _answer_of(response: httpx.Response) -> str | None:
    """Why a REST answer is a server error, or None."""
    if response.status_code < 500:
        return None
    body = response.read()
    if response.status_code == 501 and json.loads(body)["code"] == "UNIMPLEMENTED":
        return None
    if response.status_code == 503 and json.loads(body)["code"] == "UNAVAILABLE":
        return None
    return f"HTTP {response.status_code}: {body[:300]!r}"


def _grpc_web_answer_of(response: httpx.Response, text: bool) -> str | None:
    if response.status_code >= 500 and response.status_code not in SERVER_ERRORS_ALLOWED:
        return f"HTTP {response.status_code}"
    status = response.headers.get("grpc-status")
    if status is None:
        body = response.read()
        try:
            _, trailers = grpc_web_frames(decode_grpc_web_text(body) if text else body)
        except (struct.error, ValueError):
            return None  # a stream already under way: the call was accepted
        status = trailers.get("grpc-status")
    if status is not None and int(status) in GRPC_SERVER_ERRORS:
        return f"grpc-status {status}: {response.headers.get('grpc-message', '')}"
    return None


class _Fuzzer:
    """Sends hypothesis-built requests for one method at a time; collects server errors."""

    def __init__(self, http: httpx.Client, token: str, spare: str) -> None:
        self.http, self.token, self.spare = http, token, spare
        self.sent = {"rest": 0, "grpc-web": 0}
        self.statuses: Counter[str] = Counter()  # "rest 400", "grpc-web 3"
        self.failures: list[str] = []

    def _headers(self, method: Method) -> dict[str, str]:
        return {"x-prism-session": self.spare if method.name == "CloseSession" else self.token}

    def rest(self, method: Method, examples: int) -> None:
        descriptor = method.request_type.DESCRIPTOR

        @fuzz(examples)
        @given(
            body=st.one_of(message_json(descriptor), mutated_json(descriptor)),
            raw=st.none() | st.binary(max_size=16),
        )
        def call(body: dict[str, Any], raw: bytes | None) -> None:
            verb, path, query, content = rest_request(method, _fence(copy.deepcopy(body)))
            if raw is not None and content is not None:
                content = content[: len(content) // 2] + raw
            headers = {**self._headers(method), "content-type": "application/json"}
            url = path + (
                "?" + urllib.parse.urlencode([(_wire(k), _wire(v)) for k, v in query]) if query else ""
            )
            with self.http.stream(verb, url, content=content, headers=headers) as response:
                self.sent["rest"] += 1
                self.statuses[f"rest {response.status_code}"] += 1
                if problem := _answer_of(response):
                    self.failures.append(f"REST {verb} {url} {content!r:.300}: {problem}")

        call()

    def grpc_web(self, method: Method, examples: int) -> None:
        @fuzz(examples)
        @given(case=grpc_web_body(method.request_type))
        def call(case: tuple[bytes, bool, Message | None]) -> None:
            body, text, _ = case
            content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
            headers = {**self._headers(method), "content-type": content_type, "x-grpc-web": "1"}
            with self.http.stream("POST", method.path, content=body, headers=headers) as response:
                self.sent["grpc-web"] += 1
                self.statuses[f"grpc-web {response.headers.get('grpc-status', 'in trailers')}"] += 1
                if problem := _grpc_web_answer_of(response, text):
                    self.failures.append(f"gRPC-Web {method.path} {body!r:.200}: {problem}")

        call()


def test_gateway_answers_fuzzed_requests_without_server_errors(hypercorn_gateway):
    """REST and gRPC-Web requests built from every method's descriptor, valid and mutated: no
    answer is a server error, and a record stored before them is unchanged after."""
    with httpx.Client(base_url=hypercorn_gateway.base_url, timeout=15) as http:

        def session() -> str:
            response = http.post("/v1/sessions", json={"configName": "kv-memory"})
            assert response.status_code == 200, response.text
            return response.json()["token"]

        token = session()
        key = f"fuzz-stable-{uuid.uuid4().hex}"
        headers = {"x-prism-session": token}
        stored = http.put(
            f"/v1/kv/{key}", json={"value": base64.b64encode(ORIGINAL).decode()}, headers=headers
        )
        assert stored.status_code == 200, stored.text
        fuzzer = _Fuzzer(http, token, spare=session())  # CloseSession closes the spare one
        for method in METHODS:
            if method.http is not None and not method.client_streaming:
                fuzzer.rest(method, examples=6)
            fuzzer.grpc_web(method, examples=6)
        after = http.get(f"/v1/kv/{key}", headers=headers)
    assert not fuzzer.failures, "\n".join(fuzzer.failures[:20])
    assert fuzzer.sent["rest"] >= 150 and fuzzer.sent["grpc-web"] >= 150, fuzzer.sent
    # both refused and accepted requests reached the decoders, not just the session check
    assert fuzzer.statuses["rest 400"] >= 50 and fuzzer.statuses["rest 200"] >= 10, fuzzer.statuses
    assert fuzzer.statuses["grpc-web 3"] >= 30, fuzzer.statuses
    assert after.status_code == 200 and base64.b64decode(after.json()["value"]) == ORIGINAL, after.text
