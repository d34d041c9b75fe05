"""Prometheus metrics of every SIRA process, added up across processes, and the /metrics resource.

How it fits together (prometheus_client's multiprocess mode):

- the master empties ``$SIRA_DATA_DIR/metrics`` and points ``PROMETHEUS_MULTIPROC_DIR`` at it before
  it forks anything (``workers/metrics.py``); every process then writes its own values into its own
  mmap files there (one writer per file, no lock between processes);
- each process creates its metric objects after the fork (``process_metrics``): an HTTP worker in
  ``create_app``, a sidecar on its first count, and only the families it uses;
- ``GET /metrics`` merges every file of the folder, those of dead processes included, so a counter
  survives a worker's restart; the master's ``child_exit`` hook removes a dead process's files of
  live gauges (``multiprocess.mark_process_dead``).

prometheus_client picks single- or multi-process mode when it is first imported
(``values.ValueClass``), so this module imports it only inside functions, which run after the
master set the folder: the master may import this module (a sidecar's module does) without fixing
the mode too early. ``SiraMetrics`` refuses to start in the wrong mode.

The request path counts through ``app/telemetry/request_metrics.py``. Counting functions for the other
processes (supervisor, writer, model swap): ``count_model_load_error``, ``count_canary_rollback``,
``set_model_generation``, ``set_models_loaded``, ``set_canary_traffic_ratio``, ``count_rate_limited``,
``set_dependency_up``;
each works in any process. The prediction log's figures are read at scrape time from its shared counter block
(``app/predlog/metrics.py``), not copied into these files.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable
from typing import Any

from app.errors import NotFound

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OPS_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
CACHE_TYPE = "shm"  # the one prediction cache: a shared-memory segment for every worker of a host

# Sub-millisecond (cache hits) to 100 ms (the alert's p95 threshold) and a little beyond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Why a model did not go live (app/store/buckets.py, workers/smoke.py); created at 0 in every worker
# so that increase() sees the first failure. Another reason is counted too, from its first failure.
# The reasons the supervisor's model sync counts (workers/model_sync.py, ModelNotReady), created at 0 at start.
MODEL_LOAD_ERROR_REASONS = ("registry_unreachable", "store_unreachable", "download_failed", "sha256_mismatch",
                            "invalid_spec", "invalid_model", "spec_mismatch", "smoke_failed", "load_crashed",
                            "load_timeout", "invalid_entry", "publish_failed", "internal_error")


@dataclasses.dataclass(frozen=True)
class Family:
    """A metric family as exported: name (counters end in _total), help text, label names."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()


# The request path's families: app/telemetry/request_metrics.py writes them.
REQUESTS = Family("sira_inference_requests_total",
                  "Inference requests (one per event of a batch), errors included; status is the HTTP status "
                  "of the event's answer.", ("product", "model_id", "model_role", "decision", "status"))
LATENCY = Family("sira_inference_latency_seconds",
                 "Server-side latency of each answered prediction (the response's latency_ms).",
                 ("product", "model_id", "model_role"))
CACHE_HITS = Family("sira_inference_cache_hits_total", "Prediction cache lookups answered from the cache.",
                    ("cache_type",))
CACHE_MISSES = Family("sira_inference_cache_misses_total", "Prediction cache lookups that found nothing usable.",
                      ("cache_type",))
