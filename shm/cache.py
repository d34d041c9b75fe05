"""The cache segment: one response cache for every worker of a host, without a lock.

The master creates it before forking (``ShmCache.create``) and unlinks it at exit; workers
attach by name (or keep the inherited mapping). Keys are 16-byte digests made by the
caller with ``cache_key`` (put the model id and version among the parts, so a new model
never meets an old model's answer); values are opaque bytes of at most ``value_size``.

Size: about ``capacity * (value_size + 34, rounded up to 64, + 24)`` bytes of /dev/shm, e.g.
37.5 MiB for 65,536 entries of up to 512 bytes. Docker gives /dev/shm 64 MiB by default;
on Kubernetes mount an ``emptyDir`` with ``medium: Memory`` there.
"""
from __future__ import annotations

import hashlib
import struct
import time
from typing import Final

from shm.segment import (
    COMMON_HEADER_SIZE,
    DEFAULT_DIRECTORY,
    Segment,
    SegmentError,
    built_over_attached,
    built_over_new,
)

MAGIC: Final = b"SIRACACH"
LAYOUT_VERSION: Final = 1
KEY_SIZE: Final = 16
CHECKSUM_SIZE: Final = 8
MAX_VALUE_SIZE: Final = 0xFFFF
MAX_WAYS: Final = 64
MAX_CAPACITY: Final = 1 << 32
ALIGN: Final = 64

# n_buckets, ways, value_size, slot_size, bucket_size, (pad), ttl_ms, requested capacity
_CACHE_HEADER = struct.Struct("<IIIIII QQ")
_HEADER_SIZE: Final = COMMON_HEADER_SIZE + ALIGN  # data starts on a 64-byte boundary
# checksum, key, stored_at_ms, value length: the slot's head, the value follows
_SLOT_HEAD = struct.Struct("<8s16sQH")
_SLOT_BODY = struct.Struct("<16sQH")  # the checksummed head: key, stored_at_ms, length
_SLOT_HEAD_SIZE: Final = _SLOT_HEAD.size  # 34
_KEY_WORDS = struct.Struct("<QQ").unpack
_blake2b = hashlib.blake2b
_monotonic_ns = time.monotonic_ns


def cache_key(*parts: bytes) -> bytes:
    """A 16-byte key from byte strings, length-prefixed so ("ab", "c") != ("a", "bc")."""
    digest = _blake2b(digest_size=KEY_SIZE)
    for part in parts:
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(part)
    return digest.digest()


def monotonic_ms() -> int:
    """Milliseconds of CLOCK_MONOTONIC: one clock for every process of the host."""
    return _monotonic_ns() // 1_000_000


