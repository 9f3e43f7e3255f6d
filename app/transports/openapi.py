"""The OpenAPI 3.1 document of the REST/JSON and SSE transports, derived from the method table.

Nothing here names an RPC: paths come from the ``google.api.http`` rules, parameters and bodies
from the request descriptors, schemas from the message descriptors under protobuf's JSON mapping
(the one ``json_format`` speaks on the wire), links between operations from the paths and field
names they share.

    Method ─┬─ http rule ───► path item + operation (path params, query or body)
            ├─ request ─────► parameters / requestBody ──┐
            └─ response ────► 200 (JSON or SSE) + links ─┴─► components/schemas ($ref, recursive)

A message can have up to three schemas, because what the gateway writes and what it reads differ:

- what it answers (``Name``): the canonical mapping. Every field without presence is written,
  even when empty; 64-bit integers are decimal strings; enums are names; bytes standard base64.
- what it reads in a request (``NameInput`` when both exist): the mapping's other spellings too
  (integers as numbers or strings, enum numbers, URL-safe or unpadded base64, ``null`` for
  "not set"), and ``(google.api.field_behavior) = REQUIRED`` and the checks the call makes
  (``CONSTRAINTS``) as JSON Schema, so a schema-valid request is one the call accepts.
- what it reads in an element of a repeated field (``NameItem``): batch entries succeed or fail
  on their own, reported in the response, so neither REQUIRED nor the call's checks apply there.

Every object is closed (``additionalProperties: false``): the gateway refuses unknown fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from adapters.pubsub.subjects import MAX_SUBJECT_LENGTH
from adapters.queue.base import NAME as QUEUE_NAME
from app.methods import Method, is_required
from app.pipeline import PUBLIC_SERVICES
from app.services import queue as queue_service
from app.services.keyvalue import MAX_KEY_BYTES, MAX_TTL_SECONDS
from app.settings import Limits

Schema = dict[str, Any]

PACKAGE_PREFIX = "prism.v1."
SESSION_HEADER = "x-prism-session"
SESSION_QUERY = "prism_session"
JSON = "application/json"
SSE = "text/event-stream"

# Schema roles: what the gateway writes, reads in a request, reads in a repeated field's element.
OUT, IN, ITEM = "out", "in", "item"
_SUFFIX = {OUT: "", IN: "Input", ITEM: "Item"}

F = FieldDescriptor
_INT32 = {F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32}
_UINT32 = {F.TYPE_UINT32, F.TYPE_FIXED32}
_INT64 = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64}
_UINT64 = {F.TYPE_UINT64, F.TYPE_FIXED64}
_FLOATS = {F.TYPE_DOUBLE, F.TYPE_FLOAT}


# --- patterns --------------------------------------------------------------------------------


def _digits(low: int, high: int) -> str:
    return str(low) if low == high else f"[{low}-{high}]"


def _positive_up_to(limit: int) -> str:
    """A regex for the decimal numbers 1..limit written without leading zeros."""
    text = str(limit)
    width = len(text)
    parts = []
    if width > 1:
        parts.append("[1-9]" + (f"[0-9]{{0,{width - 2}}}" if width > 2 else ""))
    for i, char in enumerate(text):
        low = 1 if i == 0 else 0
        if int(char) > low:
            rest = width - i - 1
            parts.append(text[:i] + _digits(low, int(char) - 1) + (f"[0-9]{{{rest}}}" if rest else ""))
    parts.append(text)
    return "(?:" + "|".join(parts) + ")"


def integer_pattern(low: int, high: int) -> str:
    """Canonical decimal integers in [low, high]: no sign on zero, no leading zeros."""
    alternatives = ["0", _positive_up_to(high)]
    if low < 0:
        alternatives.append("-" + _positive_up_to(-low))
    return "^(?:" + "|".join(alternatives) + ")$"


_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}

# Base64: standard alphabet with padding when written; either alphabet, padding optional, read.
_B64_OUT = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_B64_IN = r"^(?:[A-Za-z0-9+/_-]{4})*(?:[A-Za-z0-9+/_-]{2}(?:==)?|[A-Za-z0-9+/_-]{3}=?)?$"

# google.protobuf.Duration: ±315,576,000,000 s; written with 0, 3, 6 or 9 fractional digits.
_MAX_DURATION_SECONDS = 315_576_000_000
_DURATION_OUT = r"^-?(?:0|[1-9][0-9]*)(?:\.(?:[0-9]{3}){1,3})?s$"
_DURATION_IN = rf"^-?(?:0|{_positive_up_to(_MAX_DURATION_SECONDS)})(?:\.[0-9]{{1,9}})?s$"

_DATE = r"(?:000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
_TIMESTAMP_OUT = rf"^{_DATE}T{_TIME}(?:\.(?:[0-9]{{3}}){{1,3}})?Z$"
_TIMESTAMP_IN = rf"^{_DATE}T{_TIME}(?:\.[0-9]{{1,9}})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"

_FIELD_PATH = r"[a-z][a-zA-Z0-9]*(?:\.[a-z][a-zA-Z0-9]*)*"
_FIELD_MASK = rf"^(?:{_FIELD_PATH}(?:,{_FIELD_PATH})*)?$"

# A decimal number the JSON mapping reads from a string, e.g. "1.5", "-2e3", bounded so that it
# is finite: at most 200 integer digits and a positive exponent of two digits for a double (below
# 1e300), 29 and one for a float (below 1e38, inside float32's range). Smaller ones underflow.
_DECIMAL = r"^-?(?:0|[1-9][0-9]{0,199})(?:\.[0-9]+)?(?:[eE](?:-[0-9]+|\+?[0-9]{1,2}))?$"
_DECIMAL_FLOAT = r"^-?(?:0|[1-9][0-9]{0,28})(?:\.[0-9]+)?(?:[eE](?:-[0-9]+|\+?[0-9]))?$"
_NON_FINITE = ["NaN", "Infinity", "-Infinity"]
_FLOAT32_MAX = 3.4028234663852886e38


def _duration_up_to(limit: int) -> str:
    """Positive durations of at most ``limit`` seconds, as the JSON mapping reads them."""
    fraction = r"(?:\.[0-9]{1,9})?"
    return (
        "^(?:"
        + f"{_positive_up_to(limit - 1)}{fraction}"
        + f"|{limit}(?:\\.0{{1,9}})?"
        + r"|0\.(?=[0-9]{0,8}[1-9])[0-9]{1,9}"
        + ")s$"
    )


# Whitespace as Python's str.isspace() sees it (adapters/pubsub/subjects.py refuses it).
_SPACE = "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_TOKEN = f"[^.*>{_SPACE}]+"
_SUBJECT = f"^{_TOKEN}(?:\\.{_TOKEN})*$"
_SUBJECT_PATTERN = f"^(?:(?:\\*|{_TOKEN})\\.)*(?:\\*|>|{_TOKEN})$"

# What the services check beyond the field types and REQUIRED, by message or field full name;
# applied where those checks refuse the whole call (not in batch entries, which fail alone).
# A fragment for a message is added with allOf; one for a field is merged into its schema.
_KEY = {"maxLength": MAX_KEY_BYTES, "description": f"At most {MAX_KEY_BYTES} bytes in UTF-8."}
_MAX_BATCH = Limits().max_batch_keys
CONSTRAINTS: dict[str, Schema] = {
    # app/services/keyvalue.py: check_key, _expiry, _set, _check_batch, Scan
    "prism.v1.GetRequest.key": _KEY,
    "prism.v1.SetRequest.key": _KEY,
    "prism.v1.DeleteRequest.key": _KEY,
    "prism.v1.ExistsRequest.key": _KEY,
    "prism.v1.SetRequest.ttl": {
        "pattern": _duration_up_to(MAX_TTL_SECONDS),
        "description": f"Positive, at most {MAX_TTL_SECONDS} seconds; leave it unset for no expiry.",
    },
    "prism.v1.SetRequest": {
        "not": {
            "required": ["ifMatch", "ifAbsent"],
            "properties": {"ifMatch": {"type": "string", "minLength": 1}, "ifAbsent": {"const": True}},
        },
        "description": "ifMatch and ifAbsent cannot be combined.",
    },
    "prism.v1.BatchGetRequest.keys": {"maxItems": _MAX_BATCH, "items": {"minLength": 1, **_KEY}},
    "prism.v1.BatchSetRequest.entries": {
        "maxItems": _MAX_BATCH,
        "items": {
            "properties": {"idempotencyToken": {"maxLength": 0}},
            "description": "idempotencyToken is for Set only: a batch is retried whole.",
        },
    },
    "prism.v1.BatchDeleteRequest.keys": {"maxItems": _MAX_BATCH},
    "prism.v1.ScanRequest.page_size": {"minimum": 0},
    "prism.v1.ScanRequest.page_token": {
        "format": "prism-page-token",
        "description": "Opaque: nextPageToken of the previous page of the same scan, or empty.",
    },
    # adapters/pubsub/subjects.py: parse_subject, parse_pattern
    "prism.v1.PubSubPublishRequest.subject": {"maxLength": MAX_SUBJECT_LENGTH, "pattern": _SUBJECT},
    "prism.v1.PubSubSubscribeRequest.subject": {"maxLength": MAX_SUBJECT_LENGTH, "pattern": _SUBJECT_PATTERN},
    # app/services/session.py: exactly one of config_name and config
    "prism.v1.CreateSessionRequest": {
        "oneOf": [
            {"required": ["configName"], "properties": {"configName": {"type": "string", "minLength": 1}}},
            {"required": ["config"], "properties": {"config": {"type": "object"}}},
        ],
        "description": "Exactly one of configName and config.",
    },
}
# The configuration a session or a registration names is checked as ValidateConfig checks it,
# against this server's namespaces, backends and their capabilities: not something a static
# document can list, so said in words.
_CONFIG_CHECKED = (
    "Checked as ValidateConfig checks it (a known namespace, a backend this server runs that "
    "serves the pattern, ...): a configuration ValidateConfig refuses is INVALID_ARGUMENT naming "
    "its first violation."
)
# app/services/queue.py: check_name, _entry, _options, _message_ids, Commit, Seek
_QUEUE_NAME = {
    "pattern": QUEUE_NAME.pattern,
    "description": "1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit.",
}
_QUEUE_NAME_OR_EMPTY = {**_QUEUE_NAME, "pattern": f"^(?:{QUEUE_NAME.pattern[1:-1]})?$"}
for _message in (
    "QueuePublishRequest", "PublishBatchRequest", "QueueSubscribeRequest", "AcknowledgeRequest",
    "NackRequest", "CommitRequest", "SeekRequest", "GetTopicInfoRequest",
):
    CONSTRAINTS[f"prism.v1.{_message}.topic"] = _QUEUE_NAME
for _message in ("QueueSubscribeRequest", "AcknowledgeRequest", "NackRequest", "CommitRequest", "SeekRequest"):
    CONSTRAINTS[f"prism.v1.{_message}.consumer_group"] = _QUEUE_NAME
for _field in ("CommitRequest.partition", "CommitRequest.offset", "SeekRequest.partition", "SeekRequest.offset"):
    CONSTRAINTS[f"prism.v1.{_field}"] = {"minimum": 0}
CONSTRAINTS |= {
    "prism.v1.GetTopicInfoRequest.consumer_group": _QUEUE_NAME_OR_EMPTY,
    "prism.v1.QueueSubscribeRequest.dead_letter_topic": {
        **_QUEUE_NAME_OR_EMPTY,
        "description": "Required with maxDeliveryAttempts (and the other way round); not the topic itself.",
    },
    "prism.v1.QueueSubscribeRequest.ack_deadline": {
        "pattern": queue_service.ACK_DEADLINE_PATTERN,
        "description": (
            f"Between {queue_service.MIN_ACK_DEADLINE:g}s and {queue_service.MAX_ACK_DEADLINE:g}s; "
            f"unset: {queue_service.DEFAULT_ACK_DEADLINE:g}s."
        ),
    },
    "prism.v1.QueueSubscribeRequest.max_in_flight": {"minimum": 0, "maximum": Limits().stream_buffer},
    "prism.v1.QueueSubscribeRequest.max_delivery_attempts": {
        "minimum": 0,
        "description": "0: redeliver without limit; more: deadLetterTopic is required too.",
    },
    "prism.v1.QueueEntry.partition_key": {
        "maxLength": queue_service.MAX_KEY_BYTES,
        "description": f"At most {queue_service.MAX_KEY_BYTES} bytes in UTF-8.",
    },
    "prism.v1.QueueEntry.idempotency_token": {"maxLength": queue_service.MAX_TOKEN_CHARS},
    "prism.v1.QueueEntry.headers": {
        "maxProperties": queue_service.MAX_HEADERS,
        "propertyNames": {"pattern": queue_service.HEADER_NAME.pattern},
        "additionalProperties": {"type": "string", "pattern": "^[^\\r\\n\\u0000]*$"},
    },
    "prism.v1.PublishBatchRequest.entries": {"maxItems": _MAX_BATCH},
    **{
        f"prism.v1.{_message}.message_ids": {
            "maxItems": _MAX_BATCH,
            "items": {"minLength": 1, "maxLength": queue_service.MAX_MESSAGE_ID_CHARS},
        }
        for _message in ("AcknowledgeRequest", "NackRequest")
    },
    "prism.v1.SeekRequest.position": {"not": {"enum": ["START_POSITION_UNSPECIFIED", 0]}},
    "prism.v1.SeekRequest": {
        "anyOf": [
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
            for name in ("offset", "timestamp", "position")
        ],
        "description": "One of offset, timestamp or position.",
    },
}
CONSTRAINTS["prism.v1.RegisterConfigRequest.config"] = {"description": _CONFIG_CHECKED}
CONSTRAINTS["prism.v1.CreateSessionRequest.config"] = {"description": _CONFIG_CHECKED}


# --- scalars ---------------------------------------------------------------------------------


def _integer(kind: str, bounds: tuple[int, int] | None = None) -> Schema:
    low, high = bounds or _RANGES[kind]
    return {"type": "integer", "format": kind, "minimum": low, "maximum": high}


def _integer_text(kind: str, bounds: tuple[int, int] | None = None) -> Schema:
    low, high = bounds or _RANGES[kind]
    return {"type": "string", "format": kind, "pattern": integer_pattern(low, high)}


def _bounds(f: FieldDescriptor) -> tuple[int, int] | None:
    """An integer field's range, narrowed by its CONSTRAINTS."""
    extra = CONSTRAINTS.get(f.full_name, {})
    if f.type not in _INT32 | _UINT32 | _INT64 | _UINT64 or not {"minimum", "maximum"} & extra.keys():
        return None
    low, high = _RANGES[_kind(f.type)]
    return max(low, extra.get("minimum", low)), min(high, extra.get("maximum", high))


