"""Where a model sync gets the registry's serving state, and what it learns about Postgres and the store.

The supervisor's sync (workers/model_sync.py) asks a `RegistrySource`:

- `read()`: the production models and canaries from Postgres. When the master could not prepare
  the database at start (workers/bootstrap.py), the migrations and the demo model come first, once.
  Every answer or failure marks ``postgres`` up or down on the dependency board (app/dependencies.py).
- `snapshot()`: after a failed read, the registry snapshot (workers/registry_snapshot.py), but only
  while nothing is served yet (no model table: the master's first sync), and once per process. A
  server that already serves keeps its table instead: it is at least as new as the snapshot.
- `after_sync()`: probe the model store (one cheap existence check of a served model's object, so
  its state is known even when every model file is already local), and write the snapshot after a
  sync that read Postgres and put every model live.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import psycopg

from app.dependencies import DEPENDENCIES_FILE, MODEL_STORE, POSTGRES, DependencyBoard
from app.store.buckets import ModelStore, ModelStoreUnavailable
from app.store.registry import RegistryModel
from conf.logs import one_line
from workers import registry_snapshot
from workers.bootstrap import prepare_database

log = logging.getLogger("sira.supervisor")


class RegistrySource:
    """The registry for one supervisor (or the master's first sync); one per process, not thread safe."""

    def __init__(self, dsn: str, store: ModelStore, data_dir: str, read_state: Callable, make_canary: Callable,
                 bootstrap_pending: bool = False):
        self.dsn = dsn
        self.store = store
        self.read_state = read_state  # dsn -> (models, {product: canary}), in a thread
        self.make_canary = make_canary  # (config, model) -> the sync's canary object
        self.bootstrap_pending = bootstrap_pending
        self.snapshot_path = os.path.join(data_dir, registry_snapshot.SNAPSHOT_FILE)
        self.dependencies = DependencyBoard(os.path.join(data_dir, DEPENDENCIES_FILE))
        self.failure_logged = False  # the last read failed to connect: the board logged it (once per outage)
        self.from_snapshot = False  # the current sync serves the snapshot
        self.snapshot_tried = False  # read at most once per process: nobody rewrites it while Postgres is away
        self._snapshot_written: tuple | None = None  # what the file holds, to skip rewriting it unchanged

    async def read(self) -> tuple[list[RegistryModel], dict]:
        """The serving state from Postgres; psycopg.Error when it cannot be read."""
        self.from_snapshot = False
        try:
            if self.bootstrap_pending:
                await self.bootstrap()
            state = await asyncio.to_thread(self.read_state, self.dsn)
        except psycopg.OperationalError as exc:  # cannot connect, or the connection broke
            self.dependencies.mark_down(POSTGRES, one_line(exc))
            self.failure_logged = True
            raise
        except psycopg.Error:  # Postgres answered, with an error of the registry's (logged by the sync)
            self.dependencies.mark_up(POSTGRES)
            self.failure_logged = False
            raise
        self.failure_logged = False
        self.dependencies.mark_up(POSTGRES)
        return state

    def take_over(self) -> None:
        """In the supervisor sidecar: the master's dependency states, and its snapshot already tried."""
        self.dependencies.take_over()
        self.snapshot_tried = True

    async def bootstrap(self) -> None:
        """The master's unfinished start: migrations and the demo model (psycopg.Error: not yet)."""
        try:
            await asyncio.to_thread(prepare_database, self.dsn, self.store)
        except ModelStoreUnavailable as exc:  # the registry can still be read; try again next sync
            self.dependencies.mark_down(MODEL_STORE, one_line(exc))
            return
        self.bootstrap_pending = False
        log.info("database prepared: migrations applied, demo model registered if the registry was empty")

    def snapshot(self, nothing_served: bool) -> tuple[list[RegistryModel], dict] | None:
        """The snapshot's serving state, when nothing is served yet and there is a usable one."""
        if not nothing_served or self.snapshot_tried:
            return None
        self.snapshot_tried = True
        snapshot = registry_snapshot.read_snapshot(self.snapshot_path)
        if snapshot is None:
            return None
        log.warning("Postgres is unreachable: serving the registry snapshot, %s", registry_snapshot.describe(snapshot))
        self.from_snapshot = True
        canaries = {config.product: self.make_canary(config, model) for config, model in snapshot.canaries}
        return snapshot.models, canaries

    async def after_sync(self, ok: bool, generation: int, models: list[RegistryModel], canaries: dict) -> bool:
        """Probe the store, keep the snapshot of a good sync; the sync's outcome (a snapshot's is not ok:
        it is retried soon)."""
        await self.probe_store(models)
        if ok and not self.from_snapshot:
            self.write_snapshot(generation, models, canaries)
        return ok and not self.from_snapshot

    def write_snapshot(self, generation: int, models: list[RegistryModel], canaries: dict) -> None:
        """Replace the snapshot with this sync's state (not when the file already holds it)."""
        snapshot = registry_snapshot.snapshot_of(generation, models, canaries)
        key = (snapshot.generation, snapshot.models, snapshot.canaries)
        if key == self._snapshot_written:
            return
        try:
            registry_snapshot.write_snapshot(self.snapshot_path, snapshot)
        except OSError as exc:
            log.warning("cannot write the registry snapshot %s: %s", self.snapshot_path, exc)
            return
        self._snapshot_written = key

    async def probe_store(self, models: list[RegistryModel]) -> None:
        """Whether the store answers: one existence check of a served model's object (a HEAD on S3)."""
        if not models:
            return
        key = min(models, key=lambda model: model.product).storage_key
        try:
            await asyncio.to_thread(self.store.exists, key)
        except ModelStoreUnavailable as exc:
            self.dependencies.mark_down(MODEL_STORE, one_line(exc))
            return
        except ValueError:  # a key the store refuses to look up: says nothing of the store
            return
        self.dependencies.mark_up(MODEL_STORE)


