"""The model supervisor as a process of its own (``run_supervisor``), against real Postgres and a folder store.

It follows NOTIFY and SIGHUP, never loads onnxruntime, stops cleanly on SIGTERM, and a killed
supervisor is replaced without a new generation (its orphaned load check leaves by itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from shm.control import ControlBlock
from shm.segment import segment_name
from tests.fixtures.model_supervisor import (  # noqa: F401 (fixtures)
    conn_fixture,
    models_dir_fixture,
    production_slot,
    promote,
    store_fixture,
)
from tests.fixtures.models import build_dense_model, register_file
from tests.fixtures.server import REPO, is_zombie, process_tree
from tests.fixtures.waiting import wait_for
from workers.bootstrap import demo_files
from workers.sync_stats import STATS_FILE

pytestmark = pytest.mark.timeout(180)


SUPERVISOR_MAIN = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from app.store.buckets import LocalModelStore
from workers.supervisor import run_supervisor
store_root, dsn, control, models_dir, stats_path = sys.argv[1:]
sys.exit(run_supervisor(LocalModelStore(store_root), dsn, control, models_dir, stats_path, 300.0))
"""


@pytest.fixture
def shm_control():
    """A control block in /dev/shm (where run_supervisor attaches), unlinked afterwards."""
    block = ControlBlock.create(segment_name(f"t{uuid.uuid4().hex[:12]}", "control"))
    try:
        yield block
    finally:
        block.close()
        block.unlink()


@pytest.fixture
def supervisor_process(shm_control, store, migrated_db, models_dir, tmp_path):
    log_path = tmp_path / "supervisor.log"
    stats_path = str(tmp_path / STATS_FILE)

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR_MAIN, store.root, migrated_db, shm_control.segment.name,
                 models_dir, stats_path], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": REPO})

    processes = [start()]
    yield processes, start, log_path, stats_path
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def read_stats(path: str) -> dict:
    with contextlib.suppress(FileNotFoundError, ValueError), open(path, encoding="utf-8") as handle:
        return json.load(handle)
    return {}


def test_supervisor_process_follows_notify_and_sighup_and_never_loads_onnxruntime(
        supervisor_process, shm_control, conn, store, tmp_path):
    processes, _start, log_path, stats_path = supervisor_process
    register_file(conn, store, demo_files()[0], status="production")
    process = processes[0]
    wait_for(lambda: shm_control.generation() == 1, what="first generation")
    # A promotion reaches it through NOTIFY (the poll interval is 300 s).
    wait_for(lambda: "listening for registry changes" in log_path.read_text(), what="LISTEN")
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256)
    dense_id = register_file(conn, store, dense)
    promote(conn, dense_id)
    wait_for(lambda: production_slot(shm_control).model_id == dense_id, what="promoted model live")
    with open(f"/proc/{process.pid}/maps", encoding="ascii", errors="replace") as handle:
        assert "onnxruntime" not in handle.read()
    # SIGHUP asks for a sync even when nothing notified.
    wait_for(lambda: read_stats(stats_path).get("syncs_total"), what="stats")
    time.sleep(0.5)  # the sync that the LISTEN asked for has ended
    syncs = read_stats(stats_path)["syncs_total"]
    os.kill(process.pid, signal.SIGHUP)
    wait_for(lambda: read_stats(stats_path)["syncs_total"] > syncs, what="sync after SIGHUP")
    assert "model sync requested (SIGHUP)" in log_path.read_text()
    # SIGTERM stops it cleanly.
    process.terminate()
    assert process.wait(30) == 0


def test_a_killed_supervisor_is_replaced_without_a_new_generation(supervisor_process, shm_control, conn, store,
                                                                   tmp_path):
    processes, start, _log_path, _stats_path = supervisor_process
    register_file(conn, store, demo_files()[0], status="production")
    wait_for(lambda: shm_control.generation() == 1, what="first generation")
    waiting_check = wait_for(lambda: process_tree(processes[0].pid)[1:], what="waiting load check")
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(10)
    # Its load-check process, waiting on a pipe from the dead supervisor, leaves by itself.
    wait_for(lambda: not [pid for pid in waiting_check if os.path.exists(f"/proc/{pid}")
                          and not is_zombie(pid)], what="orphaned load check to exit")
    processes.append(start())
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256)
    dense_id = register_file(conn, store, dense)
    promote(conn, dense_id)
    wait_for(lambda: production_slot(shm_control).model_id == dense_id, what="promoted model live")
    assert shm_control.generation() == 2  # the successor continued the generation, with no republish
