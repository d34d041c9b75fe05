"""POST /v1/infer/batch: score up to SIRA_BATCH_MAX payment events, one model run per model.

Each event meets its own model as a single event would (app/scoring/runs.py: routing, the failure
rule, runs with their deadlines, the answer body); the events of one model are scored in one run,
in request order, and each event gets its own entry: its answer or its error.

A failed canary's events are answered by production, marked ``"fallback": true``; a failed
production model's get 503 SERVICE_UNAVAILABLE entries. An answer the prediction log cannot keep
(app/predlog/log.py) becomes that event's 503 entry: the batch is still 200, its other events answered.

Deadlines (app/scoring/deadlines.py): a batch's run is stopped at its events' latest deadline only when
every event of the run has one; an event whose deadline passed gets its 504 entry either way. A
canary's or shadow's run is stopped at its budget (per event, times the run's events).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import numpy as np

from app.errors import ApiError, InvalidRequest, ServiceUnavailable, error_body
from app.http.requests import InferRequest, parse_infer_request, read_json_object
from app.predlog.log import NULL_PREDICTION_LOG
from app.scoring.cache import PredictionCache
from app.scoring.models import ModelTable, ServingModel
from app.scoring.runs import (
    DEFAULT_CANARY_BUDGET_S,
    ModelFailed,
    RunStopped,
    fail_over,
    over_budget,
    past_deadline,
    prediction,
    routed_model,
    run_model_rows,
    run_stop_time,
    timed_out,
)
from app.telemetry.metrics import count_fallbacks
from app.telemetry.model_stats import NULL_MODEL_STATS

perf_counter = time.perf_counter
NO_SPAN = contextlib.nullcontext()  # what BatchInferResource.span gives when tracing is off


class BatchInferResource:
    """Up to SIRA_BATCH_MAX events; valid ones scored with one model run per model, in request order.

    Traced (``tracer`` set), a batch has one ``parse``, ``cache`` and ``log append`` span and one
    ``score`` span per model run, and its trace id goes into every row it logs.
    """

    canary_budget_s = DEFAULT_CANARY_BUDGET_S  # SIRA_CANARY_BUDGET_MS, set by app/http/assembly.py
    tracer = None  # tracing on: app/http/assembly.py sets it (app/telemetry/tracing.py)

    auth_actions = {"POST": "infer"}

    def __init__(self, models: ModelTable, max_body_bytes: int, batch_max: int,
                 cache: PredictionCache | None = None, prediction_log=NULL_PREDICTION_LOG,
                 model_stats=NULL_MODEL_STATS):
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.batch_max = batch_max
        self.cache = cache
        self.prediction_log = prediction_log
        self.model_stats = model_stats

    def span(self, name: str):
        """A phase's span when tracing is on; else one shared no-op (a batch pays it a few times)."""
        return NO_SPAN if self.tracer is None else self.tracer.start_as_current_span(name)

    def score_span(self, model: ServingModel, events: int):
        """The span of one model run of the batch (its attributes built only when tracing is on)."""
        if self.tracer is None:
            return NO_SPAN
        return self.tracer.start_as_current_span("score", attributes={
            "sira.model_id": model.model_id, "sira.model_role": model.role, "sira.events": events})

    async def on_post(self, req, resp):
        started = perf_counter()
        request_id = req.context.request_id
        with self.span("parse"):
            events = batch_events(await read_json_object(req, self.max_body_bytes), self.batch_max)
            results: list = [None] * len(events)
            groups, shadows, skipped = self.group_valid_events(events, results, request_id)
        keys = None
        if self.cache is not None:
            with self.span("cache"):
                keys = self.answer_from_cache(groups, results, started)
        for model, items in groups.values():
            with self.score_span(model, len(items)):
                self.score_group(model, items, results, started, request_id)
        if skipped:
            mark_skipped_canaries(skipped, results)
        with self.span("log append"):
            refused = self.log_predictions(events, results, request_id, getattr(req.context, "trace_id", None))
        if keys:
            self.store_in_cache(keys, results)
        resp.media = {"results": results}
        if shadows:
            if refused:
                shadows = shadows_of_kept_events(shadows, events, refused)
            resp.schedule(partial(self.score_shadows, shadows, request_id))

    def log_predictions(self, events: list, results: list, request_id: str,
                        trace_id: str | None = None) -> list[int]:
        """Every scored event goes to the prediction log before the answer leaves (app/predlog/log.py).

        An event the log cannot keep (503 from PredictionLog.append) gets its own 503 entry instead of
        its score, so that no answer leaves unlogged; the events around it keep theirs, and the
        batch is still 200. Returns the indexes of those events, in order.
        """
        append = self.prediction_log.append
        refused: list[int] = []
        pairs = zip(events, results)  # one iterator: after a refusal the loop resumes at the next event
        while True:
            try:
                for event, result in pairs:
                    if "prediction_id" in result:  # not an error entry: the event was checked and scored
                        append(result, event["event_id"], event["product"], request_id, trace_id)
                return refused
            except ServiceUnavailable as exc:
                index = position_of(result, results, refused[-1] + 1 if refused else 0)
                results[index] = event_error(exc, index, f"events[{index}].", request_id)
                refused.append(index)

    def answer_from_cache(self, groups: dict, results: list, started: float) -> dict[int, tuple]:
        """Answer the cached events now and drop them from their group; (key, explained) of the rest."""
        cache, keys = self.cache, {}
        for group_key, (model, items) in list(groups.items()):
            remaining = []
            counters = self.model_stats.counters(model.model_id, model.role)
            for item in items:
                index, request, row = item
                if request.enable_cache:
                    key = cache.key(model, row)
                    hit = cache.get(key, request.include_explanation)
                    if hit is not None:
                        results[index] = answer = prediction(model, hit[0], hit[1], started, cached=True)
                        counters.answered(None, answer["decision"])
                        continue
                    keys[index] = (key, request.include_explanation)
                remaining.append(item)
            if remaining:
                groups[group_key] = (model, remaining)
            else:
                del groups[group_key]
        return keys

    def store_in_cache(self, keys: dict[int, tuple], results: list) -> None:
        """Store the freshly scored answers of the events that missed (a fallback's answer is not the canary's).

        Called after log_predictions: an event the log refused has a 503 entry by then, so only
        answers that were logged and given out are kept for later requests.
        """
        for index, (key, explained) in keys.items():
            answer = results[index]
            if "prediction_id" in answer and "fallback" not in answer:
                self.cache.put(key, answer["score"], answer["explain_summary"], explained)

    def group_valid_events(self, events: list, results: list, request_id: str) -> tuple[dict, list, dict]:
        """Check every event; errors go straight into results, valid rows are grouped by model.

        Also returns the (shadow model, request) pairs to score after the answer, and the events
        whose canary was skipped for its open breaker (index -> that canary).
        """
        groups: dict[tuple[str, str], tuple[ServingModel, list]] = {}
        shadows: list[tuple[ServingModel, InferRequest]] = []
        skipped_canaries: dict[int, ServingModel] = {}
        for index, event in enumerate(events):
            path = f"events[{index}]."
            try:
                if type(event) is not dict:
                    raise InvalidRequest("each event must be a JSON object", {"field": path[:-1]})
                request = parse_infer_request(event, path)
                model, shadow, skipped = routed_model(self.models, request.product, request.event_id, path)
                row = np.empty(len(model.spec), dtype=np.float32)
                model.spec.build_row(request.payload, row)
            except ApiError as exc:
                results[index] = event_error(exc, index, path, request_id)
                continue
            if skipped is not None:
                skipped_canaries[index] = skipped
            groups.setdefault((model.model_id, model.role), (model, []))[1].append((index, request, row))
            if shadow is not None:
                shadows.append((shadow, request))
        return groups, shadows, skipped_canaries

    def score_group(self, model: ServingModel, items: list, results: list, started: float,
                    request_id: str) -> None:
        """One model run for the group; a failed canary's events go to production, marked fallback."""
        explain = any(request.include_explanation for _, request, _ in items)
        counters = self.model_stats.counters(model.model_id, model.role)
        deadline = group_deadline(items, started)
        run_started = perf_counter()
        stop_at = run_stop_time(model, deadline, run_started, self.canary_budget_s * len(items))
        try:
            scores, explanations = run_model_rows(model, np.stack([row for _, _, row in items]), explain, stop_at)
        except RunStopped:
            if deadline is not None and perf_counter() >= deadline:
                answer_timed_out(items, results, request_id)
                return
            # stopped at the canary's budget, before the events' deadlines
            reason = over_budget((perf_counter() - run_started) / len(items), self.canary_budget_s, " per event")
            self.group_failed(model, counters, items, results, started, request_id, reason)
            return
        except ModelFailed as exc:
            self.group_failed(model, counters, items, results, started, request_id, str(exc))
            return
        run_s = (perf_counter() - run_started) / len(items)  # the model's time per event of the group
        if run_s > self.canary_budget_s and model.role == "canary":
            reason = over_budget(run_s, self.canary_budget_s, " per event")
            self.group_failed(model, counters, items, results, started, request_id, reason)
            return
        for position, (index, request, _) in enumerate(items):
            if past_deadline(request, started):
                results[index] = event_error(timed_out(request), index, f"events[{index}].", request_id)
                continue  # a late answer is not given (as for one event)
            explanation = explanations[position] if explanations and request.include_explanation else []
            results[index] = answer = prediction(model, float(scores[position]), explanation, started)
            counters.answered(run_s, answer["decision"], explain)  # one run: explained for every row

    def group_failed(self, model: ServingModel, counters, items: list, results: list, started: float,
                     request_id: str, reason: str) -> None:
        """The failure rule (app/scoring/runs.py fail_over) for a group: a canary's events go to
        production, marked fallback; production's get an error entry each."""
        if fail_over(model, counters, reason, len(items)):
            self.fall_back_to_production(model.product, items, results, started, request_id)
        else:
            self.answer_unavailable(model.product, items, results, request_id)

    def fall_back_to_production(self, product: str, items: list, results: list, started: float,
                                request_id: str) -> None:
        production = self.models.get(product)
        if production is None:
            self.answer_unavailable(product, items, results, request_id)
            return
        rebuilt = []
        for index, request, _ in items:  # production may have another feature spec
            row = np.empty(len(production.spec), dtype=np.float32)
            try:
                production.spec.build_row(request.payload, row)
            except ApiError as exc:
                results[index] = event_error(exc, index, f"events[{index}].", request_id)
                continue
            rebuilt.append((index, request, row))
        if not rebuilt:
            return
        self.score_group(production, rebuilt, results, started, request_id)
        for index, _, _ in rebuilt:
            if "prediction_id" in results[index]:
                results[index]["fallback"] = True

    @staticmethod
    def answer_unavailable(product: str, items: list, results: list, request_id: str) -> None:
        for index, _, _ in items:
            message = f"the model of product {product!r} failed on this event"
            results[index] = error_body(ServiceUnavailable.code, message, request_id,
                                        {"product": product, "index": index})

    async def score_shadows(self, shadows: list, request_id: str | None) -> None:
        """After the answer left: each shadow model scores its events in one run; logged, never served."""
        by_model: dict[str, tuple[ServingModel, list]] = {}
        for model, request in shadows:
            by_model.setdefault(model.model_id, (model, []))[1].append(request)
        for model, requests in by_model.values():
            started = perf_counter()
            counters = self.model_stats.counters(model.model_id, model.role)
            try:
                rows = np.empty((len(requests), len(model.spec)), dtype=np.float32)
                for position, request in enumerate(requests):
                    model.spec.build_row(request.payload, rows[position])
                run_started = perf_counter()
                budget_s = self.canary_budget_s * len(requests)
                scores, _ = run_model_rows(model, rows, False, run_started + budget_s)
            except (ModelFailed, ApiError, RunStopped) as exc:
                reason = str(exc)
                if isinstance(exc, RunStopped):  # run_started is set: the run was under way
                    reason = over_budget((perf_counter() - run_started) / len(requests), self.canary_budget_s,
                                         " per event")
                fail_over(model, counters, reason, len(requests))
                continue
            run_s = (perf_counter() - run_started) / len(requests)
            for position, request in enumerate(requests):
                answer = prediction(model, float(scores[position]), [], started)
                counters.answered(run_s, answer["decision"])
                with contextlib.suppress(ServiceUnavailable):  # as for a single shadow run
                    self.prediction_log.append(answer, request.event_id, request.product, request_id)


