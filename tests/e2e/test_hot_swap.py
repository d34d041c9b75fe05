"""Hot swap on a real `sira serve` with its models in S3 (moto over HTTP): under load, nothing fails.

Several clients post /v1/infer without pause while a new model is published and promoted, while a
corrupt model is promoted, and while the supervisor is killed. Every answer must be a 200. How long
the new model took to appear after the promote is printed (run with -s), not asserted: the
machines that run the tests are too noisy for timing assertions.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import threading
import time

import httpx
import psycopg
import pytest

from app.store.buckets import S3ModelStore
from tests.e2e.test_infer import event
from tests.fixtures.models import (
    build_dense_model,
    demo_spec,
    register_file,
    write_spec,
)
from tests.fixtures.server import bearer, process_tree, run_sira
from tests.fixtures.waiting import wait_for
from workers.sync_stats import STATS_FILE

pytestmark = pytest.mark.timeout(240)

CLIENTS = 3
SETTLED = 100  # consecutive answers from the new model: every worker has swapped


class Load:
    """Clients posting /v1/infer in a loop on keep-alive connections; every answer is recorded."""

    def __init__(self, url: str, clients: int = CLIENTS):
        self.url = url
        self.answers: list[tuple[float, int | str, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        self.wait_for(lambda answers: len(answers) >= 20, "first answers")
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, headers=bearer("sira_service"), timeout=10) as client:
            while not self._stop.is_set():
                body = event(amount=round(random.uniform(1, 5000), 2))
                try:
                    response = client.post("/v1/infer", json=body)
                    answer = (time.monotonic(), response.status_code,
                              response.json().get("model_id") if response.status_code == 200 else response.text)
                except httpx.HTTPError as exc:  # a hang or a reset is a failure too
                    answer = (time.monotonic(), f"{type(exc).__name__}: {exc}", None)
                with self._lock:
                    self.answers.append(answer)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.answers)

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> None:
        """Hang guard, not a timing assertion."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"no {what} within {timeout}s; last answers: {self.snapshot()[-5:]}")

    def failures(self) -> list:
        return [answer for answer in self.snapshot() if answer[1] != 200]


def settled_on(model_id: str):
    return lambda answers: len(answers) >= SETTLED and all(a[2] == model_id for a in answers[-SETTLED:])


@pytest.fixture
def s3_server(server_factory, s3_bucket):
    """A two-worker server whose model store is the bucket; only NOTIFY and SIGHUP trigger syncs."""
    server = server_factory(workers=2, MODEL_POLL_INTERVAL_S="300", **s3_bucket.sira_env())
    server.store = S3ModelStore(s3_bucket.name, s3_bucket.endpoint_url)
    server.bucket = s3_bucket
    return server


def serving_model_id(server) -> str:
    return httpx.get(server.url + "/readyz").json()["models"]["fraud_score"]["model_id"]


def promote(server, model_id: str) -> None:
    response = httpx.post(f"{server.url}/v1/models/{model_id}/promote", json={"target": "production"},
                          headers=bearer("ml_ops"), timeout=10)
    assert response.status_code == 200, response.text


