"""OpenTelemetry traces of a real `sira serve`, received over OTLP/HTTP; the trace id in the prediction log.

The collectors (tests/fixtures/otlp.py): Rotel, a real OpenTelemetry Collector from the test extra,
which always runs; otelcol-contrib where one is installed (skips without one, fails under
CI/SIRA_REQUIRE_TOOLS when OTELCOL_CONTRIB names an unfit one); and the in-process OTLP/HTTP sink.
"""

from __future__ import annotations

import time

import httpx
import psycopg

from tests.fixtures.server import bearer

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
PHASES = ["auth", "cache", "log append", "parse", "score"]


def event(event_id: str, amount: float = 150.5) -> dict:
    return {"event_id": event_id, "product": "fraud_score",
            "payload": {"amount": amount, "currency": "USD", "country": "US", "payment_method": "card",
                        "features": {"hour_of_day": 14}}}


def traced_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "100", **extra}


def wait_for_trace(collector, trace_id: str, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = [span for span in collector.spans() if span["trace_id"] == trace_id]
        if len(spans) >= count:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"{count} spans of trace {trace_id} not received in {timeout}s: {collector.spans()}")


def logged_trace_id(dsn: str, prediction_id: str, timeout: float = 30.0) -> str | None:
    """The trace_id column of the prediction's row, once the writer has put it in Postgres."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT trace_id FROM siramodel_predictions WHERE prediction_id = %s",
                               (prediction_id,)).fetchone()
            if row is not None:
                return row[0]
            time.sleep(0.1)
    raise AssertionError(f"prediction {prediction_id} not in Postgres after {timeout}s")


def check_traced_request(server, collector, dsn: str) -> None:
    """One request with a traceparent: its spans reach the collector and its trace id the log row."""
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "rid-e2e-trace"}
    response = httpx.post(server.url + "/v1/infer", json=event("evt-e2e-trace"), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    prediction_id = response.json()["prediction_id"]

    spans = wait_for_trace(collector, TRACE_ID, 1 + len(PHASES))
    [root] = [span for span in spans if span["parent_span_id"] == PARENT_ID]
    assert root["name"] == "POST /v1/infer" and root["kind"] == 2
    assert root["attributes"]["http.response.status_code"] == 200
    assert root["attributes"]["sira.product"] == "fraud_score"
    assert root["attributes"]["sira.decision"] == response.json()["decision"]
    assert root["attributes"]["sira.request_id"] == "rid-e2e-trace"
    assert root["resource"]["service.name"] == "sira-inference"
    children = sorted((span for span in spans if span is not root), key=lambda span: span["name"])
    assert [span["name"] for span in children] == PHASES
    assert all(span["parent_span_id"] == root["span_id"] for span in children)

    shown = httpx.get(f"{server.url}/v1/infer/{prediction_id}", headers=bearer(), timeout=10).json()
    assert shown["trace_id"] == TRACE_ID
    assert logged_trace_id(dsn, prediction_id) == TRACE_ID


def test_spans_reach_a_real_opentelemetry_collector(server_factory, fresh_db, otel_collector):
    server = server_factory(workers=1, **traced_env(otel_collector.endpoint,
                                                    OTEL_TRACES_SAMPLER="parentbased_always_on"))
    check_traced_request(server, otel_collector, fresh_db)


def test_spans_pass_through_the_rotel_collector(server_factory, fresh_db, rotel_collector):
    server = server_factory(workers=2, **traced_env(rotel_collector.endpoint,
                                                    OTEL_TRACES_SAMPLER="parentbased_always_on"))
    check_traced_request(server, rotel_collector, fresh_db)


def test_spans_reach_an_otlp_http_receiver(server_factory, fresh_db, otlp_sink):
    server = server_factory(workers=2, **traced_env(otlp_sink.endpoint, OTEL_TRACES_SAMPLER="parentbased_always_on"))
    check_traced_request(server, otlp_sink, fresh_db)


def test_a_batch_has_a_span_per_phase_and_its_trace_id_in_every_row(server_factory, fresh_db, otlp_sink):
    server = server_factory(workers=1, **traced_env(otlp_sink.endpoint, OTEL_TRACES_SAMPLER="parentbased_always_on"))
    events = [event("evt-batch-trace-1", 11.0), {"event_id": "evt-batch-bad", "product": "fraud_score"},
              event("evt-batch-trace-2", 12.0)]
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    response = httpx.post(server.url + "/v1/infer/batch", json={"events": events}, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[1]["error_code"] == "INVALID_REQUEST" and all("prediction_id" in results[index] for index in (0, 2))

    spans = wait_for_trace(otlp_sink, TRACE_ID, 6)
    [root] = [span for span in spans if span["parent_span_id"] == PARENT_ID]
    assert root["name"] == "POST /v1/infer/batch" and root["kind"] == 2
    assert root["attributes"]["http.response.status_code"] == 200
    children = sorted((span for span in spans if span is not root), key=lambda span: span["name"])
    assert [span["name"] for span in children] == PHASES
    assert all(span["parent_span_id"] == root["span_id"] for span in children)
    [score] = [span for span in children if span["name"] == "score"]
    assert score["attributes"]["sira.events"] == 2 and score["attributes"]["sira.model_role"] == "production"
    for index in (0, 2):
        assert logged_trace_id(fresh_db, results[index]["prediction_id"]) == TRACE_ID


def test_ratio_zero_sends_no_span_but_a_sampled_parent_is_followed(server_factory, fresh_db, otlp_sink):
    server = server_factory(workers=1, **traced_env(otlp_sink.endpoint, OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                                                    OTEL_TRACES_SAMPLER_ARG="0"))
    for index in range(5):
        response = httpx.post(server.url + "/v1/infer", json=event(f"evt-ratio-{index}", 10.0 + index),
                              headers=bearer(), timeout=10)
        assert response.status_code == 200
    unsampled = response.json()["prediction_id"]
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    assert httpx.post(server.url + "/v1/infer", json=event("evt-ratio-parent"), headers=headers,
                      timeout=10).status_code == 200
    assert server.stop() == 0  # the workers flush their spans at shutdown
    assert {span["trace_id"] for span in otlp_sink.spans()} == {TRACE_ID}
    assert logged_trace_id(fresh_db, unsampled) is None


def test_tracing_off_sends_nothing_and_logs_no_trace_id(server_factory, fresh_db, otlp_sink):
    server = server_factory(workers=1, OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT=otlp_sink.endpoint)
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    response = httpx.post(server.url + "/v1/infer", json=event("evt-off"), headers=headers, timeout=10)
    assert response.status_code == 200
    assert server.stop() == 0
    assert otlp_sink.spans() == []
    assert logged_trace_id(fresh_db, response.json()["prediction_id"]) is None
