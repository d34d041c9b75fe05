"""app/telemetry/tracing.py: the on/off switch, nothing installed when off, and the spans of a traced request.

In-process (falcon.testing) with the SDK's InMemorySpanExporter; tests/e2e/test_tracing.py sends the
spans of a real `sira serve` over OTLP/HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import falcon.testing
import pytest

from app.auth.keys import KeyRing
from app.auth.tokens import Authenticator
from app.config import AppConfig, ModelFile
from app.http import assembly as app_main
from app.scoring.cache import cache_segment_name, shared_cache
from app.telemetry.tracing import TracedAuth, TracedCache, Tracing, open_tracing, tracing_requested
from tests.fixtures.server import REPO, TEST_JWT_SECRET, bearer

DEMO = Path(REPO) / "workers" / "demo"
SPEC = json.loads((DEMO / "fraud_score.spec.json").read_text())
MODEL_FILE = ModelFile(model_id="11111111-1111-1111-1111-111111111111", name="fraud_score", version="1.0.0",
                       product="fraud_score", path=str(DEMO / "fraud_score.onnx"), spec=copy.deepcopy(SPEC),
                       threshold=SPEC["threshold"])
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
EVENT = {"event_id": "evt-trace-1", "product": "fraud_score",
         "payload": {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card",
                     "features": {"hour_of_day": 14}}}
OTEL_VARIABLES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
                  "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),  # off: the protocol is not looked at
])
def test_tracing_is_on_only_when_the_otel_environment_asks_for_it(environ, expected):
    assert tracing_requested(environ) is expected


@pytest.mark.parametrize("environ", [
    {"OTEL_TRACES_EXPORTER": "console"},
    {"OTEL_TRACES_EXPORTER": "otlp,zipkin"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
])
def test_an_exporter_sira_cannot_use_is_refused(environ):
    with pytest.raises(ValueError, match="OTEL_"):
        tracing_requested(environ)


def test_sira_serve_exits_2_on_an_unusable_traces_exporter(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIRA_", "OTEL_", "DATABASE_URL"))}
    env.update(PYTHONPATH=REPO, OTEL_TRACES_EXPORTER="jaeger", SIRA_DATA_DIR=str(tmp_path),
               DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", JWT_SECRET=TEST_JWT_SECRET)
    code = ("import sys; from workers.cli import main; from app.telemetry.tracing import tracing_from_environment\n"
            "from conf.settings import ConfigError\n"
            "try:\n    tracing_from_environment()\nexcept ConfigError as e:\n    print(e); sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "OTEL_TRACES_EXPORTER" in done.stdout


# -- the app in process ---------------------------------------------------------------------------

class RecordingLog:
    """A prediction log that keeps what it is given (the trace id above all)."""

    appended = overflowed = 0

    def __init__(self):
        self.rows = []

    def append(self, body, event_id, product, request_id, trace_id=None):
        self.rows.append({"prediction_id": body["prediction_id"], "trace_id": trace_id})

    async def find_unwritten(self, prediction_id):
        return None

    async def process_shutdown(self, scope, event):
        pass


@pytest.fixture
def cache_segment():
    name = cache_segment_name(f"tracetest{secrets.token_hex(4)}", 100)
    with shared_cache(name, 100, 60_000) as cache:
        yield name
    assert not os.path.exists(f"/dev/shm/{name}") or cache is None


def app_config(tracing: bool, cache_segment: str | None) -> AppConfig:
    keyring = KeyRing.from_config(TEST_JWT_SECRET, "default", {})
    return AppConfig(model_files=[MODEL_FILE], expected_products=["fraud_score"],
                     authenticator=Authenticator(keyring, None), cache_segment=cache_segment, tracing=tracing)


def infer_resource(app):
    return app._router.find("/v1/infer")[0]


@pytest.fixture
def otel_env(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def traced(otel_env, cache_segment):
    """build(**OTEL env) -> (post, exporter, log): an app with tracing on, exporting to memory.

    ``post(*requests)`` sends (json, headers) pairs in one lifespan of the app and returns the
    responses; the lifespan's shutdown flushes the spans into ``exporter``.
    """
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def build(**sampler_env):
        for name, value in sampler_env.items():
            otel_env.setenv(name, value)
        exporter = InMemorySpanExporter()
        otel_env.setattr(app_main, "open_tracing", lambda enabled: open_tracing(enabled, exporter))
        app = app_main.create_app(app_config(True, cache_segment))
        log = RecordingLog()
        infer_resource(app).prediction_log = log

        def post(*requests):
            async def send_all():
                async with falcon.testing.ASGIConductor(app) as conductor:
                    return [await conductor.simulate_post("/v1/infer", json=body, headers=headers)
                            for body, headers in requests]
            return asyncio.run(send_all())

        return post, exporter, log

    return build


def server_span(spans):
    [server] = [span for span in spans if span.kind.name == "SERVER"]
    return server


def test_off_nothing_of_tracing_is_installed(otel_env, cache_segment):
    app = app_main.create_app(app_config(False, cache_segment))
    assert not any(isinstance(m, (Tracing, TracedAuth)) for m in app._unprepared_middleware)
    resource = infer_resource(app)
    assert resource.tracer is None and not isinstance(resource.cache, TracedCache)
    client = falcon.testing.TestClient(app)
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    assert client.simulate_post("/v1/infer", json=EVENT, headers=headers).status_code == 200


def test_off_the_sdk_is_never_imported():
    """A fresh interpreter builds the app and serves a traced-looking request: no opentelemetry module loads."""
    code = f"""
