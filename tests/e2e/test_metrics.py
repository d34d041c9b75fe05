"""/metrics on a real two-worker `sira serve`: every metric exported, totals that add up, restarts survived.

Counts are summed over the workers' files (prometheus_client multiprocess mode); the tests send
traffic over fresh connections until both workers have answered some of it, and check that both
workers' files hold counts, so a total that adds up really is a sum over processes.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import re
import signal
import time
import uuid

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.fixtures.metrics import Sample, scrape, total
from tests.fixtures.postgres import create_database, drop_database, unique_database_name
from tests.fixtures.server import REPO, TEST_INTERNAL_TOKEN, TEST_JWT_SECRET, SiraServer, bearer, free_port, sira_env

SEED_METRICS = ("sira_inference_requests_total", "sira_inference_latency_seconds", "sira_inference_cache_hits_total",
                "sira_inference_cache_misses_total", "sira_models_loaded", "sira_prediction_errors_total",
                "sira_canary_traffic_ratio")
METRICS_FILE = os.path.join(REPO, "deploy", "metrics.txt")
# Series that exist only while a canary is in force: tests/e2e/test_canary_routing.py checks them.
CANARY_ONLY = {"sira_inference_fallbacks_total", "sira_canary_breaker_state", "sira_canary_breaker_opened_total"}
MAX_ROUNDS = 400  # fresh connections tried before giving up on reaching both workers


def event(**payload_overrides) -> dict:
    payload = {"amount": round(random.uniform(10.0, 9000.0), 2), "currency": "USD", "country": "US",
               "payment_method": "card", "features": {"hour_of_day": 14, "account_age_days": 700}}
    payload.update(payload_overrides)
    return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": payload}


def exported_names(samples: dict[Sample, float]) -> set[str]:
    names = set()
    for name, _ in samples:
        names.add(name)
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                names.add(name[: -len(suffix)])
    return names


def metrics_dir(server: SiraServer) -> str:
    from workers.metrics import metrics_dir as folder_of

    return folder_of(server.data_dir)


def counts_by_worker(metrics_dir: str) -> dict[int, float]:
    """pid -> sira_inference_requests_total written by that process, read from its own files."""
    counts: dict[int, float] = collections.Counter()
    for path in glob.glob(os.path.join(metrics_dir, "counter_*.db")):
        pid = int(re.match(r"counter_(\d+)", os.path.basename(path)).group(1))  # counter_<pid>[-requests].db
        for key, value, *_ in MmapedDict.read_all_values_from_file(path):
            if json.loads(key)[1] == "sira_inference_requests_total":  # [family, sample, labels, help]
                counts[pid] += value
    return counts


class Traffic:
    """What the test sent, by outcome."""

    def __init__(self):
        self.predictions = 0
        self.errors: collections.Counter = collections.Counter()
        self.cache_lookups = 0
        self.cache_hits = 0
        self.workers: set[int] = set()

    @property
    def requests(self) -> int:
        return self.predictions + sum(self.errors.values())


def send_mixed_traffic(server: SiraServer, traffic: Traffic, rounds: int) -> None:
    """Single events (some repeated: cache hits), a batch with a bad item, and errors, over fresh connections."""
    for index in range(rounds):
        with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as client:
            request = event()
            assert client.post("/v1/infer", json=request).status_code == 200
            assert client.post("/v1/infer", json=request).json()["cached"] is True  # same answer: a hit
            traffic.predictions += 2
            traffic.cache_lookups += 2
            traffic.cache_hits += 1
            if index % 4 == 0:
                batch = {"events": [event(), event(), event(amount="lots")]}
                results = client.post("/v1/infer/batch", json=batch).json()["results"]
                assert [("error_code" in result) for result in results] == [False, False, True]
                traffic.predictions += 2
                traffic.cache_lookups += 2
                traffic.errors["FEATURE_VALIDATION_FAILED"] += 1
                bad = client.post("/v1/infer", json=event(amount=-5))
                assert bad.status_code == 400
                traffic.errors["FEATURE_VALIDATION_FAILED"] += 1
                unknown = client.post("/v1/infer", json=dict(event(), product="no_such_product"))
                assert unknown.status_code == 404
                traffic.errors["MODEL_NOT_FOUND"] += 1
                anonymous = client.post("/v1/infer", json=event(), headers={"Authorization": ""})
                assert anonymous.status_code == 401
                traffic.errors["UNAUTHORIZED"] += 1
            traffic.workers.add(client.get("/readyz").json()["worker_pid"])


def send_until_both_workers_answered(server: SiraServer, traffic: Traffic) -> None:
    for _ in range(MAX_ROUNDS // 8):
        send_mixed_traffic(server, traffic, 8)
        if len(traffic.workers) >= 2:
            return
    pytest.fail(f"{MAX_ROUNDS} fresh connections all reached the same worker {traffic.workers}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url):
    """One two-worker server for the module, with the ops port (METRICS_BIND) open."""
    name = unique_database_name("sira_metrics")
    dsn = create_database(pg_url, name)
    port, metrics_port = free_port(), free_port()
    data_dir = str(tmp_path_factory.mktemp("metrics"))
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2",
                   METRICS_BIND=f"127.0.0.1:{metrics_port}", DATABASE_URL=dsn, JWT_SECRET=TEST_JWT_SECRET,
                   INTERNAL_SERVICE_TOKEN=TEST_INTERNAL_TOKEN)
    sira = SiraServer(data_dir, env, port)
    sira.metrics_url = f"http://127.0.0.1:{metrics_port}"
    try:
        sira.start()
        yield sira
    finally:
        sira.stop()
        drop_database(pg_url, name)



def test_a_fresh_server_exports_every_metric_of_the_seed_and_of_deploy(server):
    """deploy/README.md promises it: every name in deploy/metrics.txt is exported by a live server."""
    server.wait_until_workers_are_ready()
    samples = scrape(server.url)
    names = exported_names(samples)
    with open(METRICS_FILE, encoding="utf-8") as handle:
        listed = [line.strip() for line in handle if line.strip()]
    missing = [name for name in SEED_METRICS + tuple(listed) if name not in names and name not in CANARY_ONLY]
    assert not missing, f"not exported by a fresh server: {missing}"
    assert total(samples, "sira_models_loaded") == 1  # the demo model, in every worker
    assert total(samples, "sira_canary_traffic_ratio", product="fraud_score") == 0
    for name in ("sira_model_load_errors_total", "sira_canary_rollbacks_total",
                 "sira_prediction_queue_overflow_total"):
        assert any(sample == name for sample, _ in samples), f"{name} is not created at 0"


def test_counts_add_up_over_both_workers(server):
    before = scrape(server.url)
    traffic = Traffic()
    send_until_both_workers_answered(server, traffic)
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("sira_inference_requests_total") == traffic.requests
    assert delta("sira_inference_requests_total", status="200") == traffic.predictions
    assert delta("sira_inference_latency_seconds_count") == traffic.predictions
    assert delta("sira_inference_latency_seconds_count", product="fraud_score", model_role="production") \
        == traffic.predictions
    assert delta("sira_inference_latency_seconds_sum") > 0
    assert delta("sira_prediction_errors_total") == sum(traffic.errors.values())
    for error_type, count in traffic.errors.items():
        assert delta("sira_prediction_errors_total", error_type=error_type) == count, error_type
    assert delta("sira_prediction_errors_total", product="fraud_score", error_type="FEATURE_VALIDATION_FAILED") \
        == traffic.errors["FEATURE_VALIDATION_FAILED"]
    assert delta("sira_inference_requests_total", status="401") == traffic.errors["UNAUTHORIZED"]
    assert delta("sira_inference_requests_total", status="404", product="unknown") == traffic.errors["MODEL_NOT_FOUND"]
    decisions = sum(delta("sira_inference_requests_total", decision=d) for d in ("allow", "review", "block"))
    assert decisions == traffic.predictions
    assert delta("sira_inference_cache_hits_total", cache_type="shm") == traffic.cache_hits
    assert delta("sira_inference_cache_hits_total") + delta("sira_inference_cache_misses_total") \
        == traffic.cache_lookups
    by_worker = counts_by_worker(metrics_dir(server))
    assert len([pid for pid, count in by_worker.items() if count > 0 and pid in traffic.workers]) >= 2, by_worker


def test_a_worker_killed_with_sigkill_does_not_reset_a_counter(server):
    traffic = Traffic()
    send_until_both_workers_answered(server, traffic)
    before = scrape(server.url)
    by_worker = counts_by_worker(metrics_dir(server))
    victim = max((pid for pid in traffic.workers if pid in server.worker_pids()), key=lambda pid: by_worker[pid])
    assert by_worker[victim] > 0
    os.kill(victim, signal.SIGKILL)
    wait_for_replacement(server, victim)

    after_restart = scrape(server.url)
    for name in ("sira_inference_requests_total", "sira_inference_latency_seconds_count",
                 "sira_prediction_errors_total", "sira_inference_cache_hits_total"):
        assert total(after_restart, name) == total(before, name), name
    assert os.path.exists(os.path.join(metrics_dir(server), f"counter_{victim}-requests.db"))
    assert not glob.glob(os.path.join(metrics_dir(server), f"gauge_live*_{victim}.db")), \
        "child_exit did not drop the dead worker's live gauges"
    assert total(after_restart, "sira_models_loaded") == 1

    more = Traffic()
    send_mixed_traffic(server, more, 4)
    after_more = scrape(server.url)
    assert total(after_more, "sira_inference_requests_total") == total(before, "sira_inference_requests_total") \
        + more.requests


def wait_for_replacement(server: SiraServer, dead_pid: int, timeout: float = 60.0) -> None:
    """gunicorn forks a new worker; wait until two live workers answer /readyz again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [pid for pid in server.worker_pids() if pid != dead_pid]
        files = {int(os.path.basename(p)[len("gauge_livemin_"):-len(".db")])
                 for p in glob.glob(os.path.join(metrics_dir(server), "gauge_livemin_*.db"))}
        replaced = dead_pid not in files and len(files & set(workers)) >= 2
        if replaced and httpx.get(server.url + "/readyz", timeout=5).status_code == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"worker {dead_pid} was not replaced within {timeout}s:\n{server.log()[-3000:]}")


def test_metrics_port_serves_only_ops_paths_without_a_token(server):
    for path in ("/metrics", "/healthz", "/readyz"):
        response = httpx.get(server.metrics_url + path, timeout=10)
        assert response.status_code == 200, (path, response.text)
    refused = httpx.post(server.metrics_url + "/v1/infer", json=event(), headers=bearer("sira_service"), timeout=10)
    assert refused.status_code == 404
    assert refused.json()["error_code"] == "NOT_FOUND"
    assert httpx.get(server.metrics_url + "/openapi.json", timeout=10).status_code == 404
    assert "sira_inference_requests_total" in httpx.get(server.metrics_url + "/metrics", timeout=10).text
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200  # also on SIRA_BIND, no token


def test_no_access_log_by_default(server):
    assert '"logger":"gunicorn.access"' not in server.log()
