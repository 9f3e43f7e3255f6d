"""The pipeline's REQUIRED-field check (``app.methods.RequiredFields``), worked out once per
request type, against the plain walk of the descriptors it replaces: for any request of any
method, both refuse the same first field or neither refuses."""

from __future__ import annotations

from typing import Any

import pytest
from google.api import field_behavior_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.methods import Method, all_methods
from prism.errors import PrismError, invalid_argument
from prism.v1 import transact_pb2

METHODS = all_methods()


def walked(message: Message, prefix: str = "") -> None:
    """The reference: every REQUIRED field of the message, then each set singular message
    field's, depth first, asking the descriptors as it goes."""
    for field in message.DESCRIPTOR.fields:
        if field_behavior_pb2.REQUIRED not in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
            continue
        if field.is_repeated:
            present = len(getattr(message, field.name)) > 0
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            present = message.HasField(field.name)
        else:
            present = bool(getattr(message, field.name))
        if not present:
            raise invalid_argument(prefix + field.json_name, "is required")
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            walked(value, f"{prefix}{field.json_name}.")


def outcome(check: object) -> str | None:
    try:
        check()  # type: ignore[operator]
    except PrismError as exc:
        return exc.message
    return None


@st.composite
def requests(draw: st.DrawFn, method: Method) -> Message:
    """A request of ``method`` with any of its fields set or left empty, nested messages too."""

    def fill(message: Message, depth: int) -> None:
        for field in message.DESCRIPTOR.fields:
            if not draw(st.booleans()):
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                nested = field.message_type
                if nested.GetOptions().map_entry or nested.full_name.startswith("google.protobuf.") or depth > 3:
                    continue
                if field.is_repeated:
                    fill(getattr(message, field.name).add(), depth + 1)
                else:
                    child = getattr(message, field.name)
                    child.SetInParent()
                    fill(child, depth + 1)
            elif field.is_repeated:
                if field.type == FieldDescriptor.TYPE_STRING:
                    getattr(message, field.name).append(draw(st.sampled_from(["", "x"])))
            elif field.type == FieldDescriptor.TYPE_STRING:
                setattr(message, field.name, draw(st.sampled_from(["", "x"])))
            elif field.type == FieldDescriptor.TYPE_BYTES:
                setattr(message, field.name, draw(st.sampled_from([b"", b"x"])))
            elif field.type == FieldDescriptor.TYPE_BOOL:
                setattr(message, field.name, draw(st.booleans()))
            elif field.type == FieldDescriptor.TYPE_ENUM:
                setattr(message, field.name, draw(st.sampled_from([v.number for v in field.enum_type.values])))
            elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
                setattr(message, field.name, draw(st.sampled_from([0.0, 1.5])))
            else:
                setattr(message, field.name, draw(st.sampled_from([0, 3])))

    request = method.request_type()
    fill(request, 0)
    return request


@pytest.mark.parametrize("method", METHODS, ids=[m.path for m in METHODS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_check_refuses_what_the_walk_refuses(method: Method, data: st.DataObject) -> None:
    request = data.draw(requests(method))
    required = method.required_fields
    assert outcome(lambda: required.check(request) if required else None) == outcome(lambda: walked(request))


def test_fields_are_named_with_their_path() -> None:
    write = next(m for m in METHODS if m.path == "/prism.v1.TransactService/Write")
    assert write.required_fields is not None
    request = transact_pb2.WriteRequest()
    request.data.row.update({"id": "1"})
    request.mailbox.mailbox = "orders"
    with pytest.raises(PrismError) as missing:
        write.required_fields.check(request)
    assert missing.value.field == "data.table"
    request.data.table = "orders"
    write.required_fields.check(request)  # mailbox set, data.table set: nothing else is REQUIRED


def test_a_request_type_without_required_fields_has_no_check() -> None:
    for method in METHODS:
        assert (method.required_fields is None) == (not _holds_required(method.request_type.DESCRIPTOR, set())), method.path
    assert sum(m.required_fields is None for m in METHODS) > 0  # the health check, for one


def _holds_required(descriptor: Any, seen: set[str]) -> bool:
    """Whether a REQUIRED field can be reached through singular message fields."""
    if descriptor.full_name in seen:
        return False
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        if field_behavior_pb2.REQUIRED in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
            return True
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and _holds_required(field.message_type, seen):
            return True
    return False
