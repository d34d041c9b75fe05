"""The model supervisor's sync on its normal path, against real Postgres, a real folder store and real load checks.

The first sync fetches, checks and publishes the production model; later syncs publish nothing when
nothing changed, a promoted dense model in its shared form, a threshold change without a new load
check; old model files stay while a live worker lists them. Bad models and unreachable dependencies
are in tests/integration/test_supervisor_faults.py, the supervisor as a process of its own in
tests/integration/test_supervisor_process.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.model_supervisor import (  # noqa: F401 (fixtures)
    conn_fixture,
    control_fixture,
    live_demo_fixture,
    models_dir_fixture,
    production_slot,
    promote,
    stats,
    store_fixture,
    sync,
)
from tests.fixtures.models import build_dense_model, demo_spec, register_file

pytestmark = pytest.mark.timeout(180)


def test_first_sync_fetches_checks_and_publishes(live_demo, control, models_dir):
    supervisor, _demo_id = live_demo
    slot = production_slot(control)
    assert control.generation() == 1
    assert os.path.dirname(slot.path) == models_dir and os.path.isfile(slot.path)
    with open(slot.spec_path, encoding="utf-8") as handle:
        assert json.load(handle) == demo_spec()
    assert stats(supervisor)["generation"] == 1 and stats(supervisor)["last_sync_ok"] is True


def test_a_sync_with_nothing_new_publishes_nothing(live_demo, control):
    supervisor, _ = live_demo
    assert sync(supervisor) is True
    assert control.generation() == 1


def test_promoted_dense_model_goes_live_in_its_shared_form(live_demo, conn, store, control, tmp_path):
    supervisor, _ = live_demo
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256)
    dense_id = register_file(conn, store, dense)
    promote(conn, dense_id)
    assert sync(supervisor) is True
    slot = production_slot(control)
    assert control.generation() == 2 and slot.model_id == dense_id
    assert slot.path.endswith(".graph.onnx") and os.path.isfile(slot.path[:-len(".graph.onnx")] + ".weights")


def test_threshold_change_republishes_without_a_new_load_check(live_demo, conn, control):
    supervisor, demo_id = live_demo
    before = production_slot(control)
    conn.execute("UPDATE siramodel_registry SET threshold = 0.77 WHERE model_id = %s", (demo_id,))
    assert sync(supervisor) is True
    after = production_slot(control)
    assert control.generation() == 2 and after.threshold == 0.77
    assert (after.path, after.loaded_at) == (before.path, before.loaded_at)


def test_old_files_stay_while_a_worker_lists_them(live_demo, conn, store, control, models_dir, tmp_path):
    supervisor, _ = live_demo
    old = production_slot(control)
    record = os.path.join(models_dir, "in-use", str(os.getpid()))  # this process plays a live worker
    with open(record, "w", encoding="utf-8") as handle:
        handle.write(f"{os.path.basename(old.path)}\n{os.path.basename(old.spec_path)}\n")
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256)
    promote(conn, register_file(conn, store, dense))
    assert sync(supervisor) is True
    assert os.path.exists(old.path) and os.path.exists(old.spec_path)
    os.unlink(record)  # the worker swapped (or died)
    assert sync(supervisor) is True
    assert not os.path.exists(old.path) and not os.path.exists(old.spec_path)
    assert os.path.exists(production_slot(control).path)


def test_lists_of_dead_workers_are_dropped(live_demo, models_dir):
    supervisor, _ = live_demo
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    record = os.path.join(models_dir, "in-use", dead)
    with open(record, "w", encoding="utf-8") as handle:
        handle.write("something.onnx\n")
    assert sync(supervisor) is True
    assert not os.path.exists(record)
