"""The model supervisor: registry -> verified local files -> load check -> a new generation.

A sidecar of the master (workers/arbiter.py): forked by it, restarted with backoff when it dies,
sent SIGHUP when the master gets one. It runs asyncio on uvloop and syncs:

- at start, on SIGHUP (``sira reload``), every ``MODEL_POLL_INTERVAL_S``, and on every NOTIFY of
  channel ``sira_config_changed`` (the registry's trigger), so a promotion goes live in about the
  time a load check takes;
- sooner after a failed sync: 1 s, 2 s, 4 s ... up to SYNC_RETRY_MAX_S or the poll interval,
  jittered (workers/retry.py).

Postgres away: a sync with no model table yet (the master's first) serves the registry snapshot of
the last good sync; one that already serves keeps its table. The state of Postgres and the model
store goes to /readyz, sira_dependency_up and one log line per change (workers/registry_source.py).

One sync reads the production models from the registry; for each one that is not live yet it
downloads the file into ``$SIRA_DATA_DIR/models`` (temporary file, sha256 verified, fsync,
rename: the store's ``fetch``), writes its feature spec beside it and runs ``workers.smoke`` in a
process of its own (load, spec check, smoke row, shared form of the weights). Only then does the
new model table go into the control block, bumping the generation that every worker reads on
every request. A model that fails at any step stays out: the product keeps its current model, the
error is logged and counted by reason, and the next sync retries.

onnxruntime is never imported here: this process is forked from the master and forks the load
checks (see app/config.py).

Files of old generations: each worker lists the files it holds in ``models/in-use/<pid>`` (one
base name per line, written by app/model_swap.py before it opens them). After each sync the
supervisor removes the model files that neither the new table, nor the registry's production
models, nor a live worker's list names.

Errors are counted in ``sira_model_load_errors_total{reason}`` (app/metrics.py), reasons:
``registry_unreachable``, ``store_unreachable``, ``download_failed``, ``sha256_mismatch``,
``invalid_spec``, ``invalid_model``, ``spec_mismatch``, ``smoke_failed``, ``load_crashed``,
``load_timeout``, ``invalid_entry``, ``publish_failed``, ``internal_error``. The same counts and the
state of the last sync are in ``$SIRA_DATA_DIR/model-sync.json`` (``STATS_FILE``), rewritten
atomically after every sync, for ops and tests: ``model_load_errors_total``, ``syncs_total``,
``sync_failures_total``, ``generation``, ``last_sync_at``, ``last_sync_ok``, ``last_error``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import time

import psycopg

from app.metrics import count_canary_rollback, count_model_load_error, set_model_generation
from conf.settings import Settings
from shm.control import PATH_BYTES, PRODUCT_BYTES, VERSION_BYTES, ControlBlock, ModelSlot, ProductEntry
from shm.counters import CounterBlock
from workers import canary_config, registry
from workers.arbiter import Sidecar
from workers.canary_watch import CHECK_S, BreakerRules, CanaryWatch, RollbackRules, RollbackVerdict
from workers.metrics_windows import METRICS_CUT_FILE, MetricsWindows, next_boundary
from workers.model_files import ensure_local_copy
from workers.modelstore import ModelStore, ModelStoreError, open_model_store
from workers.paths import MODELS_DIR, SUPERVISOR_PIDFILE, data_path
from workers.processes import process_exists
from workers.registry_source import RegistrySource
from workers.retry import Backoff

log = logging.getLogger("sira.supervisor")

CONTROL_KIND = "control"  # the control block's segment: sira-<instance>-control
MODEL_STATS_KIND = "modelstats"  # the workers' per-model counts (shm/model_stats.py)
NOTIFY_CHANNEL = "sira_config_changed"
STATS_FILE = "model-sync.json"
IN_USE_DIR = "in-use"
SMOKE_TIMEOUT_S = 300.0
RETRY_FIRST_S = 1.0
SYNC_RETRY_MAX_S = 10.0  # a failed sync is retried after 1, 2, 4, 8, 10 ... s (jittered; at most the poll interval)
LISTEN_RETRY_MAX_S = 10.0
LISTEN_CHECK_S = 30.0  # an idle LISTEN connection is probed this often
CONNECT_TIMEOUT_S = 5
PARENT_CHECK_S = 1.0
MODEL_FILE_SUFFIXES = (".onnx", ".weights", ".spec.json")

# What each store failure counts as (ModelStoreError.reason -> our reason label).
STORE_REASONS = {"unavailable": "store_unreachable", "missing": "download_failed",
                 "integrity": "sha256_mismatch"}


class ModelNotReady(Exception):
    """A model that cannot go live now; `reason` is its label in the error counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class SyncStats:
    """The supervisor's counts and last sync, for ops and tests (STATS_FILE; one writer)."""

    control_segment: str
    generation: int = 0
    syncs_total: int = 0
    sync_failures_total: int = 0
    model_load_errors_total: dict[str, int] = dataclasses.field(default_factory=dict)
    last_sync_at: float | None = None
    last_sync_ok: bool | None = None
    last_error: dict | None = None


