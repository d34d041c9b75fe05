"""What both infer resources (app/http/infer.py, app/http/infer_batch.py) do around a model run.

Routing (app/scoring/routing.py): an event meets its product's canary when its bucket is below the
canary's share, else production; a shadow model also scores every event of its product after the
answer has left, and its predictions are logged with ``model_role: shadow``.

A canary that raises, scores something that is not a probability or runs longer than its budget
(``SIRA_CANARY_BUDGET_MS``, per event) answers nothing: production answers that event, the answer
says ``"fallback": true``, and the canary's failure is counted in the model stats block
(shm/model_stats.py), which the supervisor's rollback watch reads. A production model that fails
gets 503 SERVICE_UNAVAILABLE, never a made-up score.

Deadlines (app/scoring/deadlines.py): a run is stopped where it stands when the request's
``options.timeout_ms`` runs out (504 INFERENCE_TIMEOUT, the worker free at once), and a canary's or
shadow's run when its budget does (a failure, as above).

Here: the model an event meets, a model run with its stop time (``run_model``, ``run_model_rows``),
the failure rule (``fail_over``: the one place both resources decide what a failure means), the
deadline checks, and the answer body (``prediction``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from app.errors import InferenceTimeout, ModelNotFound
from app.http.requests import InferRequest
from app.ids import new_prediction_id
from app.scoring.deadlines import WATCHDOG
from app.scoring.features import decide
from app.scoring.models import ModelTable, ServingModel
from app.telemetry.metrics import count_model_failure

log = logging.getLogger("sira.infer")
DEFAULT_CANARY_BUDGET_S = 0.05  # a canary run longer than this is a failure: production answers
perf_counter = time.perf_counter


class ModelFailed(Exception):
    """The model raised or scored something that is not a probability."""


class RunStopped(Exception):
    """The run was terminated at its deadline (app/scoring/deadlines.py): a time-out, not a fault of the model."""


def routed_model(models: ModelTable, product: str, event_id: str,
                 path: str = "") -> tuple[ServingModel, ServingModel | None, ServingModel | None]:
    """(the model that answers, a shadow model or None, the canary skipped for its open breaker or
    None); 404 when no model serves the product."""
    model, shadow, skipped = models.route(product, event_id)
    if model is None:
        raise ModelNotFound(f"no model serves product {product!r}", {"field": path + "product", "product": product})
    return model, shadow, skipped


def run_model(model: ServingModel, row, explain: bool, stop_at: float | None = None) -> tuple[float, list]:
    """Score one row; ModelFailed when the model raises or the score is not in [0, 1]; RunStopped when
    a ``stop_at`` (perf_counter seconds) was given and the run was terminated there."""
    options = None if stop_at is None else WATCHDOG.arm(stop_at)
    runner = model.runner
    try:
        score, explanation = (runner.explain_row(row, run_options=options) if explain
                              else (runner.score_row(row, options), []))
    except Exception as exc:  # onnxruntime raises its own types; any of them means this model failed
        if WATCHDOG.stopped(options):
            raise RunStopped() from None
        raise ModelFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        if options is not None:
            WATCHDOG.disarm()
    if not 0.0 <= score <= 1.0:  # NaN fails both comparisons
        raise ModelFailed(f"score {score!r} is not a probability")
    return score, explanation


def run_model_rows(model: ServingModel, rows, explain: bool,
                   stop_at: float | None = None) -> tuple[np.ndarray, list | None]:
    """Score a batch of rows; ModelFailed and RunStopped as ``run_model``."""
    options = None if stop_at is None else WATCHDOG.arm(stop_at)
    runner = model.runner
    try:
        scores, explanations = (runner.explain_rows(rows, run_options=options) if explain
                                else (runner.score_rows(rows, options), None))
    except Exception as exc:  # see run_model
        if WATCHDOG.stopped(options):
            raise RunStopped() from None
        raise ModelFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        if options is not None:
            WATCHDOG.disarm()
    if not (np.all(scores >= 0.0) and np.all(scores <= 1.0)):
        raise ModelFailed("a score is not a probability")
    return scores, explanations


def fail_over(model: ServingModel, counters, reason: str, events: int = 1) -> bool:
    """The one failure rule of the scoring path, whatever failed (an error, a run stopped at its
    budget, a run over it), for one event or a batch's group.

    The events count as failed in the model stats (``counters``), the failure is logged, and a
    canary's or shadow's is counted in the metrics (production's is a 503 or an error entry, which
    the request metrics count). True: the events go to production instead (a canary's). False:
    this failure is their end (production's: no made-up score; a shadow's: nothing was to answer).
    """
    for _ in range(events):
        counters.failed()
    log.error("%s model %s of %s failed on %d event(s): %s", model.role, model.model_id, model.product,
              events, reason)
    if model.role != "production":
        count_model_failure(model.product, model.model_id, model.role == "canary", events)
    return model.role == "canary"


def prediction(model: ServingModel, score: float, explanation: list, started: float,
               cached: bool = False) -> dict:
    """The response body of one scored event (the seed's fields)."""
    return {
        "prediction_id": new_prediction_id(),
        "model_id": model.model_id,
        "model_role": model.role,
        "score": score,
        "decision": decide(score, model.threshold),
        "explain_summary": explanation,
        "latency_ms": round((perf_counter() - started) * 1000.0, 3),
        "cached": cached,
    }


def timed_out(request: InferRequest) -> InferenceTimeout:
    return InferenceTimeout(f"the request took longer than its timeout_ms of {request.timeout_ms}",
                            {"timeout_ms": request.timeout_ms})


def request_deadline(request: InferRequest, started: float) -> float | None:
    """When the request's timeout_ms runs out (perf_counter seconds), or None without one."""
    return None if request.timeout_ms is None else started + request.timeout_ms / 1000.0


def past_deadline(request: InferRequest, started: float) -> bool:
    return request.timeout_ms is not None and perf_counter() > request_deadline(request, started)


def check_deadline(request: InferRequest, started: float) -> None:
    """A request whose timeout_ms has passed gets 504 rather than a late answer."""
    if past_deadline(request, started):
        raise timed_out(request)


def over_budget(run_s: float, budget_s: float, per_event: str = "") -> str:
    return (f"took {run_s * 1000:.1f} ms{per_event}, over the canary budget of {budget_s * 1000:.0f} ms "
            f"(SIRA_CANARY_BUDGET_MS)")


def run_stop_time(model: ServingModel, deadline: float | None, run_started: float,
                  canary_budget_s: float) -> float | None:
    """When to stop the run: the request's deadline, or a canary's or shadow's budget if that comes first."""
    if model.role == "production":
        return deadline
    budget_end = run_started + canary_budget_s
    return budget_end if deadline is None or budget_end < deadline else deadline

