"""The OpenAPI 3.1 document of the REST/JSON and SSE transports, derived from the method table.

Nothing here names an RPC: paths come from the ``google.api.http`` rules, parameters and bodies
from the request descriptors, schemas from the message descriptors under protobuf's canonical
JSON mapping (the one ``json_format`` speaks on the wire).

    Method ─┬─ http rule ───► path item + operation (path params, query or body)
            ├─ request ─────► parameters / requestBody ─┐
            └─ response ────► 200 (JSON or SSE) ────────┴─► components/schemas ($ref, recursive)
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from app.methods import Method

Schema = dict[str, Any]

PACKAGE_PREFIX = "prism.v1."
SESSION_HEADER = "x-prism-session"
SESSION_QUERY = "prism_session"
JSON = "application/json"
SSE = "text/event-stream"

_DURATION: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
    "description": 'Seconds with up to 9 fractional digits and an "s" suffix, e.g. "3.5s".',
    "examples": ["3.5s"],
}
_TIMESTAMP: Schema = {
    "type": "string",
    "format": "date-time",
    "description": 'RFC 3339 in UTC, e.g. "2024-01-02T03:04:05.678Z".',
}

_INT64 = {"type": "string", "format": "int64"}
_UINT64 = {"type": "string", "format": "uint64"}
# Canonical JSON: 64-bit integers are decimal strings (JavaScript numbers lose precision).
_SCALARS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},  # base64
}

# Well-known types have their own JSON form instead of the object their fields suggest.
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Duration": _DURATION,
    "google.protobuf.Timestamp": _TIMESTAMP,
    "google.protobuf.Struct": {"type": "object", "description": "Any JSON object."},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": 'Comma-separated lowerCamelCase field paths, e.g. "name,config.backend".',
    },
    "google.protobuf.Any": {
        "type": "object",
        "description": "A message of the type named by @type, with that message's fields.",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": _SCALARS[FieldDescriptor.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FieldDescriptor.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _SCALARS[FieldDescriptor.TYPE_INT32],
    "google.protobuf.UInt32Value": _SCALARS[FieldDescriptor.TYPE_UINT32],
    "google.protobuf.BoolValue": _SCALARS[FieldDescriptor.TYPE_BOOL],
    "google.protobuf.StringValue": _SCALARS[FieldDescriptor.TYPE_STRING],
    "google.protobuf.BytesValue": _SCALARS[FieldDescriptor.TYPE_BYTES],
}
# Well-known types that read as one scalar, so they can travel in a query string.
_QUERY_WELL_KNOWN = frozenset(
    name
    for name, schema in _WELL_KNOWN.items()
    if schema.get("type") in {"string", "number", "integer", "boolean"}
)

# Every status an operation may answer with besides 200, as errors.HTTP_STATUS produces them.
ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE."),
    401: ("Unauthenticated", "UNAUTHENTICATED: missing or invalid credentials or session."),
    404: ("NotFound", "NOT_FOUND."),
    409: ("Conflict", "ALREADY_EXISTS, or ABORTED (e.g. a stale ETag)."),
    413: ("PayloadTooLarge", "RESOURCE_EXHAUSTED: the request or a value is above the limit."),
    429: ("TooManyRequests", "RESOURCE_EXHAUSTED: rate limited; see Retry-After."),
    500: ("Internal", "INTERNAL, UNKNOWN or DATA_LOSS."),
    501: ("Unimplemented", "UNIMPLEMENTED: not served by this gateway or backend."),
    503: ("Unavailable", "UNAVAILABLE: a backend is unreachable; retry with backoff."),
}
_RETRY_AFTER = {429, 503}

_SSE_DESCRIPTION = """\
A stream of server-sent events (`text/event-stream`):

- each response message is one event with an `id:` line, `event: message` and a `data:` line
  holding the message as canonical protobuf JSON (the schema below);