PREDICTION_ERRORS = Family("sira_prediction_errors_total",
                           "Inference requests (or batch events) answered with an error, by error code.",
                           ("product", "model_id", "error_type"))


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class SiraMetrics:
    """Every metric family of one process; each family is created on first use.

    Lazily, because a gauge is exported as soon as it exists: a sidecar that created
    `sira_models_loaded` (at 0) would pull the workers' minimum down. Not thread safe.
    """

    def __init__(self, registry: Any = None):
        # prometheus_client is imported in functions only: importing it fixes the process's mode (module docstring)
        from prometheus_client import CollectorRegistry, values

        check_value_class(values.ValueClass)
        # Used for exposition in single-process mode only (tests, an app run in-process); in
        # multiprocess mode /metrics reads the files of every process instead.
        self.registry = registry if registry is not None else CollectorRegistry()

    def family(self, family: Family):
        """The prometheus_client object of one of the request path's families."""
        return {REQUESTS: self.requests, LATENCY: self.latency, CACHE_HITS: self.cache_hits,
                CACHE_MISSES: self.cache_misses, PREDICTION_ERRORS: self.prediction_errors}[family]

    def _counter(self, family: Family):
        from prometheus_client import Counter

        return Counter(family.name, family.documentation, family.labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, mode: str, labels: tuple[str, ...] = ()):
        from prometheus_client import Gauge

        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode=mode)

    @functools.cached_property
    def requests(self):
        return self._counter(REQUESTS)

    @functools.cached_property
    def latency(self):
        from prometheus_client import Histogram

        return Histogram(LATENCY.name, LATENCY.documentation, LATENCY.labels, buckets=LATENCY_BUCKETS,
                         registry=self.registry)

    @functools.cached_property
    def cache_hits(self):
        return self._counter(CACHE_HITS)

    @functools.cached_property
    def cache_misses(self):
        return self._counter(CACHE_MISSES)

    @functools.cached_property
    def prediction_errors(self):
        return self._counter(PREDICTION_ERRORS)

    @functools.cached_property
    def models_loaded(self):
        return self._gauge("sira_models_loaded", "Models an HTTP worker serves (the fewest of any live worker).",
                           "livemin")

    @functools.cached_property
    def model_generation(self):
        return self._gauge("sira_model_generation", "Model generation served (the newest any live process reports).",
                           "livemax")

    @functools.cached_property
    def canary_traffic_ratio(self):
        return self._gauge("sira_canary_traffic_ratio",
                           "Configured share of a product's traffic sent to its canary (0-1).", "livemax", ("product",))

    @functools.cached_property
    def dependency_up(self):
        return self._gauge("sira_dependency_up", "1 while the supervisor reaches a dependency (postgres, model_store), "
                           "0 while it does not (app/dependencies.py).", "livemin", ("name",))

    @functools.cached_property
    def model_load_errors(self):
        return self._counter(Family("sira_model_load_errors_total",
                                    "Models that failed to load or to pass their checks.", ("reason",)))

    @functools.cached_property
    def fallbacks(self):
        return self._counter(Family("sira_inference_fallbacks_total",
                                    "Events whose canary model failed and that production answered (fallback: true).",
                                    ("product", "model_id")))

    @functools.cached_property
    def canary_rollbacks(self):
        return self._counter(Family("sira_canary_rollbacks_total", "Canaries rolled back automatically.", ("product",)))

    @functools.cached_property
    def rate_limited(self):
        return self._counter(Family("sira_rate_limited_total",
                                    "Requests refused with 429 RATE_LIMIT_EXCEEDED, by the role whose limit they hit "
                                    "(anonymous: failed authentication, per client address).", ("role",)))


def check_value_class(value_class: type) -> None:
    """Refuse to count into the wrong place: multiprocess mode iff PROMETHEUS_MULTIPROC_DIR is set."""
    multiprocess = getattr(value_class, "_multiprocess", False)
    if multiprocess_dir() and not multiprocess:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; "
                           "its values would stay in this process (import it only after "
                           "workers.metrics.prepare_multiprocess_dir)")
    if multiprocess and not multiprocess_dir():
        raise RuntimeError("prometheus_client is in multiprocess mode but PROMETHEUS_MULTIPROC_DIR is unset")


_process_metrics: tuple[int, SiraMetrics] | None = None


def process_metrics() -> SiraMetrics:
    """This process's metrics, created on first use after the fork (a child never uses its parent's)."""
    global _process_metrics
    pid = os.getpid()
    if _process_metrics is None or _process_metrics[0] != pid:
        _process_metrics = (pid, SiraMetrics())
    return _process_metrics[1]


# -- counting from the other processes ------------------------------------------------------------

def count_model_load_error(reason: str) -> None:
    """A model did not go live; `reason` is a short fixed word such as those of MODEL_LOAD_ERROR_REASONS."""
    process_metrics().model_load_errors.labels(reason).inc()


def count_model_failure(product: str, model_id: str, fell_back: bool, events: int = 1) -> None:
    """A canary or shadow model failed on ``events`` events (off the hot path: failures only).

    Counted in sira_prediction_errors_total{error_type="MODEL_FAILED"}, and, when production answered
    instead, in sira_inference_fallbacks_total.
    """
    metrics = process_metrics()
    metrics.prediction_errors.labels(product, model_id, "MODEL_FAILED").inc(events)
    if fell_back:
        metrics.fallbacks.labels(product, model_id).inc(events)


def count_fallbacks(product: str, model_id: str, events: int = 1) -> None:
    """Events production answered for a canary whose circuit breaker is open (fallback: true)."""
    process_metrics().fallbacks.labels(product, model_id).inc(events)


def start_fallback_series(product: str, model_id: str) -> None:
    """In a worker that loads a canary: its fallback counter at 0, so increase() sees the first one."""
    process_metrics().fallbacks.labels(product, model_id)


