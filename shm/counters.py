"""A counter block: a segment of u64 cells, each written by one process and read by any.

The prediction log keeps its figures here (rows written, batch size, flush latency, spool bytes,
overflows per worker slot, ...) so that whoever serves metrics reads them from any process without
asking the writer. Which cell means what is the caller's table; this module only stores numbers.
"""
from __future__ import annotations

import struct
import sys
from typing import Final

from shm.segment import (
    COMMON_HEADER_SIZE,
    DEFAULT_DIRECTORY,
    Segment,
    SegmentBacked,
    SegmentError,
    built_over_attached,
    built_over_new,
)

MAGIC: Final = b"SIRACNTR"
LAYOUT_VERSION: Final = 1
SPECIFIC_HEADER_SIZE: Final = 64
CELL_SIZE: Final = 8
MAX_CELLS: Final = 1 << 22  # 32 MiB: the model stats of 256 workers need about 3 MiB

_HEADER = struct.Struct("<I")  # number of cells
_U64 = struct.Struct("<Q")


class CounterBlock(SegmentBacked):
    """``cells`` unsigned 64-bit counters in one shared segment.

    Binary layout (little-endian)::

        0 .. 64      common segment header (shm.segment): magic b"SIRACNTR", layout version 1
        64 .. 128    cells u32 | zeros
        128 ..       cell 0 u64 | cell 1 u64 | ...      (each 8-byte aligned)

    Guarantees and limits: a cell has one writer process at a time (``set`` and ``add`` are a
    load and one aligned 8-byte store, not atomic against a second writer); readers never block
    and see either the old or the new value of a cell, never a mix. Values wrap at 2**64. Not
    thread safe. Ownership follows ``Segment``: ``create`` owns and unlinks, ``attach`` maps.
    """

    def __init__(self, segment: Segment) -> None:
        """Wrap a mapped counter segment; use ``create`` or ``attach`` instead."""
        header = segment.specific_header
        if segment.buf[:len(MAGIC)] != MAGIC or len(header) != SPECIFIC_HEADER_SIZE:
            raise SegmentError(f"segment {segment.path} is not a counter block")
        (cells,) = _HEADER.unpack_from(header, 0)
        if not 0 < cells <= MAX_CELLS or segment.size != segment.header_size + cells * CELL_SIZE:
            raise SegmentError(f"segment {segment.path}: {cells} cells do not match its "
                               f"{segment.size} bytes: corrupt")
        self.segment = segment
        self.cells = cells
        self._buf = segment.buf
        self._data = segment.header_size

    @classmethod
    def create(cls, name: str, cells: int, directory: str = DEFAULT_DIRECTORY) -> CounterBlock:
        """Create a block of ``cells`` zeroed counters."""
        if not 0 < cells <= MAX_CELLS:
            raise ValueError(f"cells must be in [1, {MAX_CELLS}], not {cells}")
        header = _HEADER.pack(cells) + bytes(SPECIFIC_HEADER_SIZE - _HEADER.size)
        size = COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE + cells * CELL_SIZE
        segment = Segment.create(name, size, MAGIC, LAYOUT_VERSION, directory=directory,
                                 header=header)
        return built_over_new(segment, cls)

    @classmethod
    def attach(cls, name: str, directory: str = DEFAULT_DIRECTORY) -> CounterBlock:
        """Map an existing block after checking magic, version and size."""
        segment = Segment.attach(name, MAGIC, LAYOUT_VERSION, directory=directory)
        return built_over_attached(segment, cls)

    def _at(self, cell: int) -> int:
        """Byte offset of a cell; IndexError outside the block."""
        if not 0 <= cell < self.cells:
            raise IndexError(f"cell {cell} outside [0, {self.cells})")
        return self._data + cell * CELL_SIZE

    def get(self, cell: int) -> int:
        """The cell's current value."""
        return _U64.unpack_from(self._buf, self._at(cell))[0]

    def set(self, cell: int, value: int) -> None:
        """Store a value (one aligned 8-byte store; the cell's one writer only)."""
        at = self._at(cell)
        self._buf[at:at + CELL_SIZE] = _U64.pack(value & 0xFFFFFFFFFFFFFFFF)

    def add(self, cell: int, delta: int = 1) -> int:
        """Add to a cell and return the new value (the cell's one writer only)."""
        at = self._at(cell)
        value = (_U64.unpack_from(self._buf, at)[0] + delta) & 0xFFFFFFFFFFFFFFFF
        self._buf[at:at + CELL_SIZE] = _U64.pack(value)
        return value

    def cells_view(self) -> memoryview:
        """The cells as a writable ``memoryview`` of u64 (native order, little-endian on the CPUs we
        run on): ``view[cell] += 1`` is one aligned 8-byte store. Release it before ``close``."""
        if sys.byteorder != "little":
            raise SegmentError("counter cells are little-endian; a native view needs a little-endian CPU")
        return memoryview(self._buf)[self._data:self._data + self.cells * CELL_SIZE].cast("Q")

    def snapshot(self) -> list[int]:
        """Every cell, in order (each read on its own: cells are not a consistent set)."""
        return list(struct.unpack_from(f"<{self.cells}Q", self._buf, self._data))