class ModelSupervisor:
    """Keeps the control block's model table in line with the registry's production models."""

    def __init__(self, control: ControlBlock, store: ModelStore, dsn: str, models_dir: str,
                 stats_path: str, poll_interval_s: float, canary_watch: CanaryWatch | None = None,
                 metrics_windows: MetricsWindows | None = None, bootstrap_pending: bool = False):
        self.control = control
        self.canary_watch = canary_watch  # None: no automatic rollback (the master's first sync)
        self.metrics_windows = metrics_windows  # None: no sira_inference_metrics rows
        self.store = store
        self.dsn = dsn
        self.models_dir = models_dir
        self.in_use_dir = os.path.join(models_dir, IN_USE_DIR)
        self.stats_path = stats_path
        self.poll_interval_s = poll_interval_s
        self.stats = load_stats(stats_path, control.segment.name)
        retry_cap_s = min(SYNC_RETRY_MAX_S, poll_interval_s)
        self.sync_backoff = Backoff(min(RETRY_FIRST_S, retry_cap_s), retry_cap_s)  # workers/retry.py
        # Postgres (else the registry snapshot), the dependency states, the snapshot after good syncs
        self.registry = RegistrySource(dsn, store, os.path.dirname(stats_path), read_serving_state,
                                       CanaryToServe, bootstrap_pending)
        # One load-check process waits with onnxruntime imported, so a new model does not wait for
        # the imports (in the sidecar only: the master's first sync leaves no process behind).
        self.keep_a_check_waiting = False
        self.waiting_check: asyncio.subprocess.Process | None = None
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
        self.keep_a_check_waiting = True
        self.waiting_check = await start_load_check()
        await self.warm_up_store()
        jobs = [self.sync_forever, self.listen_forever, self.watch_parent]
        if self.canary_watch is not None:
            jobs.append(self.watch_canaries)
        if self.metrics_windows is not None:
            self.metrics_windows.remember_products(self.control.read_table()[1])
            jobs.append(self.write_metrics_windows)
        tasks = [asyncio.create_task(job()) for job in jobs]
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _pending = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, *tasks):
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            await self.stop_waiting_check()
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
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
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
                await asyncio.to_thread(windows.write, self.dsn, CONNECT_TIMEOUT_S)
            except psycopg.Error as exc:  # kept for the next window
                log.warning("cannot write %d inference metrics rows now: %s", len(windows.pending), one_line(exc))

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

    # one sync --------------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Bring the control block in line with the registry; True when nothing failed."""
        started = time.time()
        try:
            models, canaries = await self.registry.read()
        except psycopg.Error as exc:  # logged once per outage (app/dependencies.py), counted every time
            self.count_error("registry_unreachable", f"cannot read the model registry: {one_line(exc)}",
                             logging.DEBUG if self.registry.failure_logged else logging.ERROR)
            served = self.registry.snapshot(nothing_served=self.control.generation() == 0)
            if served is None:
                self.finish_sync(started, ok=False)
                return False
            models, canaries = served
        _generation, table = self.control.read_table()
        new_table, ok = {}, True
        for model in models:
            current = table.get(model.product)
            live = current.production if current else None
            try:
                slot = await self.slot_for(model, live)
            except ModelNotReady as exc:
                ok = False
                kept = f"{live.model_id} keeps serving" if live else "nothing serves it"
                self.count_error(exc.reason, f"model {model.model_id} ({model.product} "
                                             f"{model.version}) is not live, {kept}: {exc}")
                slot = live
            canary = canaries.get(model.product)
            canary_slot = None
            if canary is not None and slot is not None and canary.config.production_model_id == slot.model_id:
                canary_slot, canary_ok = await self.canary_slot_for(canary, current)
                ok = ok and canary_ok
            new_table[model.product] = product_entry(model.product, slot, canary_slot, canary)
        if new_table != table:
            ok = self.publish(new_table) and ok
        self.remove_unused_files(self.control.read_table()[1],
                                 models + [canary.model for canary in canaries.values()])
        ok = await self.registry.after_sync(ok, self.control.generation(), models, canaries)
        self.finish_sync(started, ok)
        return ok

    async def canary_slot_for(self, canary: CanaryToServe, current: ProductEntry | None) -> tuple[ModelSlot | None, bool]:
        """The canary's checked slot, or None (production alone serves) when it cannot go live."""
        live = current.canary if current else None
        try:
            return await self.slot_for(canary.model, live), True
        except ModelNotReady as exc:
            self.count_error(exc.reason, f"canary model {canary.model.model_id} ({canary.model.product} "
                                         f"{canary.model.version}) is not live, production serves alone: {exc}")
            return None, False

    def publish(self, table: dict[str, ProductEntry]) -> bool:
        if self.canary_watch is not None:
            self.canary_watch.claim_breakers(table)  # before the workers look for them
        try:
            generation = self.control.publish(table)
        except ValueError as exc:  # more products than the block holds
            self.count_error("publish_failed", f"cannot publish the model table: {exc}")
            return False
        self.stats.generation = generation
        set_model_generation(generation)
        if self.metrics_windows is not None:
            self.metrics_windows.remember_products(table)
        log.info("published model generation %d: %s", generation, ", ".join(
            f"{p}={e.production.model_id if e.production else None}" for p, e in sorted(table.items())))
        return True

    async def slot_for(self, model: registry.RegistryModel, live: ModelSlot | None) -> ModelSlot:
        """The live slot when it already serves this model, else a freshly checked one."""
        spec_path = self.spec_path(model)
        if live is not None and live.model_id == model.model_id and live.spec_path == spec_path \
                and os.path.exists(live.path):
            if (live.threshold, live.version) == (model.threshold, model.version):
                return live
            return dataclasses.replace(live, threshold=model.threshold, version=model.version)
        check_fits(model, spec_path)
        model_path = await self.download(model)
        write_spec(spec_path, model.feature_spec)
        result = await self.load_check(model_path, spec_path)
        check_fits(model, result["path"])
        log.info("model %s (%s %s) passed its load check (score %.4f, %s)", model.model_id,
                 model.product, model.version, result["score"],
                 f"{result['weights_bytes']} bytes of shared weights" if result["shared"] else "plain")
        return ModelSlot(model_id=model.model_id, version=model.version, path=result["path"],
                         spec_path=spec_path, threshold=model.threshold, loaded_at=time.time())

    def spec_path(self, model: registry.RegistryModel) -> str:
        """The spec's file: named by model and content, so an edited spec is a new file."""
        digest = hashlib.sha256(spec_bytes(model.feature_spec)).hexdigest()[:16]
        return os.path.join(self.models_dir, f"{model.model_id}.{digest}.spec.json")

    async def download(self, model: registry.RegistryModel) -> str:
        """The model's verified local file, fetched from the store when missing."""
        try:
            return await asyncio.to_thread(ensure_local_copy, self.store, model, self.models_dir)
        except ModelStoreError as exc:
            raise ModelNotReady(STORE_REASONS.get(exc.reason, "download_failed"), one_line(exc)) from None
        except (OSError, ValueError) as exc:
            raise ModelNotReady("download_failed", one_line(exc)) from None

    async def load_check(self, model_path: str, spec_path: str) -> dict:
        """Run workers.smoke on the model in its own process; its result, or ModelNotReady.

        The process is the one kept waiting with its imports done, when there is one.
        """
        process = self.take_waiting_check() or await start_load_check()
        job = json.dumps({"model": model_path, "spec": spec_path}).encode("utf-8") + b"\n"
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(job), SMOKE_TIMEOUT_S)
        except TimeoutError:
            raise ModelNotReady("load_timeout", f"the load check of {model_path} took more than "
                                                f"{SMOKE_TIMEOUT_S:.0f}s") from None
        finally:
            if process.returncode is None:  # timed out, or this sync was cancelled
                process.kill()
                await process.wait()
        if self.keep_a_check_waiting:
            self.waiting_check = await start_load_check()
        for line in stderr.decode(errors="replace").splitlines()[-5:]:
            log.info("load check: %s", line)
        lines = stdout.decode(errors="replace").strip().splitlines()
        if process.returncode != 0 or not lines:
            raise ModelNotReady("load_crashed", f"the load check of {model_path} "
                                                f"{describe_returncode(process.returncode)}")
        try:
            result = json.loads(lines[-1])
        except ValueError:
            raise ModelNotReady("load_crashed", f"the load check of {model_path} answered "
                                                f"{lines[-1][:200]!r}") from None
        if not result.get("ok"):
            raise ModelNotReady(result.get("reason", "invalid_model"), result.get("error", "?"))
        return result

    def take_waiting_check(self) -> asyncio.subprocess.Process | None:
        """The load-check process kept waiting, if it is still alive (it is used once)."""
        process, self.waiting_check = self.waiting_check, None
        return process if process is not None and process.returncode is None else None

    async def stop_waiting_check(self) -> None:
        self.keep_a_check_waiting = False
        process = self.take_waiting_check()
        if process is not None:
            process.kill()
            await process.wait()

    # files and counters ----------------------------------------------------------------------

    def remove_unused_files(self, table: dict[str, ProductEntry],
                            models: list[registry.RegistryModel]) -> None:
        """Remove model files no one needs: not in the table, the registry, nor a worker's list."""
        keep = {model.sha256 for model in models} | {model.model_id for model in models}
        for entry in table.values():
            for slot in (entry.production, entry.canary):
                if slot is not None:
                    keep |= {file_stem(slot.path), file_stem(slot.spec_path)}
        keep |= {file_stem(name) for name in self.files_in_use()}
        for name in os.listdir(self.models_dir):
            if name.endswith(MODEL_FILE_SUFFIXES) and not name.startswith(".") \
                    and file_stem(name) not in keep:
                try:
                    os.unlink(os.path.join(self.models_dir, name))
                    log.info("removed %s: no generation or worker uses it", name)
                except FileNotFoundError:
                    pass

    def files_in_use(self) -> set[str]:
        """Base names listed by live workers; the lists of dead workers are removed."""
        names: set[str] = set()
        for record in os.listdir(self.in_use_dir):
            path = os.path.join(self.in_use_dir, record)
            if not record.isdigit():
                continue
            if not process_exists(int(record)):
                remove_quietly(path)
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    names.update(line.strip() for line in handle if line.strip())
            except FileNotFoundError:
                continue  # removed meanwhile: its worker is gone
        return names

    def count_error(self, reason: str, message: str, level: int = logging.ERROR) -> None:
        counts = self.stats.model_load_errors_total
        counts[reason] = counts.get(reason, 0) + 1
        count_model_load_error(reason)
        self.stats.last_error = {"reason": reason, "message": message, "at": time.time()}
        log.log(level, "model sync: %s: %s", reason, message)

    def finish_sync(self, started: float, ok: bool) -> None:
        self.stats.syncs_total += 1
        self.stats.sync_failures_total += 0 if ok else 1
        self.stats.last_sync_at, self.stats.last_sync_ok = started, ok
        self.stats.generation = self.control.generation()
        try:
            write_json_atomically(self.stats_path, dataclasses.asdict(self.stats))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.stats_path, exc)


