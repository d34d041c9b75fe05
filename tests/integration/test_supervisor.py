"""The model supervisor against real Postgres, real stores (a folder, moto's S3 over HTTP) and real load checks.

Faults are real too: a TCP proxy in front of Postgres or S3 that refuses connections while it is
down, damaged objects in the store, files that are not models, specs that do not match.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import conninfo

from app.store.buckets import LocalModelStore, S3ModelStore
from shm.control import ControlBlock
from shm.segment import segment_name
from tests.fixtures.models import build_dense_model, demo_spec, register_file
from tests.fixtures.server import REPO, free_port, is_zombie, process_tree
from tests.fixtures.waiting import wait_for
from workers.bootstrap import demo_files
from workers.supervisor import ModelSupervisor
from workers.sync_stats import STATS_FILE

pytestmark = pytest.mark.timeout(180)


class TcpProxy:
    """127.0.0.1:port forwarding to a TCP or unix-socket target while up; refusing connections while down."""

    def __init__(self, target: tuple):
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._connect_target()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _connect_target(self) -> socket.socket:
        if self.target[0] == "unix":
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.target[1])
        else:
            sock = socket.create_connection(self.target)
        return sock

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def proxied_dsn(dsn: str) -> tuple[str, TcpProxy]:
    """A proxy in front of the database of dsn, and the dsn that goes through it."""
    params = conninfo.conninfo_to_dict(dsn)
    host, port = params.get("host") or "localhost", int(params.get("port") or 5432)
    target = ("unix", os.path.join(host, f".s.PGSQL.{port}")) if host.startswith("/") else (host, port)
    proxy = TcpProxy(target)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return conninfo.make_conninfo(**params), proxy


@pytest.fixture
def control(tmp_path):
    block = ControlBlock.create("control", directory=str(tmp_path))
    try:
        yield block
    finally:
        block.close()
        block.unlink()


@pytest.fixture
def store(tmp_path) -> LocalModelStore:
    return LocalModelStore(str(tmp_path / "store"))


@pytest.fixture
def models_dir(tmp_path) -> str:
    path = tmp_path / "models"
    (path / "in-use").mkdir(parents=True)
    return str(path)


@pytest.fixture
def conn(migrated_db):
    with psycopg.connect(migrated_db, autocommit=True) as connection:
        yield connection


def make_supervisor(control, store, dsn, models_dir) -> ModelSupervisor:
    return ModelSupervisor(control, store, dsn, models_dir, os.path.join(models_dir, "..", STATS_FILE),
                           poll_interval_s=300)


def sync(supervisor: ModelSupervisor) -> bool:
    return asyncio.run(supervisor.sync())


def production_slot(control: ControlBlock, product: str = "fraud_score"):
    entry = control.read_table()[1].get(product)
    return entry.production if entry else None


def promote(conn, model_id: str) -> None:
    """What a promotion to production does in the registry, in one transaction."""
    with conn.transaction():
        product = conn.execute("SELECT product FROM siramodel_registry WHERE model_id = %s",
                               (model_id,)).fetchone()[0]
        conn.execute("UPDATE siramodel_registry SET status = 'archived' "
                     "WHERE product = %s AND status = 'production'", (product,))
        conn.execute("UPDATE siramodel_registry SET status = 'production' WHERE model_id = %s",
                     (model_id,))


def stats(supervisor: ModelSupervisor) -> dict:
    with open(supervisor.stats_path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def live_demo(conn, store, control, migrated_db, models_dir):
    """A supervisor whose first sync put the demo model live as generation 1."""
    demo_id = register_file(conn, store, demo_files()[0], status="production", spec=demo_spec())
    supervisor = make_supervisor(control, store, migrated_db, models_dir)
    assert sync(supervisor) is True
    assert production_slot(control).model_id == demo_id
    return supervisor, demo_id


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


def corrupt_object(store: LocalModelStore, model_path: str, tmp_path) -> str:
    """Register a file, then damage the stored object behind the registry's back."""
    key, _, size = store.put_file(model_path)
    with open(store.object_path(key), "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\xff" * 16)
    return key


