"""The control block: the generation counter and the table of live models, per product.

One writer (the supervisor) publishes whole tables; many readers (the HTTP workers) read the
generation on every request and decode the table only when it moved. Readers never block and
never see a half-written table: the writer fills the inactive half of a double buffer, then
publishes with one aligned 8-byte store of the new generation (a seqlock whose odd/even is the
buffer index). A reader copies the active buffer and re-reads the generation; if it moved, the
copy may be torn and the reader retries.

Limits: one writer at a time (a restarted supervisor continues the generation it finds); not
thread safe; relies on the store order of x86-64 (a CRC over each buffer turns a torn read on
a weakly ordered CPU into ``ControlCorrupt`` rather than a wrong table).
"""
from __future__ import annotations

import math
import struct
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
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

MAGIC: Final = b"SIRACTRL"
LAYOUT_VERSION: Final = 2  # 2: a canary routing seed in each entry
DEFAULT_MAX_PRODUCTS: Final = 16
MAX_BASIS_POINTS: Final = 10_000
MODES: Final = ("canary", "shadow")

PRODUCT_BYTES: Final = 64
VERSION_BYTES: Final = 64
PATH_BYTES: Final = 256
SEED_BYTES: Final = 16
ZERO_SEED: Final = bytes(SEED_BYTES)
SPECIFIC_HEADER_SIZE: Final = 64
GENERATION_AREA: Final = 64  # the generation alone in its cache line
MAX_READ_ATTEMPTS: Final = 10_000

_HAS_PRODUCTION: Final = 1
_HAS_CANARY: Final = 2

_CONTROL_HEADER = struct.Struct("<III")  # max products, entry size, buffer stride
_U64 = struct.Struct("<Q")
_BUFFER_HEADER = struct.Struct("<QII")  # generation of the content, product count, crc32
_SLOT_FORMAT = "16sB64sH256sH256sdd3x"
_ENTRY = struct.Struct("<B64sBHB3x16s" + _SLOT_FORMAT * 2)
_HEAD_FIELDS: Final = 6  # product len, product, flags, canary bp, mode, seed
_SLOT_FIELDS: Final = 9
_ZERO_SLOT: Final = (bytes(16), 0, b"", 0, b"", 0, b"", 0.0, 0.0)


class ControlCorrupt(SegmentError):
    """The control block holds a table that cannot be valid: its bytes were damaged."""


@dataclass(frozen=True)
class ModelSlot:
    """One loaded model: which one, where its files are and its decision threshold."""

    model_id: str      # a UUID; read back in canonical lowercase form
    version: str       # up to 64 bytes UTF-8
    path: str          # model file, up to 256 bytes UTF-8
    spec_path: str     # feature spec file, up to 256 bytes UTF-8
    threshold: float
    loaded_at: float   # unix time


@dataclass(frozen=True)
class ProductEntry:
    """Per product: the production and canary models and how traffic reaches the canary."""

    product: str                 # up to 64 bytes UTF-8
    production: ModelSlot | None
    canary: ModelSlot | None = None
    canary_bp: int = 0           # share of traffic for the canary in basis points, 0-10000
    mode: str = "canary"         # "canary" (serves its share) or "shadow" (scored, not served)
    # The canary's routing seed (app/scoring/routing.py): 16 bytes, kept out of repr so that a
    # logged entry never shows it.
    canary_seed: bytes = field(default=ZERO_SEED, repr=False)


