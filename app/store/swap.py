"""The worker's models follow the supervisor's generation: checked on every request, swapped in place.

The supervisor's model sync (workers/model_sync.py) publishes a model table in the control block
(shm/control.py) and bumps its generation. ``LiveModelTable.get``, which every request calls
before it scores, compares that generation with the one this worker applied: one 8-byte load,
a few hundred nanoseconds. When it moved, the worker builds sessions over the new files (only for
models that changed), then serves with them; a request that already holds a ``ServingModel``
finishes on it, since nothing is mutated, only the table's dict replaced. No download ever
happens here: the supervisor has put and checked every file before publishing.

A model that fails to load in this worker leaves the product on the model it had (the error is
logged and shown by /readyz) until the next generation. Readiness (app/http/health.py): every product
of the table (each has a production model in the registry) has a model in this worker; a product
whose production model never went live (its slot is empty) keeps the worker at 503.

Files in use: before it opens any file of a table, the worker lists the files it holds and the
files it is about to open in ``<in_use_dir>/<pid>`` (one base name per line), then re-reads the
generation; only if it has not moved does it go on, else it starts over with the newer table.
The supervisor publishes first and reads these lists after, before removing files, so it never
removes a file a worker holds or is about to open.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
from typing import NamedTuple

from app.config import ModelFile
from app.scoring.models import ModelTable, ServingModel
from app.scoring.routing import canary_bucket
from app.telemetry.metrics import (
    set_canary_traffic_ratio,
    set_model_generation,
    set_models_loaded,
    start_fallback_series,
)
from conf.datadir import write_atomically
from shm.breakers import OPEN, STATE, find_breaker
from shm.control import ControlBlock, ModelSlot, ProductEntry
from shm.counters import CounterBlock
from shm.segment import SegmentError

log = logging.getLogger("sira.models")


class Canary(NamedTuple):
    """A product's canary (or shadow) in this worker, as route() reads it."""

    model: ServingModel
    slot: ModelSlot
    basis_points: int
    shadow: bool
    breaker: int  # the cell of its breaker state in the model stats segment; -1: none


