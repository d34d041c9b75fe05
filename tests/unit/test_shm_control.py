"""Unit tests of the control block (shm/control.py), one process."""
from __future__ import annotations

import dataclasses
import os
import struct
import uuid
import zlib

import pytest

from shm.control import (
    GENERATION_AREA,
    LAYOUT_VERSION,
    ControlBlock,
    ControlCorrupt,
    ModelSlot,
    ProductEntry,
    buffer_stride,
)
from shm.segment import Segment, SegmentError

BUFFER_HEADER = struct.Struct("<QII")
ENTRY_BYTES = 1320  # layout version 2: the canary routing seed at offset 72


@pytest.fixture
def block(tmp_path):
    """A fresh control block under tmp_path, closed and unlinked afterwards."""
    control = ControlBlock.create("control", directory=str(tmp_path), max_products=4)
    try:
        yield control
    finally:
        control.close()
        control.unlink()
        assert os.listdir(tmp_path) == []


def attach(block: ControlBlock, readonly: bool = False) -> ControlBlock:
    return ControlBlock.attach(block.segment.name, os.path.dirname(block.segment.path),
                               readonly=readonly)


def model(n: int, **changes) -> ModelSlot:
    slot = ModelSlot(model_id=str(uuid.UUID(int=n)), version=f"1.{n}.0",
                     path=f"/var/lib/sira/models/{n}.onnx",
                     spec_path=f"/var/lib/sira/models/{n}.spec.json",
                     threshold=0.5 + n / 100, loaded_at=1_750_000_000.25 + n)
    return dataclasses.replace(slot, **changes)


def entry(product: str, **changes) -> ProductEntry:
    base = ProductEntry(product=product, production=model(1), canary=model(2),
                        canary_bp=1000, mode="canary", canary_seed=bytes(range(16)))
    return dataclasses.replace(base, **changes)


def buffer_offset(block: ControlBlock, generation: int) -> int:
    return (block.segment.header_size + GENERATION_AREA
            + (generation & 1) * buffer_stride(block.max_products))


def test_new_block_is_generation_zero_and_empty(block):
    assert block.generation() == 0
    assert block.read_table() == (0, {})


def test_publish_and_read_round_trip(block):
    table = {
        "fraud_score": entry("fraud_score"),
        "risk_é": entry("risk_é", canary=None, canary_bp=0, mode="shadow"),
        "p" * 64: entry("p" * 64, production=None,
                        canary=model(3, version="v" * 64, path="/" + "a" * 255,
                                     spec_path="s" * 256)),
    }
    generation = block.publish(table)
    assert generation == 1
    assert block.read_table() == (1, table)
    reader = attach(block, readonly=True)
    try:
        assert reader.read_table() == (1, table)
    finally:
        reader.close()


def test_each_publish_bumps_the_generation_and_replaces_the_table(block):
    for number in range(1, 6):
        table = {f"product{number}": entry(f"product{number}", canary_bp=number)}
        assert block.publish(table) == number
        assert block.generation() == number
        assert block.read_table() == (number, table)
    assert block.publish({}) == 6
    assert block.read_table() == (6, {})


def test_a_restarted_writer_continues_the_generation(block):
    block.publish({"a": entry("a")})
    block.publish({"b": entry("b")})
    successor = attach(block)
    try:
        assert successor.publish({"c": entry("c")}) == 3
    finally:
        successor.close()
    assert block.read_table() == (3, {"c": entry("c")})


def test_the_canary_seed_round_trips_and_stays_out_of_repr(block):
    seed = bytes.fromhex("00ff" * 8)
    table = {"a": entry("a", canary_seed=seed), "b": entry("b", canary=None, canary_bp=0)}
    block.publish(table)
    read = block.read_table()[1]
    assert read["a"].canary_seed == seed and read["b"].canary_seed == bytes(range(16))
    assert seed.hex() not in repr(read["a"]) and "canary_seed" not in repr(read["a"])
    assert ProductEntry("c", None).canary_seed == bytes(16)


def test_the_seed_sits_at_its_documented_offset(block):
    assert LAYOUT_VERSION == 2 and block.segment.version == 2
    block.publish({"a": entry("a", canary_seed=b"S" * 16)})
    body_at = buffer_offset(block, 1) + BUFFER_HEADER.size
    assert bytes(block.segment.buf[body_at + 72:body_at + 88]) == b"S" * 16
    assert bytes(block.segment.buf[body_at + ENTRY_BYTES:body_at + ENTRY_BYTES + 4]) == bytes(4)


