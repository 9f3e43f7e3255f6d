"""The REST/SSE JSON decoder (``app.transports.json_codec``): protobuf's canonical JSON mapping,
exactly, for every field type in every position; anything else is INVALID_ARGUMENT naming the
field (JSON names, ``entries[1].value``), never a server error.

``ALL_TYPES`` is a test-only message with every scalar, enum, nested message and well-known
type as a singular, a repeated and a map field, every map key type and a oneof; it joins the
default descriptor pool so ``Any`` can name it."""

from __future__ import annotations

import base64
import json
import uuid

import grpc
import httpx
import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from app.transports import json_codec
from prism.errors import PrismError
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import reader_pb2 as rd
from tests.clients import GrpcClient
from tests.conftest import open_session

# --- a message with every kind of field -------------------------------------------------------

_FD = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "int32": _FD.TYPE_INT32, "int64": _FD.TYPE_INT64, "uint32": _FD.TYPE_UINT32, "uint64": _FD.TYPE_UINT64,
    "sint32": _FD.TYPE_SINT32, "sint64": _FD.TYPE_SINT64, "fixed32": _FD.TYPE_FIXED32,
    "fixed64": _FD.TYPE_FIXED64, "sfixed32": _FD.TYPE_SFIXED32, "sfixed64": _FD.TYPE_SFIXED64,
    "float": _FD.TYPE_FLOAT, "double": _FD.TYPE_DOUBLE, "bool": _FD.TYPE_BOOL, "string": _FD.TYPE_STRING,
    "bytes": _FD.TYPE_BYTES,
}  # fmt: skip
WELL_KNOWN = {
    "any": any_pb2.Any, "duration": duration_pb2.Duration, "timestamp": timestamp_pb2.Timestamp,
    "field_mask": field_mask_pb2.FieldMask, "struct": struct_pb2.Struct, "value": struct_pb2.Value,
    "list_value": struct_pb2.ListValue, "empty": empty_pb2.Empty,
    "double_value": wrappers_pb2.DoubleValue, "float_value": wrappers_pb2.FloatValue,
    "int64_value": wrappers_pb2.Int64Value, "uint64_value": wrappers_pb2.UInt64Value,
    "int32_value": wrappers_pb2.Int32Value, "uint32_value": wrappers_pb2.UInt32Value,
    "bool_value": wrappers_pb2.BoolValue, "string_value": wrappers_pb2.StringValue,
    "bytes_value": wrappers_pb2.BytesValue,
}  # fmt: skip
KEY_TYPES = [k for k in SCALARS if k not in ("float", "double", "bytes")]


def _build_all_types() -> type[Message]:
    pool = descriptor_pool.Default()
    try:
        return GetMessageClass(pool.FindMessageTypeByName("prism.test.AllTypes"))
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="prism/test/all_types.proto",
        package="prism.test",
        syntax="proto3",
        dependency=[
            f"google/protobuf/{m.DESCRIPTOR.file.name.rsplit('/', 1)[1]}" for m in WELL_KNOWN.values()
        ],
    )
    file.dependency[:] = sorted(set(file.dependency))
    colour = file.enum_type.add(name="Colour")
    for number, name in enumerate(["COLOUR_UNSPECIFIED", "COLOUR_RED", "COLOUR_GREEN"]):
        colour.value.add(name=name, number=number)
    nested = file.message_type.add(name="Nested")
    nested.field.add(name="a", number=1, type=_FD.TYPE_INT32, label=_FD.LABEL_OPTIONAL)
    nested.field.add(name="b", number=2, type=_FD.TYPE_BYTES, label=_FD.LABEL_OPTIONAL)
    nested.field.add(
        name="children",
        number=3,
        type=_FD.TYPE_MESSAGE,
        type_name=".prism.test.Nested",
        label=_FD.LABEL_REPEATED,
    )
    nested.field.add(
        name="all",
        number=4,
        type=_FD.TYPE_MESSAGE,
        type_name=".prism.test.AllTypes",
        label=_FD.LABEL_OPTIONAL,
    )
    message = file.message_type.add(name="AllTypes")
    kinds: dict[str, tuple[int, str]] = {name: (kind, "") for name, kind in SCALARS.items()}
    kinds["colour"] = (_FD.TYPE_ENUM, ".prism.test.Colour")
    kinds["null"] = (_FD.TYPE_ENUM, ".google.protobuf.NullValue")
    kinds["nested"] = (_FD.TYPE_MESSAGE, ".prism.test.Nested")
    for name, wkt in WELL_KNOWN.items():
        kinds[name] = (_FD.TYPE_MESSAGE, "." + wkt.DESCRIPTOR.full_name)
    number = 0

    def add(name: str, kind: int, type_name: str, label: int, oneof: int | None = None) -> None:
        nonlocal number
        number += 1
        field = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
        if oneof is not None:
            field.oneof_index = oneof

    def add_map(name: str, key: int, kind: int, type_name: str) -> None:
        entry_name = "".join(part.capitalize() for part in name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=key, label=_FD.LABEL_OPTIONAL)
        value = entry.field.add(name="value", number=2, type=kind, label=_FD.LABEL_OPTIONAL)
        if type_name:
            value.type_name = type_name
        add(name, _FD.TYPE_MESSAGE, f".prism.test.AllTypes.{entry_name}", _FD.LABEL_REPEATED)

    for name, (kind, type_name) in kinds.items():
        add(f"s_{name}", kind, type_name, _FD.LABEL_OPTIONAL)
        add(f"r_{name}", kind, type_name, _FD.LABEL_REPEATED)
        add_map(f"m_{name}", _FD.TYPE_STRING, kind, type_name)
    for key in KEY_TYPES:
        add_map(f"k_{key}", SCALARS[key], _FD.TYPE_STRING, "")
    message.oneof_decl.add(name="choice")
    add("o_string", _FD.TYPE_STRING, "", _FD.LABEL_OPTIONAL, oneof=0)
    add("o_nested", _FD.TYPE_MESSAGE, ".prism.test.Nested", _FD.LABEL_OPTIONAL, oneof=0)
    add("o_value", _FD.TYPE_MESSAGE, ".google.protobuf.Value", _FD.LABEL_OPTIONAL, oneof=0)
    pool.Add(file)
    return GetMessageClass(pool.FindMessageTypeByName("prism.test.AllTypes"))