def supervisor_stats(server) -> dict:
    try:
        with open(os.path.join(server.data_dir, STATS_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, ValueError):
        return {}


def supervisor_pid(server) -> int:
    with open(os.path.join(server.data_dir, "supervisor.pid"), encoding="ascii") as handle:
        return int(handle.read())



def test_cold_start_from_an_empty_model_dir_fetches_from_s3(s3_server):
    ready = httpx.get(s3_server.url + "/readyz").json()
    assert ready["generation"] >= 1 and ready["models"]["fraud_score"]["loaded_at"].endswith("Z")
    models = os.listdir(os.path.join(s3_server.data_dir, "models"))
    assert any(name.endswith(".onnx") for name in models)
    assert any(key.startswith("models/") for key in s3_server.bucket.keys())
    assert not os.path.exists(os.path.join(s3_server.data_dir, "store")), "the bucket is the store"


def test_publish_and_promote_under_load_swaps_every_worker_without_a_failed_request(s3_server, tmp_path):
    old_id = serving_model_id(s3_server)
    models_dir = os.path.join(s3_server.data_dir, "models")
    assert any(name.startswith(old_id) for name in os.listdir(models_dir)), "the old model's spec file"
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=512)
    published = run_sira("models", "publish", path, "--product", "fraud_score", "--version", "dense-1",
                         "--threshold", "0.4", "--spec", write_spec(str(tmp_path), demo_spec()),
                         env=s3_server.env)
    assert published.returncode == 0, published.stderr
    new_id = published.stdout.strip()
    with Load(s3_server.url) as load:
        promote(s3_server, new_id)
        promoted_at = time.monotonic()
        os.kill(s3_server.master_pid, signal.SIGHUP)
        load.wait_for(settled_on(new_id), "swap to the new model")
    answers = load.snapshot()
    assert load.failures() == []
    assert {a[2] for a in answers} == {old_id, new_id}
    first_new = min(a[0] for a in answers if a[2] == new_id)
    print(f"\nnew model first answered {first_new - promoted_at:.2f}s after the promote "
          f"({len(answers)} answers, 0 failed)")
    ready = httpx.get(s3_server.url + "/readyz").json()
    assert ready["models"]["fraud_score"]["model_id"] == new_id and ready["generation"] >= 2
    # The old model's files go at the first sync after no worker lists them.
    assert run_sira("reload", env=s3_server.env).returncode == 0
    wait_for(lambda: not any(name.startswith(old_id) for name in os.listdir(models_dir)),
               "removal of the old model's files")


def test_corrupt_production_model_fails_no_request_and_the_old_one_keeps_serving(s3_server, fresh_db, tmp_path):
    old_id = serving_model_id(s3_server)
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=512, seed=5)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        bad_id = register_file(conn, s3_server.store, path)
        key = conn.execute("SELECT storage_key FROM siramodel_registry WHERE model_id = %s",
                           (bad_id,)).fetchone()[0]
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the bucket
    s3_server.bucket.client().put_object(Bucket=s3_server.bucket.name, Key=key, Body=bytes(data))
    with Load(s3_server.url) as load:
        promote(s3_server, bad_id)
        os.kill(s3_server.master_pid, signal.SIGHUP)
        wait_for(lambda: supervisor_stats(s3_server).get("model_load_errors_total", {})
                   .get("sha256_mismatch", 0) >= 2, "two failed attempts (the sync and its retry)")
        count = len(load.snapshot())
        load.wait_for(lambda answers: len(answers) >= count + 50, "more answers")
    assert load.failures() == []
    assert {a[2] for a in load.snapshot()} == {old_id}
    ready = httpx.get(s3_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["models"]["fraud_score"]["model_id"] == old_id
    assert "sha256_mismatch" in s3_server.log()


def test_killed_supervisor_is_restarted_and_workers_never_stop_serving(s3_server, fresh_db, tmp_path):
    killed = supervisor_pid(s3_server)
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=256, seed=9)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        new_id = register_file(conn, s3_server.store, path)
    with Load(s3_server.url) as load:
        os.kill(killed, signal.SIGKILL)
        replacement = wait_for(lambda: os.path.exists(os.path.join(s3_server.data_dir, "supervisor.pid"))
                                 and supervisor_pid(s3_server) != killed and supervisor_pid(s3_server),
                                 "a new supervisor")
        count = len(load.snapshot())
        load.wait_for(lambda answers: len(answers) >= count + 50, "answers after the kill")
        promote(s3_server, new_id)  # the replacement syncs it
        load.wait_for(settled_on(new_id), "swap by the new supervisor")
    assert load.failures() == []
    assert replacement in process_tree(s3_server.master_pid)
    assert "supervisor was killed by SIGKILL" in s3_server.log()