class ControlBlock(SegmentBacked):
    """Generation counter and model table in one segment; one writer, many readers.

    Binary layout (all integers little-endian, offsets in bytes)::

        0 .. 64       common segment header (shm.segment): magic b"SIRACTRL", layout version 2
        64 .. 128     control header: max products u32 | entry size u32 | buffer stride u32 | 0..
        128           generation u64, then zeros to 192 (its own cache line)
        192           buffer 0 (tables of even generations)
        192 + stride  buffer 1 (tables of odd generations)

        one buffer:
        0           8         12        16
        +-----------+---------+---------+---------------------------------------+
        | generation| count   | crc32 of| count entries of 1320 bytes, then     |
        | of content| u32     | entries | zeros up to max products               |
        +-----------+---------+---------+---------------------------------------+

        one entry (1320 bytes):
        product len u8 | product 64s | flags u8 (1 production, 2 canary) | canary bp u16 |
        mode u8 (0 canary, 1 shadow) | 3 pad | canary routing seed 16s |
        production slot (616) | canary slot (616)

        layout version 1 had no seed (entries of 1304 bytes); the seed keys the canary's bucket
        hash, so clients cannot compute which events the canary gets.

        one slot (616 bytes):
        model id 16s (uuid bytes) | version len u8 | version 64s | path len u16 | path 256s |
        spec len u16 | spec path 256s | threshold f64 | loaded at f64 | 3 pad

    Publish: write the inactive buffer (index ``(generation + 1) % 2``) whole, then store the
    new generation. Read: load the generation g, copy buffer ``g % 2``, load the generation
    again; equal means the writer never touched that buffer during the copy (it writes it only
    for g + 2, after publishing g + 1). Generation 0 is the empty table of a new block.
    """

    def __init__(self, segment: Segment) -> None:
        """Wrap a mapped control segment; use ``create`` or ``attach`` instead."""
        self.segment = segment
        self._buf = segment.buf
        if segment.buf[:len(MAGIC)] != MAGIC or segment.version != LAYOUT_VERSION:
            raise SegmentError(f"segment {segment.path} is not a control block of layout "
                               f"version {LAYOUT_VERSION}")
        header = segment.specific_header
        if len(header) != SPECIFIC_HEADER_SIZE:
            raise SegmentError(f"segment {segment.path}: control header is {len(header)} "
                               f"bytes, expected {SPECIFIC_HEADER_SIZE}")
        self.max_products, entry_size, self._stride = _CONTROL_HEADER.unpack_from(header, 0)
        if entry_size != _ENTRY.size or self._stride != buffer_stride(self.max_products):
            raise SegmentError(f"segment {segment.path}: entry size {entry_size} / buffer "
                               f"stride {self._stride} do not match this layout: corrupt")
        self._generation_at = segment.header_size
        self._buffers_at = segment.header_size + GENERATION_AREA
        if segment.size != self._buffers_at + 2 * self._stride:
            raise SegmentError(f"segment {segment.path} is {segment.size} bytes, its header "
                               f"says {self._buffers_at + 2 * self._stride}: corrupt")

    @classmethod
    def create(cls, name: str, directory: str = DEFAULT_DIRECTORY,
               max_products: int = DEFAULT_MAX_PRODUCTS) -> ControlBlock:
        """Create a zeroed block at generation 0 with an empty table."""
        if not 1 <= max_products <= 4096:
            raise ValueError(f"max_products must be in [1, 4096], not {max_products}")
        stride = buffer_stride(max_products)
        header = _CONTROL_HEADER.pack(max_products, _ENTRY.size, stride)
        header += bytes(SPECIFIC_HEADER_SIZE - len(header))
        size = segment_size(max_products)
        segment = Segment.create(name, size, MAGIC, LAYOUT_VERSION, directory=directory,
                                 header=header)
        return built_over_new(segment, cls)

    @classmethod
    def attach(cls, name: str, directory: str = DEFAULT_DIRECTORY,
               readonly: bool = False) -> ControlBlock:
        """Map an existing block (workers may map it read-only; they never publish)."""
        segment = Segment.attach(name, MAGIC, LAYOUT_VERSION, directory=directory,
                                 readonly=readonly)
        return built_over_attached(segment, cls)

    def generation(self) -> int:
        """The current generation: the per-request check, one 8-byte load."""
        return _U64.unpack_from(self._buf, self._generation_at)[0]

    def read_table(self) -> tuple[int, dict[str, ProductEntry]]:
        """A consistent snapshot: (generation, {product: entry}); retries while it moves."""
        for _attempt in range(MAX_READ_ATTEMPTS):
            generation = self.generation()
            at = self._buffers_at + (generation & 1) * self._stride
            content_generation, count, crc = _BUFFER_HEADER.unpack_from(self._buf, at)
            start = at + _BUFFER_HEADER.size
            body = self._buf[start:start + min(count, self.max_products) * _ENTRY.size]
            if self.generation() != generation:
                continue  # the writer published during the copy: it may be torn
            self._check_buffer(generation, content_generation, count, crc, body)
            return generation, self._decode_table(body, count)
        raise ControlCorrupt(f"{self.segment.path}: the generation moved during "
                             f"{MAX_READ_ATTEMPTS} consecutive reads")

    def publish(self, table: Mapping[str, ProductEntry]) -> int:
        """Write a whole new table and make it current (writer only); returns its generation."""
        if len(table) > self.max_products:
            raise ValueError(f"{len(table)} products, the block holds at most "
                             f"{self.max_products}")
        body = b"".join(_encode_entry(key, entry) for key, entry in table.items())
        generation = self.generation() + 1
        at = self._buffers_at + (generation & 1) * self._stride
        self._buf[at:at + _BUFFER_HEADER.size + len(body)] = (
            _BUFFER_HEADER.pack(generation, len(table), zlib.crc32(body)) + body)
        # Publish: one aligned 8-byte store, after the whole buffer.
        self._buf[self._generation_at:self._generation_at + 8] = _U64.pack(generation)
        return generation

    def _check_buffer(self, generation: int, content_generation: int, count: int, crc: int,
                      body: bytes) -> None:
        """Raise ControlCorrupt unless a stable copy is the table of ``generation``, intact."""
        if content_generation != generation or count > self.max_products \
                or zlib.crc32(body) != crc:
            raise ControlCorrupt(f"{self.segment.path}: buffer of generation {generation} "
                                 f"holds generation {content_generation} with {count} "
                                 f"products, or fails its crc")

    def _decode_table(self, body: bytes, count: int) -> dict[str, ProductEntry]:
        """Decode ``count`` entries, checking every length, code and name."""
        table: dict[str, ProductEntry] = {}
        for index in range(count):
            entry = _decode_entry(_ENTRY.unpack_from(body, index * _ENTRY.size), self.segment)
            if entry.product in table:
                raise ControlCorrupt(f"{self.segment.path}: product {entry.product!r} twice")
            table[entry.product] = entry
        return table