ALL_TYPES = _build_all_types()
NESTED = GetMessageClass(ALL_TYPES.DESCRIPTOR.file.message_types_by_name["Nested"])


def parse(data: dict, message_type: type[Message] = ALL_TYPES) -> Message:
    return json_codec.parse_message(data, message_type)


def refused(data: dict, message_type: type[Message] = ALL_TYPES, where: str = "body") -> PrismError:
    with pytest.raises(PrismError) as caught:
        json_codec.parse_message(data, message_type, where)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.field and error.message.startswith(f"{error.field}: "), error.message
    assert error.to_json() != b'{"code":"INTERNAL","message":"failed to encode error","details":[]}'
    error.to_status().SerializeToString()  # the gRPC rich status encodes too
    return error


def sample() -> Message:
    """An ALL_TYPES with every field set to something other than its default."""
    message = ALL_TYPES()
    scalars = {
        "int32": -(2**31), "int64": -(2**63), "uint32": 2**32 - 1, "uint64": 2**64 - 1, "sint32": 7,
        "sint64": -(2**40), "fixed32": 2**31, "fixed64": 2**63, "sfixed32": -5, "sfixed64": 2**62,
        "float": 0.25, "double": -1.5e300, "bool": True, "string": "héllo \u2028 😀", "bytes": bytes(range(256)),
    }  # fmt: skip
    for name, value in scalars.items():
        setattr(message, f"s_{name}", value)
        getattr(message, f"r_{name}").extend([value, value])
        getattr(message, f"m_{name}")["k"] = value
    message.s_colour, message.r_colour[:], message.m_colour["k"] = 2, [1, 7], 1
    message.r_null.append(0)
    message.m_null["k"] = 0
    message.s_nested.a, message.s_nested.b = 1, b"\x00\xff"
    message.s_nested.children.add(a=2).all.s_string = "deep"
    message.r_nested.add(a=3)
    message.m_nested["k"].b = b"x"
    wkt: dict[str, Message] = {
        "duration": duration_pb2.Duration(seconds=-3, nanos=-500_000_000),
        "timestamp": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=1),
        "field_mask": field_mask_pb2.FieldMask(paths=["s_int32", "s_nested.a"]),
        "empty": empty_pb2.Empty(),
        "double_value": wrappers_pb2.DoubleValue(value=2.5),
        "float_value": wrappers_pb2.FloatValue(value=-0.5),
        "int64_value": wrappers_pb2.Int64Value(value=-(2**63)),
        "uint64_value": wrappers_pb2.UInt64Value(value=2**64 - 1),
        "int32_value": wrappers_pb2.Int32Value(value=-1),
        "uint32_value": wrappers_pb2.UInt32Value(value=1),
        "bool_value": wrappers_pb2.BoolValue(value=False),
        "string_value": wrappers_pb2.StringValue(value=""),
        "bytes_value": wrappers_pb2.BytesValue(value=b"\xfb\xff"),
    }
    struct = struct_pb2.Struct()
    struct.update({"a": [1, None, "x", {"b": True}], "": {}})
    wkt["struct"] = struct
    wkt["value"] = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(null_value=0)]))
    wkt["list_value"] = struct_pb2.ListValue(
        values=[struct_pb2.Value(string_value="s"), struct_pb2.Value(number_value=3)]
    )
    packed = any_pb2.Any()
    packed.Pack(kv.SetRequest(key="k", value=b"\x00v"))
    wkt["any"] = packed
    for name, value in wkt.items():
        getattr(message, f"s_{name}").CopyFrom(value)
        getattr(message, f"r_{name}").add().CopyFrom(value)
        getattr(message, f"m_{name}")["k"].CopyFrom(value)
    nested_any = any_pb2.Any()
    nested_any.Pack(wkt["duration"])
    message.r_any.add().Pack(nested_any)
    message.r_any.add().Pack(struct_pb2.Struct(fields={"one key": struct_pb2.Value(bool_value=True)}))
    message.r_any.add().Pack(wrappers_pb2.Int64Value(value=5))
    for key in KEY_TYPES:
        sample_key = {"bool": True, "string": "ключ"}.get(key, 1)
        getattr(message, f"k_{key}")[sample_key] = "v"
    message.o_value.string_value = "chosen"
    return message


