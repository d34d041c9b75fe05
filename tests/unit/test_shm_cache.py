"""ShmCache in one process: round trip, TTL, capacity, LRU-like eviction, corruption."""
from __future__ import annotations

import os
import struct

import pytest

from shm.cache import ShmCache, cache_key
from shm.segment import COMMON_HEADER_SIZE, Segment, SegmentError

NOW = 1_000_000
TTL_MS = 60_000


@pytest.fixture
def directory(tmp_path):
    """A private directory standing in for /dev/shm; pytest removes it with every file."""
    return str(tmp_path)


@pytest.fixture
def cache(directory):
    """A 1024-entry cache, closed and unlinked afterwards."""
    shm_cache = ShmCache.create("sira-test-cache", 1024, TTL_MS, value_size=128,
                                directory=directory)
    try:
        yield shm_cache
    finally:
        shm_cache.close()
        shm_cache.unlink()


def keys_in_one_bucket(cache: ShmCache, bucket: int, count: int) -> list[bytes]:
    """Distinct keys that all land in ``bucket``."""
    found, n = [], 0
    while len(found) < count:
        key = cache_key(b"flood", str(n).encode())
        if int.from_bytes(key[:8], "little") % cache.n_buckets == bucket:
            found.append(key)
        n += 1
    return found


def slot_offset(cache: ShmCache, key: bytes) -> int:
    """Where the slot holding ``key`` starts in the raw buffer (the key must be present)."""
    base = cache._data_offset + (
        int.from_bytes(key[:8], "little") % cache.n_buckets) * cache._bucket_size
    for way in range(cache.ways):
        start = base + cache._slots_offset + way * cache._slot_size
        if cache.segment.buf[start + 8:start + 24] == key:
            return start
    raise AssertionError("key not stored")


def test_put_then_get_returns_the_value(cache):
    key = cache_key(b"model-1", b"event-1")
    assert cache.put(key, b"score=0.93", now_ms=NOW)
    assert cache.get(key, now_ms=NOW + 1) == b"score=0.93"


def test_put_replaces_the_value_of_the_same_key(cache):
    key = cache_key(b"k")
    cache.put(key, b"first", now_ms=NOW)
    cache.put(key, b"second", now_ms=NOW + 1)
    assert cache.get(key, now_ms=NOW + 2) == b"second"
    assert cache.count(now_ms=NOW + 2) == 1


def test_empty_and_full_size_values_round_trip(cache):
    empty, full = cache_key(b"empty"), cache_key(b"full")
    assert cache.put(empty, b"", now_ms=NOW)
    assert cache.put(full, bytes(range(128)), now_ms=NOW)
    assert cache.get(empty, now_ms=NOW) == b""
    assert cache.get(full, now_ms=NOW) == bytes(range(128))


def test_unknown_key_is_a_miss(cache):
    cache.put(cache_key(b"present"), b"v", now_ms=NOW)
    assert cache.get(cache_key(b"absent"), now_ms=NOW) is None


def test_entry_expires_after_ttl(cache):
    key = cache_key(b"k")
    cache.put(key, b"v", now_ms=NOW)
    assert cache.get(key, now_ms=NOW + TTL_MS - 1) == b"v"
    assert cache.get(key, now_ms=NOW + TTL_MS) is None
    assert cache.count(now_ms=NOW + TTL_MS) == 0


def test_default_clock_is_used_when_now_is_omitted(cache):
    key = cache_key(b"k")
    assert cache.put(key, b"v")
    assert cache.get(key) == b"v"


def test_oversize_value_is_refused(cache):
    key = cache_key(b"big")
    assert cache.put(key, b"x" * 129, now_ms=NOW) is False
    assert cache.get(key, now_ms=NOW) is None


def test_key_of_the_wrong_length_raises(cache):
    with pytest.raises(ValueError):
        cache.get(b"short")
    with pytest.raises(ValueError):
        cache.put(b"x" * 17, b"v")


