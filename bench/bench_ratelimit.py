"""Cost of the rate-limit check on the request path, in microseconds.

Run: ``python -m bench.bench_ratelimit [--iterations N]``. Each call is timed alone with
``perf_counter_ns`` (timer overhead printed at the end); the table gives the median and the 99th
percentile. Rows:

- ``lockf pair``: the two record-lock syscalls every limited check makes, alone;
- ``table.acquire`` admitted / refused: the shared-memory GCRA step (lock, read, write, unlock);
- ``RateLimiter.admit`` limited / unlimited: the whole check a worker makes after authentication
  (rule and key lookups included); unlimited roles (sira_service, the internal token) never
  touch the table;
- ``acquire, 2 processes on one key``: each of two processes hammers the same key (the same
  lock stripe) at once, the worst case of contention.

The table lives in /dev/shm and is removed at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import secrets
import statistics
from collections.abc import Callable
from time import perf_counter_ns

from app.auth.ratelimit import RateLimiter
from app.auth.tokens import Principal
from app.errors import RateLimitExceeded
from conf.ratelimit import parse_rate_limits
from shm.ratelimit import RateLimitTable, rate_key

S = 1_000_000_000
GENEROUS = (1, S)  # one request a nanosecond: always admitted
STINGY = (3600 * S, 3600 * S)  # one an hour: refused after the first


def timed(call: Callable[[], object], iterations: int) -> list[int]:
    samples = []
    append = samples.append
    for _ in range(iterations):
        start = perf_counter_ns()
        call()
        append(perf_counter_ns() - start)
    return samples


def row(label: str, samples: list[int]) -> str:
    ordered = sorted(samples)
    median = statistics.median(ordered) / 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] / 1000
    return f"| {label} | {median:.2f} | {p99:.2f} |"


def admit_quietly(limiter: RateLimiter, principal: Principal) -> None:
    try:
        limiter.admit(principal)
    except RateLimitExceeded:
        pass


def contend(name: str, iterations: int, start, results) -> None:
    with RateLimitTable.attach(name) as table:
        key = rate_key(b"contended")
        start.wait()
        results.put(timed(lambda: table.acquire(key, *GENEROUS), iterations))


def contention_samples(name: str, iterations: int) -> list[int]:
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=contend, args=(name, iterations, start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    samples = results.get() + results.get()
    for process in processes:
        process.join()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    iterations = parser.parse_args().iterations
    name = f"sira-bench{os.getpid()}_{secrets.token_hex(3)}-ratelimit"
    with RateLimitTable.create(name) as table:
        key, refused_key = rate_key(b"fraud_analyst", b"alice"), rate_key(b"fraud_analyst", b"bob")
        table.acquire(refused_key, *STINGY)
        limits = parse_rate_limits("fraud_analyst=1000000000/second")
        limiter = RateLimiter(RateLimitTable.attach(name), limits)
        analyst = Principal("alice", frozenset({"fraud_analyst"}))
        service = Principal("svc", frozenset({"sira_service"}))
        fd = table._fd
        rows = [
            row("lockf pair (lock + unlock)", timed(lambda: (fcntl.lockf(fd, fcntl.LOCK_EX, 1, 3),
                                                             fcntl.lockf(fd, fcntl.LOCK_UN, 1, 3)), iterations)),
            row("table.acquire, admitted", timed(lambda: table.acquire(key, *GENEROUS), iterations)),
            row("table.acquire, refused", timed(lambda: table.acquire(refused_key, *STINGY), iterations)),
            row("RateLimiter.admit, limited role", timed(lambda: admit_quietly(limiter, analyst), iterations)),
            row("RateLimiter.admit, unlimited role", timed(lambda: limiter.admit(service), iterations)),
            row("table.acquire, 2 processes on one key", contention_samples(name, iterations // 2)),
        ]
        limiter.close()
    overhead = statistics.median(timed(lambda: None, iterations)) / 1000
    print(f"{iterations} calls each, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("| check | median us | p99 us |\n|---|---|---|")
    print("\n".join(rows))
    print(f"timer overhead (empty call): median {overhead:.2f} us")


if __name__ == "__main__":
    main()