def _extra(f: FieldDescriptor) -> Schema | None:
    """A field's CONSTRAINTS fragment, less the bounds ``_bounds`` already applied."""
    extra = CONSTRAINTS.get(f.full_name)
    if extra is not None and _bounds(f) is not None:
        extra = {k: v for k, v in extra.items() if k not in ("minimum", "maximum")}
    return extra or None


def _kind(field_type: int) -> str:
    for kind, types in (("int32", _INT32), ("uint32", _UINT32), ("int64", _INT64), ("uint64", _UINT64)):
        if field_type in types:
            return kind
    raise KeyError(field_type)


def scalar_schema(field_type: int, role: str, bounds: tuple[int, int] | None = None) -> Schema:
    """One scalar value under the JSON mapping, as written (OUT) or as read."""
    if field_type in _INT32 | _UINT32:
        kind = _kind(field_type)
        if role == OUT:
            return _integer(kind)
        return {"anyOf": [_integer(kind, bounds), _integer_text(kind, bounds)]}
    if field_type in _INT64 | _UINT64:
        kind = _kind(field_type)
        # 64-bit integers are strings: JavaScript numbers lose precision above 2^53.
        if role == OUT:
            return _integer_text(kind)
        return {"anyOf": [_integer_text(kind, bounds), _integer(kind, bounds)]}
    if field_type in _FLOATS:
        number: Schema = {"type": "number", "format": "double" if field_type == F.TYPE_DOUBLE else "float"}
        if field_type == F.TYPE_FLOAT and role != OUT:
            number.update(minimum=-_FLOAT32_MAX, maximum=_FLOAT32_MAX)
        alternatives = [number, {"type": "string", "enum": _NON_FINITE}]
        if role != OUT:
            alternatives.append({"type": "string", "pattern": _DECIMAL if field_type == F.TYPE_DOUBLE else _DECIMAL_FLOAT})
        return {"anyOf": alternatives}
    if field_type == F.TYPE_BOOL:
        return {"type": "boolean"}
    if field_type == F.TYPE_STRING:
        return {"type": "string"}
    if field_type == F.TYPE_BYTES:
        if role == OUT:
            return {"type": "string", "format": "byte", "contentEncoding": "base64", "pattern": _B64_OUT}
        return {
            "type": "string",
            "format": "byte",
            "pattern": _B64_IN,
            "description": "Base64, standard or URL-safe alphabet, padding optional.",
        }
    raise TypeError(f"no JSON schema for field type {field_type}")


