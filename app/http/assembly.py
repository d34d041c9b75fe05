"""The Falcon ASGI app: routes, middleware, orjson media handlers and the one error renderer."""

from __future__ import annotations

import logging

import falcon
import falcon.asgi
import falcon.media
import orjson

from app.auth.ratelimit import open_rate_limiter
from app.auth.tokens import AuthMiddleware
from app.config import AppConfig
from app.db import Database
from app.errors import CODE_BY_STATUS, ApiError, error_body
from app.http.body_deadline import BodyDeadline
from app.http.canary_api import CanaryProductResource, CanaryResource, CanaryStopResource
from app.http.health import HealthResource, OptionalToken, ReadyResource
from app.http.infer import InferResource
from app.http.infer_batch import BatchInferResource
from app.http.lookup import PredictionResource
from app.http.middleware import RequestIdMiddleware
from app.http.models_api import ModelInfoResource, ModelPromoteResource, ModelsResource
from app.http.openapi import DocsResource, OpenApiResource
from app.http.outcomes_api import OutcomesResource
from app.predlog.log import PredictionLog, open_prediction_log
from app.predlog.metrics import PredictionLogCollector
from app.scoring.cache import PredictionCache
from app.scoring.models import ModelTable
from app.store.swap import LiveModelTable
from app.telemetry.metrics import (
    MetricsResource,
    OpsPortMiddleware,
    count_rate_limited,
    process_metrics,
    start_rate_limited_series,
)
from app.telemetry.model_stats import metrics_collectors, open_model_stats
from app.telemetry.request_metrics import InferenceMetricsMiddleware, start_inference_metrics
from app.telemetry.tracing import TracedAuth, open_tracing, traced_cache

log = logging.getLogger("sira.app")


async def render_error(req, resp, exc, params):
    """Every error of every endpoint leaves through here, in the one schema."""
    request_id = getattr(req.context, "request_id", None)
    if isinstance(exc, ApiError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        for name, value in exc.headers.items():
            resp.set_header(name, value)
    elif isinstance(exc, falcon.HTTPError):
        status = exc.status_code
        code = CODE_BY_STATUS.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
        message = exc.description or exc.title or code
        details = {}
        for name, value in (exc.headers or {}).items():
            resp.set_header(name, value)
    else:
        log.exception("unhandled error on %s %s (request %s)", req.method, req.path, request_id)
        status, code, message, details = 500, "INTERNAL_ERROR", "internal error", {}
    req.context.error_code = code  # the error_type of the request's metrics (app/telemetry/metrics.py)
    if req.content_length and not req.stream.eof:
        # The body was not read (refused before it, or too large): gunicorn closes the connection
        # after this answer, so say so, or a keep-alive client would send its next request into it.
        resp.set_header("Connection", "close")
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(error_body(code, message, request_id, details))


def json_handler() -> falcon.media.JSONHandler:
    return falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)