class LiveModelTable(ModelTable):
    """product -> production ServingModel, following the control block's generation.

    Not thread safe: one per worker, used from its event loop.
    """

    def __init__(self, control: ControlBlock, in_use_dir: str | None = None):
        super().__init__([])
        self.control = control
        self.in_use_dir = in_use_dir
        self.applied_generation = -1  # the generation this worker serves; -1: none read yet
        self.slots: dict[str, ModelSlot] = {}  # product -> the slot of the model served
        # product -> (canary or shadow model, its slot, basis points, shadow?): routed per event
        self.canaries: dict[str, Canary] = {}
        # The canaries' circuit breakers (shm/breakers.py), read once per canary-routed event.
        self.breaker_block: CounterBlock | None = None
        self._breaker_cells: memoryview | None = None
        self.table: dict[str, ProductEntry] = {}  # the published table, as last applied
        self._published_generation = control.generation  # bound once: the per-request check
        self._recorded: frozenset[str] | None = None
        self.refresh()

    @classmethod
    def attach(cls, control_segment: str, in_use_dir: str | None = None) -> LiveModelTable:
        """In a worker: map the master's control block read-only and load its current table."""
        return cls(ControlBlock.attach(control_segment, readonly=True), in_use_dir)

    # the request path ------------------------------------------------------------------------

    def get(self, product: str) -> ServingModel | None:
        if self._published_generation() != self.applied_generation:
            self.swap()
        return self.production.get(product)

    def route(self, product: str, event_id: str) -> tuple[ServingModel | None, ServingModel | None,
                                                         ServingModel | None]:
        """(the model that answers the event, a shadow model that scores it too or None, the canary
        the event was meant for when its breaker is open and production answers instead, or None).

        The canary answers the events whose bucket (app/scoring/routing.py) is below its basis
        points; a shadow model scores every event of its product and answers none. While a canary's
        circuit breaker is open, production answers its events (and its shadow scores none).
        """
        if self._published_generation() != self.applied_generation:
            self.swap()
        canary = self.canaries.get(product)
        if canary is None:
            return self.production.get(product), None, None
        model, _slot, basis_points, shadow, breaker = canary
        if shadow:
            if breaker >= 0 and self._breaker_cells[breaker] == OPEN:
                return self.production.get(product), None, None
            return self.production.get(product), model, None
        if canary_bucket(product, event_id, self.table[product].canary_seed) < basis_points:
            if breaker >= 0 and self._breaker_cells[breaker] == OPEN:
                return self.production.get(product), None, model
            return model, None, None
        return self.production.get(product), None, None

    def refresh(self) -> None:
        """Swap now if the supervisor published a generation this worker has not applied."""
        if self._published_generation() != self.applied_generation:
            self.swap()

    # swapping --------------------------------------------------------------------------------

    def swap(self) -> None:
        """Apply the current table: new sessions for changed models, the rest kept as they are."""
        try:
            generation, table = self.read_table_recording_files()
        except (SegmentError, OSError) as exc:
            # Keep serving what we have; try again when the supervisor publishes again.
            self.applied_generation = self._published_generation()
            log.error("cannot read the model table (generation %d): %s", self.applied_generation, exc)
            return
        production: dict[str, ServingModel] = {}
        slots: dict[str, ModelSlot] = {}
        errors: dict[str, str] = {}
        for product, entry in table.items():
            if entry.production is None:
                continue
            try:
                production[product] = self.model_for(product, entry.production)
                slots[product] = entry.production
            except Exception as exc:  # any load failure keeps the product on the model it had
                errors[product] = f"{type(exc).__name__}: {exc}"
                log.error("model %s for %s failed to load in worker %d: %s",
                          entry.production.model_id, product, os.getpid(), exc)
                if product in self.production:
                    production[product], slots[product] = self.production[product], self.slots[product]
        canaries = self.load_canaries(table, production)
        self.production, self.slots, self.load_errors, self.table = production, slots, errors, table
        self.canaries = canaries
        self.expected_products = sorted(table)  # each has a production model in the registry
        self.applied_generation = generation
        self.record_files_in_use(files_of([*slots.values(), *(c.slot for c in canaries.values())]))
        set_models_loaded(len(production))
        set_model_generation(generation)
        for product in table:
            canary = canaries.get(product)
            set_canary_traffic_ratio(product, canary.basis_points / 10_000 if canary and not canary.shadow else 0.0)
            if canary is not None and not canary.shadow:
                start_fallback_series(product, canary.model.model_id)
        log.info("worker %d serves model generation %d: %s", os.getpid(), generation,
                 ", ".join(f"{p}={s.model_id}" for p, s in sorted(slots.items())) or "no model")
        for product, (model, _slot, basis_points, shadow, _breaker) in sorted(canaries.items()):
            log.info("worker %d: %s %s of %s%s", os.getpid(), model.role, model.model_id, product,
                     "" if shadow else f" on {basis_points / 100:.2f}% of its events")

    def load_canaries(self, table: dict[str, ProductEntry],
                      production: dict[str, ServingModel]) -> dict[str, tuple[ServingModel, ModelSlot, int, bool]]:
        """The canary (or shadow) model of each product that has one in force and a production model.

        A canary that fails to load here is left out: its product's events all go to production.
        """
        canaries = {}
        for product, entry in table.items():
            slot = entry.canary
            shadow = entry.mode == "shadow"
            if slot is None or product not in production or not (shadow or entry.canary_bp > 0):
                continue
            role = "shadow" if shadow else "canary"
            try:
                model = self.canary_model_for(product, slot, role)
            except Exception as exc:  # the product keeps serving from production alone
                log.error("%s model %s for %s failed to load in worker %d: %s", role, slot.model_id,
                          product, os.getpid(), exc)
                continue
            canaries[product] = Canary(model, slot, entry.canary_bp, shadow, self.breaker_state_cell(slot.model_id))
        return canaries

    def follow_breakers(self, block: CounterBlock, cells: memoryview) -> None:
        """Read the canaries' breakers from the model stats segment (``cells``: its u64 view)."""
        self.breaker_block, self._breaker_cells = block, cells
        if self.canaries:
            self.canaries = {product: canary._replace(breaker=self.breaker_state_cell(canary.model.model_id))
                             for product, canary in self.canaries.items()}

    def breaker_state_cell(self, model_id: str) -> int:
        """The cell of the canary's breaker state, or -1 (no breaker: always tried)."""
        if self.breaker_block is None:
            return -1
        cell = find_breaker(self.breaker_block, model_id)
        return -1 if cell is None else cell + STATE

    def canary_model_for(self, product: str, slot: ModelSlot, role: str) -> ServingModel:
        """The canary's ServingModel: the one held when it is the same model, in the given role."""
        held = self.canaries.get(product)
        if held is not None and same_files(held.slot, slot):
            model = held.model
            if (model.threshold, model.version, model.role) != (slot.threshold, slot.version, role):
                model = copy.copy(model)
                model.threshold, model.version, model.role = float(slot.threshold), slot.version, role
            return model
        return ServingModel(model_file_for(product, slot, role))

    def model_for(self, product: str, slot: ModelSlot) -> ServingModel:
        """The ServingModel for a slot: the one held when it is the same model, else a new one."""
        held, held_slot = self.production.get(product), self.slots.get(product)
        if held is not None and held_slot is not None and same_files(held_slot, slot):
            if (held.threshold, held.version) != (slot.threshold, slot.version):
                held = copy.copy(held)  # same session; the old object stays as in-flight requests saw it
                held.threshold, held.version = float(slot.threshold), slot.version
            return held
        return ServingModel(model_file_for(product, slot))

    def read_table_recording_files(self) -> tuple[int, dict[str, ProductEntry]]:
        """A table whose files this worker listed as in use before the supervisor could remove them."""
        while True:
            generation, table = self.control.read_table()
            upcoming = [slot for entry in table.values() for slot in (entry.production, entry.canary) if slot]
            self.record_files_in_use(files_of(self.slots.values()) | files_of(upcoming))
            if self._published_generation() == generation:
                return generation, table

    def record_files_in_use(self, names: frozenset[str]) -> None:
        """Replace this worker's list of files in use (atomically; only when it changed)."""
        if self.in_use_dir is None or names == self._recorded:
            return
        path = os.path.join(self.in_use_dir, str(os.getpid()))
        try:
            write_atomically(path, "".join(f"{name}\n" for name in sorted(names)))
        except OSError as exc:  # serving comes first; the files may then be removed under us
            log.warning("cannot list the model files in use in %s: %s", path, exc)
            return
        self._recorded = names

    # what /readyz and GET /v1/models show ----------------------------------------------------

    def generation(self) -> int | None:
        """The generation this worker serves; None before the supervisor's first one."""
        return self.applied_generation if self.applied_generation > 0 else None

    def loaded_at(self, model_id: str) -> str | None:
        """When the supervisor put this model live on this instance (ISO 8601 UTC), if it serves."""
        for slot in [*self.slots.values(), *(canary.slot for canary in self.canaries.values())]:
            if slot.model_id == model_id:
                return iso_utc(slot.loaded_at)
        return None

    def waiting_reason(self) -> str | None:
        """Why this worker cannot be ready yet, or None."""
        if self.applied_generation <= 0:
            return "waiting for the supervisor's first model generation"
        return None


def same_files(a: ModelSlot, b: ModelSlot) -> bool:
    """Two slots of the same model over the same files: the session can stay."""
    return (a.model_id, a.path, a.spec_path) == (b.model_id, b.path, b.spec_path)


def model_file_for(product: str, slot: ModelSlot, role: str = "production") -> ModelFile:
    """The ModelFile of a published slot, its feature spec read from the slot's spec file."""
    with open(slot.spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    return ModelFile(model_id=slot.model_id, name=str(spec.get("name", product)), version=slot.version,
                     product=product, path=slot.path, spec=spec, threshold=slot.threshold, role=role)


def files_of(slots) -> frozenset[str]:
    """Base names of the files of some slots (the weights file shares its graph's name stem)."""
    names = set()
    for slot in slots:
        names.add(os.path.basename(slot.path))
        names.add(os.path.basename(slot.spec_path))
    return frozenset(names)


def iso_utc(unix_time: float) -> str:
    moment = _dt.datetime.fromtimestamp(unix_time, _dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
