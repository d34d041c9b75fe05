"""app/telemetry/metrics.py and workers/metrics.py: labels, counting middleware, ops port, multiprocess totals.

In this process prometheus_client runs in single-process mode (each test has its own registry);
the multiprocess behaviour is checked in a child interpreter that forks real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import falcon
import falcon.asgi
import falcon.testing
import pytest
from prometheus_client import CollectorRegistry

from app.errors import FeatureValidationFailed, Unauthorized
from app.http.assembly import render_error
from app.telemetry.metrics import (
    CACHE_TYPE,
    MODEL_LOAD_ERROR_REASONS,
    MULTIPROC_ENV,
    MetricsResource,
    OpsPortMiddleware,
    SiraMetrics,
    check_value_class,
    start_worker_metrics,
)
from app.telemetry.request_metrics import UNKNOWN, InferenceMetrics, InferenceMetricsMiddleware
from tests.fixtures.server import REPO
from workers.instance import data_dir_key
from workers.metrics import prepare_multiprocess_dir

MODEL = SimpleNamespace(product="fraud_score", model_id="m-1", role="production")


@pytest.fixture
def metrics(monkeypatch) -> SiraMetrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return SiraMetrics(CollectorRegistry())


def models_table(*models) -> SimpleNamespace:
    return SimpleNamespace(expected_products=sorted({m.product for m in models}),
                           production={m.product: m for m in models}, generation=lambda: 7)


def value(metrics: SiraMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_prediction_counts_one_request_and_one_latency_observation(metrics):
    inference = InferenceMetrics(metrics, models_table(MODEL))
    inference.count_prediction("fraud_score", "m-1", "production", "block", 0.0004)
    inference.count_prediction("fraud_score", "m-1", "production", "block", 0.02)
    labels = {"product": "fraud_score", "model_id": "m-1", "model_role": "production"}
    assert value(metrics, "sira_inference_requests_total", decision="block", status="200", **labels) == 2
    assert value(metrics, "sira_inference_latency_seconds_count", **labels) == 2
    assert value(metrics, "sira_inference_latency_seconds_bucket", le="0.0005", **labels) == 1
    assert value(metrics, "sira_inference_latency_seconds_sum", **labels) == pytest.approx(0.0204)
    assert value(metrics, "sira_prediction_errors_total", product="fraud_score", model_id="m-1",
                 error_type="FEATURE_VALIDATION_FAILED") == 0


def test_an_error_counts_as_a_request_and_as_an_error(metrics):
    inference = InferenceMetrics(metrics, models_table(MODEL))
    inference.count_error("fraud_score", "m-1", "production", "INFERENCE_TIMEOUT", "504")
    assert value(metrics, "sira_inference_requests_total", product="fraud_score", model_id="m-1",
                 model_role="production", decision="", status="504") == 1
    assert value(metrics, "sira_prediction_errors_total", product="fraud_score", model_id="m-1",
                 error_type="INFERENCE_TIMEOUT") == 1
    assert value(metrics, "sira_inference_latency_seconds_count", product="fraud_score", model_id="m-1",
                 model_role="production") == 0


def test_label_writers_are_made_once_per_label_set(metrics, monkeypatch):
    inference = InferenceMetrics(metrics, models_table(MODEL))
    calls = []
    real_labels = metrics.requests.labels
    monkeypatch.setattr(metrics.requests, "labels", lambda *values: calls.append(values) or real_labels(*values))
    for _ in range(5):
        inference.count_prediction("fraud_score", "m-1", "production", "allow", 0.001)
        inference.count_error(UNKNOWN, "", "", "UNAUTHORIZED", "401")
    assert len(calls) == 2


def test_clients_cannot_add_product_series(metrics):
    inference = InferenceMetrics(metrics, models_table(MODEL))
    assert inference.product_label("fraud_score") == "fraud_score"
    for product in ("anything_else", None, ["fraud_score"], 3):
        assert inference.product_label(product) == UNKNOWN


def test_cache_counts_are_mirrored_after_each_request(metrics):
    cache = SimpleNamespace(hits=0, misses=0)
    inference = InferenceMetrics(metrics, models_table(MODEL), cache)
    cache.hits, cache.misses = 3, 2
    inference.count_prediction("fraud_score", "m-1", "production", "allow", 0.001)
    cache.misses = 5
    inference.count_error("fraud_score", "m-1", "production", "INTERNAL_ERROR", "500")
    assert value(metrics, "sira_inference_cache_hits_total", cache_type=CACHE_TYPE) == 3
    assert value(metrics, "sira_inference_cache_misses_total", cache_type=CACHE_TYPE) == 5


def test_worker_start_creates_the_counters_ops_alert_on_at_zero(metrics):
    start_worker_metrics(metrics, ["fraud_score", "other"], models_loaded=2, generation=4)
    InferenceMetrics(metrics, models_table(MODEL)).start_series_of(MODEL)
    assert value(metrics, "sira_inference_requests_total", product="fraud_score", model_id="m-1",
                 model_role="production", decision="allow", status="200") == 0
    assert metrics.registry.get_sample_value("sira_inference_cache_hits_total", {"cache_type": CACHE_TYPE}) == 0
    assert value(metrics, "sira_models_loaded") == 2
    assert value(metrics, "sira_model_generation") == 4
    for reason in MODEL_LOAD_ERROR_REASONS:
        assert metrics.registry.get_sample_value("sira_model_load_errors_total", {"reason": reason}) == 0
    for product in ("fraud_score", "other"):
        assert metrics.registry.get_sample_value("sira_canary_rollbacks_total", {"product": product}) == 0
        assert metrics.registry.get_sample_value("sira_canary_traffic_ratio", {"product": product}) == 0


def test_metric_families_are_created_only_when_used(metrics):
    metrics.model_load_errors.labels("missing").inc()
    names = {family.name for family in metrics.registry.collect()}
    assert names == {"sira_model_load_errors"}, "a sidecar must not create the workers' gauges"


def test_value_class_must_match_the_multiprocess_folder(monkeypatch, tmp_path):
    single = type("MutexValue", (), {"_multiprocess": False})
    multi = type("MmapedValue", (), {"_multiprocess": True})
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    check_value_class(single)
    with pytest.raises(RuntimeError):
        check_value_class(multi)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    check_value_class(multi)
    with pytest.raises(RuntimeError, match="imported before"):
        check_value_class(single)


def test_prepare_multiprocess_dir_empties_old_values(monkeypatch, tmp_path):
    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored (unset) after the test: prepare sets it
    monkeypatch.setitem(sys.modules, "prometheus_client.values",
                        SimpleNamespace(ValueClass=type("MmapedValue", (), {"_multiprocess": True})))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    folder = tmp_path / f"sira-{data_dir_key(str(data_dir))}-metrics"  # tmp_path stands in for /dev/shm
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"old")
    (folder / "notes.txt").write_text("not ours")
    assert prepare_multiprocess_dir(str(data_dir), str(tmp_path)) == str(folder)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    assert os.environ[MULTIPROC_ENV] == str(folder)


def test_prepare_multiprocess_dir_refuses_a_prometheus_client_imported_too_early(monkeypatch, tmp_path):
    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored (unset) after the test
    monkeypatch.setitem(sys.modules, "prometheus_client.values",
                        SimpleNamespace(ValueClass=type("MutexValue", (), {"_multiprocess": False})))
    with pytest.raises(RuntimeError, match="imported before"):
        prepare_multiprocess_dir(str(tmp_path), str(tmp_path))
    assert os.environ[MULTIPROC_ENV] == ""


# -- the middleware, through a real Falcon app ----------------------------------------------------

class FakeInfer:
    """Answers like app.http.infer.InferResource: names its model, or raises what the request asked for."""

    async def on_post(self, req, resp):
        body = await req.get_media()
        if body.get("fail"):
            req.context.model = MODEL
            raise FeatureValidationFailed("payload.amount must be a number", {"field": "payload.amount"})
        req.context.model = MODEL
        resp.media = {"model_id": "m-1", "model_role": "production", "decision": "review", "latency_ms": 0.5}


class FakeBatch:
    async def on_post(self, req, resp):
        await req.get_media()
        resp.media = {"results": [
            {"model_id": "m-1", "model_role": "production", "decision": "allow", "latency_ms": 1.0},
            {"error_code": "FEATURE_VALIDATION_FAILED", "message": "", "request_id": None, "timestamp": "",
             "details": {}},
            {"error_code": "INVALID_REQUEST", "message": "", "request_id": None, "timestamp": "", "details": {}},
        ]}


class RequireHeader:
    """Stands for AuthMiddleware: X-Token 'refused' is a 401 before the resource runs."""

    async def process_resource(self, req, resp, resource, params):
        if req.get_header("X-Token") == "refused":
            raise Unauthorized("no token")


@pytest.fixture
def client(metrics):
    inference = InferenceMetrics(metrics, models_table(MODEL))
    app = falcon.asgi.App(middleware=[RequireHeader(), InferenceMetricsMiddleware(inference),
                                      OpsPortMiddleware(9090)])
    app.add_error_handler(Exception, render_error)
    app.add_error_handler(falcon.HTTPError, render_error)
    app.add_route("/v1/infer", FakeInfer())
    app.add_route("/v1/infer/batch", FakeBatch())
    app.add_route("/metrics", MetricsResource(metrics))
    return falcon.testing.TestClient(app, headers={"X-Token": "t"})


def test_middleware_counts_answers_errors_and_refusals_of_single_requests(client, metrics):
    assert client.simulate_post("/v1/infer", json={}).status_code == 200
    assert client.simulate_post("/v1/infer", json={"fail": True}).status_code == 400
    assert client.simulate_post("/v1/infer", json={}, headers={"X-Token": "refused"}).status_code == 401
    assert client.simulate_post("/v1/infer", body="{", headers={"Content-Type": "application/json"}).status_code == 400
    model = {"product": "fraud_score", "model_id": "m-1", "model_role": "production"}
    assert value(metrics, "sira_inference_requests_total", decision="review", status="200", **model) == 1
    assert value(metrics, "sira_inference_latency_seconds_sum", **model) == pytest.approx(0.0005)
    assert value(metrics, "sira_prediction_errors_total", product="fraud_score", model_id="m-1",
                 error_type="FEATURE_VALIDATION_FAILED") == 1
    assert value(metrics, "sira_prediction_errors_total", product=UNKNOWN, model_id="",
                 error_type="UNAUTHORIZED") == 1
    assert value(metrics, "sira_prediction_errors_total", product=UNKNOWN, model_id="",
                 error_type="INVALID_REQUEST") == 1
    total = sum(sample.value for family in metrics.registry.collect() if family.name == "sira_inference_requests"
                for sample in family.samples if sample.name == "sira_inference_requests_total")
    assert total == 4


def test_middleware_counts_every_event_of_a_batch(client, metrics):
    events = [{"product": "fraud_score"}, {"product": "fraud_score"}, "not an event"]
    assert client.simulate_post("/v1/infer/batch", json={"events": events}).status_code == 200
    assert value(metrics, "sira_inference_requests_total", product="fraud_score", model_id="m-1",
                 model_role="production", decision="allow", status="200") == 1
    assert value(metrics, "sira_prediction_errors_total", product="fraud_score", model_id="",
                 error_type="FEATURE_VALIDATION_FAILED") == 1
    assert value(metrics, "sira_prediction_errors_total", product=UNKNOWN, model_id="",
                 error_type="INVALID_REQUEST") == 1
    assert value(metrics, "sira_inference_requests_total", product=UNKNOWN, model_id="", model_role="",
                 decision="", status="400") == 1


def test_other_routes_are_not_counted(client, metrics):
    assert client.simulate_get("/metrics").status_code == 200
    assert client.simulate_get("/v1/infer").status_code == 405
    assert metrics.registry.get_sample_value("sira_inference_requests_total", {}) is None
    assert not [s for f in metrics.registry.collect() for s in f.samples if s.name == "sira_inference_requests_total"]


def test_ops_port_answers_only_ops_paths(client):
    on_ops_port = client.simulate_post("/v1/infer", json={}, port=9090)
    assert on_ops_port.status_code == 404
    assert on_ops_port.json["error_code"] == "NOT_FOUND"
    metrics_page = client.simulate_get("/metrics", port=9090)
    assert metrics_page.status_code == 200
    assert metrics_page.headers["content-type"].startswith("text/plain")
    assert client.simulate_post("/v1/infer", json={}, port=8080).status_code == 200


# -- multiprocess: real processes writing their own files --------------------------------------------

MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from types import SimpleNamespace
    from app.telemetry.metrics import exposition, process_metrics, set_models_loaded
    from app.telemetry.request_metrics import InferenceMetrics
    from workers.metrics import mark_process_dead
    from prometheus_client.parser import text_string_to_metric_families

    model = SimpleNamespace(product="fraud_score", model_id="m-1", role="production")
    table = SimpleNamespace(expected_products=["fraud_score"], production={"fraud_score": model})

    def child(requests, models_loaded, then):
        pid = os.fork()
        if pid:
            return pid
        inference = InferenceMetrics(process_metrics(), table)
        for _ in range(requests):
            inference.count_prediction("fraud_score", "m-1", "production", "allow", 0.001)
        set_models_loaded(models_loaded)
        os.write(ready_w, b"x")
        if then == "sleep":
            time.sleep(60)
        os._exit(0)

    ready_r, ready_w = os.pipe()
    alive = child(3, 1, "sleep")
    killed = child(5, 0, "sleep")
    exited = child(7, 2, "exit")
    for _ in range(3):
        os.read(ready_r, 1)
    os.kill(killed, signal.SIGKILL)
    os.waitpid(killed, 0)
    os.waitpid(exited, 0)
    before_marking = exposition(None)[0].decode()
    mark_process_dead(killed)
    mark_process_dead(exited)
    after_marking = exposition(None)[0].decode()
    os.kill(alive, signal.SIGKILL)
    os.waitpid(alive, 0)

    def samples(text):
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in ("sira_inference_requests_total", "sira_models_loaded")}

    print(json.dumps({"before": samples(before_marking), "after": samples(after_marking),
                      "files": sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))}))
""")


