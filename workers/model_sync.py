"""One model sync: registry -> verified local files -> load check -> a new generation.

One sync reads the production models and the canaries in force from the registry
(workers/registry_source.py); for each one that is not live yet it downloads the file into
``$SIRA_DATA_DIR/models`` (temporary file, sha256 verified, fsync, rename: the store's ``fetch``),
writes its feature spec beside it and runs the load check (workers/load_check.py: load, spec check,
smoke row, shared form of the weights, in a process of its own). Only then does the new model table
go into the control block, bumping the generation that every worker reads on every request. A
model that fails at any step stays out: the product keeps its current model, the error is logged
and counted by reason, and the next sync retries. After each sync the files nothing uses any more
are removed (workers/model_cleanup.py) and the counts are written (workers/sync_stats.py).

Postgres away: a sync with no model table yet (the master's first) serves the registry snapshot of
the last good sync; one that already serves keeps its table. The state of Postgres and the model
store goes to /readyz, sira_dependency_up and one log line per change (workers/registry_source.py).

The master runs one sync before it forks (`first_model_sync`), so that workers boot with the
models loaded; the supervisor sidecar (workers/supervisor.py) runs the ones after. onnxruntime is
never imported here: both are forked from the master and fork the load checks (see app/config.py).

Errors are counted in ``sira_model_load_errors_total{reason}`` (app/telemetry/metrics.py), reasons:
``registry_unreachable``, ``store_unreachable``, ``download_failed``, ``sha256_mismatch``,
``invalid_spec``, ``invalid_model``, ``spec_mismatch``, ``smoke_failed``, ``load_crashed``,
``load_timeout``, ``invalid_entry``, ``publish_failed``, ``internal_error``. The same counts and the
state of the last sync are in ``$SIRA_DATA_DIR/model-sync.json`` (workers/sync_stats.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time

import psycopg

from app.store import registry
from app.store.buckets import ModelStore, ModelStoreError, open_model_store
from app.telemetry.metrics import count_model_load_error, set_model_generation
from conf.datadir import MODELS_DIR, data_path, write_atomically
from conf.logs import one_line
from conf.settings import Settings
from shm.control import PATH_BYTES, PRODUCT_BYTES, VERSION_BYTES, ControlBlock, ModelSlot, ProductEntry
from workers.canary_watch import CanaryWatch
from workers.load_check import LoadChecker, ModelNotReady
from workers.metrics_windows import MetricsWindows
from workers.model_cleanup import IN_USE_DIR, remove_unused_files
from workers.model_files import ensure_local_copy
from workers.registry_queries import CanaryToServe, read_serving_state
from workers.registry_source import RegistrySource
from workers.sync_stats import STATS_FILE, load_stats

log = logging.getLogger("sira.supervisor")

# What each store failure counts as (ModelStoreError.reason -> our reason label).
STORE_REASONS = {"unavailable": "store_unreachable", "missing": "download_failed",
                 "integrity": "sha256_mismatch"}


class ModelSync:
    """Keeps the control block's model table in line with the registry's production models."""

    def __init__(self, control: ControlBlock, store: ModelStore, dsn: str, models_dir: str,
                 stats_path: str, canary_watch: CanaryWatch | None = None,
                 metrics_windows: MetricsWindows | None = None, bootstrap_pending: bool = False):
        self.control = control
        self.canary_watch = canary_watch  # None: no automatic rollback (the master's first sync)
        self.metrics_windows = metrics_windows  # None: no sira_inference_metrics rows
        self.store = store
        self.dsn = dsn
        self.models_dir = models_dir
        self.in_use_dir = os.path.join(models_dir, IN_USE_DIR)
        self.stats_path = stats_path
        self.stats = load_stats(stats_path, control.segment.name)
        # Postgres (else the registry snapshot), the dependency states, the snapshot after good syncs
        self.registry = RegistrySource(dsn, store, os.path.dirname(stats_path), read_serving_state,
                                       CanaryToServe, bootstrap_pending)
        self.load_checker = LoadChecker()  # workers/load_check.py

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
        remove_unused_files(self.models_dir, self.in_use_dir, self.control.read_table()[1],
                            models + [canary.model for canary in canaries.values()])
        ok = await self.registry.after_sync(ok, self.control.generation(), models, canaries)
        self.finish_sync(started, ok)
        return ok

    async def canary_slot_for(self, canary: CanaryToServe,
                              current: ProductEntry | None) -> tuple[ModelSlot | None, bool]:
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
        result = await self.load_checker.check(model_path, spec_path)
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
            write_atomically(self.stats_path, json.dumps(dataclasses.asdict(self.stats), sort_keys=True))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.stats_path, exc)


# plain helpers -------------------------------------------------------------------------------

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
        write_atomically(path, json.dumps(spec, sort_keys=True))




def first_sync(store: ModelStore, dsn: str, control: ControlBlock, models_dir: str, stats_path: str) -> bool:
    """One sync in the master before it forks, so that workers boot with the models loaded.

    A plain asyncio loop, closed before returning: it leaves no thread or handler in the master.
    A failure is logged and counted like any other; the supervisor retries it.
    """
    os.makedirs(models_dir, exist_ok=True)
    return asyncio.run(ModelSync(control, store, dsn, models_dir, stats_path).sync())


def first_model_sync(settings: Settings, dsn: str, control: ControlBlock) -> bool:
    """`first_sync` with sira serve's settings (in the master, before the fork)."""
    return first_sync(open_model_store(settings), dsn, control, data_path(settings.data_dir, MODELS_DIR),
                      data_path(settings.data_dir, STATS_FILE))