# --- the canonical mapping, exactly -----------------------------------------------------------


def test_every_field_type_round_trips_through_the_canonical_json():
    message = sample()
    data = json_format.MessageToDict(message)
    assert parse(json.loads(json.dumps(data))) == message
    # json_format refuses the null elements it writes for a repeated NullValue (upb reads them)
    assert [data.pop("rNull"), data.pop("mNull")] == [[None], {"k": None}]
    assert parse(data) == json_format.ParseDict(data, ALL_TYPES())


def test_proto_field_names_are_accepted_too():
    assert parse({"s_int32": 5, "r_bytes": ["AA=="]}) == ALL_TYPES(s_int32=5, r_bytes=[b"\x00"])


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("sInt32", "12", 12),
        ("sInt32", 1e2, 100),
        ("sInt32", "1e2", 100),
        ("sInt32", "-0", 0),
        ("sInt64", "9223372036854775807", 2**63 - 1),
        ("sUint64", "18446744073709551615", 2**64 - 1),
        ("sInt64", "1.0e3", 1000),
        ("sDouble", "NaN", None),  # checked below: NaN != NaN
        ("sDouble", "-Infinity", float("-inf")),
        ("sDouble", "1.5", 1.5),
        ("sDouble", 3, 3.0),
        ("sFloat", "Infinity", float("inf")),
        ("sColour", "COLOUR_RED", 1),
        ("sColour", 2, 2),
        ("sColour", 9, 9),  # proto3 enums are open
        ("sBytes", "aGk", b"hi"),
        ("sBytes", "aGk=", b"hi"),
        ("sBytes", "-_8", b"\xfb\xff"),
        ("sBytes", "+/8=", b"\xfb\xff"),
        ("sBytes", "+_8", b"\xfb\xff"),  # either alphabet's characters anywhere, as upb reads them
        ("sBytes", "", b""),
        ("sString", "", ""),
        ("sNull", None, 0),
        ("sNull", "NULL_VALUE", 0),
    ],
)
def test_scalars_decode_by_the_mapping(field, value, expected):
    message = parse({field: value})
    name = ALL_TYPES.DESCRIPTOR.fields_by_camelcase_name[field].name
    got = getattr(message, name)
    if expected is None:
        assert got != got
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"sInt32": "1_000"}, "sInt32", "expected an integer"),
        ({"sInt32": " 1"}, "sInt32", "expected an integer"),
        ({"sInt32": "01"}, "sInt32", "expected an integer"),
        ({"sInt32": "+1"}, "sInt32", "expected an integer"),
        ({"sInt32": "١٢"}, "sInt32", "expected an integer"),  # Arabic-Indic digits: int() takes them
        ({"sInt32": 1.5}, "sInt32", "expected an integer"),
        ({"sInt32": True}, "sInt32", "expected an integer"),
        ({"sInt32": 2**31}, "sInt32", "out of range for int32"),
        ({"sUint32": -1}, "sUint32", "out of range for uint32"),
        ({"sInt64": "1e400"}, "sInt64", "out of range"),
        ({"sInt64": 10**400}, "sInt64", "out of range"),
        ({"sUint64": "1e-400"}, "sUint64", "expected an integer"),
        ({"sDouble": "nan"}, "sDouble", "expected a number"),
        ({"sDouble": "inf"}, "sDouble", "expected a number"),
        ({"sDouble": "1_0"}, "sDouble", "expected a number"),
        ({"sDouble": 10**400}, "sDouble", "out of range"),
        ({"sDouble": "1e400"}, "sDouble", "out of range"),
        ({"sDouble": float("inf")}, "sDouble", "out of range"),
        ({"sFloat": 1e39}, "sFloat", "out of range for float"),
        ({"sBool": "true"}, "sBool", "expected true or false"),
        ({"sBool": 1}, "sBool", "expected true or false"),
        ({"sString": 5}, "sString", "expected a string"),
        ({"sString": ["a"]}, "sString", "expected a string"),
        ({"sString": "\ud800"}, "sString", "surrogate"),
        ({"sColour": "RED"}, "sColour", "not a value of prism.test.Colour"),
        ({"sColour": 1.5}, "sColour", "expected an integer"),
        ({"sColour": True}, "sColour", "prism.test.Colour"),
        ({"sColour": 2**31}, "sColour", "out of range"),
        ({"sNested": 5}, "sNested", "expected an object (prism.test.Nested), got a number"),
        ({"sNested": "a"}, "sNested", "expected an object"),
        ({"sNested": [{}]}, "sNested", "expected an object"),
        ({"sNested": {"zz": 1}}, "sNested.zz", 'no field named "zz"'),
        ({"nope": 1}, "nope", 'prism.test.AllTypes has no field named "nope"'),
        ({"sInt32": 1, "s_int32": 2}, "sInt32", "given twice"),
        ({"oString": "a", "oNested": {}}, "oNested", 'only one field of "choice"'),
        ({"oValue": None, "oString": "a"}, "oString", 'only one field of "choice"'),  # a null Value is set
    ],
)
def test_values_the_mapping_refuses_name_the_field(data, field, fragment):
    error = refused(data)
    assert error.field == field
    assert fragment in error.message


