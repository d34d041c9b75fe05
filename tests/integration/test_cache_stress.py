"""ShmCache across real processes: concurrent writers, killed writers, fresh interpreters."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
import traceback
import uuid

import pytest

from shm.cache import ShmCache, cache_key
from shm.segment import DEFAULT_DIRECTORY, segment_name

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")
WRITERS = 4
STRESS_SECONDS = 1.5
VALUE_SIZE = 256
_STAMP = struct.Struct("<16sIQ")  # key, writer id, counter; a filler follows


@pytest.fixture
def cache_name():
    """A unique cache name in the real /dev/shm; the test's creator unlinks it."""
    if not os.path.isdir(DEFAULT_DIRECTORY):
        pytest.skip("no /dev/shm on this system")
    return segment_name(f"t{uuid.uuid4().hex[:12]}", "cache")


@pytest.fixture
def processes():
    """Processes started by a test; any still alive at the end are killed and reaped."""
    started: list[multiprocessing.Process] = []
    try:
        yield started
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


def encode_value(key: bytes, writer: int, counter: int) -> bytes:
    """A value that names its key and writer, with a filler whose length and byte vary."""
    filler_length = (counter * 37 + writer * 11) % (VALUE_SIZE - _STAMP.size + 1)
    filler = bytes([(writer * 131 + counter) & 0xFF]) * filler_length
    return _STAMP.pack(key, writer, counter) + filler


def value_problem(key: bytes, value: bytes) -> str | None:
    """Why ``value`` cannot be a whole value written for ``key``; None when it can."""
    if len(value) < _STAMP.size:
        return f"value of {len(value)} bytes is shorter than its stamp"
    stored_key, writer, counter = _STAMP.unpack_from(value)
    if stored_key != key:
        return f"value written for key {stored_key.hex()} returned for {key.hex()}"
    if value != encode_value(key, writer, counter):
        return f"value of writer {writer} counter {counter} is torn or altered"
    return None


def hammer(name: str, writer: int, keys: list[bytes], seconds: float, results) -> None:
    """Random gets and puts until the deadline; report counts and every bad read."""
    report = {"writer": writer, "gets": 0, "hits": 0, "puts": 0, "problems": []}
    try:
        rng = random.Random(writer)
        with ShmCache.attach(name) as cache:
            deadline = time.monotonic() + seconds
            counter = 0
            while time.monotonic() < deadline:
                for _ in range(200):
                    key = rng.choice(keys)
                    if rng.random() < 0.5:
                        value = cache.get(key)
                        report["gets"] += 1
                        if value is not None:
                            report["hits"] += 1
                            problem = value_problem(key, value)
                            if problem and len(report["problems"]) < 10:
                                report["problems"].append(problem)
                    else:
                        counter += 1
                        if not cache.put(key, encode_value(key, writer, counter)):
                            report["problems"].append("put refused a value that fits")
                        report["puts"] += 1
    except BaseException:  # reported to the parent, which fails the test
        report["problems"].append(traceback.format_exc())
    results.put(report)


def put_until_killed(name: str, keys: list[bytes], ready) -> None:
    """Put forever in a tight loop; the parent SIGKILLs this process mid-write."""
    cache = ShmCache.attach(name)
    counter = 0
    ready.set()
    while True:
        counter += 1
        key = keys[counter % len(keys)]
        cache.put(key, encode_value(key, 99, counter))


class DiesHalfwayThroughSlotWrite:
    """Stands in for the mapping: the first slice write copies half its bytes, then exits."""

    def __init__(self, buf) -> None:
        self._buf = buf

    def __getitem__(self, index):
        return self._buf[index]

    def __setitem__(self, index: slice, data: bytes) -> None:
        half = len(data) // 2
        self._buf[index.start:index.start + half] = data[:half]
        os._exit(0)


def put_and_crash_halfway(name: str, key: bytes) -> None:
    """Put ``key`` once whole, then die in the middle of rewriting it."""
    cache = ShmCache.attach(name)
    cache.put(key, encode_value(key, 7, 1))
    buf, tags, times = cache.segment.buf, cache._tags, cache._times
    cache._tags = lambda _buf, offset: tags(buf, offset)
    cache._times = lambda _buf, offset: times(buf, offset)
    cache._mm = DiesHalfwayThroughSlotWrite(buf)
    cache.put(key, encode_value(key, 7, 2))
    os._exit(3)  # not reached: the write above exits