def _well_known(full_name: str, role: str) -> Schema | None:
    """The JSON form of a well-known type, which is not the object its fields suggest."""
    if full_name == "google.protobuf.Duration":
        return {
            "type": "string",
            "pattern": _DURATION_OUT if role == OUT else _DURATION_IN,
            "description": 'Seconds with up to 9 fractional digits and an "s" suffix, e.g. "3.5s".',
            "examples": ["3.5s"],
        }
    if full_name == "google.protobuf.Timestamp":
        return {
            "type": "string",
            "format": "date-time",
            "pattern": _TIMESTAMP_OUT if role == OUT else _TIMESTAMP_IN,
            "description": 'RFC 3339, written in UTC, e.g. "2024-01-02T03:04:05.678Z".',
        }
    if full_name == "google.protobuf.Struct":
        return {"type": "object", "description": "Any JSON object."}
    if full_name == "google.protobuf.Value":
        return {"description": "Any JSON value."}
    if full_name == "google.protobuf.ListValue":
        return {"type": "array", "description": "Any JSON array."}
    if full_name == "google.protobuf.Empty":
        return {"type": "object", "additionalProperties": False}
    if full_name == "google.protobuf.FieldMask":
        return {
            "type": "string",
            "pattern": _FIELD_MASK,
            "description": 'Comma-separated lowerCamelCase field paths, e.g. "name,config.backend".',
        }
    if full_name == "google.protobuf.Any":
        return {
            "type": "object",
            "description": "A message of the type named by @type, with that message's fields.",
            "properties": {"@type": {"type": "string"}},
        }
    wrapped = _WRAPPERS.get(full_name)
    if wrapped is not None:
        return scalar_schema(wrapped, role)
    return None