def test_null_leaves_a_field_unset_and_does_not_count_for_its_oneof():
    message = parse({f"s{name.title().replace('_', '')}": None for name in [*SCALARS, "colour", "nested"]})
    assert message == ALL_TYPES()
    assert parse({"oString": None, "oNested": {"a": 1}}).WhichOneof("choice") == "o_nested"
    assert parse({"rInt32": None, "mString": None, "kBool": None}) == ALL_TYPES()


# --- regression: the known bugs, one test each ------------------------------------------------


def test_bug1_null_in_a_google_protobuf_value_field_is_a_null_value():
    """`null` for `google.protobuf.Value` (singular, repeated element, map value) is NULL_VALUE;
    `null` for the repeated field itself means empty. Both used to answer 500 (AttributeError)."""
    message = parse({"filter": {"condition": {"field": "", "value": None}}}, rd.CountRequest)
    assert message.filter.condition.value.WhichOneof("kind") == "null_value"
    message = parse({"filter": {"condition": {"field": "", "values": None}}}, rd.QueryRequest)
    assert message.filter.HasField("condition") and len(message.filter.condition.values) == 0
    message = parse({"filter": {"condition": {"values": [None, 1, "x", [], {}]}}}, rd.CountRequest)
    kinds = [v.WhichOneof("kind") for v in message.filter.condition.values]
    assert kinds == ["null_value", "number_value", "string_value", "list_value", "struct_value"]
    assert parse({"mValue": {"k": None}}).m_value["k"].WhichOneof("kind") == "null_value"
    assert parse({"sStruct": {"k": None}}).s_struct.fields["k"].WhichOneof("kind") == "null_value"
    assert parse({"sListValue": [None]}).s_list_value.values[0].WhichOneof("kind") == "null_value"


def test_bug1_null_elsewhere_in_repeated_and_map_fields_is_refused():
    for data, field in [
        ({"rInt32": [1, None]}, "rInt32[1]"),
        ({"rNested": [None]}, "rNested[0]"),
        ({"rDuration": [None]}, "rDuration[0]"),
        ({"rInt32Value": [None]}, "rInt32Value[0]"),
        ({"mString": {"k": None}}, 'mString["k"]'),
        ({"mNested": {"k": None}}, 'mNested["k"]'),
        ({"mAny": {"k": None}}, 'mAny["k"]'),
    ]:
        assert refused(data).field == field
    assert refused({"entries": [{"key": "a"}, None]}, kv.BatchSetRequest).field == "entries[1]"


def _nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [201, 950, 1_000, 5_000, 100_000])
def test_bug2_deep_json_is_400_naming_the_body(depth):
    """1,000 levels used to be a 500 (RecursionError in the JSON parser) where 950 was a 400."""
    for raw in (
        b'{"sValue": ' + b"[" * depth + b"]" * depth + b"}",
        b'{"x": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
    ):
        with pytest.raises(PrismError) as caught:
            json_codec.parse_body(raw)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.field == "body"
        assert "nested too deeply" in caught.value.message


def test_bug2_json_depth_limit_leaves_room_for_every_valid_request():
    """A chain of repeated messages takes two JSON levels per message: 100 messages fit."""
    chain: dict = {}
    for _ in range(98):
        chain = {"children": [chain]}
    raw = json.dumps({"sNested": chain}).encode()  # 198 JSON levels, 100 messages
    message = parse(json_codec.parse_body(raw))
    assert ALL_TYPES.FromString(message.SerializeToString()) == message
    assert json_codec.parse_body(b'{"sValue": ' + b"[" * 199 + b"]" * 199 + b"}")  # a JSON level short
    assert refused(json_codec.parse_body(b'{"sValue": ' + b"[" * 199 + b"]" * 199 + b"}")).field == "body"


