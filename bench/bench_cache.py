"""Latency of the shared-memory cache against a per-process LRU dict and, if one answers, Redis.

Run: ``python -m bench.bench_cache [--iterations N]``. Each operation is timed alone with
``perf_counter_ns``; the table gives the median and the 99th percentile in microseconds,
timer overhead included (printed at the end). Hits read keys stored earlier, misses read
keys never stored, puts store new keys into a full cache (so every put evicts).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from time import monotonic_ns, perf_counter_ns

from shm.cache import ShmCache, cache_key
from shm.segment import segment_name

TTL_MS = 60_000


class LruTtlDict:
    """The per-process alternative: an OrderedDict kept in LRU order, entries with a TTL."""

    def __init__(self, capacity: int, ttl_ms: int) -> None:
        self.capacity = capacity
        self.ttl_ms = ttl_ms
        self._entries: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        """The value if present and younger than the TTL, marked most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if monotonic_ns() // 1_000_000 - entry[0] >= self.ttl_ms:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: bytes, value: bytes) -> bool:
        """Store, evicting the least recently used entry beyond capacity."""
        self._entries[key] = (monotonic_ns() // 1_000_000, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return True


def timed(operation: Callable[[bytes], object], keys: Sequence[bytes]) -> list[int]:
    """Nanoseconds of each call of ``operation``, one key per call."""
    samples = []
    append = samples.append
    for key in keys:
        start = perf_counter_ns()
        operation(key)
        append(perf_counter_ns() - start)
    return samples


def timed_puts(put: Callable[[bytes, bytes], object], keys: Sequence[bytes],
               value: bytes) -> list[int]:
    """Nanoseconds of each put of ``value`` under a new key."""
    samples = []
    append = samples.append
    for key in keys:
        start = perf_counter_ns()
        put(key, value)
        append(perf_counter_ns() - start)
    return samples


def timed_miss_then_put(get: Callable[[bytes], object], put: Callable[[bytes, bytes], object],
                        keys: Sequence[bytes], value: bytes) -> list[int]:
    """What a unique event costs the cache: a miss, then storing the fresh answer."""
    samples = []
    append = samples.append
    for key in keys:
        start = perf_counter_ns()
        if get(key) is None:
            put(key, value)
        append(perf_counter_ns() - start)
    return samples


def summary(samples: list[int]) -> tuple[float, float]:
    """Median and 99th percentile in microseconds."""
    ordered = sorted(samples)
    return statistics.median(ordered) / 1000, ordered[int(len(ordered) * 0.99)] / 1000


def new_keys(count: int, label: bytes) -> list[bytes]:
    """``count`` distinct cache keys."""
    return [cache_key(label, n.to_bytes(8, "little")) for n in range(count)]


def measure(store, capacity: int, iterations: int, value: bytes) -> dict[str, list[int]]:
    """Hit, miss, put and miss-then-put samples for one store (get and put methods)."""
    stored = new_keys(capacity, b"stored")
    for key in stored:
        store.put(key, value)
    rng = random.Random(0)
    present = [key for key in stored if store.get(key) is not None]
    hits = [rng.choice(present) for _ in range(iterations)]
    return {
        "hit": timed(store.get, hits),
        "miss": timed(store.get, new_keys(iterations, b"absent")),
        "put (evicts)": timed_puts(store.put, new_keys(iterations, b"new"), value),
        "miss + put": timed_miss_then_put(store.get, store.put,
                                          new_keys(iterations, b"unique"), value),
    }


class RedisStore:
    """GET/SET with a TTL against a Redis server, same interface as the caches."""

    def __init__(self, client) -> None:
        self._client = client

    def get(self, key: bytes) -> bytes | None:
        return self._client.get(key)

    def put(self, key: bytes, value: bytes) -> bool:
        return bool(self._client.set(key, value, px=TTL_MS))


def redis_store() -> tuple[RedisStore | None, str]:
    """A Redis store on 127.0.0.1:6379 when the package is installed and a server answers."""
    try:
        import redis  # optional: never a dependency of the project
    except ImportError:
        return None, "redis column skipped: the redis package is not installed"
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5,
                         socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as exc:
        return None, f"redis column skipped: no server on 127.0.0.1:6379 ({exc})"
    return RedisStore(client), "redis: 127.0.0.1:6379, one connection, GET and SET PX"


def component_costs(value: bytes, iterations: int) -> dict[str, float]:
    """Median nanoseconds of the pieces: key digest, slot checksum, and crc32 for comparison."""
    body = bytes(16 + 10) + value
    pieces = {
        "cache_key(3 parts)": lambda: cache_key(b"fraud-v12", b"evt-123456", b"features"),
        "blake2b-64 of a slot (used)": lambda: hashlib.blake2b(body, digest_size=8).digest(),
        "crc32 of a slot (not used)": lambda: zlib.crc32(body),
        "perf_counter_ns pair (overhead)": lambda: None,
    }
    costs = {}
    for name, piece in pieces.items():
        samples = []
        for _ in range(iterations):
            start = perf_counter_ns()
            piece()
            samples.append(perf_counter_ns() - start)
        costs[name] = statistics.median(samples)
    return costs


def print_table(results: dict[str, dict[str, list[int]]]) -> None:
    """One row per operation, median and p99 per store."""
    stores = list(results)
    header = f"{'operation':<16}" + "".join(f"{name + ' med/p99 us':>30}" for name in stores)
    print(header)
    print("-" * len(header))
    for operation in results[stores[0]]:
        cells = []
        for name in stores:
            median, p99 = summary(results[name][operation])
            cells.append(f"{median:>18.2f} / {p99:>8.2f}")
        print(f"{operation:<16}" + "".join(cells))


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--capacity", type=int, default=65_536)
    parser.add_argument("--value-bytes", type=int, default=200)
    args = parser.parse_args()
    value = os.urandom(args.value_bytes)
    name = segment_name(f"bench{uuid.uuid4().hex[:8]}", "cache")
    results: dict[str, dict[str, list[int]]] = {}
    with ShmCache.create(name, args.capacity, TTL_MS) as cache:
        results["shm cache"] = measure(cache, cache.capacity, args.iterations, value)
        print(f"shm cache: {cache.capacity} entries, {cache.ways} ways, value_size "
              f"{cache.value_size}, {cache.segment.size / 2**20:.1f} MiB in /dev/shm")
    results["LRU dict"] = measure(LruTtlDict(args.capacity, TTL_MS), args.capacity,
                                  args.iterations, value)
    store, note = redis_store()
    if store is not None:
        results["redis"] = measure(store, min(args.capacity, 10_000),
                                   min(args.iterations, 20_000), value)
    print(f"values {args.value_bytes} bytes, {args.iterations} timed calls per row; {note}")
    print()
    print_table(results)
    print()
    for piece, nanoseconds in component_costs(value, args.iterations).items():
        print(f"{piece:<34} {nanoseconds / 1000:6.2f} us (median)")


if __name__ == "__main__":
    main()
