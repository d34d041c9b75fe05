"""The model supervisor process: a sidecar of the master that runs the model syncs and the canary watch.

A sidecar of the master (workers/arbiter.py): forked by it, restarted with backoff when it dies,
sent SIGHUP when the master gets one. It runs asyncio on uvloop and syncs (workers/model_sync.py):

- at start, on SIGHUP (``sira reload``), every ``MODEL_POLL_INTERVAL_S``, and on every NOTIFY of
  channel ``sira_config_changed`` (the registry's trigger), so a promotion goes live in about the
  time a load check takes;
- sooner after a failed sync: 1 s, 2 s, 4 s ... up to SYNC_RETRY_MAX_S or the poll interval,
  jittered (workers/retry.py).

Beside the syncs it compares each canary with production and rolls back the ones that misbehave
(workers/canary_watch.py), writes the sira_inference_metrics rows at every window boundary
(workers/metrics_windows.py), and stops when the master is gone. Its wiring as the master's
sidecar (`supervisor_sidecar`, `run_supervisor`) is here too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import psycopg

from app.db import connect, connect_async
from app.predlog.partitions import ENSURE_EVERY_S, ensure_partitions
from app.store.buckets import ModelStore, open_model_store
from app.telemetry.metrics import count_canary_rollback
from conf.datadir import MODELS_DIR, SUPERVISOR_PIDFILE, data_path
from conf.logs import one_line
from conf.settings import Settings
from shm.control import ControlBlock
from shm.counters import CounterBlock
from workers.arbiter import Sidecar
from workers.canary_outcomes import FpRules, fp_verdicts
from workers.canary_watch import CHECK_S, BreakerRules, CanaryWatch, RollbackRules, RollbackVerdict
from workers.metrics_windows import METRICS_CUT_FILE, MetricsWindows, next_boundary
from workers.model_sync import ModelSync
from workers.registry_queries import roll_back_canary
from workers.retry import Backoff
from workers.sync_stats import STATS_FILE

log = logging.getLogger("sira.supervisor")

NOTIFY_CHANNEL = "sira_config_changed"
RETRY_FIRST_S = 1.0
SYNC_RETRY_MAX_S = 10.0  # a failed sync is retried after 1, 2, 4, 8, 10 ... s (jittered; at most the poll interval)
LISTEN_RETRY_MAX_S = 10.0
LISTEN_CHECK_S = 30.0  # an idle LISTEN connection is probed this often
PARENT_CHECK_S = 1.0


class ModelSupervisor(ModelSync):
    """The model syncs as a process: when asked, on NOTIFY, by poll and after failures; plus its watches."""

    def __init__(self, control: ControlBlock, store: ModelStore, dsn: str, models_dir: str,
                 stats_path: str, poll_interval_s: float, canary_watch: CanaryWatch | None = None,
                 metrics_windows: MetricsWindows | None = None, bootstrap_pending: bool = False,
                 fp_rules: FpRules | None = None):
        super().__init__(control, store, dsn, models_dir, stats_path, canary_watch, metrics_windows,
                         bootstrap_pending)
        self.fp_rules = fp_rules  # the outcomes' rule (workers/canary_outcomes.py); None: off
        self.poll_interval_s = poll_interval_s
        retry_cap_s = min(SYNC_RETRY_MAX_S, poll_interval_s)
        self.sync_backoff = Backoff(min(RETRY_FIRST_S, retry_cap_s), retry_cap_s)  # workers/retry.py
        self.parent_pid = os.getppid()
        self._wakeup: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None

    # lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Sync, listen and watch the parent until SIGTERM, SIGINT or SIGQUIT; returns 0."""
        self._wakeup, self._stopping = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.request_sync, "SIGHUP")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, self._stopping.set)
        os.makedirs(self.in_use_dir, exist_ok=True)
        self.registry.take_over()  # the master's view of the dependencies; gauges from now on
        await self.load_checker.start_waiting_check()
        await self.warm_up_store()
        jobs = [self.sync_forever, self.listen_forever, self.watch_parent, self.keep_partitions_ahead]
        if self.canary_watch is not None:
            jobs.append(self.watch_canaries)
        if self.metrics_windows is not None:
            self.metrics_windows.remember_products(self.control.read_table()[1])
            jobs.append(self.write_metrics_windows)
            if self.canary_watch is not None and self.fp_rules is not None:
                jobs.append(self.judge_outcomes)
        tasks = [asyncio.create_task(job()) for job in jobs]
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _pending = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, *tasks):
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            await self.load_checker.stop_waiting_check()
        if not self._stopping.is_set():  # a loop of ours ended: crash, and the master restarts us
            for task in done:
                log.error("supervisor task %s ended: %r", task.get_coro().__name__, task.exception())
            return 1
        log.info("supervisor stopped")
        return 0

    async def warm_up_store(self) -> None:
        """Build an S3 store's client now: boto3 takes a second or more to import and set up, and
        a promotion should not wait for it. Building it touches no network."""
        if isinstance(getattr(type(self.store), "client", None), property):
            try:
                await asyncio.to_thread(lambda: self.store.client)
            except Exception as exc:  # the syncs meet it again, and count it there
                log.warning("cannot set up %s yet: %s", self.store.describe(), one_line(exc))

    def request_sync(self, why: str) -> None:
        """Ask for a sync as soon as the current one (if any) is done; calls coalesce."""
        log.info("model sync requested (%s)", why)
        self._wakeup.set()

    async def watch_parent(self) -> None:
        """Leave when the master is gone (it was killed): nobody would stop us otherwise."""
        while os.getppid() == self.parent_pid:
            await asyncio.sleep(PARENT_CHECK_S)
        log.error("the master (pid %d) is gone: stopping", self.parent_pid)
        self._stopping.set()

    async def sync_forever(self) -> None:
        """One sync now, then one per wake-up, poll interval, or retry delay after a failure."""
        while True:
            self._wakeup.clear()
            try:
                ok = await self.sync()
            except Exception as exc:  # a bug or a surprise must not stop the syncs: count, retry
                log.exception("model sync failed unexpectedly")
                self.count_error("internal_error", one_line(exc))
                ok = False
            if ok:
                self.sync_backoff.reset()
            delay = self.poll_interval_s if ok else self.sync_backoff.next_delay()
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                pass

    async def listen_forever(self) -> None:
        """LISTEN for registry changes; reconnect with backoff (polling covers the gaps).

        The first failure after a connection is logged; the retries that follow only at debug level.
        """
        backoff = Backoff(RETRY_FIRST_S, LISTEN_RETRY_MAX_S)  # workers/retry.py
        while True:
            try:
                async with await connect_async(self.dsn, "supervisor-listen") as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff.reset()
                    self.request_sync("listening for registry changes")  # changes missed meanwhile
                    await self.relay_notifications(conn)
            except (psycopg.Error, OSError) as exc:
                delay = backoff.next_delay()
                log.log(logging.WARNING if backoff.failures == 1 else logging.DEBUG,
                        "LISTEN %s: %s; retrying in %.1fs", NOTIFY_CHANNEL, one_line(exc), delay)
                await asyncio.sleep(delay)

    async def watch_canaries(self) -> None:
        """Compare each canary with production every CHECK_S; roll back the ones that misbehave."""
        while True:
            await asyncio.sleep(CHECK_S)
            self.canary_watch.observe()
            table = self.control.read_table()[1]
            verdicts = self.canary_watch.update_breakers(table) + self.canary_watch.verdicts(table)
            for product in sorted({verdict.product for verdict in verdicts}):  # one rollback per product
                await self.roll_back(next(v for v in verdicts if v.product == product))

    async def write_metrics_windows(self) -> None:
        """At every window boundary, one sira_inference_metrics row per product, model and role."""
        windows = self.metrics_windows
        while True:
            boundary = next_boundary(time.time(), windows.window_s)
            await asyncio.sleep(max(0.0, boundary - time.time()))
            windows.remember_products(self.control.read_table()[1])
            windows.cut(boundary)
            try:
                await asyncio.to_thread(windows.write, self.dsn)
            except psycopg.Error as exc:  # kept for the next window
                log.warning("cannot write %d inference metrics rows now: %s", len(windows.pending), one_line(exc))

    async def judge_outcomes(self) -> None:
        """At every metrics window boundary, the canaries the outcomes condemn (fp_rate_threshold)."""
        while True:
            await asyncio.sleep(max(0.0, next_boundary(time.time(), self.metrics_windows.window_s) - time.time()))
            table = self.control.read_table()[1]
            try:
                verdicts = await asyncio.to_thread(fp_verdicts, self.dsn, table, self.fp_rules)
            except psycopg.Error as exc:  # judged again at the next boundary
                log.warning("cannot judge the canaries by their outcomes now: %s", one_line(exc))
                continue
            for verdict in verdicts:
                await self.roll_back(verdict)

    async def keep_partitions_ahead(self) -> None:
        """The prediction log's coming day partitions, every ENSURE_EVERY_S (app/predlog/partitions.py)."""
        while True:
            try:
                made = await asyncio.to_thread(self._ensure_partitions)
                if made:
                    log.info("made %d day partitions of the prediction log", made)
            except psycopg.Error as exc:  # rows still land, in the default partition; tried again later
                log.warning("cannot make the prediction log's coming partitions now: %s", one_line(exc))
            await asyncio.sleep(ENSURE_EVERY_S)

    def _ensure_partitions(self) -> int:
        with connect(self.dsn, "supervisor") as conn:
            return ensure_partitions(conn)

    async def roll_back(self, verdict: RollbackVerdict) -> None:
        """Stop the canary in Postgres (every instance follows its NOTIFY), log and count it."""
        try:
            done = await asyncio.to_thread(roll_back_canary, self.dsn, verdict)
        except psycopg.Error as exc:  # tried again at the next check: the figures still say so
            log.warning("cannot roll back the canary of %s now: %s", verdict.product, one_line(exc))
            return
        self.canary_watch.clear()
        if done:
            count_canary_rollback(verdict.product)
            figures = verdict.figures
            log.error("canary %s of %s rolled back (%s): canary %s, production %s over %.0fs",
                      verdict.canary_model_id, verdict.product, verdict.reason, figures.get("canary"),
                      figures.get("production"), figures.get("window_s", 0))
        self.request_sync(f"canary of {verdict.product} rolled back")

    async def relay_notifications(self, conn: psycopg.AsyncConnection) -> None:
        """Each notification asks for a sync; an idle connection is probed so a dead one is noticed."""
        while True:
            async for notify in conn.notifies(timeout=LISTEN_CHECK_S):
                self.request_sync(f"NOTIFY {notify.payload}")
            await conn.execute("SELECT 1")