- the stream ends with `event: end`;
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
    requests reach; response messages need it too.
    """
    return tuple(
        f.name
        for f in descriptor.fields
        if field_behavior_pb2.REQUIRED
        in f.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    )


def _repeated(f: FieldDescriptor) -> bool:
    # protobuf 7 dropped `label`; `is_repeated` only exists since 5.29.
    if hasattr(f, "is_repeated"):
        return bool(f.is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED


def _ref(full_name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{schema_name(full_name)}"}


def _summary(doc: str, fallback: str) -> str:
    # The first sentence; a doc of several sentences stays whole in the description.
    first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0] if doc else ""
    return first.rstrip(".") or fallback


class _Builder:
    """Collects the component schemas that operations reference, following $refs to closure."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}
        self._pending: list[Descriptor | EnumDescriptor] = []

    # --- schemas -------------------------------------------------------------------------

    def message_ref(self, descriptor: Descriptor) -> Schema:
        self._want(descriptor)
        return _ref(descriptor.full_name)

    def _want(self, descriptor: Descriptor | EnumDescriptor) -> None:
        name = schema_name(descriptor.full_name)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: a recursive reference stops here
            self._pending.append(descriptor)

    def resolve(self) -> None:
        while self._pending:
            descriptor = self._pending.pop()
            name = schema_name(descriptor.full_name)
            if isinstance(descriptor, EnumDescriptor):
                self.schemas[name] = self._enum(descriptor)
            else:
                self.schemas[name] = self._message(descriptor)

    def _enum(self, descriptor: EnumDescriptor) -> Schema:
        return {"type": "string", "enum": [v.name for v in descriptor.values]}

    def _message(self, descriptor: Descriptor, omit: frozenset[str] = frozenset()) -> Schema:
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        fields = [f for f in descriptor.fields if f.name not in omit]
        schema: Schema = {
            "type": "object",
            "properties": {f.json_name: self.field(f) for f in fields},
        }
        by_name = {f.name: f for f in fields}
        required = [by_name[n].json_name for n in required_fields(descriptor) if n in by_name]
        if required:
            schema["required"] = required
        oneofs = [
            o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))
        ]  # proto3 `optional` makes a one-field synthetic oneof; it is no choice
        if oneofs:
            schema["description"] = " ".join(
                f"At most one of {', '.join(f.json_name for f in o.fields)} is set ({o.name})."
                for o in oneofs
            )
        return schema

    def field(self, f: FieldDescriptor) -> Schema:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(f)
        if _repeated(f):
            return {"type": "array", "items": single}
        return single

    def _single(self, f: FieldDescriptor) -> Schema:
        if f.type == FieldDescriptor.TYPE_ENUM:
            if f.enum_type.full_name == "google.protobuf.NullValue":
                return {"type": "null"}
            self._want(f.enum_type)
            return _ref(f.enum_type.full_name)
        if f.message_type is not None:
            return self.message_ref(f.message_type)
        return dict(_SCALARS[f.type])

    def query_schema(self, f: FieldDescriptor) -> Schema | None:
        """A field's schema in a query string, or None when it cannot travel there."""
        if f.message_type is not None and (
            f.message_type.GetOptions().map_entry
            or f.message_type.full_name not in _QUERY_WELL_KNOWN
        ):
            return None
        if f.message_type is not None:
            single = dict(_WELL_KNOWN[f.message_type.full_name])  # inline: a plain string param
        else:
            single = self._single(f)
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
            schema = self.query_schema(field) if field is not None else None
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": description,
                    "schema": schema or {"type": "string"},
                }
            )

        # Without a body the other fields travel in the query string; with one, the REST
        # transport refuses query parameters (rest.py), so none are advertised.
        if rule.body == "":
            for f in request.fields:
                if f.name in rule.path_fields:
                    continue
                schema = self.query_schema(f)
                if schema is None:
                    continue
                param: Schema = {"name": f.json_name, "in": "query", "schema": schema}
                if f.name in required:
                    param["required"] = True
                parameters.append(param)

        operation: Schema = {
            "operationId": f"{short}_{method.name}",
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
        operation["responses"] = self._responses(method)
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
                schema = self._message(request, omit=frozenset(rule.path_fields))
                schema["title"] = f"{schema_name(request.full_name)} (body)"
            else:
                schema = self.message_ref(request)
            needed = bool(required - set(rule.path_fields))
        else:
            schema = self.field(request.fields_by_name[rule.body])
            needed = rule.body in required
        return {"required": needed, "content": {JSON: {"schema": schema}}}

    def _responses(self, method: Method) -> Schema:
        response = self.message_ref(method.response_type.DESCRIPTOR)
        ok: Schema
        if method.server_streaming:
            ok = {
                "description": _SSE_DESCRIPTION,
                "content": {SSE: {"schema": _sse_event(response)}},
            }
        else:
            ok = {"description": "OK", "content": {JSON: {"schema": response}}}
        responses: Schema = {"200": ok}
        for status, (name, _) in ERROR_RESPONSES.items():
            responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
        return responses


def _sse_event(data: Schema) -> Schema:
    """One server-sent event; ``data`` is the response message (an Error for `event: error`)."""
    return {
        "type": "object",
        "description": "One server-sent event.",
        "properties": {
            "id": {"type": "string"},
            "event": {"type": "string", "enum": ["message", "end", "error"]},
            "data": {
                **data,
                "contentMediaType": JSON,
                "description": "For `event: message` one response message as JSON; "
                "for `event: error` an Error; `{}` for `event: end`.",
            },
        },
        "required": ["event"],
    }


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
                "items": {"type": "object", "properties": {"@type": {"type": "string"}}},
            },
        },
        "required": ["code", "message", "details"],
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
                    "schema": {"type": "integer"},
                }
            }
        responses[name] = response
    return error, responses


def _probes() -> dict[str, Schema]:
    """The plain HTTP liveness and readiness endpoints, outside the proto contract."""
    status = {"$ref": "#/components/schemas/ProbeStatus"}

    def probe(name: str, summary: str) -> Schema:
        return {
            "get": {
                "operationId": name,
                "tags": ["Probes"],
                "summary": summary,
                "responses": {
                    "200": {"description": "OK", "content": {JSON: {"schema": status}}},
                    "503": {"description": "Not OK", "content": {JSON: {"schema": status}}},
                },
            }
        }

    return {
        "/healthz": probe("healthz", "Liveness: the process serves requests"),
        "/readyz": probe("readyz", "Readiness: the backends are reachable"),
    }


_INFO = """\
Prism data-access gateway: REST/JSON and server-sent events, generated from the proto contract
(package prism.v1). The same API is served over gRPC and gRPC-Web.

Messages use protobuf's canonical JSON mapping: lowerCamelCase field names, 64-bit integers as
strings, bytes as base64, enums by name, durations like "1.5s", timestamps in RFC 3339.
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
    for method in methods:
        if method.http is None:
            continue
        item = paths.setdefault(method.http.openapi_path, {})
        verb = method.http.verb.lower()
        if verb in item:
            raise ValueError(f"two methods bound to {method.http.verb} {method.http.template}")
        item[verb] = builder.operation(method)
    builder.resolve()

    error, error_responses = _error_components()
    schemas = {**builder.schemas, "Error": error, "ProbeStatus": _probe_status()}
    tags = sorted({m.service.removeprefix(PACKAGE_PREFIX) for m in methods if m.http} | {"Probes"})
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


def _probe_status() -> Schema:
    return {
        "type": "object",
        "properties": {"status": {"type": "string", "examples": ["ok"]}},
        "required": ["status"],
    }
