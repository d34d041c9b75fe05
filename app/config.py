"""What the serving process hands each worker's app; importing it loads no model runtime.

The gunicorn master imports this before it forks. It must not import onnxruntime: a child forked
from a process that loaded onnxruntime hangs in onnxruntime's exit handlers (measured: a forked
worker never exits, so SIGTERM waits out the whole graceful timeout).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A verified model file on local disk with its registry facts."""

    model_id: str
    name: str
    version: str
    product: str
    path: str
    spec: dict
    threshold: float
    role: str = "production"


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Everything a worker needs to build its app."""

    model_files: list[ModelFile]
    expected_products: list[str]
    authenticator: Any  # app.auth.tokens.Authenticator
    max_body_bytes: int = 1_048_576
    batch_max: int = 256
    outcomes_batch_max: int = 1000
    cache_segment: str | None = None  # the master's prediction cache (app/scoring/cache.py); None: off
    database_url: str | None = None  # the workers' lazily opened pool (app/db.py); None: admin API answers 503
    prediction_log: Any = None  # app.predlog.log.PredictionLogConfig (rings, spool); None: predictions not logged
    # The supervisor's control block (app/store/swap.py): when set, the workers serve its model
    # table and model_files / expected_products are not used.
    control_segment: str | None = None
    models_in_use_dir: str | None = None  # where each worker lists the model files it holds
    metrics_port: int | None = None  # METRICS_BIND's port: only /metrics, /healthz, /readyz there
    metrics_on_main_port: bool = True  # SIRA_METRICS_ON_MAIN_PORT: off, /metrics is served on METRICS_BIND only
    openapi_feature_specs: bool = False  # SIRA_OPENAPI_FEATURE_SPECS: the served feature specs without a token
    model_stats_segment: str | None = None  # the master's per-model counts (shm/model_stats.py); None: not counted
    canary_budget_ms: float = 50.0  # a canary's run time per event above which production answers instead
    rate_limit_segment: str | None = None  # the master's rate-limit table (app/auth/ratelimit.py); None: no limits
    rate_limits: Any = None  # conf.ratelimit.RateLimits (SIRA_RATE_LIMITS)
    dependencies_file: str | None = None  # the supervisor's view of Postgres and the store (app/dependencies.py)
    tracing: bool = False  # OpenTelemetry traces (app/telemetry/tracing.py: tracing_requested); False: nothing traced