def create_app(config: AppConfig, worker_slot: int | None = None) -> falcon.asgi.App:
    """Build the app in the worker process: models are loaded here, once, never per request.

    Everything a request meets is put together here and nowhere else: first the parts, then the
    middleware in the order a request meets it, then the routes. Outside the app, as plain ASGI, only
    ``BodyDeadline`` (``create_worker_app``). Falcon runs each middleware's process_request and
    process_resource top to bottom, process_response bottom to top; lifespan startup top to bottom,
    shutdown bottom to top:

    1. Tracing (tracing on only): the request's server span, first so that it covers all the others
    2. RequestIdMiddleware: req.context.request_id and X-Request-ID
    3. AuthMiddleware (process_resource): token, rate limit, role; inside an ``auth`` span (TracedAuth)
       when tracing is on
    4. the prediction log (lifespan only): seals this worker's spill files at shutdown
    5. Database (lifespan only): closes the pool at shutdown
    6. OpsPortMiddleware (METRICS_BIND set only): on the metrics port, 404 for all but /metrics,
       /healthz and /readyz
    7. InferenceMetricsMiddleware (process_response): counts each inference request once its answer
       is ready, errors and refusals included
    """
    if config.control_segment:  # sira serve: the supervisor's generations, swapped per request
        models = LiveModelTable.attach(config.control_segment, config.models_in_use_dir)
    else:
        models = ModelTable(config.expected_products)
        models.load(config.model_files)

    tracing = open_tracing(config.tracing)  # None when off: then nothing of it is installed (app/telemetry/tracing.py)
    rate_limiter = open_rate_limiter(config.rate_limit_segment, config.rate_limits, count_rate_limited)
    if rate_limiter is not None:  # each limited role's sira_rate_limited_total at 0
        start_rate_limited_series(rate_limiter.limits.limited_roles())
    auth = AuthMiddleware(config.authenticator, rate_limiter)
    token = OptionalToken(config.authenticator)  # /readyz and /openapi.json show a valid token's holder more
    cache = PredictionCache.attach(config.cache_segment) if config.cache_segment else None
    # this worker's ring of the prediction log; a middleware for its lifespan (seals spill files)
    prediction_log = open_prediction_log(config.prediction_log, worker_slot)
    model_stats = open_model_stats(config.model_stats_segment, worker_slot, models)  # read by the canary watch
    infer = InferResource(models, config.max_body_bytes, cache, prediction_log, model_stats)
    batch = BatchInferResource(models, config.max_body_bytes, config.batch_max, cache, prediction_log, model_stats)
    if tracing is not None:
        infer.tracer = batch.tracer = tracing.tracer  # spans of the request's phases
        infer.cache = traced_cache(cache, tracing.tracer)  # a span per lookup; a batch has one span for all
    infer.canary_budget_s = batch.canary_budget_s = config.canary_budget_ms / 1000.0
    database = Database(config.database_url)  # opened on first use, closed at lifespan shutdown
    shared_figures = [PredictionLogCollector(prediction_log)] if isinstance(prediction_log, PredictionLog) else []
    shared_figures += metrics_collectors(model_stats)  # read from shared memory at scrape time
    metrics = process_metrics()  # this worker's families (app/telemetry/metrics.py)
    inference_metrics = start_inference_metrics(metrics, models, cache)  # the request counters

    app = falcon.asgi.App(middleware=[
        *([tracing] if tracing is not None else []),
        RequestIdMiddleware(),
        auth if tracing is None else TracedAuth(auth, tracing.tracer),
        prediction_log,
        database,
        *([OpsPortMiddleware(config.metrics_port)] if config.metrics_port is not None else []),
        InferenceMetricsMiddleware(inference_metrics),
    ], cors_enable=False)
    handler = json_handler()
    app.req_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: handler})
    app.resp_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: handler})
    app.req_options.strip_url_path_trailing_slash = True
    for exc_type in (Exception, falcon.HTTPError, ApiError):
        app.add_error_handler(exc_type, render_error)

    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(models, config.dependencies_file, token, config.metrics_port))
    app.add_route("/v1/infer", infer)
    app.add_route("/v1/infer/batch", batch)
    app.add_route("/v1/models", ModelsResource(database, models))
    app.add_route("/v1/models/{model_id}", ModelInfoResource(database, models, model_stats))
    app.add_route("/v1/models/{model_id}/promote", ModelPromoteResource(database, models))
    app.add_route("/v1/canary", CanaryResource(database))
    app.add_route("/v1/canary/{product}", CanaryProductResource(database))
    app.add_route("/v1/canary/{product}/stop", CanaryStopResource(database))
    app.add_route("/v1/infer/{prediction_id}", PredictionResource(prediction_log, database))
    app.add_route("/v1/outcomes", OutcomesResource(database, config.outcomes_batch_max))
    # SIRA_METRICS_ON_MAIN_PORT off: /metrics on METRICS_BIND's port only
    app.add_route("/metrics", MetricsResource(metrics, shared_figures, config.metrics_on_main_port,
                                              config.metrics_port))
    # the document describes the routes the app has when it is asked, with the served payloads
    app.add_route("/openapi.json", OpenApiResource(app, config.batch_max, models, token,
                                                   config.openapi_feature_specs, config.outcomes_batch_max))
    app.add_route("/docs", DocsResource())
    return app


def create_worker_app(config: AppConfig, body_timeout_s: float, worker_slot: int | None = None) -> BodyDeadline:
    """What a gunicorn worker serves: ``create_app``'s app inside ``BodyDeadline``, the outermost layer.

    A body cut off by SIRA_BODY_TIMEOUT_S (workers/http_worker.py) is answered 408 (app/http/body_deadline.py).
    """
    return BodyDeadline(create_app(config, worker_slot=worker_slot), body_timeout_s)