def buffer_stride(max_products: int) -> int:
    """Bytes of one table buffer, rounded up to a cache line."""
    return (_BUFFER_HEADER.size + max_products * _ENTRY.size + 63) & ~63


def segment_size(max_products: int) -> int:
    """Total bytes of a control segment, headers included."""
    return (COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE + GENERATION_AREA
            + 2 * buffer_stride(max_products))


def _encode_entry(key: str, entry: ProductEntry) -> bytes:
    """Pack one product entry, raising ValueError for anything the layout cannot hold."""
    if key != entry.product:
        raise ValueError(f"table key {key!r} differs from its entry's product "
                         f"{entry.product!r}")
    product = _encode_text(entry.product, PRODUCT_BYTES, "product")
    if not product:
        raise ValueError("product must not be empty")
    if not (isinstance(entry.canary_bp, int) and 0 <= entry.canary_bp <= MAX_BASIS_POINTS):
        raise ValueError(f"canary_bp {entry.canary_bp!r} must be an int in "
                         f"[0, {MAX_BASIS_POINTS}]")
    if entry.mode not in MODES:
        raise ValueError(f"mode {entry.mode!r} must be one of {MODES}")
    if not (isinstance(entry.canary_seed, bytes) and len(entry.canary_seed) == SEED_BYTES):
        raise ValueError(f"canary_seed must be {SEED_BYTES} bytes")
    flags = ((_HAS_PRODUCTION if entry.production else 0)
             | (_HAS_CANARY if entry.canary else 0))
    return _ENTRY.pack(len(product), product, flags, entry.canary_bp, MODES.index(entry.mode),
                       entry.canary_seed, *_slot_fields(entry.production),
                       *_slot_fields(entry.canary))


