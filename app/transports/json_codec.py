"""Protobuf's canonical JSON mapping for REST and SSE, with errors that name the field.

Encoding is ``json_encoder``'s. Decoding is written here rather than left to
``json_format.ParseDict``, which is lenient where the mapping is strict (a string that is not
base64 decodes to garbage bytes, ``"1_000"`` is an integer, ``1.5`` an enum value), fails with
a server error on some valid or invalid input (``null`` for a repeated ``google.protobuf.Value``,
an integer too large for a double, an ``Any`` whose ``@type`` is not a string) and names the
field only inside prose.

Each message type gets a table of field converters, built once from its descriptor. A converter
checks one JSON value against the mapping and returns it as a constructor argument: a Python
scalar, a dict of constructor arguments for a nested message, or a built message for a
well-known type. The request is then built by a single constructor call into the C extension.
A problem raises ``_Bad``, which gathers the field path (``entries[1].value``,
``headers["k"]``) while it unwinds. Nesting is counted in messages as protobuf counts it (a map
entry is one, a JSON array inside a ``Value`` two: ``ListValue`` and ``Value``), and deeper than
``MAX_DEPTH`` is refused as a whole.
``tests/test_json_decoding.py`` checks the results against ``json_format`` for valid input.
"""

from __future__ import annotations

import binascii
import codecs
import datetime
import decimal
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from app.transports.json_encoder import encoder
from prism.errors import invalid_argument

log = logging.getLogger("prism.json")

F = FieldDescriptor
# Messages nested in one another, the request being the first: protobuf's own limit (upb's
# decoder refuses a 101st level, and json_format too), so whatever is decoded can be re-read.
MAX_DEPTH = 100
# JSON arrays and objects nested in one another. A request within MAX_DEPTH needs at most
# twice as many (a repeated message field is an array holding objects); deeper is refused
# whatever it holds, before any field is looked at.
MAX_JSON_DEPTH = 2 * MAX_DEPTH
_TOO_DEEP_JSON = f"nested too deeply: more than {MAX_JSON_DEPTH} levels of JSON arrays and objects"
_TOO_DEEP = f"nested too deeply: more than {MAX_DEPTH} levels of messages"
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def to_json(message: Message) -> bytes:
    if not isinstance(message, Message):  # a response encoded by its service (a Reader page: app/services/reader_pages.py)
        return message.to_json()  # type: ignore[attr-defined]
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


def to_dict(message: Message) -> dict[str, Any]:
    if not isinstance(message, Message):  # as in to_json
        return json.loads(message.to_json())  # type: ignore[attr-defined,no-any-return]
    return encoder(message.DESCRIPTOR)(message)


class _NotJson(ValueError):
    """NaN, Infinity and -Infinity, which Python's json module accepts and JSON does not."""


def _no_constant(name: str) -> Any:
    raise _NotJson(name)