def attach_and_answer(name: str, question: bytes, answer: bytes, results) -> None:
    """In a fresh interpreter: read the parent's entry, store one back, exit normally."""
    with ShmCache.attach(name) as cache:
        results.put(cache.get(question))
        cache.put(answer, b"from a spawned interpreter")


def assert_cache_is_sound(cache: ShmCache, keys: list[bytes]) -> None:
    """Every read is a miss or a whole value of its key; every key can be stored again."""
    for key in keys:
        value = cache.get(key)
        assert value is None or value_problem(key, value) is None
    for counter, key in enumerate(keys):
        assert cache.put(key, encode_value(key, 0, counter))
    for counter, key in enumerate(keys):
        assert cache.get(key) == encode_value(key, 0, counter)
    assert cache.count() == len(keys)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key_space", [4, 64])
def test_concurrent_writers_never_return_a_torn_or_foreign_value(cache_name, processes,
                                                                  key_space):
    keys = [cache_key(b"stress", str(n).encode()) for n in range(key_space)]
    results = FORK.Queue()
    with ShmCache.create(cache_name, capacity=16, ttl_ms=60_000, value_size=VALUE_SIZE) as cache:
        for writer in range(WRITERS):
            process = FORK.Process(target=hammer,
                                   args=(cache_name, writer, keys, STRESS_SECONDS, results))
            processes.append(process)
            process.start()
        reports = [results.get(timeout=30) for _ in range(WRITERS)]
        for process in processes:
            process.join(timeout=10)
            assert process.exitcode == 0
        assert [report["problems"] for report in reports] == [[]] * WRITERS
        assert all(report["hits"] > 0 and report["puts"] > 0 for report in reports)
        assert cache.count() <= cache.capacity
        for key in keys:
            value = cache.get(key)
            assert value is None or value_problem(key, value) is None


@pytest.mark.timeout(60)
def test_writers_killed_mid_put_leave_a_usable_cache(cache_name, processes):
    keys = [cache_key(b"crash", str(n).encode()) for n in range(64)]
    rng = random.Random(1)
    with ShmCache.create(cache_name, capacity=1024, ttl_ms=60_000,
                         value_size=VALUE_SIZE) as cache:
        for _ in range(3):
            ready = FORK.Event()
            process = FORK.Process(target=put_until_killed, args=(cache_name, keys, ready))
            processes.append(process)
            process.start()
            assert ready.wait(timeout=20)
            time.sleep(rng.uniform(0.05, 0.2))
            os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=10)
            assert process.exitcode == -signal.SIGKILL
        assert_cache_is_sound(cache, keys)


@pytest.mark.timeout(60)
def test_writer_dying_halfway_through_a_slot_leaves_a_miss(cache_name, processes):
    key = cache_key(b"half")
    others = [cache_key(b"other", str(n).encode()) for n in range(32)]
    with ShmCache.create(cache_name, capacity=1024, ttl_ms=60_000,
                         value_size=VALUE_SIZE) as cache:
        process = FORK.Process(target=put_and_crash_halfway, args=(cache_name, key))
        processes.append(process)
        process.start()
        process.join(timeout=20)
        assert process.exitcode == 0  # exited from inside the slot write
        assert cache.get(key) is None  # neither the old value nor half of the new one
        assert_cache_is_sound(cache, [key, *others])


@pytest.mark.timeout(60)
def test_spawned_interpreter_attaches_by_name_and_leaves_the_segment(cache_name, processes):
    question, answer = cache_key(b"question"), cache_key(b"answer")
    results = SPAWN.Queue()
    with ShmCache.create(cache_name, capacity=64, ttl_ms=60_000) as cache:
        cache.put(question, b"from the creator")
        process = SPAWN.Process(target=attach_and_answer,
                                args=(cache_name, question, answer, results))
        processes.append(process)
        process.start()
        assert results.get(timeout=30) == b"from the creator"
        process.join(timeout=30)
        assert process.exitcode == 0
        assert os.path.exists(cache.segment.path)  # no resource tracker unlinked it
        assert cache.get(answer) == b"from a spawned interpreter"
    assert not os.path.exists(os.path.join(DEFAULT_DIRECTORY, cache_name))