def test_model_id_is_read_back_in_canonical_form(block):
    raw = uuid.uuid4()
    block.publish({"a": entry("a", production=model(1, model_id=str(raw).upper()))})
    assert block.read_table()[1]["a"].production.model_id == str(raw)


@pytest.mark.parametrize("table", [
    {f"p{n}": entry(f"p{n}") for n in range(5)},                  # more than max_products
    {"p" * 65: entry("p" * 65)},                                   # product too long
    {"": entry("")},                                               # empty product
    {"a": entry("b")},                                             # key differs from product
    {"a": entry("a", production=model(1, version="v" * 65))},
    {"a": entry("a", canary=model(1, path="/" * 257))},
    {"a": entry("a", canary=model(1, spec_path="é" * 129))},       # 258 bytes of UTF-8
    {"a": entry("a", production=model(1, model_id="not-a-uuid"))},
    {"a": entry("a", canary_bp=10_001)},
    {"a": entry("a", canary_bp=-1)},
    {"a": entry("a", mode="dark")},
    {"a": entry("a", canary_seed=b"short")},
    {"a": entry("a", canary_seed=bytes(17))},
    {"a": entry("a", canary_seed="0" * 16)},                       # text, not bytes
    {"a": entry("a", production=model(1, threshold=float("nan")))},
])
def test_publish_rejects_what_the_layout_cannot_hold(block, table):
    block.publish({"kept": entry("kept")})
    with pytest.raises(ValueError):
        block.publish(table)
    assert block.read_table() == (1, {"kept": entry("kept")})


def test_readonly_reader_cannot_publish(block):
    reader = attach(block, readonly=True)
    try:
        with pytest.raises(TypeError):
            reader.publish({})
    finally:
        reader.close()


def test_attach_rejects_bad_magic(block):
    block.segment.buf[0:8] = b"SIRAXXXX"
    with pytest.raises(SegmentError):
        attach(block)


def test_attach_rejects_a_header_of_another_layout(block):
    block.segment.buf[64:68] = struct.pack("<I", 5)  # claims 5 products
    with pytest.raises(SegmentError):
        attach(block)


def test_damaged_table_bytes_raise_control_corrupt(block):
    block.publish({"a": entry("a")})
    at = buffer_offset(block, 1) + BUFFER_HEADER.size + 10
    block.segment.buf[at:at + 1] = b"\xff"
    with pytest.raises(ControlCorrupt):
        block.read_table()


def test_buffer_of_another_generation_raises_control_corrupt(block):
    block.publish({"a": entry("a")})
    at = buffer_offset(block, 1)
    block.segment.buf[at:at + 8] = struct.pack("<Q", 7)
    with pytest.raises(ControlCorrupt):
        block.read_table()


def test_count_over_the_limit_raises_control_corrupt(block):
    block.publish({"a": entry("a")})
    at = buffer_offset(block, 1)
    generation, _count, crc = BUFFER_HEADER.unpack_from(block.segment.buf, at)
    block.segment.buf[at:at + BUFFER_HEADER.size] = BUFFER_HEADER.pack(generation, 99, crc)
    with pytest.raises(ControlCorrupt):
        block.read_table()


@pytest.mark.parametrize("offset, value", [
    (0, b"\x41"),        # product length 65
    (65, b"\x04"),       # unknown flag
    (66, b"\xff\xff"),   # canary bp 65535
    (68, b"\x09"),       # unknown mode
    (88 + 16, b"\xff"),  # production version length 255
    (1, b"\xff"),        # product name not UTF-8
])
def test_impossible_fields_with_a_valid_crc_raise_control_corrupt(block, offset, value):
    block.publish({"a": entry("a")})
    at = buffer_offset(block, 1)
    generation, count, _crc = BUFFER_HEADER.unpack_from(block.segment.buf, at)
    body_at = at + BUFFER_HEADER.size
    block.segment.buf[body_at + offset:body_at + offset + len(value)] = value
    body = block.segment.buf[body_at:body_at + ENTRY_BYTES * count]
    block.segment.buf[at:at + BUFFER_HEADER.size] = BUFFER_HEADER.pack(
        generation, count, zlib.crc32(body))
    with pytest.raises(ControlCorrupt):
        block.read_table()


def test_context_manager_unlinks_the_file(tmp_path):
    with ControlBlock.create("ctl", directory=str(tmp_path)) as control:
        assert control.publish({"a": entry("a")}) == 1
    assert os.listdir(tmp_path) == []


def test_control_block_refuses_a_segment_of_another_kind(tmp_path):
    with Segment.create("other", 4096, b"SIRAOTHR", 1, directory=str(tmp_path),
                        header=bytes(64)) as other:
        with pytest.raises(SegmentError):
            ControlBlock(other)
