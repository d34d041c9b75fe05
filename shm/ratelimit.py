"""The rate-limit table: one token bucket per key, shared by every worker of a host.

The master creates it before forking (``RateLimitTable.create``) and unlinks it at exit; workers
attach by name. A key is a 16-byte digest made by the caller with ``rate_key`` (``app/auth/ratelimit.py``
hashes the role and the token's subject); a rate is (``interval_ns``, ``period_ns``): at most
``period_ns // interval_ns`` requests at once, then one per ``interval_ns``. Which key gets which
rate is the caller's business: this module knows nothing of roles or HTTP.

Algorithm: GCRA (the generic cell rate algorithm), a token bucket stored as one number per key,
its "theoretical arrival time" (TAT, CLOCK_MONOTONIC nanoseconds, one clock for every process of
the host). A request at ``now`` is admitted when ``max(TAT, now) + interval - period <= now``, and
then ``TAT = max(TAT, now) + interval``; a refused request changes nothing, so a client that keeps
hammering still gets its full rate, no more. A key whose TAT is in the past is back to a full
bucket: its slot is free to reuse, so the table needs no sweeping.

Size: 16 bytes a key, ``capacity`` keys (default 65,536: 1 MiB of /dev/shm).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import time
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

MAGIC: Final = b"SIRARATE"
LAYOUT_VERSION: Final = 1
SPECIFIC_HEADER_SIZE: Final = 64
KEY_SIZE: Final = 16
SLOT_SIZE: Final = 16
DEFAULT_CAPACITY: Final = 65_536
DEFAULT_WAYS: Final = 8
DEFAULT_STRIPES: Final = 64
MAX_WAYS: Final = 64
MAX_STRIPES: Final = 4096
MAX_CAPACITY: Final = 1 << 28

# n_buckets, ways, stripes, slot size, requested capacity
_HEADER = struct.Struct("<IIIIQ")
_SLOT = struct.Struct("<QQ")  # tag, TAT ns
_KEY_WORDS = struct.Struct("<QQ").unpack
_monotonic_ns = time.monotonic_ns
_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN


def rate_key(*parts: bytes) -> bytes:
    """A 16-byte key over ``parts``, each length-prefixed so that (b"ab", b"c") != (b"a", b"bc")."""
    digest = hashlib.blake2b(digest_size=KEY_SIZE)
    for part in parts:
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(part)
    return digest.digest()


class RateLimitTable(SegmentBacked):
    """A fixed-size, set-associative table of GCRA buckets, updated under a striped file lock.

    Binary layout after the common ``Segment`` header (integers little-endian, W = ways)::

        0 .. 64      common segment header (shm.segment): magic b"SIRARATE", layout version 1
        64 .. 128    n_buckets u32 | ways u32 | stripes u32 | slot size u32 (16) |
                     requested capacity u64 | zeros
        128 ..       bucket 0, bucket 1, ... bucket n_buckets-1, each W slots of 16 bytes:

        slot    +------------------------+-------------------------------+
                | tag u64 (0: never used)| TAT u64 (CLOCK_MONOTONIC ns)  |
                +------------------------+-------------------------------+

    A key (two u64 words k0, k1) lives in bucket ``k0 % n_buckets``, in any of its ways, tagged
    ``k1 | 1``. Two keys share a bucket entry only if both words collide (about 2**-64 a pair).

    Concurrency: every read and write of a bucket happens under an exclusive ``lockf`` lock on
    byte ``bucket % stripes`` of the segment file (an advisory POSIX record lock, outside the
    data: the lock and the mapping are independent). So two workers updating one key serialise
    and the count is exact. The kernel drops a process's locks when it dies, so a worker killed
    in the middle of a check blocks nobody; at worst the one 16-byte slot it was writing is
    torn, which reads as another key or as a TAT that is clamped (below). One check costs two
    lock syscalls (1.5 us together) and about 3 us in all (bench/bench_ratelimit.py); a process
    that finds the stripe taken sleeps until it is free (tens of microseconds at the p99 when two
    processes hammer one key).
    POSIX locks belong to the process, not the thread: a handle is for one thread, and two
    threads of one process would not exclude each other. A handle inherited across fork works
    in the child (the child's locks are its own).

    Full table: a new key takes the slot of its bucket with the smallest TAT: an unused slot
    (TAT 0), else one whose bucket refilled (TAT in the past: nothing is lost), else, when
    every way holds a live key, the live key closest to refilled (counted in ``evictions``):
    that key gets back at most what it had spent, so a table too small makes limits looser,
    never tighter, and a check never fails for lack of room. A stored TAT further than one
    period ahead cannot come from this algorithm (a torn write, a damaged byte): it is treated
    as a full bucket.
    """

    def __init__(self, segment: Segment) -> None:
        """Wrap a segment whose header was validated; use ``create`` or ``attach``."""
        n_buckets, ways, stripes, _slot_size, requested = _HEADER.unpack_from(segment.buf, COMMON_HEADER_SIZE)
        self.segment = segment
        self.n_buckets = n_buckets
        self.ways = ways
        self.stripes = stripes
        self.capacity = n_buckets * ways
        self.requested_capacity = requested
        self.evictions = 0  # live keys this handle pushed out of a full bucket
        self._mm = segment.buf
        self._data = segment.header_size
        self._bucket_size = ways * SLOT_SIZE
        self._bucket = struct.Struct(f"<{2 * ways}Q").unpack_from
        self._fd = os.open(segment.path, os.O_RDWR | os.O_CLOEXEC)  # for the record locks only

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_CAPACITY, ways: int = DEFAULT_WAYS,
               stripes: int = DEFAULT_STRIPES, directory: str = DEFAULT_DIRECTORY) -> RateLimitTable:
        """Create the segment with room for at least ``capacity`` keys."""
        _check_parameters(capacity, ways, stripes)
        n_buckets = -(-capacity // ways)
        header = _HEADER.pack(n_buckets, ways, stripes, SLOT_SIZE, capacity)
        header = header.ljust(SPECIFIC_HEADER_SIZE, b"\0")
        size = COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE + n_buckets * ways * SLOT_SIZE
        segment = Segment.create(name, size, MAGIC, LAYOUT_VERSION, directory, header=header)
        return built_over_new(segment, cls)

    @classmethod
    def attach(cls, name: str, directory: str = DEFAULT_DIRECTORY) -> RateLimitTable:
        """Map a table created by another process, checking every recorded size."""
        segment = Segment.attach(name, MAGIC, LAYOUT_VERSION, directory)
        return built_over_attached(segment, cls, _check_header)

    def acquire(self, key: bytes, interval_ns: int, period_ns: int, now_ns: int | None = None) -> int:
        """Spend one request of ``key``: 0 when admitted, else the nanoseconds until one would be.

        ``interval_ns`` >= 1 and ``period_ns`` >= ``interval_ns`` (the caller checks them once).
        """
        try:
            k0, k1 = _KEY_WORDS(key)
        except struct.error:
            raise ValueError(f"rate keys are {KEY_SIZE} bytes, got {len(key)}") from None
        if now_ns is None:
            now_ns = _monotonic_ns()
        bucket = k0 % self.n_buckets
        stripe = bucket % self.stripes
        base = self._data + bucket * self._bucket_size
        tag = k1 | 1
        fd = self._fd
        _lockf(fd, _LOCK_EX, 1, stripe)
        try:
            words = self._bucket(self._mm, base)
            tags = words[0::2]
            if tag in tags:
                way = tags.index(tag)
                tat = words[2 * way + 1]
                if tat < now_ns or tat > now_ns + period_ns:
                    tat = now_ns
            else:
                way = self._free_way(words[1::2], now_ns)
                tat = now_ns
            tat += interval_ns
            wait = tat - period_ns - now_ns
            if wait > 0:
                return wait
            at = base + way * SLOT_SIZE
            self._mm[at:at + SLOT_SIZE] = _SLOT.pack(tag, tat)
            return 0
        finally:
            _lockf(fd, _LOCK_UN, 1, stripe)

    def _free_way(self, tats: tuple[int, ...], now_ns: int) -> int:
        """The way a new key takes: the smallest TAT (unused, refilled, else the least indebted)."""
        oldest = min(tats)
        if oldest > now_ns:
            self.evictions += 1
        return tats.index(oldest)

    def live_keys(self, now_ns: int | None = None) -> int:
        """Keys whose bucket has not refilled yet (reads the whole table without locks: tests, metrics)."""
        if now_ns is None:
            now_ns = _monotonic_ns()
        live = 0
        for bucket in range(self.n_buckets):
            words = self._bucket(self._mm, self._data + bucket * self._bucket_size)
            live += sum(1 for tag, tat in zip(words[0::2], words[1::2]) if tag and tat > now_ns)
        return live

    def close(self) -> None:
        """Close the lock descriptor and unmap in this process (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.segment.close()

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creator also unlinks."""
        try:
            self.close()
        finally:
            if self.segment.is_owner:
                self.unlink()


def _check_parameters(capacity: int, ways: int, stripes: int) -> None:
    """Refuse sizes the layout cannot record."""
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}], got {capacity}")
    if not 1 <= ways <= MAX_WAYS:
        raise ValueError(f"ways must be in [1, {MAX_WAYS}], got {ways}")
    if not 1 <= stripes <= MAX_STRIPES:
        raise ValueError(f"stripes must be in [1, {MAX_STRIPES}], got {stripes}")


def _check_header(segment: Segment) -> None:
    """Raise SegmentError unless the header describes exactly this segment."""
    n_buckets, ways, stripes, slot_size, requested = _HEADER.unpack_from(segment.buf, COMMON_HEADER_SIZE)
    problems = []
    if segment.header_size != COMMON_HEADER_SIZE + SPECIFIC_HEADER_SIZE:
        problems.append(f"header size {segment.header_size}")
    if not 1 <= ways <= MAX_WAYS or not 1 <= stripes <= MAX_STRIPES or n_buckets < 1:
        problems.append(f"ways {ways}, stripes {stripes}, n_buckets {n_buckets}")
    if slot_size != SLOT_SIZE or not 1 <= requested <= n_buckets * ways:
        problems.append(f"slot size {slot_size}, requested capacity {requested}")
    if segment.size != segment.header_size + n_buckets * ways * SLOT_SIZE:
        problems.append(f"file size {segment.size} for {n_buckets} buckets of {ways} ways")
    if problems:
        raise SegmentError(f"rate-limit segment {segment.path} is corrupt: {'; '.join(problems)}")