_WRAPPERS = {
    "google.protobuf.DoubleValue": F.TYPE_DOUBLE,
    "google.protobuf.FloatValue": F.TYPE_FLOAT,
    "google.protobuf.Int64Value": F.TYPE_INT64,
    "google.protobuf.UInt64Value": F.TYPE_UINT64,
    "google.protobuf.Int32Value": F.TYPE_INT32,
    "google.protobuf.UInt32Value": F.TYPE_UINT32,
    "google.protobuf.BoolValue": F.TYPE_BOOL,
    "google.protobuf.StringValue": F.TYPE_STRING,
    "google.protobuf.BytesValue": F.TYPE_BYTES,
}
# Well-known types read exactly as they are written.
_SAME_BOTH_WAYS = frozenset(
    {
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Empty",
        "google.protobuf.FieldMask",
        "google.protobuf.Any",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
    }
)
# A boolean in a URL: true or false, or 1 or 0, in any case (json_codec.text_params).
_TEXT_BOOL: Schema = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "string", "pattern": "^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"},
    ]
}
# Well-known types that read as one scalar, so they can travel in a path or a query string.
_TEXT_WELL_KNOWN = frozenset(
    {"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask", *_WRAPPERS}
)

# --- responses -------------------------------------------------------------------------------

# Every status an operation may answer with besides 200, as prism.errors.HTTP_STATUS produces them.
ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE."),
    401: ("Unauthenticated", "UNAUTHENTICATED: missing or invalid credentials or session."),
    403: ("PermissionDenied", "PERMISSION_DENIED: the caller may not do this in this namespace."),
    404: ("NotFound", "NOT_FOUND."),
    409: ("Conflict", "ALREADY_EXISTS, or ABORTED (e.g. a stale ETag)."),
    413: ("PayloadTooLarge", "RESOURCE_EXHAUSTED: the request or a value is above the limit."),
    415: ("UnsupportedMediaType", "The request body is not JSON (application/json)."),
    429: ("TooManyRequests", "RESOURCE_EXHAUSTED: rate limited; see Retry-After."),
    500: ("Internal", "INTERNAL, UNKNOWN or DATA_LOSS."),
    501: ("Unimplemented", "UNIMPLEMENTED: not served by this gateway or backend."),
    503: ("Unavailable", "UNAVAILABLE: a backend is unreachable; retry with backoff."),
}
_RETRY_AFTER = {429, 503}
_NEEDS_CALLER = {401, 403, 429}  # not for the public probes of HealthService
_NEEDS_BODY = {413, 415}  # only where a request body is read

_SSE_DESCRIPTION = """\
A stream of server-sent events (`text/event-stream`):

- each response message is one event with an `id:` line, `event: message` and a `data:` line
  holding the message as canonical protobuf JSON (the schema below);
- the stream ends with `event: end` and `data: {}`;
- a failure after the stream started is `event: error` whose data is an `Error` body, and ends
  the stream; a failure before it started is an ordinary JSON error response;
- comment lines `: ping` are keep-alives and carry no event.

Browsers can use `EventSource`, which cannot set headers: pass the session token as the
`prism_session` query parameter instead of the `x-prism-session` header."""

_GRPC_CODES = sorted(code.name for code in grpc.StatusCode)


def schema_name(full_name: str) -> str:
    """Component name of a message or enum: Prism's own types lose the package prefix."""
    return full_name.removeprefix(PACKAGE_PREFIX)