def group_deadline(items: list, started: float) -> float | None:
    """The latest deadline of a model run's events when every one has a timeout_ms; else None (an
    event without one is not cut short by the others')."""
    if any(request.timeout_ms is None for _, request, _ in items):
        return None
    return started + max(request.timeout_ms for _, request, _ in items) / 1000.0


def answer_timed_out(items: list, results: list, request_id: str) -> None:
    for index, request, _ in items:
        results[index] = event_error(timed_out(request), index, f"events[{index}].", request_id)


def batch_events(body: dict, batch_max: int) -> list:
    """The body's ``events``: a list of 1 to ``batch_max`` items (each checked later on its own)."""
    events = body.get("events")
    if type(events) is not list or not 0 < len(events) <= batch_max:
        raise InvalidRequest(f"events must be a list of 1 to {batch_max} infer requests",
                             {"field": "events", "limit": batch_max})
    return events


def mark_skipped_canaries(skipped: dict[int, ServingModel], results: list) -> None:
    """Production answered these events because their canary's breaker is open: say so, count them."""
    for index, canary in skipped.items():
        answer = results[index]
        if "prediction_id" in answer:
            answer["fallback"] = True
            count_fallbacks(canary.product, canary.model_id)


def position_of(entry: dict, results: list, start: int) -> int:
    """Where ``entry`` (that very object) sits in ``results``, looking from ``start``; only a
    refused append needs it, so the logging loop itself carries no index."""
    return next(index for index in range(start, len(results)) if results[index] is entry)


def shadows_of_kept_events(shadows: list, events: list, refused: list[int]) -> list:
    """The (shadow model, request) pairs less those of events the log refused (matched by event id):
    as for one event, an event answered 503 is not scored by its shadow either."""
    refused_ids = {events[index]["event_id"] for index in refused}
    return [(model, request) for model, request in shadows if request.event_id not in refused_ids]


def event_error(exc: ApiError, index: int, path: str, request_id: str) -> dict:
    """A batch event's error entry, its field named from the batch's root."""
    details = dict(exc.details, index=index)
    if "field" in details and not details["field"].startswith(path):
        details["field"] = path + details["field"]
    return error_body(exc.code, exc.message, request_id, details)
