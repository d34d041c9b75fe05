"""app/http/assembly.py: the one place the app is put together, in the order a request meets it.

These tests pin that order and the routes: a middleware moved, added or dropped, or a route gained or
lost, fails here first (tests/e2e/test_openapi.py then says whether the document follows).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import secrets
from pathlib import Path

import falcon.asgi
import pytest

from app.auth.keys import KeyRing
from app.auth.ratelimit import RateLimiter, rate_limit_segment_name, shared_rate_limits
from app.auth.tokens import Authenticator, AuthMiddleware
from app.config import AppConfig, ModelFile
from app.db import Database
from app.http import assembly
from app.http.body_deadline import BodyDeadline
from app.http.middleware import RequestIdMiddleware
from app.http.openapi import app_routes
from app.predlog.log import NullPredictionLog
from app.telemetry.metrics import OpsPortMiddleware, count_rate_limited, process_metrics
from app.telemetry.request_metrics import InferenceMetricsMiddleware
from app.telemetry.tracing import TracedAuth, Tracing, open_tracing
from conf.ratelimit import parse_rate_limits
from tests.fixtures.server import TEST_JWT_SECRET

DEMO = Path(__file__).resolve().parents[2] / "workers" / "demo"
SPEC = json.loads((DEMO / "fraud_score.spec.json").read_text())

ROUTES = {
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/v1/infer", "POST"),
    ("/v1/infer/batch", "POST"),
    ("/v1/infer/{prediction_id}", "GET"),
    ("/v1/models", "GET"),
    ("/v1/models/{model_id}", "GET"),
    ("/v1/models/{model_id}/promote", "POST"),
    ("/v1/canary", "POST"),
    ("/v1/canary/{product}", "GET"),
    ("/v1/canary/{product}/stop", "POST"),
    ("/v1/outcomes", "POST"),
    ("/metrics", "GET"),
    ("/openapi.json", "GET"),
    ("/docs", "GET"),
}


def app_config(**changes) -> AppConfig:
    model_file = ModelFile(model_id="11111111-1111-1111-1111-111111111111", name="fraud_score", version="1.0.0",
                           product="fraud_score", path=str(DEMO / "fraud_score.onnx"), spec=copy.deepcopy(SPEC),
                           threshold=SPEC["threshold"])
    authenticator = Authenticator(KeyRing.from_config(TEST_JWT_SECRET, "default", {}), None)
    config = AppConfig(model_files=[model_file], expected_products=["fraud_score"], authenticator=authenticator)
    return dataclasses.replace(config, **changes)


def classes(app: falcon.asgi.App) -> list[type]:
    return [type(each) for each in app._unprepared_middleware]


def owners(hooks) -> list[type]:
    """The middleware classes of one of Falcon's prepared hook lists, in the order Falcon calls them."""
    return [type(hook.__self__) for hook in hooks]


@pytest.fixture
def rate_limit_segment():
    name = rate_limit_segment_name(f"asmtest{secrets.token_hex(4)}")
    with shared_rate_limits(name):
        yield name


@pytest.fixture
def everything_on(monkeypatch, rate_limit_segment):
    """An app with every optional middleware: tracing (to memory), the metrics port, rate limits."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setattr(assembly, "open_tracing", lambda enabled: open_tracing(enabled, InMemorySpanExporter()))
    app = assembly.create_app(app_config(tracing=True, metrics_port=9464, rate_limit_segment=rate_limit_segment,
                                         rate_limits=parse_rate_limits("fraud_analyst=5/minute")))
    yield app
    app._unprepared_middleware[0].close()  # the tracer provider's export thread
    app._unprepared_middleware[2].auth._limiter.close()


def test_the_middleware_in_the_order_a_request_meets_it():
    app = assembly.create_app(app_config())
    assert classes(app) == [RequestIdMiddleware, AuthMiddleware, NullPredictionLog, Database,
                            InferenceMetricsMiddleware]
    requests, resources, responses = app._middleware[:3]
    assert owners(requests) == [RequestIdMiddleware]
    assert owners(resources) == [AuthMiddleware]
    assert owners(responses) == [InferenceMetricsMiddleware, RequestIdMiddleware]  # reversed


def test_every_optional_middleware_takes_its_place(everything_on):
    app = everything_on
    assert classes(app) == [Tracing, RequestIdMiddleware, TracedAuth, NullPredictionLog, Database,
                            OpsPortMiddleware, InferenceMetricsMiddleware]
    requests, resources, responses = app._middleware[:3]
    assert owners(requests) == [Tracing, RequestIdMiddleware, OpsPortMiddleware]
    assert owners(resources) == [Tracing, TracedAuth]
    assert owners(responses) == [InferenceMetricsMiddleware, RequestIdMiddleware, Tracing]


def test_tracing_puts_the_auth_middleware_in_a_span(everything_on):
    traced = everything_on._unprepared_middleware[2]
    assert isinstance(traced.auth, AuthMiddleware)
    assert traced.tracer is everything_on._unprepared_middleware[0].tracer


def test_a_refusal_of_the_rate_limits_is_counted(everything_on):
    limiter = everything_on._unprepared_middleware[2].auth._limiter
    assert isinstance(limiter, RateLimiter)
    assert limiter._on_refusal is count_rate_limited
    assert process_metrics().rate_limited.labels("fraud_analyst")._value.get() == 0  # the series exists


def test_the_routes():
    app = assembly.create_app(app_config())
    assert app_routes(app) == ROUTES


def test_the_routes_with_everything_on(everything_on):
    assert app_routes(everything_on) == ROUTES


def test_a_worker_serves_the_app_inside_the_body_deadline():
    served = assembly.create_worker_app(app_config(), 7.5)
    assert isinstance(served, BodyDeadline) and served.timeout_s == 7.5
    assert isinstance(served.app, falcon.asgi.App)
    assert classes(served.app)[0] is RequestIdMiddleware
