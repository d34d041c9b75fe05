"""A real `sira serve` that starts and keeps serving with Postgres or the model store down (issue 12).

- Postgres stopped before the start, with the registry snapshot of an earlier run: ready and
  scoring from it; /readyz and sira_dependency_up say Postgres is down; once Postgres is back, the
  dependency is up again (one log line) and the predictions made meanwhile reach it.
- Postgres stopped before the first start ever (no snapshot, database not even migrated): not ready,
  /readyz says why; once Postgres answers, the supervisor migrates, registers the demo model and the
  server becomes ready by itself.
- The S3 store (its own moto server) stopped while serving: the verified local files keep serving;
  /readyz and the gauge say model_store is down, logged once however many syncs fail.

No timing is asserted: the waits below are hang guards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid

import httpx
import psycopg
import pytest

from tests.fixtures.metrics import scrape
from tests.fixtures.s3 import S3_ENV, S3Bucket
from tests.fixtures.server import TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, SiraServer, bearer, free_port, sira_env
from tests.fixtures.waiting import wait_for, wait_for_port
from workers.registry_snapshot import SNAPSHOT_FILE
from workers.sync_stats import STATS_FILE

pytestmark = pytest.mark.timeout(300)


def event() -> dict:
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card"}}



def new_server(data_dir: str, database_url: str, **env_overrides: str) -> SiraServer:
    port = free_port()
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2",
                   DATABASE_URL=database_url, JWT_SECRET=TEST_JWT_SECRET,
                   INTERNAL_SERVICE_TOKEN=TEST_INTERNAL_TOKEN, LOG_LEVEL="info", **env_overrides)
    return SiraServer(data_dir, env, port)


@contextlib.contextmanager
def running(server: SiraServer, wait_ready: bool = True):
    try:
        yield server.start(timeout=90, wait_ready=wait_ready)
    finally:
        server.stop()


def readyz(server: SiraServer, details: bool = True) -> httpx.Response:
    """/readyz with its details (the internal token: unlimited, as polling needs), or as a probe sees it."""
    headers = {"Authorization": f"Bearer {TEST_INTERNAL_TOKEN}"} if details else {}
    return httpx.get(server.url + "/readyz", headers=headers, timeout=10)


def dependency(server: SiraServer, name: str) -> dict | None:
    """The dependency's state as /readyz shows it (200 or 503)."""
    body = readyz(server).json()
    dependencies = body["dependencies"] if "dependencies" in body else body["details"]["dependencies"]
    return dependencies.get(name)


def gauge(server: SiraServer, name: str) -> float | None:
    samples = scrape(server.url)
    key = ("sira_dependency_up", frozenset({("name", name)}))
    return samples.get(key)


def log_messages(server: SiraServer, since: int = 0) -> list[str]:
    """The `message` of every JSON log line written after byte `since` of the server's log."""
    with open(server.log_path, "rb") as handle:
        handle.seek(since)
        lines = handle.read().decode("utf-8", "replace").splitlines()
    messages = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError):
            messages.append(json.loads(line)["message"])
    return messages


def log_size(server: SiraServer) -> int:
    return os.path.getsize(server.log_path) if os.path.exists(server.log_path) else 0


