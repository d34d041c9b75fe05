"""The writer: a sidecar of the master that drains every worker's ring into Postgres, nothing lost.

Loop (asyncio on uvloop; Postgres through ``workers/prediction_sink.py``):

1. Take a batch from the rings (up to ``SIRA_WRITER_BATCH_ROWS`` records, every slot in turn).
2. Postgres reachable: COPY it and ``INSERT ... ON CONFLICT (prediction_id) DO NOTHING``,
   commit. Postgres away: write it to the spool (``workers/spool.py``, fsynced). Only
   then advance the rings' read positions. A writer killed in between re-sends at most that batch,
   and the insert is idempotent, so nothing is lost and nothing doubled.
3. Postgres reachable again: replay the spool oldest first, and the overflow files that workers
   wrote while their ring was full, between ring batches.

A batch that Postgres refuses as data (a row that breaks a constraint) is retried row by row; the
rows it still refuses are kept under ``<spool>/rejected`` with the error and counted, never lost
silently. SIGTERM (also SIGINT, SIGQUIT): drain every ring to Postgres or the spool, replay what
the disk holds while time allows, exit 0. The master stops the HTTP workers first, so nothing is
appended behind the drain, and if the rings still hold records when the master leaves (a writer
that was down at that moment) the master drains them itself (``prediction_log_segments``).

Counters go to the counter block (``app.predlog.Stat``) for metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterator

import orjson

from app.predlog import PredictionLogConfig, Stat, stat_cells
from conf.settings import Settings
from shm.counters import CounterBlock
from shm.ring import QueueRings, RingReader
from shm.segment import segment_name
from workers.arbiter import Sidecar
from workers.paths import data_path
from workers.prediction_sink import DatabaseAway, PostgresSink
from workers.retry import Backoff
from workers.spool import BatchSpool, OverflowFiles, SpoolCorrupt

log = logging.getLogger("sira.writer")

POLL_S = 0.01                # idle wait between two looks at the rings
HOUSEKEEPING_S = 0.5         # counters that need a scan (ages, files)
STOP_DEADLINE_S = 25.0       # the master waits 30 s for the writer to stop
RING_BATCH_BYTES = 16 * 1024 * 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RECONNECT_FIRST_S = 0.5      # Postgres away: probed after 0.5, 1, 2, 4, 5, 5 ... s, jittered (workers/retry.py)
RECONNECT_MAX_S = 5.0


class PredictionWriter:
    """Moves prediction records from the rings (and the disk) into Postgres; see the module doc."""

    def __init__(self, config: PredictionLogConfig, rings: QueueRings, stats: CounterBlock,
                 spool: BatchSpool, sink: PostgresSink) -> None:
        self.config = config
        self.rings = rings
        self.stats = stats
        self.spool = spool
        self.sink = sink
        self.readers: list[RingReader] = [rings.reader(slot) for slot in range(rings.slots)]
        self.overflow = OverflowFiles(config.overflow_dir, config.instance_id,
                                      lambda slot: self.readers[slot].producer()[1])
        self.database_up = True  # until a write says otherwise
        self.stopping = asyncio.Event()
        self._next_slot = 0
        self._retry_at = 0.0
        self._reconnect_backoff = Backoff(RECONNECT_FIRST_S, RECONNECT_MAX_S)
        self._housekeeping_at = 0.0
        self._spool_full_logged = False

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> int:
        """Drain until asked to stop, then drain everything left; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a re-sync is not for the writer
        self.stats.set(Stat.WRITER_PID, os.getpid())
        log.info("prediction writer started (pid %d, %d rings)", os.getpid(), len(self.readers))
        while not self.stopping.is_set():
            started = time.monotonic()
            moved, replayed = await self.step()
            if replayed or moved >= self.config.batch_rows:
                continue  # a backlog: no pause
            pause = self.pause_after(moved, time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)
        await self.drain(time.monotonic() + STOP_DEADLINE_S)
        return 0

    def pause_after(self, moved: int, took_s: float) -> float:
        """How long to wait before the next look at the rings.

        A commit costs Postgres about the same whatever its size, so rows that arrive at a steady
        rate are sent at most every ``linger_s`` (SIRA_WRITER_LINGER_MS) rather than as soon as
        the last commit returns: measured (README, prediction log), the writer and Postgres spent
        34 us of CPU per row at 100 ms instead of 108 us. Idle rings are looked at every POLL_S.
        """
        if not moved:
            return POLL_S
        return max(self.config.linger_s - took_s, 0.0)

    async def step(self) -> tuple[int, bool]:
        """One ring batch, then one backlog item: (records moved from the rings, whether one was replayed)."""
        await self._maybe_reconnect()
        moved = await self.move_ring_batch()
        replayed = await self.replay_one() if self.database_up else False
        self._housekeeping()
        return moved, bool(replayed)

    async def drain(self, deadline: float) -> None:
        """Empty every ring (to Postgres or the spool), then replay the disk while time allows."""
        while time.monotonic() < deadline:
            await self._maybe_reconnect()
            if not await self.move_ring_batch(force=True):
                break
        left = sum(reader.depth_records() for reader in self.readers)
        if left:
            log.error("prediction writer stops with %d records still in the rings", left)
        self._retry_at = 0.0  # Postgres may be back by now: look before giving up on the replay
        await self._maybe_reconnect()
        while self.database_up and time.monotonic() < deadline and await self.replay_one():
            pass
        self.overflow.make_durable()
        self._housekeeping(force=True)
        log.info("prediction writer drained: %d spool batches and %d overflow files wait for the "
                 "next start", self.spool.batches, self.overflow.waiting())

    # -- rings ------------------------------------------------------------------------------------

    def take_ring_batch(self) -> tuple[list[bytes], list[tuple[RingReader, int]]]:
        """Up to batch_rows records from the rings, each slot in turn; with the positions to commit."""
        records: list[bytes] = []
        ends: list[tuple[RingReader, int]] = []
        count = len(self.readers)
        for i in range(count):
            reader = self.readers[(self._next_slot + i) % count]
            room = self.config.batch_rows - len(records)
            if room <= 0:
                break
            part, end = reader.peek_batch(room, RING_BATCH_BYTES)
            if part:
                records.extend(part)
                ends.append((reader, end))
        self._next_slot = (self._next_slot + 1) % count
        return records, ends

    async def move_ring_batch(self, force: bool = False) -> int:
        """Move one ring batch to Postgres, or to the spool; the rings advance only after that."""
        records, ends = self.take_ring_batch()
        if not records:
            return 0
        written = self.database_up and await self.write_rows(records)
        if not written and not self.spool_batch(records, force):
            return 0
        for reader, end in ends:
            reader.commit(end)
        return len(records)

    def spool_batch(self, records: list[bytes], force: bool) -> bool:
        """Postgres is away: keep the batch on disk. False when it must stay in the rings."""
        if not force and not self.spool.has_room():
            if not self._spool_full_logged:
                log.error("prediction spool is full (SIRA_SPOOL_MAX_BYTES=%d): new predictions wait "
                          "in the rings, then in the workers' overflow files", self.spool.max_bytes)
                self._spool_full_logged = True
            return False
        self._spool_full_logged = False
        try:
            self.spool.append(records, force=True)
        except OSError as exc:
            log.error("prediction spool write failed (%s): the batch stays in the rings", exc)
            return False
        self.stats.add(Stat.ROWS_SPOOLED, len(records))
        return True

    # -- Postgres ---------------------------------------------------------------------------------

    async def write_rows(self, records: list[bytes]) -> bool:
        """Commit a batch to Postgres; False (and Postgres marked away) when it cannot."""
        started = time.perf_counter()
        rejected_before = self.sink.rows_rejected
        try:
            await self.sink.write(records)
        except DatabaseAway as exc:
            self._database_away(exc)
            return False
        elapsed_us = int((time.perf_counter() - started) * 1e6)
        stats = self.stats
        stats.add(Stat.ROWS_WRITTEN, len(records))
        stats.add(Stat.BATCHES_WRITTEN)
        stats.set(Stat.LAST_BATCH_ROWS, len(records))
        stats.set(Stat.LAST_FLUSH_US, elapsed_us)
        stats.add(Stat.FLUSH_US_TOTAL, elapsed_us)
        stats.add(Stat.ROWS_REJECTED, self.sink.rows_rejected - rejected_before)
        return True

    def _database_away(self, exc: Exception) -> None:
        if self.database_up:
            log.error("Postgres is away (%s): spooling prediction batches to %s", exc,
                      self.spool.directory)
        self.database_up = False
        self.stats.set(Stat.DATABASE_UP, 0)
        self._retry_at = time.monotonic() + self._reconnect_backoff.next_delay()

    async def _maybe_reconnect(self) -> None:
        if self.database_up or time.monotonic() < self._retry_at:
            return
        if await self.sink.reachable():
            log.info("Postgres is back: replaying %d spooled batches and %d overflow files",
                     self.spool.batches, self.overflow.waiting())
            self.database_up = True
            self.stats.set(Stat.DATABASE_UP, 1)
            self._reconnect_backoff.reset()
        else:
            self._retry_at = time.monotonic() + self._reconnect_backoff.next_delay()

    # -- backlog on disk --------------------------------------------------------------------------

    async def replay_one(self) -> bool:
        """Replay the oldest spooled batch, else one ready overflow file; True if one went in."""
        try:
            batch = self.spool.oldest()
        except SpoolCorrupt as exc:  # set aside by oldest(); look again next time
            log.error("%s", exc)
            return True
        if batch is not None:
            if not await self.write_rows(batch.records):
                return False
            self.spool.remove(batch)
            self.stats.add(Stat.ROWS_REPLAYED, len(batch.records))
            return True
        for path in self.overflow.ready():
            try:
                item = self.overflow.read(path)
            except FileNotFoundError:
                continue
            if item.records and not await self.write_rows(item.records):
                return False
            self.overflow.remove(item)
            self.stats.add(Stat.ROWS_REPLAYED, len(item.records))
            return True
        return False

    # -- counters ---------------------------------------------------------------------------------

    def _housekeeping(self, force: bool = False) -> None:
        """Counters that cost a scan, at most every HOUSEKEEPING_S."""
        now = time.monotonic()
        stats = self.stats
        stats.set(Stat.WRITER_HEARTBEAT_MS, int(time.time() * 1000))
        if not force and now < self._housekeeping_at:
            return
        self._housekeeping_at = now + HOUSEKEEPING_S
        stats.set(Stat.SPOOL_BYTES, self.spool.bytes_used)
        stats.set(Stat.SPOOL_BATCHES, self.spool.batches)
        stats.set(Stat.SPOOL_FULL, 0 if self.spool.has_room() else 1)
        stats.set(Stat.OVERFLOW_FILES, self.overflow.waiting())
        stats.set(Stat.DATABASE_UP, 1 if self.database_up else 0)
        stats.set(Stat.OLDEST_UNWRITTEN_MS, int(self.oldest_unwritten_s() * 1000))

    def oldest_unwritten_s(self) -> float:
        """Age of the oldest record still waiting in any ring (0 when they are empty)."""
        oldest = None
        for reader in self.readers:
            record = reader.oldest()
            if record is None:
                continue
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                created = orjson.loads(record)["created_at"]
                oldest = created if oldest is None else min(oldest, created)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)


