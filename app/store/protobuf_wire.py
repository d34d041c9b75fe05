"""The protobuf wire format, as much of it as reading and rewriting an ONNX file's tensors needs.

The serving path does not depend on the protobuf package (onnxruntime reads its models itself), so
app/store/shared_weights.py walks and rebuilds the few ONNX messages it moves tensors out of with these
functions: fields of a message, varints, tags and length-delimited fields.
"""
from __future__ import annotations

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # wire types


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def fields(data: memoryview):
    """Yield (field number, wire type, start, end, value) for each field of a message.

    The value is an int for varints and fixed-width fields, a memoryview for length-delimited ones.
    """
    at, size = 0, len(data)
    while at < size:
        start = at
        key, at = read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, at = read_varint(data, at)
        elif wire == LENGTH:
            length, at = read_varint(data, at)
            if at + length > size:
                raise ProtobufError("truncated protobuf: a field runs past its message")
            value, at = data[at:at + length], at + length
        elif wire == FIXED64:
            value, at = int.from_bytes(data[at:at + 8], "little"), at + 8
        elif wire == FIXED32:
            value, at = int.from_bytes(data[at:at + 4], "little"), at + 4
        else:
            raise ProtobufError(f"unsupported protobuf wire type {wire}")
        if number == 0 or at > size:
            raise ProtobufError("corrupt protobuf")
        yield number, wire, start, at, value


def read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise ProtobufError("corrupt protobuf varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def packed_varints(data: memoryview) -> list[int]:
    values, at = [], 0
    while at < len(data):
        value, at = read_varint(data, at)
        values.append(value)
    return values


def varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # negative int64: ten bytes, as protobuf encodes them
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_field(number: int, payload: bytes) -> bytes:
    return tag(number, LENGTH) + varint(len(payload)) + payload
