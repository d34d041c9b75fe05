"""Byte layout of the prediction queue rings: sizes, offsets and the checks on them.

Kept apart from ``shm.ring`` (the producer and consumer) so that read-only users such as
``shm.ring_search`` share one definition of a record; ``QueueRings`` documents the layout.
"""
from __future__ import annotations

import struct
import zlib
from typing import Final, NamedTuple

from shm.segment import COMMON_HEADER_SIZE, Segment, SegmentError

MAGIC: Final = b"SIRAQRNG"
LAYOUT_VERSION: Final = 2  # 2: records carry a crc32 and are 8-byte aligned

SPECIFIC_HEADER_SIZE: Final = 64
SLOT_HEADER_SIZE: Final = 128
RING_ALIGN: Final = 64
RECORD_HEADER_SIZE: Final = 8  # u32 payload length | u32 crc32 of the payload
RECORD_ALIGN: Final = 8  # a whole header always fits before the end of the data area
MAX_RING_BYTES: Final = 1 << 31

# Offsets inside one slot header. Producer fields share one cache line, consumer fields another.
WRITE_POS: Final = 0
RECORDS_WRITTEN: Final = 8
PRODUCER_EPOCH: Final = 16
PRODUCER_PID: Final = 24
READ_POS: Final = 64
RECORDS_READ: Final = 72

RINGS_HEADER: Final = struct.Struct("<IIQQ")  # slots, reserved, ring bytes, slot stride
RECORD_HEADER: Final = struct.Struct("<II")  # payload length, zlib.crc32(payload)
U64: Final = struct.Struct("<Q")
U32: Final = struct.Struct("<I")


class RingCorrupt(SegmentError):
    """A slot's positions are impossible: its header was damaged (see ``reset_damaged_slot``)."""


class RingLayout(NamedTuple):
    """Where each slot of a rings segment lives; parsed from and checked against a segment."""

    slots: int
    ring_bytes: int
    data_start: int

    @property
    def slot_stride(self) -> int:
        """Bytes from one slot header to the next."""
        return SLOT_HEADER_SIZE + self.ring_bytes

    def slot_base(self, slot: int) -> int:
        """Offset of a slot's header; raises IndexError for a slot that does not exist."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} outside [0, {self.slots})")
        return self.data_start + slot * self.slot_stride

    @classmethod
    def of(cls, segment: Segment) -> RingLayout:
        """Read the layout from a segment's own header, checking every size against the file."""
        if segment.buf[:len(MAGIC)] != MAGIC or segment.version != LAYOUT_VERSION:
            raise SegmentError(f"segment {segment.path} is not a rings segment of layout "
                               f"version {LAYOUT_VERSION}")
        header = segment.specific_header
        if len(header) != SPECIFIC_HEADER_SIZE:
            raise SegmentError(f"segment {segment.path}: rings header is {len(header)} bytes, "
                               f"expected {SPECIFIC_HEADER_SIZE}")
        slots, _reserved, ring_bytes, stride = RINGS_HEADER.unpack_from(header, 0)
        check_ring_bytes(ring_bytes, SegmentError)
        layout = cls(slots, ring_bytes, segment.header_size)
        if slots < 1 or stride != layout.slot_stride:
            raise SegmentError(f"segment {segment.path}: {slots} slots of stride {stride} "
                               f"do not match ring size {ring_bytes}: corrupt")
        if segment.size != layout.data_start + slots * stride:
            raise SegmentError(f"segment {segment.path} is {segment.size} bytes, its header "
                               f"says {layout.data_start + slots * stride}: corrupt")
        return layout


def segment_size(slots: int, ring_bytes: int) -> int:
    """Total bytes of a rings segment, headers included."""
    return COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE + slots * (SLOT_HEADER_SIZE + ring_bytes)


def record_size(payload_bytes: int) -> int:
    """Ring bytes one record occupies: 8-byte header + payload, rounded up to 8 bytes."""
    return (payload_bytes + RECORD_HEADER_SIZE + RECORD_ALIGN - 1) & -RECORD_ALIGN


def record_header(payload: bytes) -> bytes:
    """The 8 header bytes stored before ``payload`` (what ``RingWriter.append`` writes)."""
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload))


def load_u64(buf: object, offset: int) -> int:
    """One aligned 8-byte load."""
    return U64.unpack_from(buf, offset)[0]


def positions_possible(read_pos: int, write_pos: int, capacity: int) -> bool:
    """True when ``read_pos <= write_pos <= read_pos + capacity``, both on record boundaries.

    Positions off the 8-byte grid are impossible too: a record read there could have its
    header straddle the end of the data area (and read past it).
    """
    return (read_pos <= write_pos <= read_pos + capacity
            and not (read_pos | write_pos) % RECORD_ALIGN)


def check_positions(read_pos: int, write_pos: int, capacity: int, segment: Segment,
                    slot: int) -> None:
    """Raise RingCorrupt unless ``positions_possible``."""
    if not positions_possible(read_pos, write_pos, capacity):
        raise RingCorrupt(f"{segment.path} slot {slot}: read position {read_pos} and write "
                          f"position {write_pos} are impossible for a {capacity}-byte ring")


def check_ring_bytes(ring_bytes: int, error: type[Exception]) -> None:
    """Ring sizes are positive multiples of 64 below 2 GiB (lengths are u32)."""
    if not 0 < ring_bytes < MAX_RING_BYTES or ring_bytes % RING_ALIGN:
        raise error(f"ring_bytes {ring_bytes} must be a positive multiple of {RING_ALIGN} "
                    f"below {MAX_RING_BYTES}")