def test_totals_add_up_over_processes_and_dead_ones_drop_their_gauges(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, MULTIPROC_ENV: str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"]["sira_inference_requests_total"] == 15  # 3 + 5 + 7: every process, the dead too
    assert report["before"]["sira_models_loaded"] == 0  # livemin: the killed one still counted
    assert report["after"]["sira_inference_requests_total"] == 15  # counters survive their process
    assert report["after"]["sira_models_loaded"] == 1  # only the live process is left
    assert len([name for name in report["files"] if name.endswith("-requests.db")]) == 6  # counters, histograms


SAME_AS_PROMETHEUS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from app.telemetry.metrics import LATENCY, REQUESTS, SiraMetrics, exposition
    from app.telemetry.request_metrics import HotValueFile, RegistryWriters

    which = sys.argv[1]
    if which == "hot":
        writers = HotValueFile(os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid())
    else:
        writers = RegistryWriters(SiraMetrics())
    # The same series asked for twice (two label sets share one latency series): one running total.
    counts = [writers.counter(REQUESTS, ("p", "m", "production", "allow", "200")) for _ in range(2)]
    observes = [writers.histogram(LATENCY, ("p", "m", "production")) for _ in range(2)]
    for index, latency in enumerate((0.00005, 0.0001, 0.0003, 0.002, 0.07, 0.1, 3.0, 0.0001)):
        counts[index % 2]()
        observes[index % 2](latency)
    sys.stdout.write(exposition(None)[0].decode())
""")


def families(text: str) -> dict:
    """name -> (type, help, samples), the order of families and samples left out."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: (family.type, family.documentation,
                          sorted((s.name, sorted(s.labels.items()), s.value) for s in family.samples))
            for family in text_string_to_metric_families(text)}