class ShmCache:
    """A fixed-capacity, set-associative cache with TTL and LRU-like eviction.

    Layout after the common ``Segment`` header (integers little-endian, W = ways)::

        64   cache header: n_buckets u32, ways u32, value_size u32, slot_size u32,
             bucket_size u32, pad u32, ttl_ms u64, requested capacity u64, zeros to 128
        128  bucket 0, bucket 1, ... bucket n_buckets-1, each ``bucket_size`` bytes:

        bucket  +-----------------+---------------------+--------------------+-----------------+
                | tags: W x u64   | accessed_ms: W x    | stored_at_ms: W x  | slots:          |
                | (0 = empty way) | u64                 | u64                | W x slot_size   |
                +-----------------+---------------------+--------------------+-----------------+
        slot    +-------------+---------+-----------------+-----------+----------------------+
                | checksum 8B | key 16B | stored_at_ms u64| length u16| value (value_size B) |
                +-------------+---------+-----------------+-----------+----------------------+
                checksum = blake2b, 8-byte digest, over key .. the last byte of the value

    A key (two u64 words k0, k1) lives in bucket ``k0 % n_buckets``, in any of its ways,
    tagged ``k1 | 1`` (never 0). The slot is the truth; tags and times only speed up the
    search and the choice of a victim, and may be stale.

    Concurrency, with no lock: a writer copies the whole slot in one slice assignment, then
    writes the tag and the times. A reader copies the slot once and accepts it only if the
    key matches, the entry is younger than ``ttl_ms`` and the checksum holds. So two writers
    interleaving in one slot, or a writer killed half-way, leave an entry that reads as a
    miss (a torn slot passes a 64-bit checksum once in 2**64) and that a later put replaces.
    A hit stores its time in the way's ``accessed_ms`` word, outside the checksum (racy,
    harmless). A put takes the key's own way, else an empty one, else the oldest one if it
    has expired, else the one read least recently (a put counts as a read).

    Not guaranteed: a put may be lost to a concurrent put in the same way; two concurrent
    puts of one new key may store it twice (reads find the first); ``clear`` racing with
    puts may let some survive. A handle is for one thread; a handle inherited across fork
    works in the child.
    """

    def __init__(self, segment: Segment) -> None:
        """Wrap a segment whose cache header was validated; use ``create`` or ``attach``."""
        (n_buckets, ways, value_size, slot_size, bucket_size, _pad, ttl_ms,
         requested) = _CACHE_HEADER.unpack_from(segment.buf, COMMON_HEADER_SIZE)
        self._segment = segment
        self._mm = segment.buf
        self._words = memoryview(segment.buf).cast("Q")  # aligned u64 stores
        self.n_buckets = n_buckets
        self.ways = ways
        self.capacity = n_buckets * ways
        self.requested_capacity = requested
        self.ttl_ms = ttl_ms
        self.value_size = value_size
        self._slot_size = slot_size
        self._bucket_size = bucket_size
        self._data_offset = segment.header_size
        self._times_offset = 8 * ways  # accessed_ms words, then stored_at_ms words
        self._slots_offset = 24 * ways
        self._tags = struct.Struct(f"<{ways}Q").unpack_from
        self._times = struct.Struct(f"<{2 * ways}Q").unpack_from

    @classmethod
    def create(cls, name: str, capacity: int, ttl_ms: int, value_size: int = 512,
               ways: int = 8, directory: str = DEFAULT_DIRECTORY) -> ShmCache:
        """Create the segment with room for at least ``capacity`` entries."""
        _check_parameters(capacity, ttl_ms, value_size, ways)
        n_buckets = -(-capacity // ways)
        slot_size = _slot_size(value_size)
        bucket_size = _bucket_size(ways, slot_size)
        header = _CACHE_HEADER.pack(n_buckets, ways, value_size, slot_size, bucket_size, 0,
                                    ttl_ms, capacity)
        header = header.ljust(_HEADER_SIZE - COMMON_HEADER_SIZE, b"\0")
        size = _HEADER_SIZE + n_buckets * bucket_size
        segment = Segment.create(name, size, MAGIC, LAYOUT_VERSION, directory, header=header)
        return built_over_new(segment, cls)

    @classmethod
    def attach(cls, name: str, directory: str = DEFAULT_DIRECTORY) -> ShmCache:
        """Attach to a cache created by another process, checking every recorded size."""
        segment = Segment.attach(name, MAGIC, LAYOUT_VERSION, directory)
        return built_over_attached(segment, cls, _check_cache_header)

    def get(self, key: bytes, now_ms: int | None = None) -> bytes | None:
        """The value stored under ``key``, or None (absent, expired, torn or corrupt)."""
        try:
            k0, k1 = _KEY_WORDS(key)
        except struct.error:
            raise ValueError(f"cache keys are {KEY_SIZE} bytes, got {len(key)}") from None
        base = self._data_offset + (k0 % self.n_buckets) * self._bucket_size
        tags = self._tags(self._mm, base)
        tag = k1 | 1
        if tag not in tags:
            return None  # the common miss: two unpacks and a scan of W ints
        way = tags.index(tag)
        if now_ms is None:
            now_ms = _monotonic_ns() // 1_000_000
        start = base + self._slots_offset + way * self._slot_size
        value = _verified_value(self._mm[start:start + self._slot_size], key, now_ms,
                                self.ttl_ms, self.value_size)
        if value is not None:
            self._words[base // 8 + self.ways + way] = now_ms
        return value

    def put(self, key: bytes, value: bytes, now_ms: int | None = None) -> bool:
        """Store ``value`` under ``key``; False when the value is longer than ``value_size``."""
        try:
            k0, k1 = _KEY_WORDS(key)
        except struct.error:
            raise ValueError(f"cache keys are {KEY_SIZE} bytes, got {len(key)}") from None
        length = len(value)
        if length > self.value_size:
            return False
        if now_ms is None:
            now_ms = _monotonic_ns() // 1_000_000
        base = self._data_offset + (k0 % self.n_buckets) * self._bucket_size
        tag = k1 | 1
        tags = self._tags(self._mm, base)
        if tag in tags:
            way = tags.index(tag)
        elif 0 in tags:
            way = tags.index(0)
        else:  # the steady state of a full cache
            way = self._victim(base, now_ms)
        body = _SLOT_BODY.pack(key, now_ms, length) + value
        # blake2b-64 costs ~0.4 us more than crc32 here (bench/bench_cache.py) and takes the
        # chance of accepting a torn slot from 2**-32 to 2**-64.
        slot = _blake2b(body, digest_size=CHECKSUM_SIZE).digest() + body
        start = base + self._slots_offset + way * self._slot_size
        self._mm[start:start + len(slot)] = slot  # one copy: readers see it whole or reject it
        words, ways, word = self._words, self.ways, base // 8 + way
        words[word] = tag
        words[word + ways] = now_ms  # accessed
        words[word + 2 * ways] = now_ms  # stored
        return True

    def clear(self) -> None:
        """Empty the cache (puts racing with it may survive)."""
        chunk = bytes(1 << 20)
        for start in range(self._data_offset, len(self._mm), len(chunk)):
            end = min(start + len(chunk), len(self._mm))
            self._mm[start:end] = chunk[:end - start]

    def count(self, now_ms: int | None = None) -> int:
        """Live entries that a get would return (reads every slot: for tests and metrics)."""
        if now_ms is None:
            now_ms = monotonic_ms()
        live = 0
        for bucket in range(self.n_buckets):
            base = self._data_offset + bucket * self._bucket_size
            for way, tag in enumerate(self._tags(self._mm, base)):
                if tag == 0:
                    continue
                start = base + self._slots_offset + way * self._slot_size
                slot = self._mm[start:start + self._slot_size]
                key = slot[CHECKSUM_SIZE:CHECKSUM_SIZE + KEY_SIZE]
                if ((_KEY_WORDS(key)[1] | 1) == tag and _verified_value(
                        slot, key, now_ms, self.ttl_ms, self.value_size) is not None):
                    live += 1
        return live

    def _victim(self, base: int, now_ms: int) -> int:
        """The way a put replaces in a full bucket: the oldest if expired, else the least read."""
        times = self._times(self._mm, base + self._times_offset)
        ways = self.ways
        stored = times[ways:]
        oldest = min(stored)
        if now_ms - oldest >= self.ttl_ms:
            return stored.index(oldest)
        accessed = times[:ways]
        return accessed.index(min(accessed))

    @property
    def segment(self) -> Segment:
        """The underlying segment (name, path, ownership)."""
        return self._segment

    def close(self) -> None:
        """Unmap the cache in this process (idempotent)."""
        if self._segment.closed:
            return
        self._words.release()
        self._segment.close()

    def unlink(self) -> None:
        """Remove the segment file (creator only, idempotent)."""
        self._segment.unlink()

    def __enter__(self) -> ShmCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creator also unlinks."""
        try:
            self.close()
        finally:
            if self._segment.is_owner:
                self.unlink()


def _verified_value(slot: bytes, key: bytes, now_ms: int, ttl_ms: int,
                    value_size: int) -> bytes | None:
    """The slot's value if it holds ``key``, is younger than the TTL and its checksum holds."""
    checksum, stored_key, stored_at, length = _SLOT_HEAD.unpack_from(slot)
    if stored_key != key or length > value_size or now_ms - stored_at >= ttl_ms:
        return None
    end = _SLOT_HEAD_SIZE + length
    if _blake2b(slot[CHECKSUM_SIZE:end], digest_size=CHECKSUM_SIZE).digest() != checksum:
        return None
    return slot[_SLOT_HEAD_SIZE:end]


def _slot_size(value_size: int) -> int:
    """Bytes of one slot: its head and the largest value, rounded to a cache line."""
    return _round_up(_SLOT_HEAD_SIZE + value_size, ALIGN)


def _bucket_size(ways: int, slot_size: int) -> int:
    """Bytes of one bucket: tags, times and slots."""
    return 24 * ways + ways * slot_size


def _check_parameters(capacity: int, ttl_ms: int, value_size: int, ways: int) -> None:
    """Refuse sizes the layout cannot record."""
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}], got {capacity}")
    if ttl_ms < 1:
        raise ValueError(f"ttl_ms must be at least 1, got {ttl_ms}")
    if not 1 <= value_size <= MAX_VALUE_SIZE:
        raise ValueError(f"value_size must be in [1, {MAX_VALUE_SIZE}], got {value_size}")
    if not 1 <= ways <= MAX_WAYS:
        raise ValueError(f"ways must be in [1, {MAX_WAYS}], got {ways}")