FAULTS = ["sha256_mismatch", "download_failed", "invalid_model", "spec_mismatch"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_new_model_keeps_the_current_one_serving_and_is_counted(fault, live_demo, conn, store, control,
                                                                      tmp_path):
    supervisor, demo_id = live_demo
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256, seed=11)
    spec = demo_spec()
    if fault == "sha256_mismatch":
        corrupt_object(store, dense, tmp_path)
    elif fault == "download_failed":
        pass  # registered below from a store that never got the object
    elif fault == "invalid_model":
        with open(dense, "wb") as handle:
            handle.write(os.urandom(50_000))
    elif fault == "spec_mismatch":
        spec["features"] = spec["features"][:5]
    bad_store = LocalModelStore(str(tmp_path / "elsewhere")) if fault == "download_failed" else store
    bad_id = register_file(conn, bad_store, dense, spec=spec)
    promote(conn, bad_id)
    for attempt in (1, 2):  # and the next sync retries, failing the same way
        assert sync(supervisor) is False
        assert control.generation() == 1 and production_slot(control).model_id == demo_id
        assert stats(supervisor)["model_load_errors_total"] == {fault: attempt}
        assert stats(supervisor)["last_error"]["reason"] == fault


def test_a_fixed_store_object_goes_live_on_the_next_sync(live_demo, conn, store, control, tmp_path):
    supervisor, _ = live_demo
    dense = str(tmp_path / "dense.onnx")
    build_dense_model(dense, hidden=256, seed=12)
    key = corrupt_object(store, dense, tmp_path)
    promote(conn, register_file(conn, LocalModelStore(str(tmp_path / "other")), dense))
    assert sync(supervisor) is False
    shutil.copyfile(dense, store.object_path(key))  # ops re-upload the right bytes
    assert sync(supervisor) is True
    assert control.generation() == 2 and production_slot(control).path.endswith(".graph.onnx")


def test_postgres_unreachable_keeps_serving_and_the_next_sync_catches_up(conn, store, control, migrated_db,
                                                                          models_dir, tmp_path):
    demo_id = register_file(conn, store, demo_files()[0], status="production")
    dsn, proxy = proxied_dsn(migrated_db)
    supervisor = make_supervisor(control, store, dsn, models_dir)
    proxy.up()
    try:
        assert sync(supervisor) is True and production_slot(control).model_id == demo_id
        proxy.down()
        dense = str(tmp_path / "dense.onnx")
        build_dense_model(dense, hidden=256)
        dense_id = register_file(conn, store, dense)
        promote(conn, dense_id)
        assert sync(supervisor) is False
        assert control.generation() == 1 and production_slot(control).model_id == demo_id
        assert stats(supervisor)["model_load_errors_total"] == {"registry_unreachable": 1}
        proxy.up()
        assert sync(supervisor) is True
        assert control.generation() == 2 and production_slot(control).model_id == dense_id
    finally:
        proxy.down()


def test_s3_unreachable_keeps_serving_and_the_next_sync_catches_up(conn, control, migrated_db, models_dir,
                                                                    s3_bucket, tmp_path):
    endpoint = s3_bucket.endpoint_url.rsplit(":", 1)
    proxy = TcpProxy(("127.0.0.1", int(endpoint[1])))
    through_proxy = S3ModelStore(s3_bucket.name, f"http://127.0.0.1:{proxy.port}", connect_timeout_s=1,
                                 read_timeout_s=5, max_attempts=1)
    direct = S3ModelStore(s3_bucket.name, s3_bucket.endpoint_url)
    demo_id = register_file(conn, direct, demo_files()[0], status="production")
    supervisor = make_supervisor(control, through_proxy, migrated_db, models_dir)
    proxy.up()
    try:
        assert sync(supervisor) is True and production_slot(control).model_id == demo_id
        proxy.down()
        dense = str(tmp_path / "dense.onnx")
        build_dense_model(dense, hidden=256)
        dense_id = register_file(conn, direct, dense)
        promote(conn, dense_id)
        assert sync(supervisor) is False
        assert control.generation() == 1 and production_slot(control).model_id == demo_id
        assert stats(supervisor)["model_load_errors_total"] == {"store_unreachable": 1}
        proxy.up()
        assert sync(supervisor) is True and production_slot(control).model_id == dense_id
    finally:
        proxy.down()


# The supervisor as a process of its own ---------------------------------------------------------

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