def test_capacity_holds_and_recent_entries_win(cache):
    keys = [cache_key(b"k", str(n).encode()) for n in range(10 * cache.capacity)]
    for n, key in enumerate(keys):
        cache.put(key, b"v%d" % n, now_ms=NOW + n)
    now = NOW + len(keys)
    assert cache.count(now_ms=now) <= cache.capacity
    recent = sum(cache.get(key, now_ms=now) is not None for key in keys[-cache.capacity:])
    old = sum(cache.get(key, now_ms=now) is not None for key in keys[:cache.capacity])
    assert old == 0
    assert recent > cache.capacity // 2
    for n, key in enumerate(keys[-cache.capacity:], start=len(keys) - cache.capacity):
        assert cache.get(key, now_ms=now) in (None, b"v%d" % n)


def test_entry_read_repeatedly_survives_a_flood_in_its_bucket(cache):
    hot, *flood = keys_in_one_bucket(cache, bucket=3, count=10 * cache.ways + 1)
    cache.put(hot, b"hot", now_ms=NOW)
    for n, key in enumerate(flood, start=1):
        cache.put(key, b"cold", now_ms=NOW + 2 * n)
        assert cache.get(hot, now_ms=NOW + 2 * n + 1) == b"hot"
    assert sum(cache.get(key, now_ms=NOW + 1000) is not None for key in flood) == cache.ways - 1


def test_expired_entry_is_evicted_before_a_less_recently_read_live_one(cache):
    expiring, *live, newcomer = keys_in_one_bucket(cache, bucket=5, count=cache.ways + 1)
    cache.put(expiring, b"old", now_ms=NOW)
    for key in live:
        cache.put(key, b"v", now_ms=NOW + 1)
    assert cache.get(expiring, now_ms=NOW + TTL_MS - 1) == b"old"  # read last, then expires
    late = NOW + TTL_MS
    cache.put(newcomer, b"new", now_ms=late)
    assert cache.get(newcomer, now_ms=late) == b"new"
    assert [cache.get(key, now_ms=late) for key in live] == [b"v"] * len(live)


def test_flipped_byte_in_a_value_is_a_miss_not_garbage(cache):
    key = cache_key(b"k")
    cache.put(key, b"genuine value", now_ms=NOW)
    start = slot_offset(cache, key) + 34 + 3
    buf = cache.segment.buf
    buf[start:start + 1] = bytes([buf[start] ^ 0x01])
    assert cache.get(key, now_ms=NOW) is None
    assert cache.count(now_ms=NOW) == 0
    assert cache.put(key, b"repaired", now_ms=NOW)
    assert cache.get(key, now_ms=NOW) == b"repaired"


def test_corrupt_length_is_a_miss(cache):
    key = cache_key(b"k")
    cache.put(key, b"value", now_ms=NOW)
    start = slot_offset(cache, key) + 32
    cache.segment.buf[start:start + 2] = struct.pack("<H", 0xFFFF)
    assert cache.get(key, now_ms=NOW) is None


