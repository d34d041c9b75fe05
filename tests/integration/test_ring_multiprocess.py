"""Queue rings across real processes: a producer and a consumer, and producers SIGKILLed."""
from __future__ import annotations

import array
import multiprocessing
import os
import random
import signal
import struct
import time
import uuid
from typing import Any, NamedTuple

import pytest

from shm.ring import READ_POS, SLOT_HEADER_SIZE, QueueRings

NUMBER = struct.Struct("<Q")
PATTERN = bytes(range(256)) * 3
PRODUCER_RANGE = 1 << 40  # producer k appends numbers from k * PRODUCER_RANGE
CONTEXT = multiprocessing.get_context("spawn")
JOIN_SECONDS = 60

pytestmark = pytest.mark.timeout(180)


def make_record(number: int) -> bytes:
    """A record that names its number and whose size and bytes derive from it (150-400 B)."""
    size = 142 + number * 7919 % 251
    start = number % 256
    return NUMBER.pack(number) + PATTERN[start:start + size]


def check_record(record: bytes) -> int:
    """The record's number, or ValueError when its bytes are not what make_record wrote."""
    number = NUMBER.unpack_from(record)[0]
    if record != make_record(number):
        raise ValueError(f"record {number} damaged: {len(record)} bytes")
    return number


def produce(name: str, directory: str, slot: int, first: int, count: int,
            appended) -> None:
    """Append numbered records, spinning while the ring is full; report each one appended."""
    writer = QueueRings.attach(name, directory).writer(slot)
    for number in range(first, first + count):
        record = make_record(number)
        while not writer.append(record):
            time.sleep(0)
        appended.value = number - first + 1


def consume(name: str, directory: str, slot: int, stop, pause, paused, conn) -> None:
    """Drain with peek/commit until told to stop and the ring is empty; send every number.

    While ``pause`` is set it drains nothing (and says so through ``paused``), so that the
    test can kill a producer or damage a record while records are waiting in the ring. A
    damaged record is set aside with ``skip_damaged`` and sent back as well.
    """
    reader = QueueRings.attach(name, directory).reader(slot)
    numbers = array.array("Q")
    set_aside: list[bytes] = []
    try:
        while True:
            if pause.is_set():
                paused.set()
                time.sleep(0.0005)
                continue
            stopping = stop.is_set()
            records, end = reader.peek_batch(max_records=500, max_bytes=64 * 1024)
            if not records:
                if reader.damaged_at is not None:
                    set_aside.append(reader.skip_damaged())
                    continue
                if stopping:
                    break
                time.sleep(0.0005)
                continue
            numbers.extend(check_record(record) for record in records)
            reader.commit(end)
        conn.send(("ok", numbers.tobytes(), reader.producer(), set_aside))
    except Exception as exc:  # reported to the test, which fails with it
        conn.send(("error", repr(exc), None, None))


@pytest.fixture
def rings_segment():
    """A rings segment in /dev/shm with small rings (many wrap-arounds), always unlinked."""
    rings = QueueRings.create(f"sira-test-{uuid.uuid4().hex[:12]}-rings", slots=2,
                              ring_bytes=64 * 1024)
    try:
        yield rings
    finally:
        rings.close()
        rings.unlink()
        assert not os.path.exists(rings.segment.path)


@pytest.fixture
def processes():
    """Start spawned processes; kill and reap any left running when the test ends."""
    started: list[multiprocessing.Process] = []

    def start(target, *args) -> multiprocessing.Process:
        process = CONTEXT.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
            process.join(10)


class ConsumerHandle(NamedTuple):
    stop: Any
    pause: Any
    paused: Any
    receive: Any


def start_consumer(start, rings: QueueRings, slot: int) -> ConsumerHandle:
    receive, send = CONTEXT.Pipe(duplex=False)
    handle = ConsumerHandle(CONTEXT.Event(), CONTEXT.Event(), CONTEXT.Event(), receive)
    start(consume, rings.segment.name, os.path.dirname(rings.segment.path), slot,
          handle.stop, handle.pause, handle.paused, send)
    return handle


def collect(consumer: ConsumerHandle) -> tuple[list[int], tuple[int, int]]:
    numbers, producer, set_aside = collect_all(consumer)
    assert set_aside == [], "the consumer set damaged records aside"
    return numbers, producer


def collect_all(consumer: ConsumerHandle) -> tuple[list[int], tuple[int, int], list[bytes]]:
    """Stop the consumer: the numbers it drained, the last producer, the bytes it set aside."""
    consumer.stop.set()
    assert consumer.receive.poll(JOIN_SECONDS), "consumer did not finish"
    status, payload, producer, set_aside = consumer.receive.recv()
    assert status == "ok", payload
    return array.array("Q", payload).tolist(), producer, set_aside


def check_consumer_running(consumer: ConsumerHandle) -> None:
    """Fail now, with its reason, if the consumer stopped early (it only reports at the end)."""
    if consumer.receive.poll():
        raise AssertionError(f"consumer stopped early: {consumer.receive.recv()}")


def wait_until(condition, consumer: ConsumerHandle) -> None:
    deadline = time.monotonic() + JOIN_SECONDS
    while not condition():
        check_consumer_running(consumer)
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