# -- the process --------------------------------------------------------------------------------

async def writer_main(config: PredictionLogConfig, until_stopped: bool = True) -> int:
    """Attach, drain (until SIGTERM, or only once when ``until_stopped`` is false), close."""
    rings = QueueRings.attach(config.rings_segment)
    stats = CounterBlock.attach(config.stats_segment)
    spool = BatchSpool(config.batches_dir, config.spool_max_bytes).open()
    sink = PostgresSink(config.database_url, config.rejected_dir)
    try:
        await sink.open()
        writer = PredictionWriter(config, rings, stats, spool, sink)
        if until_stopped:
            return await writer.run()
        await writer.drain(time.monotonic() + STOP_DEADLINE_S)
        return 0
    finally:
        await sink.close()
        spool.close()
        stats.close()
        rings.close()


def run_writer(config: PredictionLogConfig) -> int:
    """The writer sidecar's entry point, in the child the master forked."""
    import uvloop

    # The pool warns at every failed connection attempt; the writer says once that Postgres is away
    # and once that it is back (one line per change, not per retry).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    return uvloop.run(writer_main(config))


# -- in the master ------------------------------------------------------------------------------

RINGS_KIND = "predlog"
STATS_KIND = "predstats"
SPOOL_DIR = "spool"


def prediction_log_config(settings: Settings, dsn: str, instance_id: str) -> PredictionLogConfig:
    """The prediction log of one ``sira serve``: one ring per worker, the spool in the data dir."""
    return PredictionLogConfig(
        instance_id=instance_id,
        rings_segment=segment_name(instance_id, RINGS_KIND),
        stats_segment=segment_name(instance_id, STATS_KIND),
        slots=settings.workers,
        ring_bytes=settings.queue_ring_bytes,
        spool_dir=data_path(settings.data_dir, SPOOL_DIR),
        database_url=dsn,
        spool_max_bytes=settings.spool_max_bytes,
        batch_rows=settings.writer_batch_rows,
        linger_s=settings.writer_linger_ms / 1000.0,
    )