def test_bug2_depth_limit_is_100_messages_as_protobuf_counts_them():
    """AllTypes is level 1, its sValue 2, and each JSON array inside a Value two more
    (ListValue, then the Value of an element): 49 arrays reach level 99, 50 would reach 101.
    Anything accepted can be serialized and read back by protobuf, whose decoder stops at 100
    levels too."""
    message = parse({"sValue": _nested_lists(49)})
    assert ALL_TYPES.FromString(message.SerializeToString()) == message
    assert refused({"sValue": _nested_lists(50)}).field == "body"

    def filters(levels: int) -> dict:
        nested: dict = {}
        for _ in range(levels):
            nested = {"and": {"filters": [nested]}}  # Filter → FilterList → Filter
        return nested

    message = parse({"filter": filters(49)}, rd.CountRequest)  # CountRequest 1, Filters 2 … 100
    assert rd.CountRequest.FromString(message.SerializeToString()) == message
    assert refused({"filter": filters(50)}, rd.CountRequest).field == "body"
    assert refused({"sStruct": json.loads('{"a":' * 40 + "1" + "}" * 40)}).field == "body"
    assert refused({"mNested": {"k": json.loads('{"children": [' * 120 + "{}" + "]}" * 120)}}).field == "body"
    deep_any = '{"@type": "type.googleapis.com/google.protobuf.Value", "value": ' + "[" * 60 + "]" * 60 + "}"
    assert refused({"sAny": json.loads(deep_any)}).field == "body"


def test_bug2_recursion_error_inside_the_decoder_is_still_400(monkeypatch):
    def explode(value, depth):
        raise RecursionError

    monkeypatch.setitem(json_codec._CODECS, kv.SetRequest, explode)
    error = refused({"key": "k"}, kv.SetRequest)
    assert error.field == "body"


def test_unexpected_failure_inside_the_decoder_is_400_naming_the_body(monkeypatch):
    def explode(value, depth):
        raise AttributeError("a bug")

    monkeypatch.setitem(json_codec._CODECS, kv.SetRequest, explode)
    error = refused({"key": "k"}, kv.SetRequest, where="query")
    assert error.field == "query" and "not a valid prism.v1.SetRequest" in error.message


@pytest.mark.parametrize(
    "text",
    [
        "hello world!",
        "AA=A",
        "A",
        "AAAAA",
        "AA==AA==",
        "AA=",
        "QQ= =",
        "QQ\n==",
        "Zm9v\u00e9",
        "=AAA",
        "AAA\x00",
    ],
)
def test_bug3_bytes_must_be_standard_or_url_safe_base64(text):
    error = refused({"value": text}, kv.SetRequest)
    assert error.field == "value" and "base64" in error.message


def test_bug3_bytes_are_checked_in_every_position():
    bad = "hello world!"
    cases = [
        (
            {"entries": [{"key": "a", "value": "AA=="}, {"key": "b", "value": bad}]},
            kv.BatchSetRequest,
            "entries[1].value",
        ),
        ({"rBytes": ["AA", bad]}, ALL_TYPES, "rBytes[1]"),
        ({"sNested": {"children": [{}, {"b": bad}]}}, ALL_TYPES, "sNested.children[1].b"),
        ({"mBytes": {"k": bad}}, ALL_TYPES, 'mBytes["k"]'),
        ({"sBytesValue": bad}, ALL_TYPES, "sBytesValue"),
        ({"rBytesValue": [bad]}, ALL_TYPES, "rBytesValue[0]"),
        ({"mBytesValue": {"k": bad}}, ALL_TYPES, 'mBytesValue["k"]'),
        (
            {"sAny": {"@type": "type.googleapis.com/google.protobuf.BytesValue", "value": bad}},
            ALL_TYPES,
            "sAny.value",
        ),
        (
            {"sAny": {"@type": "type.googleapis.com/prism.v1.SetRequest", "value": bad}},
            ALL_TYPES,
            "sAny.value",
        ),
    ]
    for data, message_type, field in cases:
        error = refused(data, message_type)
        assert (error.field, "base64" in error.message) == (field, True), error.message
    # path and query parameters go through the same decoder
    params = json_codec.text_params(
        ALL_TYPES.DESCRIPTOR, [("sBytes", "aGk"), ("rBytes", "-_8"), ("sNested.b", "AA==")]
    )
    assert parse(params) == ALL_TYPES(s_bytes=b"hi", r_bytes=[b"\xfb\xff"], s_nested=NESTED(b=b"\x00"))
    params = json_codec.text_params(ALL_TYPES.DESCRIPTOR, [("rBytes", "AA"), ("rBytes", bad)])
    assert refused(params, where="query").field == "rBytes[1]"
    assert (
        refused(json_codec.text_params(ALL_TYPES.DESCRIPTOR, [("sNested.b", bad)]), where="query").field
        == "sNested.b"
    )


