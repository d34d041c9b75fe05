"""POST /v1/infer: score one payment event with the model it meets.

The event meets its product's canary or production model, and a shadow scores it after the answer
has left (app/scoring/runs.py: routing, the failure rule, runs with their deadlines, the answer body).
A canary that fails answers nothing: production answers the event, marked ``"fallback": true``. A
production model that fails gets 503 SERVICE_UNAVAILABLE, never a made-up score. So does an answer
the prediction log cannot keep (app/predlog/log.py): the whole request.

Deadlines (app/scoring/deadlines.py): the run is stopped where it stands when the request's
``options.timeout_ms`` runs out (504 INFERENCE_TIMEOUT), and a canary's or shadow's run when its
budget does (a failure, as above).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

from app.errors import ApiError, ServiceUnavailable
from app.http.requests import InferRequest, parse_infer_request, read_json_object
from app.predlog.log import NULL_PREDICTION_LOG
from app.scoring.cache import PredictionCache
from app.scoring.models import ModelTable, ServingModel
from app.scoring.runs import (
    DEFAULT_CANARY_BUDGET_S,
    ModelFailed,
    RunStopped,
    check_deadline,
    fail_over,
    over_budget,
    past_deadline,
    prediction,
    request_deadline,
    routed_model,
    run_model,
    run_stop_time,
    timed_out,
)
from app.telemetry.metrics import count_fallbacks
from app.telemetry.model_stats import NULL_MODEL_STATS

perf_counter = time.perf_counter


def production_model(models: ModelTable, product: str) -> ServingModel:
    model = models.get(product)
    if model is None:
        raise ServiceUnavailable(f"no production model serves product {product!r} now",
                                 {"product": product}, {"Retry-After": "1"})
    return model


def model_failed(product: str) -> ServiceUnavailable:
    """The answer when the model that must answer failed: 503, never a made-up score."""
    return ServiceUnavailable(f"the model of product {product!r} failed on this event", {"product": product},
                              {"Retry-After": "1"})


class InferResource:
    """One event, one model run (or one batched run when an explanation is asked for)."""

    auth_actions = {"POST": "infer"}
    tracer = None  # tracing on: app/http/assembly.py sets it (app/telemetry/tracing.py); None: no span is ever made
    canary_budget_s = DEFAULT_CANARY_BUDGET_S  # SIRA_CANARY_BUDGET_MS, set by app/http/assembly.py

    def __init__(self, models: ModelTable, max_body_bytes: int, cache: PredictionCache | None = None,
                 prediction_log=NULL_PREDICTION_LOG, model_stats=NULL_MODEL_STATS):
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.cache = cache
        self.prediction_log = prediction_log
        self.model_stats = model_stats

    def logged(self, body: dict, request: InferRequest, req, trace_id: str | None = None) -> dict:
        """Every answer goes to the prediction log before it leaves (app/predlog/log.py)."""
        self.prediction_log.append(body, request.event_id, request.product, req.context.request_id, trace_id)
        return body

    async def on_post(self, req, resp):
        started = perf_counter()
        if self.tracer is None:
            request = parse_infer_request(await read_json_object(req, self.max_body_bytes))
        else:  # tracing on (app/telemetry/tracing.py); so below
            with self.tracer.start_as_current_span("parse"):
                request = parse_infer_request(await read_json_object(req, self.max_body_bytes))
        model, shadow, skipped = routed_model(self.models, request.product, request.event_id)
        req.context.model = model  # labels the request's metrics (app/telemetry/metrics.py), errors included
        try:
            body = self.answer(model, request, started)
            if skipped is not None:  # its canary's breaker is open: production answered instead
                body["fallback"] = True
                count_fallbacks(request.product, skipped.model_id)
        except ModelFailed as exc:
            if not fail_over(model, self.counters_of(model), str(exc)):
                raise model_failed(request.product) from None
            model = req.context.model = production_model(self.models, request.product)
            try:
                body = self.answer(model, request, started)
            except ModelFailed as again:
                fail_over(model, self.counters_of(model), str(again))  # production's: the event's end
                raise model_failed(request.product) from None
            body["fallback"] = True
        if self.tracer is None:
            resp.media = self.logged(body, request, req)
        else:
            with self.tracer.start_as_current_span("log append"):
                resp.media = self.logged(body, request, req, req.context.trace_id)
        if shadow is not None:
            resp.schedule(partial(self.score_shadow, shadow, request, req.context.request_id))

    def counters_of(self, model: ServingModel):
        return self.model_stats.counters(model.model_id, model.role)

    def answer(self, model: ServingModel, request: InferRequest, started: float) -> dict:
        """The model's answer to the event, from the cache or a run; counted in the model stats.
        ModelFailed: the caller applies the failure rule (app/scoring/runs.py fail_over)."""
        counters = self.counters_of(model)
        row = model.row
        model.spec.build_row(request.payload, row)
        cache = self.cache if request.enable_cache else None
        if cache is not None:
            key = cache.key(model, row)
            hit = cache.get(key, request.include_explanation)
            if hit is not None:
                answer = prediction(model, hit[0], hit[1], started, cached=True)
                counters.answered(None, answer["decision"])
                return answer
        run_started = perf_counter()
        stop_at = None if request.timeout_ms is None and model.role == "production" else \
            run_stop_time(model, request_deadline(request, started), run_started, self.canary_budget_s)
        try:
            if self.tracer is None:
                score, explanation = run_model(model, row, request.include_explanation, stop_at)
            else:
                with self.tracer.start_as_current_span("score"):
                    score, explanation = run_model(model, row, request.include_explanation, stop_at)
        except RunStopped:
            if past_deadline(request, started):
                raise timed_out(request) from None
            # stopped at the canary's budget, before the request's deadline
            raise ModelFailed(over_budget(perf_counter() - run_started, self.canary_budget_s)) from None
        run_s = perf_counter() - run_started  # the model's own time: comparable across roles
        if run_s > self.canary_budget_s and model.role == "canary":
            raise ModelFailed(over_budget(run_s, self.canary_budget_s))
        check_deadline(request, started)
        if cache is not None:
            cache.put(key, score, explanation, request.include_explanation)
        answer = prediction(model, score, explanation, started)
        counters.answered(run_s, answer["decision"], request.include_explanation)
        return answer

    async def score_shadow(self, model: ServingModel, request: InferRequest, request_id: str | None) -> None:
        """After the answer left: the shadow model scores the event; logged, never served."""
        started = perf_counter()
        counters = self.model_stats.counters(model.model_id, model.role)
        row = model.row
        try:
            model.spec.build_row(request.payload, row)
            run_started = perf_counter()
            score, explanation = run_model(model, row, False, run_started + self.canary_budget_s)
        except RunStopped:
            fail_over(model, counters, over_budget(perf_counter() - run_started, self.canary_budget_s))
            return
        except (ModelFailed, ApiError) as exc:
            fail_over(model, counters, str(exc))
            return
        run_s = perf_counter() - run_started
        answer = prediction(model, score, explanation, started)
        counters.answered(run_s, answer["decision"])
        with contextlib.suppress(ServiceUnavailable):  # a shadow answers no client: dropped, counted as refused
            self.prediction_log.append(answer, request.event_id, request.product, request_id)
