"""Control block across real processes: one publisher in a tight loop, three readers."""
from __future__ import annotations

import functools
import multiprocessing
import os
import time
import uuid

import pytest

from shm.control import ControlBlock, ModelSlot, ProductEntry

CONTEXT = multiprocessing.get_context("spawn")
MAX_PRODUCTS = 16
PUBLISHES = 3_000
READERS = 3
JOIN_SECONDS = 90

pytestmark = pytest.mark.timeout(180)


def slot_for(generation: int, product: int, role: int) -> ModelSlot:
    """A model slot whose every field derives from (generation, product, role)."""
    key = f"{generation}-{product}-{role}"
    return ModelSlot(model_id=str(uuid.UUID(int=(generation << 16) | (product << 1) | role)),
                     version=f"v{key}", path=f"/models/{key}/" + "p" * (generation % 200),
                     spec_path=f"/specs/{key}.json", threshold=generation + product / 100,
                     loaded_at=float(generation))


@functools.lru_cache(maxsize=4)  # readers re-read a generation many times: check them fast
def table_for(generation: int) -> dict[str, ProductEntry]:
    """The table published as ``generation``: its size and every field derive from it."""
    table: dict[str, ProductEntry] = {}
    if generation == 0:
        return table  # a new block holds the empty table
    for product in range(1 + generation % MAX_PRODUCTS):
        name = f"product-{product}-{generation}"
        table[name] = ProductEntry(
            product=name, production=slot_for(generation, product, 0),
            canary=slot_for(generation, product, 1) if (generation + product) % 3 else None,
            canary_bp=(generation * 7 + product) % 10_001,
            mode="shadow" if generation % 2 else "canary")
    return table


def publish_loop(name: str, directory: str, ready, go) -> None:
    """Publish PUBLISHES tables back to back, each derived from its generation."""
    block = ControlBlock.attach(name, directory)
    for _ in range(READERS):  # start once every reader is attached
        ready.acquire(timeout=JOIN_SECONDS)
    go.set()
    for _ in range(PUBLISHES):
        generation = block.generation() + 1
        if block.publish(table_for(generation)) != generation:
            raise SystemExit(3)


def read_loop(name: str, directory: str, ready, go, results) -> None:
    """Read snapshots until the last generation; report reads, generations and any mismatch."""
    block = ControlBlock.attach(name, directory, readonly=True)
    ready.release()
    go.wait(JOIN_SECONDS)
    reads, seen, bad, last = 0, set(), [], -1
    deadline = time.monotonic() + JOIN_SECONDS
    try:
        while last < PUBLISHES and time.monotonic() < deadline:
            generation, table = block.read_table()
            reads += 1
            seen.add(generation)
            if generation < last or table != table_for(generation):
                bad.append(generation)
            last = generation
    except Exception as exc:  # reported to the test, which fails with it
        bad.append(repr(exc))
    results.put((reads, len(seen), bad[:10], last))


@pytest.fixture
def control_block():
    """A control block in /dev/shm, always unlinked."""
    block = ControlBlock.create(f"sira-test-{uuid.uuid4().hex[:12]}-control",
                                max_products=MAX_PRODUCTS)
    try:
        yield block
    finally:
        block.close()
        block.unlink()
        assert not os.path.exists(block.segment.path)


def test_readers_never_see_an_inconsistent_table(control_block):
    name, directory = control_block.segment.name, os.path.dirname(control_block.segment.path)
    ready, go, results = CONTEXT.Semaphore(0), CONTEXT.Event(), CONTEXT.Queue()
    readers = [CONTEXT.Process(target=read_loop, args=(name, directory, ready, go, results),
                               daemon=True) for _ in range(READERS)]
    publisher = CONTEXT.Process(target=publish_loop, args=(name, directory, ready, go),
                                 daemon=True)
    processes = readers + [publisher]
    try:
        for process in processes:
            process.start()
        reports = [results.get(timeout=JOIN_SECONDS * 2) for _ in readers]
        publisher.join(JOIN_SECONDS)
        assert publisher.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    assert control_block.read_table() == (PUBLISHES, table_for(PUBLISHES))
    for reads, distinct, bad, last in reports:
        assert bad == []
        assert last == PUBLISHES
        assert distinct > 10, f"reader saw only {distinct} generations in {reads} reads"