def score(server: SiraServer) -> dict:
    response = httpx.post(server.url + "/v1/infer", json=event(), headers=bearer("sira_service"), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def logged_ids(dsn: str) -> set[str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return {row[0] for row in conn.execute("SELECT prediction_id::text FROM siramodel_predictions")}


def test_postgres_down_at_start_serves_the_registry_snapshot(tmp_path, own_postgres):
    dsn = own_postgres.url
    data_dir = str(tmp_path / "sira")
    with running(new_server(data_dir, dsn)) as first:
        wait_for(lambda: os.path.exists(os.path.join(data_dir, SNAPSHOT_FILE)), "the registry snapshot")
        model_id = readyz(first).json()["models"]["fraud_score"]["model_id"]
        assert dependency(first, "postgres")["up"] is True
    own_postgres.close()  # Postgres stops before the next start

    server = new_server(data_dir, dsn)
    log_from = log_size(server)  # the same data dir, the same log file: this run's lines only
    with running(server):  # ready: start() waits for /readyz 200
        body = readyz(server).json()
        assert body["ready"] is True and body["models"]["fraud_score"]["model_id"] == model_id
        assert body["dependencies"]["postgres"]["up"] is False
        assert body["dependencies"]["postgres"]["last_error"]
        assert body["dependencies"]["model_store"]["up"] is True
        made = [score(server)["prediction_id"] for _ in range(5)]
        assert wait_for(lambda: gauge(server, "postgres") == 0, "sira_dependency_up{postgres} 0") is True
        assert gauge(server, "model_store") == 1
        admin = httpx.get(server.url + "/v1/models", headers=bearer("ml_ops"), timeout=30)
        assert admin.status_code == 503 and admin.headers["Retry-After"] == "1", admin.text
        assert admin.json()["error_code"] == "SERVICE_UNAVAILABLE"

        own_postgres.open()
        wait_for(lambda: dependency(server, "postgres")["up"], "postgres up in /readyz")
        wait_for(lambda: gauge(server, "postgres") == 1, "sira_dependency_up{postgres} 1")
        wait_for(lambda: set(made) <= logged_ids(dsn), "the predictions made meanwhile in Postgres")
        assert readyz(server).status_code == 200
        score(server)
        messages = log_messages(server, log_from)
        assert sum(m.startswith("postgres is unreachable") for m in messages) == 1, messages
        assert sum(m.startswith("postgres is reachable again") for m in messages) == 1, messages
        assert any(m.startswith("Postgres is unreachable: serving the registry snapshot") for m in messages)


def test_postgres_down_at_first_start_is_not_ready_until_it_answers(tmp_path, own_postgres):
    dsn = own_postgres.url
    own_postgres.close()  # never migrated, no snapshot: nothing to serve
    server = new_server(str(tmp_path / "sira"), dsn)
    with running(server, wait_ready=False):  # start() waits for /healthz only
        response = wait_for(lambda: (r := readyz(server)).status_code == 503 and r, "a 503 from /readyz")
        body = response.json()
        assert body["error_code"] == "SERVICE_UNAVAILABLE"
        assert body["message"] == "not ready: postgres unreachable and no registry snapshot", body
        assert body["details"]["dependencies"]["postgres"]["up"] is False
        error = body["details"]["dependencies"]["postgres"]["last_error"]
        assert error and response.headers["Retry-After"] == "1"
        probe = readyz(server, details=False)  # no token: the same status and reason, no error text
        assert probe.status_code == 503 and probe.headers["Retry-After"] == "1"
        assert probe.json()["message"] == body["message"]
        assert set(probe.json()["details"]) == {"ready", "generation", "missing_products"}, probe.text
        assert error not in probe.text and "127.0.0.1" not in probe.text, probe.text
        assert wait_for(lambda: gauge(server, "postgres") == 0, "sira_dependency_up{postgres} 0") is True

        own_postgres.open()
        wait_for(lambda: readyz(server).status_code == 200, "ready once Postgres answers")
        assert dependency(server, "postgres")["up"] is True
        score(server)
        assert any(m.startswith("database prepared") for m in log_messages(server))


def syncs_total(server: SiraServer) -> int:
    with open(os.path.join(server.data_dir, STATS_FILE), encoding="utf-8") as handle:
        return json.load(handle)["syncs_total"]


@contextlib.contextmanager
def own_s3_server():
    """A moto S3 server of this test alone (the session's one must not stop); yields (endpoint, process)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="sira-test-moto-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV},
                               start_new_session=True)
    log.close()
    try:
        wait_for_port(port, process, log.name)
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)
        os.unlink(log.name)


def test_store_down_keeps_serving_the_verified_local_files(tmp_path, fresh_db, s3_credentials):
    with own_s3_server() as (endpoint, moto):
        bucket = S3Bucket(endpoint, f"sira-test-{uuid.uuid4().hex[:16]}")
        bucket.client().create_bucket(Bucket=bucket.name)
        server = new_server(str(tmp_path / "sira"), fresh_db, MODEL_POLL_INTERVAL_S="1", **bucket.sira_env())
        with running(server):
            wait_for(lambda: (dependency(server, "model_store") or {}).get("up"), "model_store up")
            log_from = log_size(server)
            moto.terminate()
            moto.wait(10)
            wait_for(lambda: dependency(server, "model_store")["up"] is False, "model_store down in /readyz",
                     timeout=120)
            assert dependency(server, "model_store")["last_error"]
            wait_for(lambda: gauge(server, "model_store") == 0, "sira_dependency_up{model_store} 0")
            syncs = syncs_total(server)
            wait_for(lambda: syncs_total(server) >= syncs + 3, "three more syncs with the store down", timeout=120)
            assert readyz(server).status_code == 200
            for _ in range(5):
                score(server)
            messages = log_messages(server, log_from)
            assert sum(m.startswith("model_store is unreachable") for m in messages) == 1, messages
            assert gauge(server, "postgres") == 1