def required_fields(descriptor: Descriptor) -> tuple[str, ...]:
    """Names of the fields marked ``(google.api.field_behavior) = REQUIRED``.

    Read from the descriptor rather than ``Method.required_fields``, which covers only what
    requests reach.
    """
    return tuple(f.name for f in descriptor.fields if is_required(f))


def _repeated(f: FieldDescriptor) -> bool:
    # protobuf 7 dropped `label`; `is_repeated` only exists since 5.29.
    if hasattr(f, "is_repeated"):
        return bool(f.is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED


def _map_entry(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _summary(doc: str, fallback: str) -> str:
    # The first sentence; a doc of several sentences stays whole in the description.
    first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0] if doc else ""
    return first.rstrip(".") or fallback


def _nullable(schema: Schema) -> Schema:
    """``schema`` or null: the JSON mapping reads null as "not set"."""
    if (
        isinstance(schema.get("type"), str)
        and not {"enum", "const", "allOf", "anyOf", "oneOf", "not"} & schema.keys()
    ):
        return {**schema, "type": [schema["type"], "null"]}
    if set(schema) == {"anyOf"}:
        return {"anyOf": [*schema["anyOf"], {"type": "null"}]}
    return {"anyOf": [schema, {"type": "null"}]}


def _constrain(schema: Schema, extra: Schema) -> Schema:
    """``schema`` narrowed by a CONSTRAINTS fragment."""
    if set(extra) == {"description"}:
        return {**schema, **extra}
    if "$ref" in schema or "anyOf" in schema:
        return {"allOf": [schema, extra]}
    merged = dict(schema)
    for key, value in extra.items():
        if key == "items" and "items" in merged:
            merged["items"] = _constrain(merged["items"], value)
        else:
            merged[key] = value
    return merged


def _required_value(schema: Schema, f: FieldDescriptor) -> Schema:
    """A REQUIRED field's schema: set and not its default, as pipeline.check_required checks."""
    if _repeated(f):
        return {**schema, "minItems": 1}
    if f.type == F.TYPE_MESSAGE:
        return schema
    if f.type == F.TYPE_STRING or f.type == F.TYPE_BYTES:
        return {**schema, "minLength": 1}
    if f.type == F.TYPE_BOOL:
        return {**schema, "const": True}
    if f.type == F.TYPE_ENUM:
        zero = f.enum_type.values_by_number[0].name
        return {"allOf": [schema, {"not": {"enum": [zero, 0]}}]}
    return {"allOf": [schema, {"not": {"enum": [0, "0"]}}]}


@dataclass(frozen=True, slots=True)
class _Ref:
    """A $ref to a schema variant, named once every variant is known."""

    full_name: str
    role: str


class _Builder:
    """Collects the component schemas that operations reference, following $refs to closure."""

    def __init__(self) -> None:
        self.variants: dict[tuple[str, str], Schema] = {}
        self.names: dict[tuple[str, str], str] = {}  # variant → component name, by components()
        self._pending: list[tuple[Descriptor | EnumDescriptor, str]] = []

    # --- variants ------------------------------------------------------------------------

    def ref(self, descriptor: Descriptor | EnumDescriptor, role: str) -> Schema:
        role = self._role(descriptor, role)
        key = (descriptor.full_name, role)
        if key not in self.variants:
            self.variants[key] = {}  # placeholder: a recursive reference stops here
            self._pending.append((descriptor, role))
        return {"$ref": _Ref(descriptor.full_name, role)}

    def _role(self, descriptor: Descriptor | EnumDescriptor, role: str) -> str:
        """The variant a role reads, merging those that would be equal."""
        if isinstance(descriptor, EnumDescriptor):
            return OUT if role == OUT else IN
        if descriptor.full_name.startswith("google.protobuf."):
            return OUT if descriptor.full_name in _SAME_BOTH_WAYS else (OUT if role == OUT else IN)
        if role == ITEM and not _checked(descriptor):
            role = IN
        if role != OUT and not descriptor.fields:
            role = OUT
        return role

    def resolve(self) -> None:
        while self._pending:
            descriptor, role = self._pending.pop()
            key = (descriptor.full_name, role)
            if isinstance(descriptor, EnumDescriptor):
                self.variants[key] = self._enum(descriptor, role)
            else:
                self.variants[key] = self.message(descriptor, role)

    def components(self) -> dict[str, Schema]:
        """The variants under their component names, every $ref rewritten to them."""
        roles: dict[str, list[str]] = {}
        for full_name, role in self.variants:
            roles.setdefault(full_name, []).append(role)
        for full_name, used in roles.items():
            first = min(used, key=[OUT, IN, ITEM].index)
            for role in used:
                self.names[(full_name, role)] = schema_name(full_name) + (
                    "" if role == first else _SUFFIX[role]
                )
        return {self.names[key]: self.rewrite(schema) for key, schema in self.variants.items()}

    def rewrite(self, node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, _Ref):
                    out[key] = f"#/components/schemas/{self.names[(value.full_name, value.role)]}"
                else:
                    out[key] = self.rewrite(value)
            return out
        if isinstance(node, list):
            return [self.rewrite(item) for item in node]
        return node

    # --- schemas -------------------------------------------------------------------------

    def _enum(self, descriptor: EnumDescriptor, role: str) -> Schema:
        names = [v.name for v in descriptor.values]
        if role == OUT:
            return {"type": "string", "enum": names}
        # proto3 enums are open: a number the contract does not define is read, and kept.
        return {
            "anyOf": [{"type": "string", "enum": names}, _integer("int32")],
            "description": "The value's name, or a number: "
            + ", ".join(f"{v.number} = {v.name}" for v in descriptor.values)
            + ".",
        }

    def message(self, descriptor: Descriptor, role: str, omit: Iterable[str] = ()) -> Schema:
        wkt = _well_known(descriptor.full_name, role)
        if wkt is not None:
            return wkt
        omitted = set(omit)
        fields = [f for f in descriptor.fields if f.name not in omitted]
        enforced = set(required_fields(descriptor)) if role == IN else set()
        properties: Schema = {}
        required: list[str] = []
        for f in fields:
            if role == OUT:
                properties[f.json_name] = self.field(f, OUT)
                if not f.has_presence:  # written even when empty
                    required.append(f.json_name)
                continue
            schema = self.field(f, role)
            if f.name in enforced:
                schema = _required_value(schema, f)
                required.append(f.json_name)
            if role == IN and (extra := _extra(f)):
                schema = _constrain(schema, extra)
            properties[f.json_name] = schema if f.name in enforced else _nullable(schema)
        schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        rules: list[Schema] = []
        notes: list[str] = []
        for oneof in descriptor.oneofs:
            members = [f.json_name for f in oneof.fields if f.name not in omitted]
            if len(oneof.fields) == 1 and oneof.name.startswith("_"):
                continue  # proto3 `optional` makes a one-field synthetic oneof: it is no choice
            notes.append(f"At most one of {', '.join(members)} is set ({oneof.name}).")
            set_ = {"not": {"type": "null"}}
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    rules.append({"not": {"required": [a, b], "properties": {a: set_, b: set_}}})
        if role == IN and (extra := CONSTRAINTS.get(descriptor.full_name)):
            extra = dict(extra)
            if note := extra.pop("description", None):
                notes.append(note)
            rules.append(extra)
        if rules:
            schema["allOf"] = rules
        if notes:
            schema["description"] = " ".join(notes)
        return schema

    def field(self, f: FieldDescriptor, role: str) -> Schema:
        element = ITEM if role == IN else role  # elements of repeated fields are checked alone
        if _map_entry(f):
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            schema: Schema = {"type": "object", "additionalProperties": self.single(value, element)}
            if key.type != F.TYPE_STRING:
                schema["propertyNames"] = (
                    {"enum": ["true", "false"]} if key.type == F.TYPE_BOOL else _integer_text(_kind(key.type))
                )
            return schema
        if _repeated(f):
            return {"type": "array", "items": self.single(f, element)}
        return self.single(f, role)

    def single(self, f: FieldDescriptor, role: str) -> Schema:
        if f.type == F.TYPE_ENUM:
            if f.enum_type.full_name == "google.protobuf.NullValue":
                return {"type": "null"}
            return self.ref(f.enum_type, role)
        if f.message_type is not None:
            return self.ref(f.message_type, role)
        return scalar_schema(f.type, role, _bounds(f) if role == IN else None)

    def text_schema(self, f: FieldDescriptor) -> Schema | None:
        """A request field's schema in a path segment or query string, or None when it cannot
        travel there (messages other than scalar well-known types, maps)."""
        if _map_entry(f):
            return None
        if f.message_type is not None:
            if f.message_type.full_name not in _TEXT_WELL_KNOWN:
                return None
            single = _well_known(f.message_type.full_name, IN)
            assert single is not None
        elif f.type == F.TYPE_ENUM:
            single = self._enum(f.enum_type, IN)
        elif f.type in _INT32 | _UINT32 | _INT64 | _UINT64:
            single = _integer(_kind(f.type), _bounds(f))  # the decimal text of one
        elif f.type == F.TYPE_BOOL:
            single = _TEXT_BOOL
        else:
            single = scalar_schema(f.type, IN)
        if _repeated(f):
            return {"type": "array", "items": single}
        return single

    # --- operations ----------------------------------------------------------------------

    def operation(self, method: Method) -> Schema:
        assert method.http is not None
        rule = method.http
        request: Descriptor = method.request_type.DESCRIPTOR
        fields = request.fields_by_name
        required = set(required_fields(request))
        short = method.service.removeprefix(PACKAGE_PREFIX)

        parameters: list[Schema] = []
        for name in rule.path_fields:
            deep = f"{{{name}=**}}" in rule.template
            description = (
                "May contain slashes; the value is percent-decoded."
                if deep
                else "One path segment (no slashes); the value is percent-decoded."
            )
            field = fields.get(name)
            schema = (self.text_schema(field) if field is not None else None) or {"type": "string"}
            schema = {**schema, "minLength": 1} if "type" in schema else schema
            if field is not None and (extra := _extra(field)):
                schema = _constrain(schema, extra)
            parameters.append(
                {"name": name, "in": "path", "required": True, "description": description, "schema": schema}
            )

        # Without a body the other fields travel in the query string; with one, the REST
        # transport refuses query parameters (rest.py), so none are advertised.
        if rule.body == "":
            for f in request.fields:
                if f.name in rule.path_fields:
                    continue
                schema = self.text_schema(f)
                if schema is None:
                    continue
                param: Schema = {"name": f.json_name, "in": "query"}
                if f.name in required:
                    schema = _required_value(schema, f)
                    param["required"] = True
                if extra := _extra(f):
                    schema = _constrain(schema, extra)
                param["schema"] = schema
                parameters.append(param)

        operation: Schema = {
            "operationId": operation_id(method),
            "tags": [short],
            "summary": _summary(method.doc, method.name),
            "x-grpc-method": method.path,
        }
        if description := self._description(method):
            operation["description"] = description
        if parameters:
            operation["parameters"] = parameters
        if body := self._request_body(method, required):
            operation["requestBody"] = body
        operation["responses"] = self._responses(method, has_body=body is not None)
        if method.requires_session:
            security = [{"PrismSession": []}]
            if method.server_streaming:
                security.append({"PrismSessionQuery": []})
            operation["security"] = security
        return operation

    def _description(self, method: Method) -> str:
        parts = [method.doc] if method.doc else []
        if method.requires_session:
            where = f"the `{SESSION_HEADER}` header"
            if method.server_streaming:
                where += f" (or the `{SESSION_QUERY}` query parameter, for EventSource)"
            parts.append(f"Needs a session: send its token in {where}.")
        if method.server_streaming:
            parts.append("Server-streaming: answers with server-sent events, see the 200 response.")
        return "\n\n".join(parts)

    def _request_body(self, method: Method, required: set[str]) -> Schema | None:
        assert method.http is not None
        rule = method.http
        request: Descriptor = method.request_type.DESCRIPTOR
        if rule.body == "":
            return None
        if rule.body == "*":
            if rule.path_fields:
                # The path already carries these fields; the body holds the rest.
                schema = self.message(request, IN, omit=rule.path_fields)
                schema["title"] = f"{schema_name(request.full_name)} (body)"
            else:
                schema = self.ref(request, IN)
            needed = bool(required - set(rule.path_fields))
        else:
            field = request.fields_by_name[rule.body]
            schema = self.field(field, IN)
            if extra := _extra(field):
                schema = _constrain(schema, extra)
            needed = rule.body in required
        return {"required": needed, "content": {JSON: {"schema": schema}}}

    def _responses(self, method: Method, *, has_body: bool) -> Schema:
        response = self.ref(method.response_type.DESCRIPTOR, OUT)
        ok: Schema
        if method.server_streaming:
            ok = {"description": _SSE_DESCRIPTION, "content": {SSE: {"schema": _sse_event(response)}}}
        else:
            ok = {"description": "OK", "content": {JSON: {"schema": response}}}
        responses: Schema = {"200": ok}
        for status, (name, _) in ERROR_RESPONSES.items():
            if status in _NEEDS_CALLER and method.service in PUBLIC_SERVICES:
                continue
            if status in _NEEDS_BODY and not has_body:
                continue
            responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
        return responses


def _checked(descriptor: Descriptor, seen: set[str] | None = None) -> bool:
    """Whether reading a message as a request (REQUIRED, CONSTRAINTS) differs from reading it
    as a batch entry, here or in the messages its singular fields hold."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    if required_fields(descriptor) or descriptor.full_name in CONSTRAINTS:
        return True
    for f in descriptor.fields:
        if f.full_name in CONSTRAINTS:
            return True
        if f.message_type is not None and not _repeated(f) and _checked(f.message_type, seen):
            return True
    return False


def operation_id(method: Method) -> str:
    return f"{method.service.removeprefix(PACKAGE_PREFIX)}_{method.name}"


def _event_data(schema: Schema) -> Schema:
    return {"type": "string", "contentMediaType": JSON, "contentSchema": schema}


def _sse_event(message: Schema) -> Schema:
    """One server-sent event as a client parses it: its type, id and JSON data."""
    common = {
        "id": {
            "type": "string",
            "description": "The response's messageId where it has one (acknowledge by it), else its position in the stream from 1.",
        },
        "retry": {"type": "integer"},
    }
    return {
        "description": "One server-sent event.",
        "oneOf": [
            {
                "type": "object",
                "properties": {"event": {"const": "message"}, "data": _event_data(message), **common},
                "required": ["event", "data", "id"],
            },
            {
                "type": "object",
                "properties": {
                    "event": {"const": "end"},
                    "data": _event_data({"type": "object", "additionalProperties": False}),
                    **common,
                },
                "required": ["event", "data"],
            },
            {
                "type": "object",
                "properties": {
                    "event": {"const": "error"},
                    "data": _event_data({"$ref": "#/components/schemas/Error"}),
                    **common,
                },
                "required": ["event", "data"],
            },
        ],
    }


# --- links -----------------------------------------------------------------------------------

# A response field that feeds a request field of another name (AIP-154 ETags).
_FEEDS = {"etag": "if_match"}


def _response_fields(descriptor: Descriptor, depth: int = 2) -> Iterable[tuple[str, str]]:
    """(proto name, JSON pointer) of the scalar fields a response always has, one message deep."""
    for f in descriptor.fields:
        if _repeated(f):
            continue
        if f.message_type is None and f.type != F.TYPE_ENUM:
            yield f.name, "/" + f.json_name
        elif f.message_type is not None and depth > 1 and not f.message_type.full_name.startswith("google."):
            for name, pointer in _response_fields(f.message_type, depth - 1):
                yield name, "/" + f.json_name + pointer


def _links(source: Method, methods: list[Method]) -> Schema:
    """OpenAPI links from a unary method's answer to the other operations of its service that
    it leads to: those on the same path (the same resource), and those whose path parameters
    its answer fills (a name it returns, an ETag for if_match on the same resource)."""
    assert source.http is not None
    links: Schema = {}
    given = list(_response_fields(source.response_type.DESCRIPTOR))
    for target in methods:
        rule = target.http
        if rule is None or target is source or target.client_streaming or target.service != source.service:
            continue
        request = target.request_type.DESCRIPTOR
        query = {f.name for f in request.fields if rule.body == "" and f.name not in rule.path_fields}
        parameters: Schema = {}
        same_path = rule.openapi_path == source.http.openapi_path
        if same_path:
            for name in rule.path_fields:
                parameters[f"path.{name}"] = f"$request.path.{name}"
        for name, pointer in given:
            wanted = _FEEDS.get(name, name)
            if wanted in rule.path_fields and f"path.{wanted}" not in parameters:
                parameters[f"path.{wanted}"] = f"$response.body#{pointer}"
            elif wanted in query and same_path:
                parameters[f"query.{request.fields_by_name[wanted].json_name}"] = f"$response.body#{pointer}"
        if not parameters or not all(f"path.{name}" in parameters for name in rule.path_fields):
            continue
        links[target.name] = {
            "operationId": operation_id(target),
            "parameters": dict(sorted(parameters.items())),
        }
    return links


# --- document --------------------------------------------------------------------------------


def _error_components() -> tuple[Schema, Schema]:
    error: Schema = {
        "type": "object",
        "description": "The one error body of every HTTP transport.",
        "properties": {
            "code": {
                "type": "string",
                "description": 'gRPC status name, e.g. "INVALID_ARGUMENT".',
                "enum": _GRPC_CODES,
            },
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "description": "google.rpc error details, e.g. google.rpc.BadRequest naming the field.",
                "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "required": ["@type"],
                },
            },
        },
        "required": ["code", "message", "details"],
        "additionalProperties": False,
    }
    responses: Schema = {}
    for status, (name, description) in ERROR_RESPONSES.items():
        response: Schema = {
            "description": description,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in _RETRY_AFTER:
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying, when known.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": "The scheme to authenticate with (RFC 9110 §11.6.1).",
                    "required": True,
                    "schema": {"type": "string"},
                }
            }
        responses[name] = response
    return error, responses


def _probes() -> dict[str, Schema]:
    """The plain HTTP liveness and readiness endpoints, outside the proto contract."""

    def probe(name: str, summary: str, schema: str, statuses: dict[str, str]) -> Schema:
        content = {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        return {
            "get": {
                "operationId": name,
                "tags": ["Probes"],
                "summary": summary,
                "responses": {
                    status: {"description": text, "content": content} for status, text in statuses.items()
                },
            }
        }

    return {
        "/healthz": probe("healthz", "Liveness: the process serves requests", "Liveness", {"200": "OK"}),
        "/readyz": probe(
            "readyz",
            "Readiness: the backends answer (app/health.py)",
            "Readiness",
            {"200": "Ready: ok, or degraded (an optional backend is down)", "503": "Starting, or unready"},
        ),
    }


def _probe_schemas() -> dict[str, Schema]:
    backend = {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": ["ok", "degraded", "down"]},
            "required": {"type": "boolean", "description": "Whether the gateway is unready without it."},
            "since": {"type": "number", "description": "When it last went up or down (Unix seconds)."},
            "problem": {"type": "string", "description": "Why it is not ok."},
        },
        "required": ["state", "required", "since"],
        "additionalProperties": False,
    }
    return {
        "Liveness": {
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
            "additionalProperties": False,
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded", "unready", "starting"]},
                "backends": {"type": "object", "additionalProperties": backend},
            },
            "required": ["status", "backends"],
            "additionalProperties": False,
        },
    }


_INFO = """\
Prism data-access gateway: REST/JSON and server-sent events, generated from the proto contract
(package prism.v1). The same API is served over gRPC and gRPC-Web.

Messages use protobuf's canonical JSON mapping: lowerCamelCase field names, 64-bit integers as
strings, bytes as base64, enums by name, durations like "1.5s", timestamps in RFC 3339. Answers
always carry every field without presence, even when empty. Requests may also use the mapping's
other spellings: integers as numbers or strings, enum numbers, URL-safe or unpadded base64,
`null` for a field that is not set, and a field's proto name (`if_match`) for its JSON name
(`ifMatch`), though not both. Any other field is refused. The schemas give integers in a string
as plain decimals; the mapping's exponent and fraction forms of an integer ("1e3", "5.0") are
read too.
Errors are `{"code", "message", "details"}` with the gRPC status name as code."""


def _info_description(methods: list[Method]) -> str:
    grpc_only = sorted((m for m in methods if m.http is None), key=lambda m: m.path)
    if not grpc_only:
        return _INFO
    lines = [f"- `{m.path}`" + (f": {m.doc}" if m.doc else "") for m in grpc_only]
    return _INFO + "\n\ngRPC only (no HTTP mapping):\n\n" + "\n".join(lines)


def build_openapi(methods: list[Method], *, title: str = "Prism", version: str = "v1") -> dict:
    """The OpenAPI 3.1 document for every method with an HTTP rule; stable for a drift check."""
    builder = _Builder()
    paths: dict[str, dict[str, Schema]] = _probes()
    routed = [m for m in methods if m.http is not None]
    for method in routed:
        assert method.http is not None
        item = paths.setdefault(method.http.openapi_path, {})
        verb = method.http.verb.lower()
        if verb in item:
            raise ValueError(f"two methods bound to {method.http.verb} {method.http.template}")
        operation = builder.operation(method)
        if not method.server_streaming and (links := _links(method, routed)):
            operation["responses"]["200"]["links"] = links
        item[verb] = operation
    builder.resolve()
    schemas = builder.components()
    paths = builder.rewrite(paths)

    error, error_responses = _error_components()
    schemas = {**schemas, "Error": error, **_probe_schemas()}
    tags = sorted({m.service.removeprefix(PACKAGE_PREFIX) for m in routed} | {"Probes"})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": _info_description(methods)},
        "tags": [{"name": t} for t in tags],
        "paths": {p: dict(sorted(paths[p].items())) for p in sorted(paths)},
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "responses": dict(sorted(error_responses.items())),
            "securitySchemes": {
                "PrismSession": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SESSION_HEADER,
                    "description": "The session token from SessionService.CreateSession.",
                },
                "PrismSessionQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": SESSION_QUERY,
                    "description": "The session token as a query parameter, for server-sent "
                    "event streams opened with EventSource (which cannot set headers).",
                },
            },
        },
    }
