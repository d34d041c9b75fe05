"""The writer as a process: its entry point, and what the master prepares for it.

In the master (before the fork): ``prediction_log_config`` (where the log of one ``sira serve``
lives), ``prediction_log_segments`` (the rings and counters, created before the fork and removed at
exit, drained first if the writer left records behind) and ``writer_sidecar``. In the child:
``run_writer`` attaches the segments, the rings dead instances left, the spool and the bucket, and
runs ``workers/writer.py``'s loop. ``python -m workers.writer_process CONFIG_JSON`` runs a writer on
its own (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Iterator

import orjson
import uvloop

from app.predlog.handoff import SpoolHandoff
from app.predlog.log import SPOOL_DIR, PredictionLogConfig, Stat, stat_cells
from app.predlog.sink import PostgresSink
from app.predlog.spool import BatchSpool, keep_copy
from app.store.buckets import S3ModelStore
from conf.datadir import data_path
from conf.settings import Settings
from shm.counters import CounterBlock
from shm.ring import QueueRings
from shm.segment import RINGS_KIND, STATS_KIND, SegmentError, remove_segment, segment_name, segment_path
from workers.arbiter import Sidecar
from workers.writer import STOP_DEADLINE_S, PredictionWriter

log = logging.getLogger("sira.writer")


# -- in the writer's process ---------------------------------------------------------------------

async def writer_main(config: PredictionLogConfig, until_stopped: bool = True) -> int:
    """Attach, drain (until SIGTERM, or only once when ``until_stopped`` is false), close."""
    rings = QueueRings.attach(config.rings_segment)
    stats = CounterBlock.attach(config.stats_segment)
    spool = BatchSpool(config.batches_dir, config.spool_max_bytes)  # opened by the writer (disk errors)
    sink = PostgresSink(config.database_url, config.rejected_dir)
    adopted = attach_adopted_rings(config)
    try:
        await sink.open()
        writer = PredictionWriter(config, rings, stats, spool, sink, adopted, spool_handoff(config))
        if until_stopped:
            return await writer.run()
        await writer.drain(time.monotonic() + STOP_DEADLINE_S)
        return 0
    finally:
        await sink.close()
        spool.close()
        stats.close()
        rings.close()
        for other in adopted:
            other.close()


def spool_handoff(config: PredictionLogConfig) -> SpoolHandoff | None:
    """The bucket the spool is handed to at stop (MODEL_BUCKET), or None with a local model store."""
    if not config.handoff_bucket:
        return None
    return SpoolHandoff(S3ModelStore(config.handoff_bucket, config.handoff_endpoint), config.handoff_prefix)


def attach_adopted_rings(config: PredictionLogConfig) -> list[QueueRings]:
    """Map the rings dead instances left; one that cannot be read is set aside as a file.

    A name that is gone was drained and removed by an earlier writer of this instance.
    """
    attached = []
    for name in config.adopted_rings:
        path = segment_path(name)
        if not os.path.exists(path):
            continue
        try:
            attached.append(QueueRings.attach(name))
        except SegmentError as exc:
            set_aside_unreadable_rings(name, path, config.corrupt_dir, exc)
    return attached


def set_aside_unreadable_rings(name: str, path: str, corrupt_dir: str, reason: Exception) -> None:
    """A copy in the spool's corrupt/, then the segment goes; if the copy fails, it stays for next time."""
    try:
        kept = keep_copy(path, corrupt_dir)
    except OSError as exc:
        log.error("prediction rings %s left by a stopped instance cannot be read (%s) nor kept (%s): "
                  "left in /dev/shm for the next start", name, reason, exc)
        return
    remove_segment(name)
    log.error("prediction rings %s left by a stopped instance cannot be read (%s): kept in %s", name, reason, kept)


def run_writer(config: PredictionLogConfig) -> int:
    """The writer sidecar's entry point, in the child the master forked."""
    # The pool warns at every failed connection attempt; the writer says once that Postgres is away
    # and once that it is back (one line per change, not per retry).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    return uvloop.run(writer_main(config))


# -- in the master ------------------------------------------------------------------------------



def prediction_log_config(settings: Settings, dsn: str, instance_id: str,
                          adopted_rings: tuple[str, ...] = ()) -> PredictionLogConfig:
    """The prediction log of one ``sira serve``: one ring per worker, the spool in the data dir.

    ``adopted_rings``: the rings segments dead instances of the data dir left (workers/master.py).
    """
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
        adopted_rings=adopted_rings,
        handoff_bucket=settings.model_bucket if settings.spool_handoff_prefix else None,
        handoff_endpoint=settings.s3_endpoint_url,
        handoff_prefix=settings.spool_handoff_prefix,
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
        os.makedirs(directory, mode=0o700, exist_ok=True)  # private: workers/instance.py check_private
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
    try:
        uvloop.run(writer_main(config, until_stopped=False))
    except Exception:
        log.exception("draining the rings at exit failed")
    left = sum(rings.reader(slot).depth_bytes() for slot in range(rings.slots))
    if left:
        log.error("%d bytes of prediction records stay in %s", left, rings.segment.path)
    return not left


def main(argv: list[str] | None = None) -> int:
    """Run a writer on its own (tests, benchmarks): ``python -m workers.writer_process CONFIG_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.writer_process '<PredictionLogConfig as JSON>'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fields = orjson.loads(args[0])
    config = PredictionLogConfig(**{f.name: fields[f.name] for f in dataclasses.fields(PredictionLogConfig)
                                     if f.name in fields})
    return run_writer(config)


if __name__ == "__main__":
    raise SystemExit(main())
