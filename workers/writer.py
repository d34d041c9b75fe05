"""The writer: a sidecar of the master that drains every worker's ring into Postgres, nothing lost.

Loop (asyncio on uvloop; Postgres through ``app/predlog/sink.py``):

1. Take a batch from the rings (up to ``SIRA_WRITER_BATCH_ROWS`` records, every slot in turn).
2. Postgres reachable: COPY it and ``INSERT ... ON CONFLICT (prediction_id, created_at) DO NOTHING``,
   commit. Postgres away: write it to the spool (``app/predlog/spool.py``, fsynced). Only
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

The rings include those a dead instance of the data dir left (``workers/writer_rings.py``, which also
sets damaged records aside). Disk errors never end the writer (``app/predlog/disk.py``): what could not
be written stays where it was and is tried again. With Postgres away at stop, the spool is handed to
the bucket, and handed-off spools of any instance are replayed here (``workers/writer_handoff.py``).
The process around this class: ``workers/writer_process.py``.

Counters go to the counter block (``app.predlog.log.Stat``) for metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from app.predlog.disk import DiskTrouble
from app.predlog.handoff import SpoolHandoff
from app.predlog.log import PredictionLogConfig, Stat
from app.predlog.sink import DatabaseAway, PostgresSink
from app.predlog.spool import BatchSpool, OverflowFile, OverflowFiles, SpoolCorrupt, keep_aside
from shm.counters import CounterBlock
from shm.ring import QueueRings
from workers.processes import process_exists
from workers.retry import Backoff
from workers.writer_handoff import BucketSpool
from workers.writer_rings import RingSet

log = logging.getLogger("sira.writer")

POLL_S = 0.01                # idle wait between two looks at the rings
HOUSEKEEPING_S = 0.5         # counters that need a scan (ages, files)
STOP_DEADLINE_S = 25.0       # drain, replay and handoff; the master waits STOP_TIMEOUT_S (30 s) for the writer
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RECONNECT_FIRST_S = 0.5      # Postgres away: probed after 0.5, 1, 2, 4, 5, 5 ... s, jittered (workers/retry.py)
RECONNECT_MAX_S = 5.0


class PredictionWriter:
    """Moves prediction records from the rings (and the disk) into Postgres; see the module doc."""

    def __init__(self, config: PredictionLogConfig, rings: QueueRings, stats: CounterBlock,
                 spool: BatchSpool, sink: PostgresSink, adopted: list[QueueRings] | None = None,
                 handoff: SpoolHandoff | None = None) -> None:
        self.config = config
        self.rings = rings
        self.stats = stats
        self.spool = spool
        self.sink = sink
        self.disk = DiskTrouble(lambda reason: stats.add(Stat.WRITER_DISK_ERRORS + reason), log, "prediction writer")
        self.rings_set = RingSet(rings, adopted or [], stats, config.corrupt_dir, self.disk)
        self.overflow = OverflowFiles(config.overflow_dir, config.instance_id,
                                      lambda slot: self.rings_set.own[slot].producer()[1], process_exists)
        self.database_up = True  # until a write says otherwise
        self.spool_ready = False     # opened (counted) in the first step; again after a disk error
        self.overflow_bytes = 0      # the workers' overflow files share the spool's budget
        # the bucket's handed-off spool (app/predlog/handoff.py): sent at stop, replayed from any instance
        self.handoff = BucketSpool(handoff, stats, sink, self._database_away) if handoff else None
        self.stopping = asyncio.Event()
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
        log.info("prediction writer started (pid %d, %d rings)", os.getpid(), len(self.rings_set.readers))
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
        the last commit returns: measured (docs/prediction-log.md), the writer and Postgres spent
        34 us of CPU per row at 100 ms instead of 108 us. Idle rings are looked at every POLL_S.
        """
        if not moved:
            return POLL_S
        return max(self.config.linger_s - took_s, 0.0)

    async def step(self) -> tuple[int, bool]:
        """One ring batch, then one backlog item: (records moved from the rings, whether one was replayed)."""
        self.open_spool()
        await self._maybe_reconnect()
        moved = await self.move_ring_batch()
        replayed = await self.replay_one() if self.database_up else False
        self._housekeeping()
        return moved, bool(replayed)

    async def drain(self, deadline: float) -> None:
        """Empty every ring (to Postgres or the spool), then replay the disk while time allows."""
        self.open_spool()
        while time.monotonic() < deadline:
            await self._maybe_reconnect()
            damage_before = self.rings_set.damage_set_aside
            if not await self.move_ring_batch(force=True) and self.rings_set.damage_set_aside == damage_before:
                break  # empty, or nowhere to put it now (a damaged record set aside: look again)
        left = self.rings_set.waiting_records()
        if left:
            log.error("prediction writer stops with %d records still in the rings", left)
        self._retry_at = 0.0  # Postgres may be back by now: look before giving up on the replay
        await self._maybe_reconnect()
        while self.database_up and time.monotonic() < deadline and await self.replay_one():
            pass
        try:
            self.overflow.make_durable()
        except OSError as exc:
            self.disk.failed("syncing the overflow files", exc, "they stay as the workers left them")
        if not self.database_up and self.handoff is not None:
            await self.handoff.hand_off_disk(self.config.instance_id, self.spool, self.overflow, self.disk,
                                             deadline)
        self._housekeeping(force=True)
        log.info("prediction writer drained: %d spool batches and %d overflow files wait for the "
                 "next start", self.spool.batches, self.overflow.waiting())

    # -- rings ------------------------------------------------------------------------------------

    async def move_ring_batch(self, force: bool = False) -> int:
        """Move one ring batch to Postgres, or to the spool; the rings advance only after that."""
        records, ends = self.rings_set.take(self.config.batch_rows, force)
        if not records:
            return 0
        written = self.database_up and await self.write_rows(records)
        if not written and not self.spool_batch(records, force):
            return 0
        for reader, end in ends:
            reader.commit(end)
        return len(records)

    def open_spool(self) -> None:
        """Count what the spool holds, once; after a failure (EMFILE, EIO), again at the next step."""
        if self.spool_ready:
            return
        try:
            self.spool.open()
        except OSError as exc:
            self.disk.failed(f"opening the spool {self.spool.directory}", exc,
                             "Postgres still gets the rings; spooling waits until it opens")
            return
        self.disk.ok()
        self.spool_ready = True

    def spool_batch(self, records: list[bytes], force: bool) -> bool:
        """Postgres is away: keep the batch on disk. False when it must stay in the rings."""
        if not self.spool_ready:
            return False
        if not force and not self.spool.has_room(self.overflow_bytes):
            if not self._spool_full_logged:
                log.error("prediction spool is full (SIRA_SPOOL_MAX_BYTES=%d): new predictions wait "
                          "in the rings, then in the workers' overflow files", self.spool.max_bytes)
                self._spool_full_logged = True
            return False
        self._spool_full_logged = False
        try:
            self.spool.append(records, force=True)
        except OSError as exc:
            self.disk.failed("spooling a batch", exc, "new predictions wait in the rings")
            return False
        self.disk.ok()
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
        except OSError as exc:  # rows Postgres refused could not be kept under rejected/
            self.disk.failed("keeping rows Postgres refused", exc, "their batch stays where it is")
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
        """Replay the oldest spooled batch, else one ready overflow file; True if one went in.

        A disk error leaves the files where they are until the next round (nothing is removed
        before Postgres committed its rows).
        """
        if not self.spool_ready:
            return False
        try:
            replayed = await self._replay_one()
        except OSError as exc:
            self.disk.failed("replaying the spool", exc, "its files wait on disk")
            return False
        if replayed:
            self.disk.ok()
        return replayed

    async def _replay_one(self) -> bool:
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
            if item.rest:
                self.keep_rest_of(item)
            self.overflow.remove(item)
            self.stats.add(Stat.ROWS_REPLAYED, len(item.records))
            return True
        return self.handoff is not None and await self.handoff.replay_one()

    def keep_rest_of(self, item: OverflowFile) -> None:
        """What followed an overflow file's good records goes to corrupt/ before the file goes.

        A torn last record (its worker died writing it) was never answered; a frame whose crc32
        failed is damage, counted and logged. OSError leaves the file for the next round.
        """
        kept = keep_aside(self.config.corrupt_dir, os.path.basename(item.path), item.rest)
        if not item.torn:
            self.stats.add(Stat.FILE_DAMAGE)
            log.error("overflow file %s: a record failed its checksum; %d bytes from there are kept in %s",
                      item.path, len(item.rest), kept)

    # -- counters ---------------------------------------------------------------------------------

    def _housekeeping(self, force: bool = False) -> None:
        """Counters that cost a scan, at most every HOUSEKEEPING_S."""
        now = time.monotonic()
        stats = self.stats
        stats.set(Stat.WRITER_HEARTBEAT_MS, int(time.time() * 1000))
        if not force and now < self._housekeeping_at:
            return
        self._housekeeping_at = now + HOUSEKEEPING_S
        self.rings_set.release_drained_adopted()
        stats.set(Stat.ADOPTED_RECORDS, self.rings_set.adopted_records())
        try:
            self.overflow_bytes = self.overflow.bytes_waiting()
            stats.set(Stat.OVERFLOW_FILES, self.overflow.waiting())
        except OSError as exc:
            self.disk.failed("counting the overflow files", exc, "their figures are stale")
        stats.set(Stat.OVERFLOW_BYTES, self.overflow_bytes)
        stats.set(Stat.SPOOL_BYTES, self.spool.bytes_used)
        stats.set(Stat.SPOOL_BATCHES, self.spool.batches)
        stats.set(Stat.SPOOL_FULL, 0 if self.spool.has_room(self.overflow_bytes) else 1)
        stats.set(Stat.DATABASE_UP, 1 if self.database_up else 0)
        stats.set(Stat.OLDEST_UNWRITTEN_MS, int(self.rings_set.oldest_unwritten_s() * 1000))
