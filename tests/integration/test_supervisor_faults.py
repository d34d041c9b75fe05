"""The model supervisor's sync when things break: the model in production keeps serving, the fault is counted.

Faults are real: damaged objects in the store, objects it never got, files that are not models, specs
that do not match, and a TCP proxy in front of Postgres or S3 (moto's, over HTTP) that refuses
connections while it is down. The next sync after the fix catches up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading

import pytest
from psycopg import conninfo

from app.store.buckets import LocalModelStore, S3ModelStore
from tests.fixtures.model_supervisor import (  # noqa: F401 (fixtures)
    conn_fixture,
    control_fixture,
    live_demo_fixture,
    make_supervisor,
    models_dir_fixture,
    production_slot,
    promote,
    stats,
    store_fixture,
    sync,
)
from tests.fixtures.models import build_dense_model, demo_spec, register_file
from tests.fixtures.server import free_port
from workers.bootstrap import demo_files

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
