"""Cost of the queue rings and the control block on the request path and in the writer.

Run: ``python -m bench.bench_shm [--iterations N]``. Per-call rows time each call alone with
``perf_counter_ns`` (median and 99th percentile in microseconds, timer overhead included and
printed last); "mean" rows time a loop of calls and divide, which hides the timer. Segments
live in /dev/shm and are unlinked at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
import uuid
from collections.abc import Callable

from shm.control import ControlBlock, ModelSlot, ProductEntry
from shm.ring import QueueRings, RingReader, RingWriter

RECORD_SIZES = (150, 300, 400)


def percentiles_us(samples: list[int]) -> tuple[float, float]:
    """(median, p99) of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    return (statistics.median(ordered) / 1000,
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000)


def mean_ns(call: Callable[[], object], iterations: int) -> float:
    """Mean nanoseconds of one call over a tight loop (no per-call timer)."""
    for _ in range(min(iterations, 1000)):
        call()
    start = time.perf_counter_ns()
    for _ in range(iterations):
        call()
    return (time.perf_counter_ns() - start) / iterations


def time_appends(writer: RingWriter, reader: RingReader, record: bytes,
                 iterations: int) -> list[int]:
    """Per-append nanoseconds; the ring is drained (untimed) whenever it fills."""
    samples = []
    clock = time.perf_counter_ns
    while len(samples) < iterations:
        start = clock()
        appended = writer.append(record)
        elapsed = clock() - start
        if appended:
            samples.append(elapsed)
        else:
            reader.commit(reader.peek_batch(max_records=1 << 30, max_bytes=1 << 40)[1])
    return samples


def mean_append_ns(writer: RingWriter, reader: RingReader, record: bytes,
                   iterations: int) -> float:
    """Mean nanoseconds of an append over loops that fill the ring (drained untimed)."""
    appended, spent = 0, 0
    while appended < iterations:
        start = time.perf_counter_ns()
        while writer.append(record):
            appended += 1
        spent += time.perf_counter_ns() - start
        reader.commit(reader.peek_batch(max_records=1 << 30, max_bytes=1 << 40)[1])
    return spent / appended


def fill_and_drain(writer: RingWriter, reader: RingReader) -> None:
    """One pass over the whole ring, so page faults of first touch stay out of the timings."""
    while writer.append(bytes(300)):
        pass
    reader.commit(reader.peek_batch(max_records=1 << 30, max_bytes=1 << 40)[1])


def drain_rate(writer: RingWriter, reader: RingReader, record: bytes,
               batch: int) -> float:
    """Records per second through peek_batch + commit, the ring refilled untimed."""
    drained, spent = 0, 0
    while drained < 200_000:
        while writer.append(record):
            pass
        start = time.perf_counter_ns()
        while True:
            records, end = reader.peek_batch(max_records=batch, max_bytes=1 << 30)
            if not records:
                break
            reader.commit(end)
            drained += len(records)
        spent += time.perf_counter_ns() - start
    return drained / (spent / 1e9)


def bench_rings(iterations: int) -> list[tuple[str, str]]:
    """Rows for append (per size), free_bytes and draining."""
    rows = []
    name = f"sira-bench-{os.getpid()}-rings"
    with QueueRings.create(name, slots=1, ring_bytes=4 * 1024 * 1024) as rings:
        writer, reader = rings.writer(0), rings.reader(0)
        fill_and_drain(writer, reader)
        for size in RECORD_SIZES:
            record = os.urandom(size)
            median, p99 = percentiles_us(time_appends(writer, reader, record, iterations))
            rows.append((f"ring append {size} B (per call)",
                         f"median {median:6.2f} us   p99 {p99:6.2f} us"))
            reader.commit(reader.peek_batch(1 << 30, 1 << 40)[1])
        record = os.urandom(300)
        rows.append(("ring append 300 B (mean of loop)",
                     f"{mean_append_ns(writer, reader, record, iterations):8.0f} ns"))
        rows.append(("ring free_bytes", f"{mean_ns(writer.free_bytes, iterations):8.0f} ns"))
        reader.commit(reader.peek_batch(1 << 30, 1 << 40)[1])
        for batch in (100, 1000):
            rate = drain_rate(writer, reader, record, batch)
            rows.append((f"ring drain 300 B, batches of {batch}", f"{rate:10,.0f} records/s"))
    return rows


def sample_table(products: int) -> dict[str, ProductEntry]:
    """A realistic table: every product with a production and a canary model."""
    def slot(n: int) -> ModelSlot:
        return ModelSlot(model_id=str(uuid.uuid4()), version=f"2026.11.{n}",
                         path=f"/var/lib/sira/models/{uuid.uuid4()}.onnx",
                         spec_path=f"/var/lib/sira/models/{uuid.uuid4()}.json",
                         threshold=0.7, loaded_at=time.time())
    return {f"product_{n}": ProductEntry(f"product_{n}", slot(n), slot(n + 1), 1000, "canary")
            for n in range(products)}


def bench_control(iterations: int) -> list[tuple[str, str]]:
    """Rows for the per-request generation read, table reads and publishes."""
    rows = []
    name = f"sira-bench-{os.getpid()}-control"
    with ControlBlock.create(name) as block:
        reader = ControlBlock.attach(name, readonly=True)
        try:
            rows.append(("control generation() (mean of loop)",
                         f"{mean_ns(reader.generation, iterations * 10):8.0f} ns"))
            samples = []
            for _ in range(iterations):
                start = time.perf_counter_ns()
                reader.generation()
                samples.append(time.perf_counter_ns() - start)
            median, p99 = percentiles_us(samples)
            rows.append(("control generation() (per call)",
                         f"median {median:6.2f} us   p99 {p99:6.2f} us"))
            raw = struct.Struct("<Q")
            offset = block.segment.header_size
            buf = reader.segment.buf
            bare = mean_ns(lambda: raw.unpack_from(buf, offset)[0], iterations * 10)
            rows.append(("  bare unpack_from of 8 bytes", f"{bare:8.0f} ns"))
            table_rounds = max(100, iterations // 100)
            for products in (1, 4, 16):
                block.publish(sample_table(products))
                cost = mean_ns(reader.read_table, table_rounds) / 1000
                rows.append((f"control read_table, {products} products", f"{cost:8.1f} us"))
            table = sample_table(16)
            cost = mean_ns(lambda: block.publish(table), table_rounds) / 1000
            rows.append(("control publish, 16 products", f"{cost:8.1f} us"))
        finally:
            reader.close()
    return rows


def timer_overhead_us(iterations: int) -> float:
    """Median cost of the two perf_counter_ns calls around a per-call sample."""
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args()
    rows = bench_rings(args.iterations) + bench_control(args.iterations)
    print(f"shm bench, {args.iterations} iterations (python {sys.version.split()[0]})")
    for label, value in rows:
        print(f"  {label:<40} {value}")
    print(f"  {'timer overhead (per call rows)':<40} {timer_overhead_us(args.iterations):6.2f} us")


if __name__ == "__main__":
    main()
