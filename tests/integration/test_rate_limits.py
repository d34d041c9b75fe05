"""The rate-limit table across real processes: exact counts under contention, locks freed by death, bad settings."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal

import pytest

from shm.ratelimit import RateLimitTable, rate_key
from tests.fixtures.server import run_sira, sira_env

S = 1_000_000_000
NOW = 5_000 * S
PROCESSES = 4
ATTEMPTS = 600
HUNDRED_AN_HOUR = (36 * S, 3600 * S)  # interval, burst
FORK = multiprocessing.get_context("fork")
HANG_GUARD_S = 60  # only against a deadlock; never a timing assertion


@pytest.fixture
def table_name():
    """A table in the real /dev/shm, created and unlinked here."""
    name = f"sira-test{os.getpid()}_{secrets.token_hex(3)}-ratelimit"
    with RateLimitTable.create(name, capacity=4096) as table:
        yield name, table
    assert not os.path.exists(os.path.join("/dev/shm", name))


def hammer(name: str, key: bytes, start, results) -> None:
    """A worker-like process: attach by name, wait for the others, spend as fast as it can."""
    with RateLimitTable.attach(name) as table:
        start.wait()
        results.put((key, sum(1 for _ in range(ATTEMPTS) if table.acquire(key, *HUNDRED_AN_HOUR, NOW) == 0)))


def run_processes(target, args_of, count: int) -> list[tuple[bytes, int]]:
    results = FORK.Queue()
    start = FORK.Barrier(count)
    processes = [FORK.Process(target=target, args=(*args_of(index), start, results)) for index in range(count)]
    for process in processes:
        process.start()
    try:
        counts = [results.get(timeout=HANG_GUARD_S) for _ in processes]
    finally:
        for process in processes:
            process.join(HANG_GUARD_S)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    return counts


def test_processes_hammering_one_key_are_admitted_exactly_the_limit_in_all(table_name):
    name, table = table_name
    key = rate_key(b"fraud_analyst", b"alice")
    counts = [count for _, count in run_processes(hammer, lambda index: (name, key), PROCESSES)]
    assert sum(counts) == 100, counts
    assert table.acquire(key, *HUNDRED_AN_HOUR, NOW) > 0  # the creator sees the same empty bucket


def test_processes_hammering_two_keys_get_exactly_the_limit_of_each(table_name):
    name, _ = table_name
    keys = [rate_key(b"fraud_analyst", b"alice"), rate_key(b"fraud_analyst", b"bob")]
    totals = dict.fromkeys(keys, 0)
    for key, count in run_processes(hammer, lambda index: (name, keys[index % 2]), PROCESSES):
        totals[key] += count
    assert list(totals.values()) == [100, 100]


def hold_the_lock_of(name: str, key: bytes, ready) -> None:
    """Take the stripe lock of ``key`` and keep it until killed."""
    import fcntl

    table = RateLimitTable.attach(name)
    bucket = int.from_bytes(key[:8], "little") % table.n_buckets
    fcntl.lockf(table._fd, fcntl.LOCK_EX, 1, bucket % table.stripes)
    ready.set()
    signal.pause()


def spend_once(name: str, key: bytes, done) -> None:
    with RateLimitTable.attach(name) as table:
        done.put(table.acquire(key, *HUNDRED_AN_HOUR, NOW))


def test_a_worker_killed_while_holding_a_lock_blocks_nobody(table_name):
    name, _ = table_name
    key = rate_key(b"ml_ops", b"ops")
    ready, done = FORK.Event(), FORK.Queue()
    holder = FORK.Process(target=hold_the_lock_of, args=(name, key, ready))
    holder.start()
    assert ready.wait(HANG_GUARD_S)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(HANG_GUARD_S)
    spender = FORK.Process(target=spend_once, args=(name, key, done))
    spender.start()
    assert done.get(timeout=HANG_GUARD_S) == 0
    spender.join(HANG_GUARD_S)


def spend_with_inherited_handle(table: RateLimitTable, key: bytes, done) -> None:
    done.put(sum(1 for _ in range(10) if table.acquire(key, *HUNDRED_AN_HOUR, NOW) == 0))


def test_a_handle_inherited_across_fork_shares_the_buckets(table_name):
    _, table = table_name
    key = rate_key(b"pay_admin", b"inherited")
    for _ in range(95):
        assert table.acquire(key, *HUNDRED_AN_HOUR, NOW) == 0
    done = FORK.Queue()
    child = FORK.Process(target=spend_with_inherited_handle, args=(table, key, done))
    child.start()
    assert done.get(timeout=HANG_GUARD_S) == 5
    child.join(HANG_GUARD_S)


@pytest.mark.parametrize("value", ["root=5/minute", "fraud_analyst=0/minute", "fraud_analyst=-1/minute",
                                   "fraud_analyst=5/week", "ml_ops=1/second,ml_ops=2/second"])
def test_a_bad_setting_exits_2_with_one_line_before_anything_starts(tmp_path, value):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), SIRA_RATE_LIMITS=value)
    result = run_sira("serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sira: configuration error: SIRA_RATE_LIMITS: expected")
    assert not (tmp_path / "data").exists()