def test_hot_value_file_exports_exactly_what_prometheus_client_would(tmp_path):
    """The request path writes prometheus_client's file format itself: the scrape must not tell the difference."""
    outputs = {}
    for which in ("hot", "prometheus_client"):
        folder = tmp_path / which
        folder.mkdir()
        env = {**os.environ, "PYTHONPATH": REPO, MULTIPROC_ENV: str(folder)}
        result = subprocess.run([sys.executable, "-c", SAME_AS_PROMETHEUS_SCRIPT, which], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        outputs[which] = result.stdout
    assert "sira_inference_latency_seconds_bucket" in outputs["hot"]
    assert 'le="0.0001"' in outputs["hot"] and "sira_inference_requests_total" in outputs["hot"]
    assert families(outputs["hot"]) == families(outputs["prometheus_client"])


def test_an_answer_of_unknown_shape_still_leaves_and_is_reported_once(metrics, caplog):
    class ChangedInfer:
        async def on_post(self, req, resp):
            req.context.model = MODEL
            resp.data = b'{"score": 0.1}'  # not the media the middleware reads

    inference = InferenceMetrics(metrics, models_table(MODEL))
    app = falcon.asgi.App(middleware=[InferenceMetricsMiddleware(inference)])
    app.add_route("/v1/infer", ChangedInfer())
    client = falcon.testing.TestClient(app)
    for _ in range(2):
        assert client.simulate_post("/v1/infer", json={}).status_code == 200
    assert len([r for r in caplog.records if "cannot count" in r.getMessage()]) == 1