def first_half_of_slot(directory: str, key: bytes, value: bytes, now_ms: int) -> bytes:
    """The first half of the slot a put of ``key`` would write: what a killed writer leaves."""
    with ShmCache.create("sira-test-twin", 1024, TTL_MS, value_size=128,
                         directory=directory) as twin:
        twin.put(key, value, now_ms=now_ms)
        start = slot_offset(twin, key)
        return twin.segment.buf[start:start + (34 + len(value)) // 2]


@pytest.mark.parametrize("same_key", [True, False])
def test_half_written_slot_is_a_miss(cache, directory, same_key):
    first, second = keys_in_one_bucket(cache, bucket=7, count=2)
    cache.put(first, b"A" * 100, now_ms=NOW)
    writer_key = first if same_key else second
    half = first_half_of_slot(directory, writer_key, b"B" * 100, now_ms=NOW + 5)
    start = slot_offset(cache, first)
    cache.segment.buf[start:start + len(half)] = half
    assert cache.get(first, now_ms=NOW + 5) is None
    assert cache.get(second, now_ms=NOW + 5) is None
    assert cache.count(now_ms=NOW + 5) == 0
    assert cache.put(writer_key, b"C" * 100, now_ms=NOW + 6)
    assert cache.get(writer_key, now_ms=NOW + 6) == b"C" * 100


def test_clear_empties_the_cache(cache):
    keys = [cache_key(str(n).encode()) for n in range(50)]
    for key in keys:
        cache.put(key, b"v", now_ms=NOW)
    cache.clear()
    assert cache.count(now_ms=NOW) == 0
    assert all(cache.get(key, now_ms=NOW) is None for key in keys)
    assert cache.put(keys[0], b"again", now_ms=NOW)
    assert cache.get(keys[0], now_ms=NOW) == b"again"


def test_attach_shares_entries_and_geometry(cache, directory):
    key = cache_key(b"shared")
    cache.put(key, b"from the creator", now_ms=NOW)
    with ShmCache.attach("sira-test-cache", directory) as other:
        assert (other.capacity, other.ttl_ms, other.value_size) == (1024, TTL_MS, 128)
        assert other.get(key, now_ms=NOW) == b"from the creator"
        other.put(cache_key(b"back"), b"from the attacher", now_ms=NOW)
    assert cache.get(cache_key(b"back"), now_ms=NOW) == b"from the attacher"
    assert os.path.exists(cache.segment.path)


def test_capacity_is_rounded_up_to_whole_buckets(directory):
    with ShmCache.create("sira-test-round", 1000, TTL_MS, ways=8, directory=directory) as c:
        assert c.capacity == 1000 and c.n_buckets == 125
    with ShmCache.create("sira-test-round", 1001, TTL_MS, ways=8, directory=directory) as c:
        assert c.capacity == 1008 and c.requested_capacity == 1001


def test_attach_with_wrong_magic_raises(directory):
    Segment.create("sira-test-other", 4096, b"SIRAQRNG", 1, directory).close()
    with pytest.raises(SegmentError, match="magic"):
        ShmCache.attach("sira-test-other", directory)


def test_attach_with_wrong_layout_version_raises(cache, directory):
    cache.segment.buf[8:12] = struct.pack("<I", 99)
    with pytest.raises(SegmentError, match="layout version 99"):
        ShmCache.attach("sira-test-cache", directory)


def test_attach_with_wrong_file_size_raises(cache, directory):
    os.truncate(cache.segment.path, cache.segment.size + 64)
    with pytest.raises(SegmentError, match="truncated or corrupt"):
        ShmCache.attach("sira-test-cache", directory)


def test_attach_with_a_corrupt_cache_header_raises(cache, directory):
    offset = COMMON_HEADER_SIZE  # n_buckets
    cache.segment.buf[offset:offset + 4] = struct.pack("<I", cache.n_buckets + 1)
    with pytest.raises(SegmentError, match="cache segment .* is corrupt"):
        ShmCache.attach("sira-test-cache", directory)


def test_create_refuses_bad_parameters(directory):
    for kwargs in ({"capacity": 0}, {"ttl_ms": 0}, {"value_size": 70_000}, {"ways": 0}):
        args = {"capacity": 16, "ttl_ms": 1000, **kwargs}
        with pytest.raises(ValueError):
            ShmCache.create("sira-test-bad", directory=directory, **args)
    assert os.listdir(directory) == []


def test_close_and_unlink_are_idempotent_and_remove_the_file(directory):
    shm_cache = ShmCache.create("sira-test-idem", 64, TTL_MS, directory=directory)
    shm_cache.close()
    shm_cache.close()
    shm_cache.unlink()
    shm_cache.unlink()
    assert os.listdir(directory) == []


def test_context_manager_unlinks_for_the_creator_only(directory):
    with ShmCache.create("sira-test-ctx", 64, TTL_MS, directory=directory) as owner:
        with ShmCache.attach("sira-test-ctx", directory):
            pass
        assert os.path.exists(owner.segment.path)
    assert os.listdir(directory) == []


def test_cache_key_separates_parts():
    assert len(cache_key(b"a")) == 16
    assert cache_key(b"ab", b"c") != cache_key(b"a", b"bc")
    assert cache_key(b"a", b"b") == cache_key(b"a", b"b")
