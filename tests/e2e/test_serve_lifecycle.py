"""`sira serve` as ops meet it: health, pidfile, demo model on first start, clean stop on signals."""

from __future__ import annotations

import os
import signal

import httpx
import psycopg
import pytest

from tests.fixtures.server import SiraServer, free_port, is_zombie, process_tree, sira_env


def sira_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("sira")}


def test_healthz_answers_from_a_worker(sira_server):
    response = httpx.get(sira_server.url + "/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["service"] == "sira-inference"
    assert body["timestamp"].endswith("Z")
    assert response.headers["x-request-id"]


def test_pidfile_names_the_master(sira_server):
    with open(os.path.join(sira_server.data_dir, "sira.pid"), encoding="ascii") as handle:
        assert int(handle.read().strip()) == sira_server.master_pid
    assert len(sira_server.worker_pids()) >= 2


def test_first_start_registers_the_demo_model_once(server_factory, fresh_db):
    first = server_factory(workers=1)
    ready = httpx.get(first.url + "/readyz").json()
    assert ready["ready"] is True and "fraud_score" in ready["models"]
    first.stop()
    second = server_factory(workers=1)
    served = httpx.get(second.url + "/readyz").json()["models"]
    assert served["fraud_score"]["model_id"] == ready["models"]["fraud_score"]["model_id"]
    assert served["fraud_score"]["loaded_at"] > ready["models"]["fraud_score"]["loaded_at"]  # loaded anew
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute("SELECT product, status FROM siramodel_registry").fetchall()
    assert rows == [("fraud_score", "production")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_leaving_no_process_or_segment(server_factory, sig):
    server = server_factory(workers=2)
    tree = process_tree(server.master_pid)
    assert len(tree) >= 3
    # This instance's segments (named after its data dir and master): other servers may run beside it.
    own = server.segments(server.master_pid)
    assert {name.rsplit("-", 1)[1] for name in own} >= {"control", "cache"}
    assert server.stop(sig) == 0
    assert server.leftover_pids(tree) == []
    assert sira_segments() & own == set()
    assert not os.path.exists(os.path.join(server.data_dir, "sira.pid"))


def test_serve_on_embedded_postgres_by_default(tmp_path):
    """No DATABASE_URL: sira starts its own Postgres under the data dir and stops it at exit."""
    port = free_port()
    data_dir = str(tmp_path / "data")
    server = SiraServer(data_dir, sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}",
                                           SIRA_WORKERS="1"), port)
    try:
        server.start(timeout=120)
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert os.path.isdir(os.path.join(data_dir, "pg"))
        postmaster = os.path.join(data_dir, "pg", "postmaster.pid")
        assert os.path.exists(postmaster)
        with open(postmaster, encoding="ascii") as handle:
            pg_pid = int(handle.readline())
    finally:
        code = server.stop()
    assert code == 0
    assert not os.path.exists(f"/proc/{pg_pid}") or is_zombie(pg_pid), "the embedded Postgres must stop with sira"


def test_master_never_loads_onnxruntime(sira_server):
    """A worker forked from a master that loaded onnxruntime hangs at exit (see app/config.py)."""
    with open(f"/proc/{sira_server.master_pid}/maps", encoding="ascii", errors="replace") as handle:
        assert "onnxruntime" not in handle.read()
    worker = httpx.get(sira_server.url + "/readyz").json()["worker_pid"]  # a worker that has booted
    with open(f"/proc/{worker}/maps", encoding="ascii", errors="replace") as handle:
        assert "onnxruntime" in handle.read()


def test_sighup_does_not_restart_workers(sira_server):
    """SIGHUP is a model re-sync for the supervisor, never a gunicorn reload."""
    workers = sorted(sira_server.worker_pids())
    os.kill(sira_server.master_pid, signal.SIGHUP)
    for _ in range(20):
        assert httpx.get(sira_server.url + "/healthz").status_code == 200
    assert sorted(sira_server.worker_pids()) == workers
    assert "Hang up" not in sira_server.log()


def test_no_gunicorn_control_socket_is_opened(sira_server):
    assert "Control socket listening" not in sira_server.log()


def test_gunicorn_config_file_overrides_for_ops(server_factory, tmp_path):
    config = tmp_path / "gunicorn_ops.py"
    config.write_text("workers = 1\ngraceful_timeout = 10\n")
    server = server_factory(workers=3, SIRA_GUNICORN_CONFIG=str(config))
    assert len(server.worker_pids()) == 1


@pytest.mark.parametrize("content", ["workers = (\n", "workers = 'many'\n", "raise RuntimeError('no')\n"])
def test_broken_gunicorn_config_file_stops_sira_before_serving(tmp_path, fresh_db, content):
    config = tmp_path / "broken.py"
    config.write_text(content)
    port = free_port()
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), SIRA_BIND=f"127.0.0.1:{port}", DATABASE_URL=fresh_db,
                   SIRA_GUNICORN_CONFIG=str(config))
    from tests.fixtures.server import run_sira

    result = run_sira("serve", env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "SIRA_GUNICORN_CONFIG" in result.stderr and "broken.py" in result.stderr
    assert not (tmp_path / "data").exists(), "nothing may start before the ops config is checked"