WKT_VALID = [
    ("Duration", "1.5s", duration_pb2.Duration(seconds=1, nanos=500_000_000)),
    ("Duration", "-0.000000001s", duration_pb2.Duration(nanos=-1)),
    ("Duration", "315576000000s", duration_pb2.Duration(seconds=315_576_000_000)),
    ("Timestamp", "1970-01-01T00:00:00Z", timestamp_pb2.Timestamp()),
    (
        "Timestamp",
        "2024-02-29T23:59:59.5+01:30",
        timestamp_pb2.Timestamp(seconds=1_709_251_199 - 5_400, nanos=500_000_000),
    ),
    ("Timestamp", "0001-01-01T00:00:00Z", timestamp_pb2.Timestamp(seconds=-62_135_596_800)),
    ("FieldMask", "a.fooBar,b", field_mask_pb2.FieldMask(paths=["a.foo_bar", "b"])),
    ("FieldMask", "", field_mask_pb2.FieldMask()),
    ("Struct", {"a": 1, "b": [None, True]}, None),
    ("Value", 1.5, struct_pb2.Value(number_value=1.5)),
    ("Value", "s", struct_pb2.Value(string_value="s")),
    ("Value", False, struct_pb2.Value(bool_value=False)),
    ("Value", {}, struct_pb2.Value(struct_value=struct_pb2.Struct())),
    ("ListValue", [], struct_pb2.ListValue()),
    ("Empty", {}, empty_pb2.Empty()),
    ("Any", {}, any_pb2.Any()),
    ("Any", {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "2s"}, None),
    ("Any", {"@type": "type.googleapis.com/prism.v1.SetRequest", "key": "k", "value": "AA=="}, None),
    ("Any", {"@type": "x/google.protobuf.Value", "value": None}, None),
    ("Int64Value", "-9223372036854775808", wrappers_pb2.Int64Value(value=-(2**63))),
    ("UInt32Value", 7, wrappers_pb2.UInt32Value(value=7)),
    ("BoolValue", False, wrappers_pb2.BoolValue(value=False)),
    ("StringValue", "", wrappers_pb2.StringValue()),
    ("BytesValue", "AP8", wrappers_pb2.BytesValue(value=b"\x00\xff")),
    ("DoubleValue", "NaN", None),
    ("FloatValue", 1, wrappers_pb2.FloatValue(value=1)),
]


def _json_name(wkt: str, position: str) -> str:
    """The ALL_TYPES field holding well-known type ``wkt`` ("UInt32Value") in ``position``."""
    suffix = next(name for name, cls in WELL_KNOWN.items() if cls.DESCRIPTOR.name == wkt)
    return ALL_TYPES.DESCRIPTOR.fields_by_name[f"{position[0]}_{suffix}"].json_name


def _placed(value: object, position: str) -> object:
    return {"singular": value, "repeated": [value], "map": {"k": value}}[position]


@pytest.mark.parametrize(("wkt", "value", "expected"), WKT_VALID)
@pytest.mark.parametrize("position", ["singular", "repeated", "map"])
def test_bug4_well_known_types_decode_in_every_position(wkt, value, expected, position):
    """Equal to json_format's reading of the same canonical JSON, in every position."""
    json_name = _json_name(wkt, position)
    message = parse({json_name: _placed(value, position)})
    field = getattr(message, ALL_TYPES.DESCRIPTOR.fields_by_camelcase_name[json_name].name)
    got = field if position == "singular" else field[0] if position == "repeated" else field["k"]
    if wkt == "DoubleValue":  # NaN
        assert got.value != got.value
        return
    assert message == json_format.ParseDict({json_name: _placed(value, position)}, ALL_TYPES())
    if expected is not None:
        assert got == expected