# plain helpers -------------------------------------------------------------------------------

def roll_back_canary(dsn: str, verdict: RollbackVerdict) -> bool:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        return canary_config.roll_back(conn, verdict.product, verdict.canary_model_id, verdict.reason,
                                       verdict.figures)


@dataclasses.dataclass(frozen=True)
class CanaryToServe:
    """A product's canary config in force and its registered model."""

    config: canary_config.CanaryConfig
    model: registry.RegistryModel


def read_serving_state(dsn: str) -> tuple[list[registry.RegistryModel], dict[str, CanaryToServe]]:
    """The production models (one per product) and the canaries in force, in one snapshot.

    A config whose canary model is archived (or gone) is not in force: production serves alone.
    """
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn, \
            conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        models = registry.production_models(conn)
        configs = canary_config.active_canaries(conn)
        registered = registry.models_by_id(conn, [config.canary_model_id for config in configs])
    canaries = {}
    for config in configs:
        model = registered.get(config.canary_model_id)
        if model is not None and model.status != "archived" and model.product == config.product:
            canaries[config.product] = CanaryToServe(config, model)
    return models, canaries


async def start_load_check() -> asyncio.subprocess.Process:
    """A workers.smoke process that imports onnxruntime, then waits for its one job on stdin."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.smoke", "--wait-for-job", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def product_entry(product: str, slot: ModelSlot | None, canary_slot: ModelSlot | None,
                  canary: CanaryToServe | None) -> ProductEntry:
    """The product's entry: its production slot and, when it is live, its canary and share."""
    if canary_slot is None or canary is None:
        return ProductEntry(product=product, production=slot)
    return ProductEntry(product=product, production=slot, canary=canary_slot,
                        canary_bp=canary.config.basis_points, mode=canary.config.mode,
                        canary_seed=canary.config.seed_bytes)


