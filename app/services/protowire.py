"""Protobuf wire format pieces for the services that encode their responses themselves
(Reader pages, PubSub batches): varints."""

from __future__ import annotations


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