# the sidecar ---------------------------------------------------------------------------------

def run_supervisor(store: ModelStore, dsn: str, control_segment: str, models_dir: str,
                   stats_path: str, poll_interval_s: float, model_stats_segment: str | None = None,
                   rollback_rules: RollbackRules | None = None, metrics_window_s: float = 60.0,
                   bootstrap_pending: bool = False, breaker_rules: BreakerRules | None = None,
                   fp_rules: FpRules | None = None) -> int:
    """The sidecar's entry point, in the child the master forked; returns the exit code."""
    import uvloop

    # gunicorn's SIGCHLD handler came with the fork: it would reap our load checks. A SIGHUP
    # before the loop handles it must not kill us (the first sync comes anyway).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.makedirs(models_dir, exist_ok=True)
    control = ControlBlock.attach(control_segment)
    model_stats = CounterBlock.attach(model_stats_segment) if model_stats_segment else None
    try:
        watch = CanaryWatch(model_stats, rollback_rules or RollbackRules(),
                            breaker_rules=breaker_rules) if model_stats else None
        windows = MetricsWindows(model_stats, metrics_window_s,
                                 os.path.join(os.path.dirname(stats_path), METRICS_CUT_FILE)) if model_stats else None
        supervisor = ModelSupervisor(control, store, dsn, models_dir, stats_path, poll_interval_s, watch, windows,
                                     bootstrap_pending, fp_rules)
        return uvloop.run(supervisor.run())
    finally:
        control.close()
        if model_stats is not None:
            model_stats.close()