WKT_INVALID = [
    ("Duration", 5, "expected a duration"),
    ("Duration", "5", "expected a duration"),
    ("Duration", "1.5 s", "expected a duration"),
    ("Duration", "1.s", "expected a duration"),
    ("Duration", "1.0000000001s", "expected a duration"),
    ("Duration", "+1s", "expected a duration"),
    ("Duration", "315576000001s", "out of range"),
    ("Duration", {"seconds": 1}, "expected a duration"),
    ("Timestamp", "2024-02-30T00:00:00Z", "not a valid date"),
    ("Timestamp", "2024-01-01T24:00:00Z", "not a valid date"),
    ("Timestamp", "2024-01-01t00:00:00z", "RFC 3339"),
    ("Timestamp", "2024-01-01T00:00:00", "RFC 3339"),
    ("Timestamp", "0001-01-01T00:00:00+00:01", "out of range"),
    ("Timestamp", "2024-01-01T00:00:00+24:00", "invalid UTC offset"),
    ("Timestamp", 0, "RFC 3339"),
    ("FieldMask", ["a"], "lowerCamelCase field paths"),
    ("FieldMask", "a_b", "lowerCamelCase field paths"),
    ("FieldMask", "a,,b", "lowerCamelCase field paths"),
    ("FieldMask", "A.b", "lowerCamelCase field paths"),
    ("Duration", "01s", "expected a duration"),
    ("Struct", [1], "expected an object"),
    ("Struct", "s", "expected an object"),
    ("Struct", {"a": float("inf")}, "finite"),
    ("Struct", {"a": 10**400}, "finite"),
    ("Struct", {"\ud800": 1}, "surrogate"),
    ("Value", float("nan"), "finite"),
    ("Value", ["\udfff"], "surrogate"),
    ("ListValue", {"values": []}, "expected an array"),
    ("ListValue", "x", "expected an array"),
    ("Empty", {"a": 1}, "no field named"),
    ("Empty", [], "expected an object"),
    ("Any", {"value": "AA=="}, "expected a type URL"),
    ("Any", {"@type": 5}, "expected a type URL"),
    ("Any", {"@type": ["x"]}, "expected a type URL"),
    ("Any", {"@type": "no-slash"}, "names no message type"),
    ("Any", {"@type": "type.googleapis.com/"}, "names no message type"),
    ("Any", {"@type": "type.googleapis.com/nothing.Here"}, "names no message type"),
    ("Any", {"@type": "type.googleapis.com/google.protobuf.Duration"}, 'needs "value"'),
    (
        "Any",
        {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s", "x": 1},
        'only "@type" and "value"',
    ),
    ("Any", {"@type": "type.googleapis.com/google.protobuf.Duration", "value": None}, "got null"),
    ("Any", {"@type": "type.googleapis.com/prism.v1.SetRequest", "nope": 1}, "no field named"),
    ("Any", "x", "expected an object"),
    ("Int32Value", "x", "expected an integer"),
    ("Int32Value", {"value": 1}, "expected an integer"),
    ("UInt64Value", -1, "out of range"),
    ("BoolValue", "true", "expected true or false"),
    ("StringValue", 1, "expected a string"),
    ("FloatValue", 1e39, "out of range"),
    ("DoubleValue", [], "expected a number"),
]


@pytest.mark.parametrize(("wkt", "value", "fragment"), WKT_INVALID)
@pytest.mark.parametrize("position", ["singular", "repeated", "map"])
def test_bug4_well_known_types_refuse_what_the_mapping_refuses(wkt, value, fragment, position):
    json_name = _json_name(wkt, position)
    error = refused({json_name: _placed(value, position)})
    field = json_name + {"singular": "", "repeated": "[0]", "map": '["k"]'}[position]
    assert error.field.startswith(field), (error.field, field)
    assert fragment in error.message, error.message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rInt32": 5}, "rInt32"),
        ({"rInt32": {"0": 1}}, "rInt32"),
        ({"mString": ["a"]}, "mString"),
        ({"mString": "a"}, "mString"),
        ({"kInt32": {"x": "v"}}, 'kInt32["x"]'),
        ({"kInt32": {"2147483648": "v"}}, 'kInt32["2147483648"]'),
        ({"kBool": {"True": "v"}}, 'kBool["True"]'),
        ({"kUint64": {"-1": "v"}}, 'kUint64["-1"]'),
        ({"kInt64": {"1": "a", "1e0": "b"}}, 'kInt64["1e0"]'),
        ({"mString": {"\ud800": "v"}}, 'mString["\\ud800"]'),
        ({"rNested": [{"a": 1}, 5]}, "rNested[1]"),
        ({"sNested": {"children": [{"children": {}}]}}, "sNested.children[0].children"),
        ({"sNested": {"all": {"sNested": {"a": "x"}}}}, "sNested.all.sNested.a"),
    ],
)
def test_wrong_json_types_anywhere_name_the_field(data, field):
    assert refused(data).field == field


def test_map_keys_by_the_mapping():
    message = parse(
        {
            "kInt32": {"-5": "a", "1e1": "b"},
            "kBool": {"true": "t", "false": "f"},
            "kUint64": {"18446744073709551615": "m"},
        }
    )
    assert dict(message.k_int32) == {-5: "a", 10: "b"}
    assert dict(message.k_bool) == {True: "t", False: "f"}
    assert dict(message.k_uint64) == {2**64 - 1: "m"}


