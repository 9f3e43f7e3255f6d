"""Protobuf's canonical JSON mapping for REST and SSE, with errors that name the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from app.transports.json_encoder import encoder
from prism.errors import PrismError, invalid_argument

_FIELD_IN_ERROR = re.compile(r'(?:no field named|field) "?([A-Za-z0-9_.\[\]]+)"?')
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def to_json(message: Message) -> bytes:
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


def to_dict(message: Message) -> dict[str, Any]:
    return encoder(message.DESCRIPTOR)(message)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise invalid_argument("body", "is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise invalid_argument("body", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(body, dict):
        raise invalid_argument("body", f"must be a JSON object, not {type(body).__name__}")
    return body


def _field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    return descriptor.fields_by_name.get(name) or descriptor.fields_by_camelcase_name.get(name)


def _scalar(field: FieldDescriptor, name: str, value: str) -> Any:
    """A text value (path segment, query parameter) as the JSON value its field expects.

    The JSON mapping already accepts numbers and enums as strings; only bools need converting."""
    if field.type != FieldDescriptor.TYPE_BOOL:
        return value
    lowered = value.lower()
    if lowered not in _TRUE and lowered not in _FALSE:
        raise invalid_argument(name, f"expected true or false, got {value!r}")
    return lowered in _TRUE


def text_params(descriptor: Descriptor, params: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Path and query parameters (``a.b=1``, repeated ``k=x&k=y``) as a JSON-mapping dict."""
    result: dict[str, Any] = {}
    for dotted, value in params:
        node, desc = result, descriptor
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            field = _field(desc, part) if desc is not None else None
            if field is None:
                raise invalid_argument(dotted, "unknown parameter")
            key = field.json_name
            if i < len(parts) - 1:
                if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated:
                    raise invalid_argument(dotted, "unknown parameter")
                node = node.setdefault(key, {})
                desc = field.message_type
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.full_name.startswith(
                "google.protobuf."
            ):
                raise invalid_argument(dotted, "a message field cannot be set from the URL")
            converted = _scalar(field, dotted, value)
            if field.is_repeated:
                node.setdefault(key, []).append(converted)
            else:
                node[key] = converted
    return result


def merge(body: dict[str, Any], path: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in path.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            merge(body[key], value)
        else:
            body[key] = value
    return body


def parse_message(data: dict[str, Any], message_type: type[Message], where: str = "body") -> Message:
    message = message_type()
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        text = str(exc)
        match = _FIELD_IN_ERROR.search(text)
        raise PrismError(
            invalid_argument(match.group(1) if match else where, "").code,
            f"invalid request {where}: {text}",
            field=match.group(1) if match else where,
        ) from None
    return message