def breaker_rules(settings: Settings) -> BreakerRules:
    return BreakerRules(failures=settings.breaker_failures, window_s=settings.breaker_window_s,
                        cooldown_s=settings.breaker_cooldown_s)


def fp_rules(settings: Settings) -> FpRules:
    return FpRules(window_h=settings.canary_fp_window_h, min_labelled=settings.canary_min_labelled,
                   max_ratio=settings.canary_max_fp_ratio)


def rollback_rules(settings: Settings) -> RollbackRules:
    return RollbackRules(window_s=settings.canary_window_s, min_requests=settings.canary_min_requests,
                         max_error_ratio=settings.canary_max_error_ratio,
                         max_latency_ratio=settings.canary_max_latency_ratio,
                         max_block_ratio=settings.canary_max_block_ratio)


def supervisor_sidecar(settings: Settings, dsn: str, control_segment: str,
                       model_stats_segment: str | None = None, bootstrap_pending: bool = False) -> Sidecar:
    """The master's sidecar that runs the supervisor; SIGHUP to the master reaches it.

    bootstrap_pending: the master could not apply the migrations nor register the demo model.
    """

    def run() -> int:
        return run_supervisor(open_model_store(settings), dsn, control_segment,
                              data_path(settings.data_dir, MODELS_DIR),
                              data_path(settings.data_dir, STATS_FILE), settings.model_poll_interval_s,
                              model_stats_segment, rollback_rules(settings), settings.metrics_window_s,
                              bootstrap_pending, breaker_rules(settings), fp_rules(settings))

    return Sidecar("supervisor", run, data_path(settings.data_dir, SUPERVISOR_PIDFILE), forward_hup=True)