def test_bug5_errors_name_the_field_path_in_json_names():
    error = refused({"entries": [{"key": "a"}, {"key": "b", "if_absent": "yes"}]}, kv.BatchSetRequest)
    assert error.field == "entries[1].ifAbsent"
    assert error.message.startswith("entries[1].ifAbsent: expected true or false")
    details = json.loads(error.to_json())
    assert details["code"] == "INVALID_ARGUMENT"
    violation = details["details"][0]
    assert violation["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert violation["fieldViolations"][0]["field"] == "entries[1].ifAbsent"


def test_client_text_in_messages_is_bounded_and_encodable():
    error = refused({"x" * 500 + "\ud800": 1})
    assert len(error.message) < 300
    json.loads(error.to_json())
    error = refused({"sColour": "\udcff" * 10})
    assert "\\udcff" in error.message


def test_text_params_convert_for_the_decoder():
    params = [("sBoolValue", "true"), ("sColour", "2"), ("rColour", "COLOUR_RED"), ("sDuration", "1s"),
              ("sInt64", "-7"), ("sNested.a", "3"), ("sTimestamp", "2024-01-01T00:00:00Z"), ("sValue", "v")]  # fmt: skip
    message = parse(json_codec.text_params(ALL_TYPES.DESCRIPTOR, params))
    assert message.s_bool_value.value is True and message.s_colour == 2 and list(message.r_colour) == [1]
    assert message.s_duration.seconds == 1 and message.s_int64 == -7 and message.s_nested.a == 3
    assert message.s_value.string_value == "v" and message.s_timestamp.seconds == 1_704_067_200
    for params, field in [
        ([("sNested", "x")], "sNested"),
        ([("sDuration.seconds", "1")], "sDuration.seconds"),
        ([("sNested.a", "1"), ("sNested", "x")], "sNested"),
        ([("sBool", "yes")], "sBool"),
        ([("nope", "1")], "nope"),
    ]:
        with pytest.raises(PrismError) as caught:
            json_codec.text_params(ALL_TYPES.DESCRIPTOR, params)
        assert caught.value.field == field
    assert (
        refused(json_codec.text_params(ALL_TYPES.DESCRIPTOR, [("sStruct", "x")]), where="query").field
        == "sStruct"
    )
    assert (
        refused(json_codec.text_params(ALL_TYPES.DESCRIPTOR, [("sInt32", "many")]), where="query").field
        == "sInt32"
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"a": NaN}', "NaN is not a JSON value"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"a": ' + b"1" * 5000 + b"}", "too many digits"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": "\xed\xa0\x80"}', "not UTF-8"),  # an encoded surrogate
        (b"[1]", "must be a JSON object, not an array"),
        (b"null", "must be a JSON object, not null"),
        (b'{"a": 1', "malformed JSON"),
    ],
)
def test_parse_body_refuses_what_is_not_json(raw, fragment):
    with pytest.raises(PrismError) as caught:
        json_codec.parse_body(raw)
    assert caught.value.field == "body" and fragment in caught.value.message


def test_parse_body_skips_a_utf8_byte_order_mark():
    assert json_codec.parse_body(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


# --- end to end, through a real gateway -------------------------------------------------------

ORIGINAL = b"original \x00 value"
KV = "/prism.v1.KeyValueService/"


@pytest.fixture
async def gateway_session(hypercorn_gateway):
    """An HTTP client with a session, and a key holding ORIGINAL, checked unchanged after."""
    client = GrpcClient(hypercorn_gateway.grpc_target)
    token = await open_session(client, "kv")
    key = f"decoding-{uuid.uuid4().hex}"
    await client.call(KV + "Set", kv.SetRequest(key=key, value=ORIGINAL), token)
    http = httpx.AsyncClient(
        base_url=hypercorn_gateway.base_url, headers={"x-prism-session": token}, timeout=30
    )
    yield http, key
    after = await client.call(KV + "Get", kv.GetRequest(key=key), token)
    assert after.value == ORIGINAL, "a refused request changed stored data"
    await http.aclose()
    await client.close()


def _assert_400(response: httpx.Response, field: str) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "INVALID_ARGUMENT"
    assert body["details"][0]["fieldViolations"][0]["field"] == field, body
    assert body["message"].startswith(f"{field}: ")
    return body


async def test_e2e_bug1_reader_null_value_body_is_not_a_server_error(gateway_session):
    http, _ = gateway_session
    for route in ("/v1/collections/x:count", "/v1/collections/x:query"):
        for condition in ({"field": "", "value": None}, {"field": "", "values": None}, {"values": [None]}):
            response = await http.post(
                route, json={"filter": {"condition": condition}}, headers={"accept": "text/event-stream"}
            )
            assert response.status_code < 500 or response.status_code == 501, response.text
            assert response.json()["code"] != "INTERNAL"


@pytest.mark.parametrize("depth", [950, 1_000, 100_000])
async def test_e2e_bug2_deeply_nested_json_is_400_naming_the_body(gateway_session, depth):
    http, key = gateway_session
    body = b'{"value": ' + b"[" * depth + b"]" * depth + b"}"
    body = _assert_400(
        await http.put(f"/v1/kv/{key}", content=body, headers={"content-type": "application/json"}), "body"
    )
    assert "nested too deeply" in body["message"]


async def test_e2e_bug3_bytes_that_are_not_base64_are_refused(gateway_session):
    http, key = gateway_session
    body = _assert_400(await http.put(f"/v1/kv/{key}", json={"value": "hello world!"}), "value")
    assert "base64" in body["message"]
    entries = [
        {"key": key, "value": base64.b64encode(b"new").decode()},
        {"key": key, "value": "hello world!"},
    ]
    _assert_400(await http.post("/v1/kv:batchSet", json={"entries": entries}), "entries[1].value")
    # URL-safe base64 without padding is the same bytes as standard base64 with it
    other = f"{key}-urlsafe"
    response = await http.put(
        f"/v1/kv/{other}", json={"value": base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode().rstrip("=")}
    )
    assert response.status_code == 200, response.text
    got = (await http.get(f"/v1/kv/{other}")).json()
    assert base64.b64decode(got["value"]) == b"\xfb\xff\xfe"
