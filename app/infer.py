"""POST /v1/infer and POST /v1/infer/batch: score payment events with the product's model."""

from __future__ import annotations

import time
import uuid

import numpy as np

from app.cache import PredictionCache
from app.errors import ApiError, InferenceTimeout, InvalidRequest, ModelNotFound, error_body
from app.features import decide
from app.models import ModelTable, ServingModel
from app.predlog import NULL_PREDICTION_LOG
from app.requests import InferRequest, parse_infer_request, read_json_object

perf_counter = time.perf_counter
uuid4 = uuid.uuid4


def model_for(models: ModelTable, product: str, path: str = "") -> ServingModel:
    model = models.get(product)
    if model is None:
        raise ModelNotFound(f"no model serves product {product!r}", {"field": path + "product", "product": product})
    return model


def prediction(model: ServingModel, score: float, explanation: list, started: float,
               cached: bool = False) -> dict:
    """The response body of one scored event (the seed's fields)."""
    return {
        "prediction_id": str(uuid4()),
        "model_id": model.model_id,
        "model_role": model.role,
        "score": score,
        "decision": decide(score, model.threshold),
        "explain_summary": explanation,
        "latency_ms": round((perf_counter() - started) * 1000.0, 3),
        "cached": cached,
    }


def check_deadline(request: InferRequest, started: float) -> None:
    """A request whose timeout_ms has passed gets 504 rather than a late answer."""
    if request.timeout_ms is not None and (perf_counter() - started) * 1000.0 > request.timeout_ms:
        raise InferenceTimeout(f"the request took longer than its timeout_ms of {request.timeout_ms}",
                               {"timeout_ms": request.timeout_ms})


class InferResource:
    """One event, one model run (or one batched run when an explanation is asked for)."""

    auth_actions = {"POST": "infer"}

    def __init__(self, models: ModelTable, max_body_bytes: int, cache: PredictionCache | None = None,
                 prediction_log=NULL_PREDICTION_LOG):
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.cache = cache
        self.prediction_log = prediction_log

    def logged(self, body: dict, request: InferRequest, req) -> dict:
        """Every answer goes to the prediction log before it leaves (app/predlog.py)."""
        self.prediction_log.append(body, request.event_id, request.product, req.context.request_id)
        return body

    async def on_post(self, req, resp):
        started = perf_counter()
        request = parse_infer_request(await read_json_object(req, self.max_body_bytes))
        model = model_for(self.models, request.product)
        req.context.model = model  # labels the request's metrics (app/metrics.py), errors included
        row = model.row
        model.spec.build_row(request.payload, row)
        cache = self.cache if request.enable_cache else None
        if cache is not None:
            key = cache.key(model, row)
            hit = cache.get(key, request.include_explanation)
            if hit is not None:
                resp.media = self.logged(prediction(model, hit[0], hit[1], started, cached=True), request, req)
                return
        if request.include_explanation:
            score, explanation = model.runner.explain_row(row)
        else:
            score, explanation = model.runner.score_row(row), []
        check_deadline(request, started)
        if cache is not None:
            cache.put(key, score, explanation, request.include_explanation)
        resp.media = self.logged(prediction(model, score, explanation, started), request, req)


class BatchInferResource:
    """Up to SIRA_BATCH_MAX events; valid ones scored with one model run per model, in request order."""

    auth_actions = {"POST": "infer"}

    def __init__(self, models: ModelTable, max_body_bytes: int, batch_max: int,
                 cache: PredictionCache | None = None, prediction_log=NULL_PREDICTION_LOG):
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.batch_max = batch_max
        self.cache = cache
        self.prediction_log = prediction_log

    async def on_post(self, req, resp):
        started = perf_counter()
        body = await read_json_object(req, self.max_body_bytes)
        events = body.get("events")
        if type(events) is not list or not 0 < len(events) <= self.batch_max:
            raise InvalidRequest(f"events must be a list of 1 to {self.batch_max} infer requests",
                                 {"field": "events", "limit": self.batch_max})
        results: list = [None] * len(events)
        groups = self.group_valid_events(events, results, req.context.request_id)
        keys = self.answer_from_cache(groups, results, started) if self.cache is not None else None
        for model, items in groups.values():
            self.score_group(model, items, results, started)
        if keys:
            self.store_in_cache(keys, results)
        self.log_predictions(events, results, req.context.request_id)
        resp.media = {"results": results}

    def log_predictions(self, events: list, results: list, request_id: str) -> None:
        """Every scored event goes to the prediction log before the answer leaves (app/predlog.py)."""
        append = self.prediction_log.append
        for event, result in zip(events, results):
            if "prediction_id" in result:  # not an error entry: the event was checked and scored
                append(result, event["event_id"], event["product"], request_id)

    def answer_from_cache(self, groups: dict, results: list, started: float) -> dict[int, tuple]:
        """Answer the cached events now and drop them from their group; (key, explained) of the rest."""
        cache, keys = self.cache, {}
        for model_id, (model, items) in list(groups.items()):
            remaining = []
            for item in items:
                index, request, row = item
                if request.enable_cache:
                    key = cache.key(model, row)
                    hit = cache.get(key, request.include_explanation)
                    if hit is not None:
                        results[index] = prediction(model, hit[0], hit[1], started, cached=True)
                        continue
                    keys[index] = (key, request.include_explanation)
                remaining.append(item)
            if remaining:
                groups[model_id] = (model, remaining)
            else:
                del groups[model_id]
        return keys

    def store_in_cache(self, keys: dict[int, tuple], results: list) -> None:
        """Store the freshly scored answers of the events that missed."""
        for index, (key, explained) in keys.items():
            answer = results[index]
            self.cache.put(key, answer["score"], answer["explain_summary"], explained)

    def group_valid_events(self, events: list, results: list, request_id: str) -> dict:
        """Check every event; errors go straight into results, valid rows are grouped by model."""
        groups: dict[str, tuple[ServingModel, list]] = {}
        for index, event in enumerate(events):
            path = f"events[{index}]."
            try:
                if type(event) is not dict:
                    raise InvalidRequest("each event must be a JSON object", {"field": path[:-1]})
                request = parse_infer_request(event, path)
                model = model_for(self.models, request.product, path)
                row = np.empty(len(model.spec), dtype=np.float32)
                model.spec.build_row(request.payload, row)
            except ApiError as exc:
                details = dict(exc.details, index=index)
                if "field" in details and not details["field"].startswith(path):
                    details["field"] = path + details["field"]
                results[index] = error_body(exc.code, exc.message, request_id, details)
                continue
            groups.setdefault(model.model_id, (model, []))[1].append((index, request, row))
        return groups

    @staticmethod
    def score_group(model: ServingModel, items: list, results: list, started: float) -> None:
        rows = np.stack([row for _, _, row in items])
        if any(request.include_explanation for _, request, _ in items):
            scores, explanations = model.runner.explain_rows(rows)
        else:
            scores, explanations = model.runner.score_rows(rows), None
        for position, (index, request, _) in enumerate(items):
            explanation = explanations[position] if explanations and request.include_explanation else []
            results[index] = prediction(model, float(scores[position]), explanation, started)