def writer_sidecar(config: PredictionLogConfig, pidfile: str) -> Sidecar:
    """The writer as a sidecar of the master (restarted with backoff, stopped after the workers)."""
    return Sidecar(name="writer", run=functools.partial(run_writer, config), pidfile=pidfile)


@contextlib.contextmanager
def prediction_log_segments(config: PredictionLogConfig) -> Iterator[None]:
    """The master creates the rings and counters before the fork, and removes them when this exits.

    At exit the writer has stopped (sidecars stop after the workers). Rings that still hold records
    (the writer was down at that moment) are drained here first, to Postgres or the spool; rings
    that cannot be drained stay in /dev/shm, named in the log, rather than be lost. Forked workers
    unwind the master's stack through here too: they only unmap.
    """
    for directory in (config.spool_dir, config.overflow_dir, config.batches_dir):
        os.makedirs(directory, exist_ok=True)
    rings = QueueRings.create(config.rings_segment, config.slots, config.ring_bytes)
    stats = None
    try:
        stats = CounterBlock.create(config.stats_segment, stat_cells(config.slots))
        stats.set(Stat.DATABASE_UP, 1)
        yield
    finally:
        in_master = rings.segment.is_owner
        drained = drain_left_behind(config, rings) if in_master and stats is not None else True
        rings.close()
        if stats is not None:
            stats.close()
        if in_master:
            if drained:
                rings.unlink()
            if stats is not None:
                stats.unlink()


def drain_left_behind(config: PredictionLogConfig, rings: QueueRings) -> bool:
    """In the master at exit: drain what no writer took. False if records are still there."""
    if not any(rings.reader(slot).depth_bytes() for slot in range(rings.slots)):
        return True
    log.warning("the rings still hold prediction records at exit: draining them now")
    import uvloop

    try:
        uvloop.run(writer_main(config, until_stopped=False))
    except Exception:
        log.exception("draining the rings at exit failed")
    left = sum(rings.reader(slot).depth_bytes() for slot in range(rings.slots))
    if left:
        log.error("%d bytes of prediction records stay in %s", left, rings.segment.path)
    return not left


def main(argv: list[str] | None = None) -> int:
    """Run a writer on its own (tests, benchmarks): ``python -m workers.writer CONFIG_JSON``."""
    import dataclasses
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.writer '<PredictionLogConfig as JSON>'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fields = orjson.loads(args[0])
    config = PredictionLogConfig(**{f.name: fields[f.name] for f in dataclasses.fields(PredictionLogConfig)})
    return run_writer(config)


if __name__ == "__main__":
    raise SystemExit(main())
