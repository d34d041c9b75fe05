"""RateLimitTable in one process, with an injected clock: GCRA counts, refill, full buckets, corruption."""

from __future__ import annotations

import os
import struct

import pytest

from shm.ratelimit import SLOT_SIZE, RateLimitTable, rate_key
from shm.segment import COMMON_HEADER_SIZE, SegmentError

S = 1_000_000_000
NOW = 1_000 * S
FIVE_A_MINUTE = (12 * S, 60 * S)  # interval, burst: 5 at once, then one every 12 s


@pytest.fixture
def directory(tmp_path):
    """A private directory standing in for /dev/shm."""
    return str(tmp_path)


@pytest.fixture
def table(directory):
    with RateLimitTable.create("sira-test-ratelimit", capacity=1024, directory=directory) as rate_table:
        yield rate_table


def admitted(table: RateLimitTable, key: bytes, attempts: int, now: int, rate=FIVE_A_MINUTE) -> int:
    return sum(1 for _ in range(attempts) if table.acquire(key, *rate, now) == 0)


def keys_in_one_bucket(table: RateLimitTable, bucket: int, count: int) -> list[bytes]:
    found, n = [], 0
    while len(found) < count:
        key = rate_key(b"flood", str(n).encode())
        if int.from_bytes(key[:8], "little") % table.n_buckets == bucket:
            found.append(key)
        n += 1
    return found


def test_burst_then_refusal_with_the_wait_until_the_next_token(table):
    key = rate_key(b"fraud_analyst", b"alice")
    assert admitted(table, key, 5, NOW) == 5
    assert table.acquire(key, *FIVE_A_MINUTE, NOW) == 12 * S
    assert table.acquire(key, *FIVE_A_MINUTE, NOW + 5 * S) == 7 * S


def test_tokens_come_back_one_interval_at_a_time(table):
    key = rate_key(b"k")
    assert admitted(table, key, 10, NOW) == 5
    assert admitted(table, key, 10, NOW + 12 * S - 1) == 0
    assert admitted(table, key, 10, NOW + 12 * S) == 1
    assert admitted(table, key, 10, NOW + 36 * S) == 2
    assert admitted(table, key, 10, NOW + 1000 * S) == 5  # never more than the burst


def test_refused_requests_spend_nothing(table):
    key = rate_key(b"hammer")
    total = sum(admitted(table, key, 1000, NOW + second * S) for second in range(0, 60, 3))
    assert total == 5 + 4  # the burst, then one per 12 s over 57 s (12, 24, 36, 48)


def test_keys_are_independent(table):
    alice, bob = rate_key(b"fraud_analyst", b"alice"), rate_key(b"fraud_analyst", b"bob")
    assert admitted(table, alice, 9, NOW) == 5
    assert admitted(table, bob, 9, NOW) == 5
    assert table.live_keys(NOW) == 2
    assert table.live_keys(NOW + 61 * S) == 0


def test_key_parts_are_length_prefixed():
    assert rate_key(b"ab", b"c") != rate_key(b"a", b"bc")
    assert len(rate_key(b"x")) == 16


def test_a_refilled_slot_is_reused_without_an_eviction(directory):
    with RateLimitTable.create("sira-test-small", capacity=2, ways=2, directory=directory) as small:
        first, second, third = keys_in_one_bucket(small, 0, 3)
        small.acquire(first, *FIVE_A_MINUTE, NOW)
        small.acquire(second, *FIVE_A_MINUTE, NOW)
        assert admitted(small, third, 5, NOW + 13 * S) == 5  # first and second refilled by then
        assert small.evictions == 0


def test_a_full_bucket_evicts_the_live_key_closest_to_refilled(directory):
    with RateLimitTable.create("sira-test-small", capacity=2, ways=2, directory=directory) as small:
        heavy, light, newcomer = keys_in_one_bucket(small, 0, 3)
        assert admitted(small, heavy, 5, NOW) == 5
        assert admitted(small, light, 1, NOW) == 1
        assert admitted(small, newcomer, 5, NOW + S) == 5  # never refused for lack of room
        assert small.evictions == 1
        assert admitted(small, heavy, 1, NOW + S) == 0  # the indebted key kept its place
        assert admitted(small, light, 5, NOW + S) == 5  # the evicted one starts afresh


def test_a_tat_further_than_one_period_ahead_reads_as_a_full_bucket(table):
    key = rate_key(b"damaged")
    assert admitted(table, key, 5, NOW) == 5
    slot = find_slot(table, key)
    tag, _ = struct.unpack_from("<QQ", table.segment.buf, slot)
    table.segment.buf[slot:slot + SLOT_SIZE] = struct.pack("<QQ", tag, NOW + 10_000 * S)
    assert admitted(table, key, 9, NOW) == 5


def test_keys_must_be_16_bytes(table):
    with pytest.raises(ValueError, match="16 bytes"):
        table.acquire(b"short", *FIVE_A_MINUTE, NOW)


def test_attach_sees_the_creators_buckets(table, directory):
    key = rate_key(b"shared")
    assert admitted(table, key, 3, NOW) == 3
    with RateLimitTable.attach("sira-test-ratelimit", directory=directory) as other:
        assert (other.n_buckets, other.ways, other.stripes) == (table.n_buckets, table.ways, table.stripes)
        assert admitted(other, key, 9, NOW) == 2
    assert os.path.exists(os.path.join(directory, "sira-test-ratelimit")), "an attached handle never unlinks"


def test_attach_refuses_a_corrupt_header(table, directory):
    struct.pack_into("<I", table.segment.buf, COMMON_HEADER_SIZE + 4, 1000)  # ways
    with pytest.raises(SegmentError, match="corrupt"):
        RateLimitTable.attach("sira-test-ratelimit", directory=directory)


def test_attach_refuses_another_kind_of_segment(directory):
    from shm.counters import CounterBlock

    with CounterBlock.create("sira-test-counters", 4, directory=directory):
        with pytest.raises(SegmentError, match="magic"):
            RateLimitTable.attach("sira-test-counters", directory=directory)


def test_the_creator_unlinks_and_close_is_idempotent(directory):
    path = os.path.join(directory, "sira-test-life")
    with RateLimitTable.create("sira-test-life", capacity=8, directory=directory) as rate_table:
        assert os.path.exists(path)
    assert not os.path.exists(path)
    rate_table.close()


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"ways": 0}, {"ways": 65}, {"stripes": 0},
                                    {"stripes": 5000}])
def test_bad_sizes_are_refused(directory, kwargs):
    with pytest.raises(ValueError):
        RateLimitTable.create("sira-test-bad", directory=directory, **kwargs)


def find_slot(table: RateLimitTable, key: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    base = table._data + (k0 % table.n_buckets) * table.ways * SLOT_SIZE
    for way in range(table.ways):
        at = base + way * SLOT_SIZE
        if struct.unpack_from("<Q", table.segment.buf, at)[0] == k1 | 1:
            return at
    raise AssertionError("key not stored")