def _slot_fields(slot: ModelSlot | None) -> tuple:
    """The struct fields of one model slot (zeros for an empty slot)."""
    if slot is None:
        return _ZERO_SLOT
    try:
        model_id = uuid.UUID(str(slot.model_id)).bytes
    except ValueError:
        raise ValueError(f"model_id {slot.model_id!r} is not a UUID") from None
    version = _encode_text(slot.version, VERSION_BYTES, "version")
    path = _encode_text(slot.path, PATH_BYTES, "path")
    spec_path = _encode_text(slot.spec_path, PATH_BYTES, "spec_path")
    for label, number in (("threshold", slot.threshold), ("loaded_at", slot.loaded_at)):
        if not math.isfinite(number):
            raise ValueError(f"{label} must be a finite number, not {number!r}")
    return (model_id, len(version), version, len(path), path, len(spec_path), spec_path,
            float(slot.threshold), float(slot.loaded_at))


def _encode_text(text: str, limit: int, label: str) -> bytes:
    """UTF-8 bytes of a string field, at most ``limit`` of them."""
    data = text.encode("utf-8")
    if len(data) > limit:
        raise ValueError(f"{label} is {len(data)} bytes of UTF-8, the limit is {limit}: "
                         f"{text[:40]!r}...")
    return data


def _decode_entry(fields: tuple, segment: Segment) -> ProductEntry:
    """Build a ProductEntry from unpacked fields, raising ControlCorrupt on bad bytes."""
    product_len, product, flags, canary_bp, mode, seed = fields[:_HEAD_FIELDS]
    if not 0 < product_len <= PRODUCT_BYTES or flags > 3 or canary_bp > MAX_BASIS_POINTS \
            or mode >= len(MODES):
        raise ControlCorrupt(f"{segment.path}: entry with product length {product_len}, "
                             f"flags {flags}, canary bp {canary_bp}, mode {mode}")
    production = (fields[_HEAD_FIELDS:_HEAD_FIELDS + _SLOT_FIELDS] if flags & _HAS_PRODUCTION
                  else None)
    canary = fields[_HEAD_FIELDS + _SLOT_FIELDS:] if flags & _HAS_CANARY else None
    return ProductEntry(
        product=_decode_text(product, product_len, segment),
        production=None if production is None else _decode_slot(production, segment),
        canary=None if canary is None else _decode_slot(canary, segment),
        canary_bp=canary_bp, mode=MODES[mode], canary_seed=seed)


def _decode_slot(fields: tuple, segment: Segment) -> ModelSlot:
    """Build a ModelSlot from its unpacked fields."""
    (model_id, version_len, version, path_len, path, spec_len, spec_path, threshold,
     loaded_at) = fields
    if version_len > VERSION_BYTES or path_len > PATH_BYTES or spec_len > PATH_BYTES:
        raise ControlCorrupt(f"{segment.path}: slot string lengths {version_len}, "
                             f"{path_len}, {spec_len} out of bounds")
    return ModelSlot(model_id=str(uuid.UUID(bytes=model_id)),
                     version=_decode_text(version, version_len, segment),
                     path=_decode_text(path, path_len, segment),
                     spec_path=_decode_text(spec_path, spec_len, segment),
                     threshold=threshold, loaded_at=loaded_at)


def _decode_text(data: bytes, length: int, segment: Segment) -> str:
    """The first ``length`` bytes as UTF-8."""
    try:
        return data[:length].decode("utf-8")
    except UnicodeDecodeError:
        raise ControlCorrupt(f"{segment.path}: a string field is not UTF-8") from None