def check_fits(model: registry.RegistryModel, path: str) -> None:
    """ModelNotReady unless the model's fields fit the control block's slots."""
    for label, text, limit in (("product", model.product, PRODUCT_BYTES),
                               ("version", model.version, VERSION_BYTES), ("path", path, PATH_BYTES)):
        if len(text.encode("utf-8")) > limit:
            raise ModelNotReady("invalid_entry", f"{label} {text[:40]!r}... is longer than the "
                                                 f"control block's {limit} bytes")


def spec_bytes(spec: dict) -> bytes:
    return json.dumps(spec, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_spec(path: str, spec: dict) -> None:
    if not os.path.exists(path):
        write_json_atomically(path, spec)


def write_json_atomically(path: str, value) -> None:
    """Temporary file, fsync, rename: readers see the old or the new file, whole."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def file_stem(path: str) -> str:
    """What a model file is named by: the sha256 or model id before the first dot."""
    return os.path.basename(path).split(".", 1)[0]


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def load_stats(path: str, control_segment: str) -> SyncStats:
    """This instance's counters when a previous supervisor of the same `sira serve` left them."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("control_segment") == control_segment:
            return SyncStats(**saved)
    except (OSError, ValueError, TypeError):
        pass
    return SyncStats(control_segment=control_segment)


def describe_returncode(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}" if -code in signal.Signals._value2member_map_ \
            else f"was killed by signal {-code}"
    return f"exited with code {code} without a result"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def first_sync(store: ModelStore, dsn: str, control: ControlBlock, models_dir: str, stats_path: str,
               poll_interval_s: float) -> bool:
    """One sync in the master before it forks, so that workers boot with the models loaded.

    A plain asyncio loop, closed before returning: it leaves no thread or handler in the master.
    A failure is logged and counted like any other; the supervisor retries it.
    """
    os.makedirs(models_dir, exist_ok=True)
    supervisor = ModelSupervisor(control, store, dsn, models_dir, stats_path, poll_interval_s)
    return asyncio.run(supervisor.sync())


def run_supervisor(store: ModelStore, dsn: str, control_segment: str, models_dir: str,
                   stats_path: str, poll_interval_s: float, model_stats_segment: str | None = None,
                   rollback_rules: RollbackRules | None = None, metrics_window_s: float = 60.0,
                   bootstrap_pending: bool = False, breaker_rules: BreakerRules | None = None) -> int:
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
                                     bootstrap_pending)
        return uvloop.run(supervisor.run())
    finally:
        control.close()
        if model_stats is not None:
            model_stats.close()


def first_model_sync(settings: Settings, dsn: str, control: ControlBlock) -> bool:
    """`first_sync` with sira serve's settings (in the master, before the fork)."""
    return first_sync(open_model_store(settings), dsn, control, data_path(settings.data_dir, MODELS_DIR),
                      data_path(settings.data_dir, STATS_FILE), settings.model_poll_interval_s)


def breaker_rules(settings: Settings) -> BreakerRules:
    return BreakerRules(failures=settings.breaker_failures, window_s=settings.breaker_window_s,
                        cooldown_s=settings.breaker_cooldown_s)


def rollback_rules(settings: Settings) -> RollbackRules:
    return RollbackRules(window_s=settings.canary_window_s, min_requests=settings.canary_min_requests,
                         max_error_ratio=settings.canary_max_error_ratio,
                         max_latency_ratio=settings.canary_max_latency_ratio)


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
                              bootstrap_pending, breaker_rules(settings))

    return Sidecar("supervisor", run, data_path(settings.data_dir, SUPERVISOR_PIDFILE), forward_hup=True)