def _check_cache_header(segment: Segment) -> None:
    """Raise SegmentError unless the cache header describes exactly this segment."""
    (n_buckets, ways, value_size, slot_size, bucket_size, _pad, ttl_ms,
     requested) = _CACHE_HEADER.unpack_from(segment.buf, COMMON_HEADER_SIZE)
    problems = []
    if segment.header_size != _HEADER_SIZE:
        problems.append(f"header size {segment.header_size} != {_HEADER_SIZE}")
    if not 1 <= ways <= MAX_WAYS or not 1 <= value_size <= MAX_VALUE_SIZE or n_buckets < 1:
        problems.append(f"ways {ways}, value_size {value_size}, n_buckets {n_buckets}")
    if slot_size != _slot_size(value_size):
        problems.append(f"slot size {slot_size} for value size {value_size}")
    if bucket_size != _bucket_size(ways, slot_size):
        problems.append(f"bucket size {bucket_size}")
    if ttl_ms < 1 or not 1 <= requested <= n_buckets * ways:
        problems.append(f"ttl_ms {ttl_ms}, requested capacity {requested}")
    if segment.size != _HEADER_SIZE + n_buckets * bucket_size:
        problems.append(f"file size {segment.size} for {n_buckets} buckets of {bucket_size}")
    if problems:
        raise SegmentError(f"cache segment {segment.path} is corrupt: {'; '.join(problems)}")


def _round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple
