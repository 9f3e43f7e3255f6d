"""The fast JSON encoder prints exactly what protobuf's json_format prints, for every message."""

from __future__ import annotations

import random

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message

from app.methods import PROTO_MODULES
from app.transports.json_encoder import encoder


def all_message_types() -> list[type[Message]]:
    found: dict[str, type[Message]] = {}

    def visit(cls: type[Message]) -> None:
        found.setdefault(cls.DESCRIPTOR.full_name, cls)
        for nested in cls.DESCRIPTOR.nested_types:
            if not nested.GetOptions().map_entry:
                visit(getattr(cls, nested.name))

    for module in PROTO_MODULES:
        for name in module.DESCRIPTOR.message_types_by_name:
            visit(getattr(module, name))
    return list(found.values())


def fill(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Set a random subset of fields, including nested, repeated, map and oneof ones."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for i in range(rng.randint(0, 2)):
                target = getattr(message, field.name)
                if value_field.type == F.TYPE_MESSAGE:
                    fill(target[f"k{i}"], rng, depth + 1)
                else:
                    target[f"k{i}"] = scalar(value_field, rng)
        elif field.type == F.TYPE_MESSAGE:
            if depth > 3 or field.message_type.full_name.startswith("google.protobuf.Value"):
                continue
            if field.is_repeated:
                for _ in range(rng.randint(0, 2)):
                    item = getattr(message, field.name).add()
                    if not field.message_type.full_name.startswith("google.protobuf."):
                        fill(item, rng, depth + 1)
            elif field.message_type.full_name == "google.protobuf.Duration":
                getattr(message, field.name).FromNanoseconds(rng.randint(0, 10**12))
            elif field.message_type.full_name == "google.protobuf.Timestamp":
                getattr(message, field.name).FromNanoseconds(rng.randint(0, 2 * 10**18))
            elif field.message_type.full_name.startswith("google.protobuf."):
                getattr(message, field.name).SetInParent()
            else:
                fill(getattr(message, field.name), rng, depth + 1)
                getattr(message, field.name).SetInParent()
        elif field.is_repeated:
            getattr(message, field.name).extend(scalar(field, rng) for _ in range(rng.randint(0, 3)))
        else:
            setattr(message, field.name, scalar(field, rng))


def scalar(field, rng: random.Random):
    if field.type == F.TYPE_STRING:
        return rng.choice(["", "a", "ключ/🙂", "x" * 20])
    if field.type == F.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
    if field.type == F.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == F.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice([0.0, 1.5, -2.25])
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice([0, -1, 2**62])
    if field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice([0, 2**63])
    if field.type in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice([0, 7, 2**31])
    return rng.choice([0, -7, 2**30])


@pytest.mark.parametrize("message_type", all_message_types(), ids=lambda t: t.DESCRIPTOR.full_name)
def test_fast_encoder_matches_json_format(message_type: type[Message]) -> None:
    rng = random.Random(message_type.DESCRIPTOR.full_name)
    for _ in range(25):
        message = message_type()
        fill(message, rng)
        expected = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        assert encoder(message.DESCRIPTOR)(message) == expected