_JSON = json.JSONDecoder(parse_constant=_no_constant)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = _JSON.decode(raw.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid_argument("body", "is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise invalid_argument(
            "body", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _NotJson as exc:
        raise invalid_argument(
            "body", f'malformed JSON: {exc} is not a JSON value (write "{exc}" as a string)'
        ) from None
    except RecursionError:
        raise invalid_argument("body", _TOO_DEEP_JSON) from None
    except ValueError:  # an integer of more than 4,300 digits (sys.get_int_max_str_digits)
        raise invalid_argument("body", "malformed JSON: a number has too many digits") from None
    if not isinstance(body, dict):
        raise invalid_argument("body", f"must be a JSON object, not {_kind(body)}")
    # Fewer brackets than the limit cannot nest deeper than it: most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise invalid_argument("body", _TOO_DEEP_JSON)
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels, without recursion."""
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                pending.append((child, depth + 1))
    return False


# --- path and query parameters --------------------------------------------------------------


def _field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    return descriptor.fields_by_name.get(name) or descriptor.fields_by_camelcase_name.get(name)


def _scalar(field: FieldDescriptor, name: str, value: str) -> Any:
    """A text value (path segment, query parameter) as the JSON value its field expects.

    The JSON mapping takes numbers as strings already; bools (and BoolValue) need converting,
    and an enum given by number becomes that number. Everything else is checked by the decoder."""
    kind = field.type
    if kind == F.TYPE_MESSAGE and field.message_type.full_name == "google.protobuf.BoolValue":
        kind = F.TYPE_BOOL
    if kind == F.TYPE_BOOL:
        lowered = value.lower()
        if lowered not in _TRUE and lowered not in _FALSE:
            raise invalid_argument(name, f"expected true or false, got {_shown(value)}")
        return lowered in _TRUE
    if kind == F.TYPE_ENUM and _INT_TEXT.fullmatch(value):
        return int(value)
    return value


def text_params(descriptor: Descriptor, params: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Path and query parameters (``a.b=1``, repeated ``k=x&k=y``) as a JSON-mapping dict."""
    result: dict[str, Any] = {}
    for dotted, value in params:
        name = _shown(dotted)[1:-1] if dotted else "query"  # bounded, for error messages
        node, desc = result, descriptor
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            field = _field(desc, part)
            if field is None:
                raise invalid_argument(name, "unknown parameter")
            key = field.json_name
            if i < len(parts) - 1:
                if (
                    field.type != F.TYPE_MESSAGE
                    or field.is_repeated
                    or field.message_type.full_name in _WELL_KNOWN
                ):
                    raise invalid_argument(name, "unknown parameter")
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise invalid_argument(name, f"{key} is given both whole and by its fields")
                desc = field.message_type
                continue
            if field.type == F.TYPE_MESSAGE and field.message_type.full_name not in _WELL_KNOWN:
                raise invalid_argument(name, "a message field cannot be set from the URL")
            converted = _scalar(field, name, value)
            if field.is_repeated:
                node.setdefault(key, []).append(converted)
            elif isinstance(node.get(key), dict):
                raise invalid_argument(name, f"{key} is given both whole and by its fields")
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


# --- decoding ---------------------------------------------------------------------------------


def parse_message(data: dict[str, Any], message_type: type[Message], where: str = "body") -> Message:
    """``data`` (parsed JSON) as a ``message_type``, by the canonical JSON mapping.

    INVALID_ARGUMENT naming the field for anything the mapping refuses, and naming ``where``
    for nesting beyond ``MAX_DEPTH`` messages; no other exception escapes."""
    try:
        codec = _CODECS.get(message_type) or _codec_of(message_type)
        converted = codec(data, 1)
        return converted if isinstance(converted, Message) else message_type(**converted)
    except _Bad as bad:
        raise invalid_argument(bad.path() or where, bad.problem) from None
    except (_TooDeep, RecursionError):
        raise invalid_argument(where, _TOO_DEEP) from None
    except Exception:
        # A case the converters missed: still the client's input, so still a 400.
        log.warning("decoding a %s failed unexpectedly", message_type.DESCRIPTOR.full_name, exc_info=True)
        raise invalid_argument(where, f"not a valid {message_type.DESCRIPTOR.full_name}") from None


class _Bad(Exception):
    """A value the mapping refuses; ``segments`` is its field path, innermost first."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.segments: list[str] = []

    def at(self, segment: str) -> _Bad:
        self.segments.append(segment)
        return self

    def path(self) -> str:
        text = ""
        for segment in reversed(self.segments):
            text += segment if not text or segment.startswith("[") else "." + segment
        return text


class _TooDeep(Exception):
    pass


Convert = Callable[[Any, int], Any]  # (JSON value, its message level if a message) → constructor argument
_SKIP = object()  # a null that leaves the field unset


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shown(text: Any, limit: int = 64) -> str:
    """Client text quoted for an error message: bounded, and encodable (a lone surrogate
    becomes its escape)."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def _got(value: Any) -> str:
    return (
        _shown(value)
        if isinstance(value, str)
        else repr(value)
        if isinstance(value, (int, float))
        else _kind(value)
    )


# Scalars.


def _string(value: Any, depth: int = 0) -> str:
    if type(value) is not str:
        raise _Bad(f"expected a string, got {_kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad("is not valid UTF-8 (it holds an unpaired surrogate)") from None
    return value


def _bool(value: Any, depth: int = 0) -> bool:
    if type(value) is not bool:
        raise _Bad(f"expected true or false, got {_got(value)}")
    return value


_NOT_BASE64 = "is not valid base64 (standard or URL-safe alphabet, padding optional)"
_FROM_URLSAFE = str.maketrans("-_", "+/")


def _bytes(value: Any, depth: int = 0) -> bytes:
    """Base64 in either alphabet, padded or not, and nothing else (no whitespace, no stray
    characters). Like protobuf's own upb parser, and the OpenAPI document's input pattern, a
    character of either alphabet is read wherever it appears."""
    if type(value) is not str:
        raise _Bad(f"expected a base64 string, got {_kind(value)}")
    text = value.translate(_FROM_URLSAFE) if "-" in value or "_" in value else value
    if extra := len(text) % 4:
        if extra == 1 or "=" in text:
            raise _Bad(_NOT_BASE64)
        text += "=" * (4 - extra)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _Bad(_NOT_BASE64) from None


# A JSON number, as the mapping also accepts it inside a string; an integer without exponent.
_NUMBER_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INT_TEXT = re.compile(r"-?(?:0|[1-9][0-9]{0,19})")


def _integer(low: int, high: int, name: str) -> Convert:
    bounds = decimal.Decimal(low), decimal.Decimal(high)

    def convert(value: Any, depth: int = 0) -> int:
        kind = type(value)
        if kind is int:
            number = value
        elif kind is str:
            if _INT_TEXT.fullmatch(value):
                number = int(value)
            elif _NUMBER_TEXT.fullmatch(value):
                exact = decimal.Decimal(value)
                if not bounds[0] <= exact <= bounds[1]:
                    raise _Bad(f"{_shown(value)} is out of range for {name}")
                if exact != exact.to_integral_value():
                    raise _Bad(f"expected an integer, got {_shown(value)}")
                number = int(exact)
            else:
                raise _Bad(f"expected an integer, got {_shown(value)}")
        elif kind is float:
            if not value.is_integer():
                raise _Bad(f"expected an integer, got {value!r}")
            number = int(value)
        else:
            raise _Bad(f"expected an integer, got {_kind(value)}")
        if low <= number <= high:
            return number
        raise _Bad(f"{_got(value)} is out of range for {name}")

    return convert


_FLOAT32_MAX = 3.4028234663852886e38
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _floating(single: bool) -> Convert:
    name = "float" if single else "double"

    def convert(value: Any, depth: int = 0) -> float:
        kind = type(value)
        if kind is float:
            number = value
            if math.isnan(number):
                raise _Bad('expected a number; NaN is written "NaN"')
        elif kind is int:
            try:
                number = float(value)
            except OverflowError:
                raise _Bad(f"{value!r} is out of range for {name}") from None
        elif kind is str:
            special = _SPECIAL_FLOATS.get(value)
            if special is not None:
                return special
            if not _NUMBER_TEXT.fullmatch(value):
                raise _Bad(f"expected a number, got {_shown(value)}")
            number = float(value)
        else:
            raise _Bad(f"expected a number, got {_kind(value)}")
        if math.isinf(number) or (single and abs(number) > _FLOAT32_MAX):
            raise _Bad(f"{_got(value)} is out of range for {name}")
        return number

    return convert


_INT32 = _integer(-(2**31), 2**31 - 1, "int32")
_INTEGERS = {
    F.TYPE_INT32: _INT32,
    F.TYPE_SINT32: _INT32,
    F.TYPE_SFIXED32: _INT32,
    F.TYPE_UINT32: _integer(0, 2**32 - 1, "uint32"),
    F.TYPE_FIXED32: _integer(0, 2**32 - 1, "uint32"),
    F.TYPE_INT64: _integer(-(2**63), 2**63 - 1, "int64"),
    F.TYPE_SINT64: _integer(-(2**63), 2**63 - 1, "int64"),
    F.TYPE_SFIXED64: _integer(-(2**63), 2**63 - 1, "int64"),
    F.TYPE_UINT64: _integer(0, 2**64 - 1, "uint64"),
    F.TYPE_FIXED64: _integer(0, 2**64 - 1, "uint64"),
}
_SCALARS: dict[int, Convert] = {
    **_INTEGERS,
    F.TYPE_DOUBLE: _floating(False),
    F.TYPE_FLOAT: _floating(True),
    F.TYPE_BOOL: _bool,
    F.TYPE_STRING: _string,
    F.TYPE_BYTES: _bytes,
}


def _enum(enum: EnumDescriptor) -> Convert:
    names = {v.name: v.number for v in enum.values}
    closed = enum.is_closed

    def convert(value: Any, depth: int = 0) -> int:
        if type(value) is str:
            number = names.get(value)
            if number is None:
                raise _Bad(f"{_shown(value)} is not a value of {enum.full_name}")
            return number
        if type(value) is not int and type(value) is not float:
            raise _Bad(f"expected a {enum.full_name} name, got {_kind(value)}")
        number = _INT32(value)
        if closed and number not in enum.values_by_number:
            raise _Bad(f"{number} is not a value of {enum.full_name}")
        return number

    return convert


def _map_key(field: FieldDescriptor) -> Callable[[str], Any]:
    if field.type == F.TYPE_STRING:
        return _string
    if field.type == F.TYPE_BOOL:

        def boolean(key: str) -> bool:
            if key not in ("true", "false"):
                raise _Bad(f'expected the key "true" or "false", got {_shown(key)}')
            return key == "true"

        return boolean
    return _INTEGERS[field.type]


# Well-known types: each is its own JSON form, converted to a built message.

_DURATION = re.compile(r"(-)?(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,9}))?s")
_DURATION_MAX = 315_576_000_000
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?(?:Z|([+-])([0-9]{2}):([0-9]{2}))"
)
_TIMESTAMP_MIN, _TIMESTAMP_MAX = -62_135_596_800, 253_402_300_799  # 0001-01-01 … 9999-12-31
_EPOCH_DAY = datetime.date(1970, 1, 1).toordinal()
_UPPER = re.compile(r"[A-Z]")
_FIELD_PATH = r"[a-z][a-zA-Z0-9]*(?:\.[a-z][a-zA-Z0-9]*)*"
_FIELD_MASK = re.compile(rf"(?:{_FIELD_PATH}(?:,{_FIELD_PATH})*)?")  # lowerCamelCase paths


def _duration(value: Any, depth: int = 0) -> duration_pb2.Duration:
    if depth > MAX_DEPTH:
        raise _TooDeep
    if type(value) is not str:
        raise _Bad(f'expected a duration such as "1.5s", got {_kind(value)}')
    found = _DURATION.fullmatch(value)
    if found is None:
        raise _Bad(f'expected a duration such as "1.5s", got {_shown(value)}')
    seconds, nanos = int(found[2]), int((found[3] or "").ljust(9, "0"))
    if seconds > _DURATION_MAX:
        raise _Bad(f"{_shown(value)} is out of range for a duration (±{_DURATION_MAX}s)")
    if found[1]:
        seconds, nanos = -seconds, -nanos
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _timestamp(value: Any, depth: int = 0) -> timestamp_pb2.Timestamp:
    expected = 'expected an RFC 3339 timestamp such as "2024-05-01T12:00:00Z"'
    if depth > MAX_DEPTH:
        raise _TooDeep
    if type(value) is not str:
        raise _Bad(f"{expected}, got {_kind(value)}")
    found = _TIMESTAMP.fullmatch(value)
    if found is None:
        raise _Bad(f"{expected}, got {_shown(value)}")
    year, month, day, hour, minute, second = (int(found[i]) for i in range(1, 7))
    try:
        day_number = datetime.date(year, month, day).toordinal() - _EPOCH_DAY
        datetime.time(hour, minute, second)
    except ValueError:
        raise _Bad(f"{_shown(value)} is not a valid date and time") from None
    seconds = day_number * 86_400 + hour * 3_600 + minute * 60 + second
    if found[8]:
        offset_hours, offset_minutes = int(found[9]), int(found[10])
        if offset_hours > 23 or offset_minutes > 59:
            raise _Bad(f"{_shown(value)} has an invalid UTC offset")
        offset = (offset_hours * 60 + offset_minutes) * 60
        seconds += -offset if found[8] == "+" else offset
    if not _TIMESTAMP_MIN <= seconds <= _TIMESTAMP_MAX:
        raise _Bad(f"{_shown(value)} is out of range for a timestamp (years 1 to 9999)")
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((found[7] or "").ljust(9, "0")))


def _field_mask(value: Any, depth: int = 0) -> field_mask_pb2.FieldMask:
    if depth > MAX_DEPTH:
        raise _TooDeep
    if type(value) is not str:
        raise _Bad(
            f'expected comma-separated lowerCamelCase field paths such as "a.fooBar,b", got {_kind(value)}'
        )
    if not _FIELD_MASK.fullmatch(value):
        raise _Bad(
            f'expected comma-separated lowerCamelCase field paths such as "a.fooBar,b", got {_shown(value)}'
        )
    paths = [_UPPER.sub(lambda m: "_" + m[0].lower(), path) for path in value.split(",")] if value else []
    return field_mask_pb2.FieldMask(paths=paths)


def _checked(value: Any, depth: int) -> Any:
    """``value`` when every part of it fits a google.protobuf.Value at nesting level ``depth``:
    finite numbers, UTF-8 strings, no message deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    kind = type(value)
    if kind is str:
        return _string(value)
    if kind is float or kind is int:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _Bad(f"{_got(value)} is not a finite number, which a google.protobuf.Value needs")
        return value
    if value is None or kind is bool:
        return value
    if kind is dict:
        return _checked_object(value, depth + 1)
    if kind is list:
        return _checked_array(value, depth + 1)
    raise _Bad(f"expected a JSON value, got {_kind(value)}")


def _checked_object(value: dict[str, Any], depth: int) -> dict[str, Any]:
    """A Struct at level ``depth``: its map entries one level down, their Values two."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    for key, item in value.items():
        try:
            _string(key)
            _checked(item, depth + 2)
        except _Bad as bad:
            raise bad.at(f"[{_shown(key)}]") from None
    return value


def _checked_array(value: list[Any], depth: int) -> list[Any]:
    """A ListValue at level ``depth``: its Values one level down."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    for index, item in enumerate(value):
        try:
            _checked(item, depth + 1)
        except _Bad as bad:
            raise bad.at(f"[{index}]") from None
    return value


def _value(value: Any, depth: int = 0) -> struct_pb2.Value:
    message = struct_pb2.Value()
    _checked(value, depth)
    if value is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, dict):
        message.struct_value.SetInParent()  # present even when empty
        message.struct_value.update(value)
    elif isinstance(value, list):
        message.list_value.SetInParent()
        message.list_value.extend(value)
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, str):
        message.string_value = value
    else:
        message.number_value = value
    return message


def _struct(value: Any, depth: int = 0) -> struct_pb2.Struct:
    if not isinstance(value, dict):
        raise _Bad(f"expected an object (google.protobuf.Struct), got {_kind(value)}")
    message = struct_pb2.Struct()
    message.update(_checked_object(value, depth))
    return message


def _list_value(value: Any, depth: int = 0) -> struct_pb2.ListValue:
    if not isinstance(value, list):
        raise _Bad(f"expected an array (google.protobuf.ListValue), got {_kind(value)}")
    message = struct_pb2.ListValue()
    message.extend(_checked_array(value, depth))
    return message


def _wrapper(message_class: type[Message]) -> Convert:
    convert = _SCALARS[message_class.DESCRIPTOR.fields_by_name["value"].type]

    def wrap(value: Any, depth: int = 0) -> Message:
        if depth > MAX_DEPTH:
            raise _TooDeep
        return message_class(value=convert(value, depth))

    return wrap


def _any(value: Any, depth: int = 0) -> any_pb2.Any:
    if not isinstance(value, dict):
        raise _Bad(f'expected an object with "@type" (google.protobuf.Any), got {_kind(value)}')
    if depth > MAX_DEPTH:
        raise _TooDeep
    if not value:
        return any_pb2.Any()
    type_url = value.get("@type")
    if type(type_url) is not str:
        raise _Bad(f"expected a type URL string, got {_kind(type_url)}").at("@type")
    _, slash, name = type_url.rpartition("/")
    try:
        if not slash or not name:
            raise KeyError(name)
        descriptor = descriptor_pool.Default().FindMessageTypeByName(_string(name))
    except (KeyError, TypeError):
        raise _Bad(f"{_shown(type_url)} names no message type this server knows").at("@type") from None
    message_class = GetMessageClass(descriptor)
    codec = _CODECS.get(message_class) or _codec_of(message_class)
    if descriptor.full_name in _WELL_KNOWN:
        for key in value:
            if key not in ("@type", "value"):
                raise _Bad(f'an Any holding a {descriptor.full_name} has only "@type" and "value"').at(key)
        if "value" not in value:
            raise _Bad(f'an Any holding a {descriptor.full_name} needs "value"')
        inner = value["value"]
        if inner is None and descriptor.full_name != _VALUE:
            raise _Bad(f"expected a {descriptor.full_name}, got null").at("value")
        try:
            converted = codec(inner, depth + 1)
        except _Bad as bad:
            raise bad.at("value") from None
    else:
        converted = codec({k: v for k, v in value.items() if k != "@type"}, depth + 1)
    built = converted if isinstance(converted, Message) else message_class(**converted)
    return any_pb2.Any(type_url=type_url, value=built.SerializeToString())


_VALUE = "google.protobuf.Value"
_WELL_KNOWN: dict[str, Convert] = {
    "google.protobuf.Duration": _duration,
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.FieldMask": _field_mask,
    _VALUE: _value,
    "google.protobuf.Struct": _struct,
    "google.protobuf.ListValue": _list_value,
    "google.protobuf.Any": _any,
    **{
        wrapper.DESCRIPTOR.full_name: _wrapper(wrapper)
        for wrapper in (
            wrappers_pb2.DoubleValue,
            wrappers_pb2.FloatValue,
            wrappers_pb2.Int64Value,
            wrappers_pb2.UInt64Value,
            wrappers_pb2.Int32Value,
            wrappers_pb2.UInt32Value,
            wrappers_pb2.BoolValue,
            wrappers_pb2.StringValue,
            wrappers_pb2.BytesValue,
        )
    },
}


# Messages and the fields that hold them.


def _null_of(field: FieldDescriptor) -> Any:
    """What a JSON null means for a singular field: unset, except for Value and NullValue."""
    if field.type == F.TYPE_MESSAGE and field.message_type.full_name == _VALUE:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if field.type == F.TYPE_ENUM and field.enum_type.full_name == "google.protobuf.NullValue":
        return struct_pb2.NULL_VALUE
    return _SKIP


def _single(field: FieldDescriptor) -> Convert:
    if field.type == F.TYPE_MESSAGE:
        return _codec(field.message_type)
    if field.type == F.TYPE_ENUM:
        return _enum(field.enum_type)
    return _SCALARS[field.type]


def _repeated(convert: Convert, null: Any) -> Convert:
    def convert_all(value: Any, depth: int) -> list[Any]:
        if not isinstance(value, list):
            raise _Bad(f"expected an array, got {_kind(value)}")
        result = []
        index = 0
        try:
            for index, item in enumerate(value):  # noqa: B007 - index names the failing element
                if item is not None:
                    result.append(convert(item, depth))  # each element is a field's value
                elif null is _SKIP:
                    raise _Bad("null is not allowed as an element of a repeated field")
                else:
                    result.append(null)
        except _Bad as bad:
            raise bad.at(f"[{index}]") from None
        return result

    return convert_all


def _map(key_field: FieldDescriptor, value_field: FieldDescriptor) -> Convert:
    convert_key, convert, null = _map_key(key_field), _single(value_field), _null_of(value_field)

    def convert_all(value: Any, depth: int) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"expected an object (a map), got {_kind(value)}")
        result: dict[Any, Any] = {}
        for key, item in value.items():
            try:
                converted_key = convert_key(key)
                if converted_key in result:
                    raise _Bad("the same map key is given twice")
                if item is not None:
                    result[converted_key] = convert(item, depth + 1)  # in a map entry, one level down
                elif null is _SKIP:
                    raise _Bad("null is not allowed as a map value")
                else:
                    result[converted_key] = null
            except _Bad as bad:
                raise bad.at(f"[{_shown(key)}]") from None
        return result

    return convert_all


class _MessageCodec:
    """A regular message: a JSON object, converted to a dict of constructor arguments."""

    __slots__ = ("descriptor", "fields")

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        # JSON key → (field name, JSON name, the other accepted key, converter, oneof, null meaning)
        self.fields: dict[str, tuple[str, str, str | None, Convert, str | None, Any]] | None = None

    def _table(self) -> dict[str, tuple[str, str, str | None, Convert, str | None, Any]]:
        table = {}
        for field in self.descriptor.fields:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                entry = field.message_type
                convert = _map(entry.fields_by_name["key"], entry.fields_by_name["value"])
                null = _SKIP
            elif field.is_repeated:
                convert = _repeated(_single(field), _null_of(field))
                null = _SKIP
            else:
                convert, null = _single(field), _null_of(field)
            oneof = field.containing_oneof.name if field.containing_oneof is not None else None
            names = {field.json_name, field.name}
            for key in names:
                other = next((n for n in names if n != key), None)
                table[key] = (field.name, field.json_name, other, convert, oneof, null)
        return table

    def __call__(self, value: Any, depth: int) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"expected an object ({self.descriptor.full_name}), got {_kind(value)}")
        if depth > MAX_DEPTH:
            raise _TooDeep
        fields = self.fields
        if fields is None:
            fields = self.fields = self._table()
        result: dict[str, Any] = {}
        oneofs: dict[str, str] | None = None
        for key, item in value.items():
            entry = fields.get(key)
            if entry is None:
                raise _Bad(f"{self.descriptor.full_name} has no field named {_shown(key)}").at(
                    _shown(key)[1:-1]
                )
            name, json_name, other, convert, oneof, null = entry
            if other is not None and other in value:
                raise _Bad(f'is given twice, as "{json_name}" and as "{name}"').at(json_name)
            if item is None:
                if null is _SKIP:
                    continue
                result[name] = null
            else:
                try:
                    result[name] = convert(item, depth + 1)
                except _Bad as bad:
                    raise bad.at(json_name) from None
            if oneof is not None:
                oneofs = {} if oneofs is None else oneofs
                if oneof in oneofs:
                    raise _Bad(f'only one field of "{oneof}" may be set; "{oneofs[oneof]}" is set too').at(
                        json_name
                    )
                oneofs[oneof] = json_name
        return result


_CODECS: dict[type[Message], Convert] = {}


def _codec(descriptor: Descriptor) -> Convert:
    return _WELL_KNOWN.get(descriptor.full_name) or _codec_of(GetMessageClass(descriptor))


def _codec_of(message_class: type[Message]) -> Convert:
    codec = _CODECS.get(message_class)
    if codec is None:
        descriptor = message_class.DESCRIPTOR
        codec = _CODECS[message_class] = _WELL_KNOWN.get(descriptor.full_name) or _MessageCodec(descriptor)
    return codec