def count_canary_rollback(product: str) -> None:
    process_metrics().canary_rollbacks.labels(product).inc()


def set_model_generation(generation: int) -> None:
    process_metrics().model_generation.set(generation)


def set_models_loaded(count: int) -> None:
    """In an HTTP worker, after each model swap: how many models it serves."""
    process_metrics().models_loaded.set(count)


def set_canary_traffic_ratio(product: str, ratio: float) -> None:
    process_metrics().canary_traffic_ratio.labels(product).set(ratio)


def set_dependency_up(name: str, up: bool) -> None:
    """In the supervisor, when a dependency's state changes (app/dependencies.py)."""
    process_metrics().dependency_up.labels(name).set(1 if up else 0)


def count_rate_limited(role: str) -> None:
    """In an HTTP worker: one request refused by the rate limits (app/auth/ratelimit.py)."""
    process_metrics().rate_limited.labels(role).inc()


def start_rate_limited_series(roles: Iterable[str]) -> None:
    """In an HTTP worker with rate limits (create_app): each limited role's series at 0, so that the
    first refusal is an increase() of 1."""
    metrics = process_metrics()
    for role in roles:
        metrics.rate_limited.labels(role)


def start_worker_metrics(metrics: SiraMetrics, products: Iterable[str], models_loaded: int,
                         generation: int | None) -> None:
    """An HTTP worker's startup: its gauges set, and every counter ops alert on created at 0.

    A counter exists in Prometheus from its first sample; created at 0 here, the first model load
    error, rollback or overflow is an increase() of 1, not a series that starts at 1 and shows none.
    """
    metrics.models_loaded.set(models_loaded)
    metrics.model_generation.set(generation or 0)
    for reason in MODEL_LOAD_ERROR_REASONS:
        metrics.model_load_errors.labels(reason)
    for product in products:
        metrics.canary_rollbacks.labels(product)
        metrics.canary_traffic_ratio.labels(product).set(0)


# -- /metrics and the ops port ------------------------------------------------------------------

def exposition(registry: Any, collectors: Iterable[Any] = ()) -> tuple[bytes, str]:
    """(body, content type) of a scrape: every process's files in multiprocess mode, else `registry`.

    `collectors` read shared state at scrape time (the prediction log's counter block).
    """
    # in the function: importing prometheus_client fixes the process's mode (module docstring)
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        generate_latest,
    )
    from prometheus_client.multiprocess import MultiProcessCollector

    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
    for collector in collectors:
        registry.register(collector)
    body = generate_latest(registry)
    for collector in collectors:
        registry.unregister(collector)
    return body, CONTENT_TYPE_LATEST


class MetricsResource:
    """GET /metrics: the Prometheus text format, summed over every process of this server.

    Public (no token), like /healthz: ops keep it on METRICS_BIND's port and restrict that port to
    the scraper. Reading the files takes a few milliseconds of this worker's loop per scrape, so
    with `on_main_port` False (SIRA_METRICS_ON_MAIN_PORT=off) a request that did not come in on
    METRICS_BIND's port is a 404 before any file is read: a client of SIRA_BIND cannot make the
    workers merge files, nor read the figures.
    """

    def __init__(self, metrics: SiraMetrics, collectors: Iterable[Any] = (), on_main_port: bool = True,
                 metrics_port: int | None = None):
        self.metrics = metrics
        self.collectors = tuple(collectors)
        self.on_main_port = on_main_port
        self.metrics_port = metrics_port

    async def on_get(self, req, resp):
        if not self.on_main_port and (self.metrics_port is None or listening_port(req) != self.metrics_port):
            raise NotFound("/metrics is not served on this port (SIRA_METRICS_ON_MAIN_PORT is off)",
                           {"path": req.path})
        resp.data, resp.content_type = exposition(self.metrics.registry, self.collectors)


def listening_port(req) -> int | None:
    """The port of the socket the request came in on (never the client's Host header); None if unknown."""
    server = req.scope.get("server")
    if server is None:
        return None
    if type(server) is not tuple:  # gunicorn gives a tuple; ASGI allows any 2-item iterable
        server = req.scope["server"] = tuple(server)
    return server[1]


class OpsPortMiddleware:
    """On METRICS_BIND's port only /metrics, /healthz and /readyz answer; anything else is 404."""

    def __init__(self, port: int):
        self.port = port

    async def process_request(self, req, resp):
        if listening_port(req) == self.port and req.path not in OPS_PATHS:
            raise NotFound("only /metrics, /healthz and /readyz are served on the metrics port",
                           {"path": req.path})