import sys, falcon.testing
from tests.unit.test_tracing import app_config, EVENT
from tests.fixtures.server import bearer
from app.http.assembly import create_app
client = falcon.testing.TestClient(create_app(app_config(False, None)))
headers = {{**bearer(), "traceparent": "00-{TRACE_ID}-{PARENT_ID}-01"}}
assert client.simulate_post("/v1/infer", json=EVENT, headers=headers).status_code == 200
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_request_makes_a_server_span_continuing_the_traceparent_with_a_child_per_phase(traced):
    post, exporter, log = traced(OTEL_TRACES_SAMPLER="parentbased_always_on")
    headers = {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "rid-trace-1"}
    [response] = post((EVENT, headers))
    assert response.status_code == 200
    spans = exporter.get_finished_spans()  # flushed by the lifespan's shutdown
    server = server_span(spans)
    assert server.name == "POST /v1/infer"
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID and server.parent.is_remote
    children = [span for span in spans if span is not server]
    assert sorted(span.name for span in children) == ["auth", "cache", "log append", "parse", "score"]
    for child in children:
        assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
    attributes = server.attributes
    assert attributes["http.request.method"] == "POST" and attributes["url.path"] == "/v1/infer"
    assert attributes["http.response.status_code"] == 200
    assert attributes["sira.product"] == "fraud_score" and attributes["sira.model_id"] == MODEL_FILE.model_id
    assert attributes["sira.model_role"] == "production"
    assert attributes["sira.decision"] == response.json["decision"] and attributes["sira.cached"] is False
    assert attributes["sira.request_id"] == "rid-trace-1"
    assert server.resource.attributes["service.name"] == "sira-inference"
    assert log.rows == [{"prediction_id": response.json["prediction_id"], "trace_id": TRACE_ID}]


def test_a_cached_answer_has_one_cache_span_and_no_score_span(traced):
    post, exporter, log = traced()
    first, second = post((EVENT, bearer()), (EVENT, bearer()))
    assert second.json["cached"] is True
    spans = exporter.get_finished_spans()
    servers = sorted((span for span in spans if span.kind.name == "SERVER"), key=lambda span: span.start_time)
    second_trace = servers[1].context.trace_id
    names = sorted(span.name for span in spans if span.context.trace_id == second_trace)
    assert names == ["POST /v1/infer", "auth", "cache", "log append", "parse"]


def test_without_traceparent_a_sampled_request_starts_a_trace_and_logs_its_id(traced):
    post, exporter, log = traced(OTEL_TRACES_SAMPLER="always_on", OTEL_SERVICE_NAME="sira-test")
    post((EVENT, bearer()))
    server = server_span(exporter.get_finished_spans())
    assert server.parent is None and server.resource.attributes["service.name"] == "sira-test"
    assert log.rows[0]["trace_id"] == format(server.context.trace_id, "032x")


def test_ratio_zero_samples_nothing_but_a_given_traceparent_still_reaches_the_log(traced):
    post, exporter, log = traced(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    post((EVENT, bearer()), (EVENT, {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}))
    assert exporter.get_finished_spans() == ()
    assert [row["trace_id"] for row in log.rows] == [None, TRACE_ID]


def test_parent_based_ratio_zero_follows_a_sampled_parent(traced):
    post, exporter, log = traced(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
    post((EVENT, bearer()), (EVENT, {**bearer(), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}))
    spans = exporter.get_finished_spans()
    assert {format(span.context.trace_id, "032x") for span in spans} == {TRACE_ID}
    assert server_span(spans).name == "POST /v1/infer" and len(spans) == 5  # a cache hit: no score span


def test_a_refused_token_ends_in_an_auth_span_marked_as_error(traced):
    post, exporter, log = traced()
    [response] = post((EVENT, {"Authorization": "Bearer nope"}))
    assert response.status_code == 401
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/infer", "auth"}
    assert spans["auth"].status.status_code.name == "ERROR"
    assert spans["POST /v1/infer"].attributes["http.response.status_code"] == 401
    assert spans["POST /v1/infer"].attributes["error.type"] == "UNAUTHORIZED"


def test_a_malformed_traceparent_starts_a_new_trace(traced):
    post, exporter, log = traced()
    [response] = post((EVENT, {**bearer(), "traceparent": "00-zz-yy-01"}))
    assert response.status_code == 200
    server = server_span(exporter.get_finished_spans())
    assert server.parent is None and log.rows[0]["trace_id"] == format(server.context.trace_id, "032x")