def join_ok(process: multiprocessing.Process, consumer: ConsumerHandle) -> None:
    wait_until(lambda: process.exitcode is not None, consumer)
    assert process.exitcode == 0, f"producer exit code {process.exitcode}"


def test_consumer_sees_every_record_once_and_in_order(rings_segment, processes):
    total = 200_000
    name, directory = rings_segment.segment.name, os.path.dirname(rings_segment.segment.path)
    consumer = start_consumer(processes, rings_segment, 1)
    appended = CONTEXT.Value("q", 0, lock=False)
    join_ok(processes(produce, name, directory, 1, 0, total, appended), consumer)
    numbers, _producer = collect(consumer)
    assert appended.value == total
    assert numbers == list(range(total))
    assert rings_segment.reader(1).depth_records() == 0
    assert rings_segment.reader(0).depth_bytes() == 0  # the other slot was never touched


def wait_for(appended, at_least: int, consumer: ConsumerHandle) -> None:
    wait_until(lambda: appended.value >= at_least, consumer)


def pause_consumer(consumer: ConsumerHandle) -> None:
    consumer.paused.clear()
    consumer.pause.set()
    assert consumer.paused.wait(JOIN_SECONDS), "consumer did not pause"


def test_records_of_a_killed_producer_are_drained_after_takeover(rings_segment, processes):
    name, directory = rings_segment.segment.name, os.path.dirname(rings_segment.segment.path)
    reader = rings_segment.reader(0)  # only to look at the slot from the test
    consumer = start_consumer(processes, rings_segment, 0)
    reported = []
    for epoch in (1, 2, 3):  # three producers in turn, each SIGKILLed mid-run
        first = epoch * PRODUCER_RANGE
        appended = CONTEXT.Value("q", 0, lock=False)
        producer = processes(produce, name, directory, 0, first, 10_000_000, appended)
        # Resume draining only once it took the slot over, records of the last one waiting.
        wait_until(lambda epoch=epoch: reader.producer()[1] == epoch, consumer)
        consumer.pause.clear()
        wait_for(appended, 20_000, consumer)
        pause_consumer(consumer)
        wait_until(lambda: reader.depth_bytes() > 0, consumer)
        time.sleep(random.uniform(0, 0.002))  # kill it running: mid-append or spinning
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(JOIN_SECONDS)
        assert producer.exitcode == -signal.SIGKILL
        reported.append((first, appended.value))
    last_first = 4 * PRODUCER_RANGE
    last = processes(produce, name, directory, 0, last_first, 30_000,
                     CONTEXT.Value("q", 0, lock=False))
    wait_until(lambda: reader.producer()[1] == 4, consumer)
    consumer.pause.clear()
    join_ok(last, consumer)
    numbers, (pid, epoch) = collect(consumer)

    assert (pid, epoch) == (last.pid, 4)
    cursor = 0
    for first, count in reported:
        # Every record the killed producer reported appended is drained, in order, once;
        # at most one more (appended, killed before it could report) may follow.
        assert numbers[cursor:cursor + count] == list(range(first, first + count))
        cursor += count
        if cursor < len(numbers) and numbers[cursor] == first + count:
            cursor += 1
    assert numbers[cursor:] == list(range(last_first, last_first + 30_000))


def damage_oldest_record(rings: QueueRings, slot: int) -> bytes:
    """Flip a payload byte of the oldest unconsumed record; return its header + damaged payload."""
    base = rings.layout.slot_base(slot)
    buf = rings.segment.buf
    read_pos = NUMBER.unpack_from(buf, base + READ_POS)[0]
    data = base + SLOT_HEADER_SIZE
    if read_pos % rings.ring_bytes > rings.ring_bytes - 8 - 400:
        return b""  # its payload may wrap: let the caller try again further on
    at = data + read_pos % rings.ring_bytes
    length = struct.unpack_from("<I", buf, at)[0]
    buf[at + 8 + 100] ^= 0x5A  # after the number, inside every record (142 bytes or more)
    return buf[at:at + 8 + length]


def test_a_damaged_record_is_set_aside_and_the_rest_arrive_while_the_producer_runs(
        rings_segment, processes):
    total = 100_000
    name, directory = rings_segment.segment.name, os.path.dirname(rings_segment.segment.path)
    reader = rings_segment.reader(0)  # only to look at the slot from the test
    consumer = start_consumer(processes, rings_segment, 0)
    appended = CONTEXT.Value("q", 0, lock=False)
    producer = processes(produce, name, directory, 0, 0, total, appended)
    damaged = b""
    while not damaged:
        wait_for(appended, 10_000 + appended.value // 2, consumer)
        pause_consumer(consumer)  # the producer keeps appending (until the ring is full)
        wait_until(lambda: reader.depth_bytes() > 0, consumer)
        damaged = damage_oldest_record(rings_segment, 0)
        consumer.pause.clear()
    join_ok(producer, consumer)
    numbers, _producer, set_aside = collect_all(consumer)

    assert set_aside == [damaged]  # header and payload as stored, for the caller to keep
    lost = NUMBER.unpack_from(damaged, 8)[0]
    assert numbers == [n for n in range(total) if n != lost]
    assert reader.depth_bytes() == 0 and reader.depth_records() == 0
