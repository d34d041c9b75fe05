"""What each inference request counts: requests, latency, errors and cache lookups, at a few microseconds.

``InferenceMetricsMiddleware`` counts every POST /v1/infer and every event of POST /v1/infer/batch
once its answer is ready, errors and refusals included; ``InferenceMetrics`` keeps one writer per
label set, made on the set's first use, so a request does no label lookup.

In multiprocess mode the writers write into this process's own file of hot values
(``HotValueFile``), in prometheus_client's file format, so /metrics adds them up with every other
process's files. An increment there is a float addition and one 16-byte write: prometheus_client's
own values also take a lock and call getpid() on every increment, which made the counting of one
request cost as much as a model run (bench/bench_metrics.py). In single-process mode (tests, an app
run in-process) the writers are plain prometheus_client children.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable
from typing import Any

from app.errors import CODE_BY_STATUS, ApiError
from app.telemetry.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_TYPE,
    LATENCY,
    LATENCY_BUCKETS,
    PREDICTION_ERRORS,
    REQUESTS,
    Family,
    SiraMetrics,
    multiprocess_dir,
    start_worker_metrics,
)

log = logging.getLogger("sira.metrics")

INFER_ROUTE = "/v1/infer"
BATCH_ROUTE = "/v1/infer/batch"
UNKNOWN = "unknown"  # product label of a request that named no product this server serves
OK_STATUS = "200"
DECISIONS = ("allow", "review", "block")
# Errors a request meets once its model is chosen; their series start at 0 for every served model.
MODEL_ERROR_TYPES = ("FEATURE_VALIDATION_FAILED", "INFERENCE_TIMEOUT", "INTERNAL_ERROR")
MAX_CACHED_LABEL_SETS = 10_000  # a bound on the writers kept; cleared beyond, never unbounded


# -- writers ---------------------------------------------------------------------------------------

class FileValue:
    """One value of a hot value file; this process is its only writer."""

    __slots__ = ("_write", "key", "value")

    def __init__(self, file: Any, key: str):
        self.key = key
        self.value = file.read_value(key)[0]  # creates the entry at 0 (so the series is exported)
        self._write = file.write_value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount
        self._write(self.key, self.value, 0.0)


class FileHistogram:
    """A histogram's sum and (non-cumulative) buckets, as prometheus_client's Histogram stores them."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: list[float], buckets: list[FileValue], total: FileValue):
        self.bounds = bounds
        self.buckets = buckets
        self.sum = total

    def observe(self, amount: float) -> None:
        self.sum.inc(amount)
        self.buckets[bisect.bisect_left(self.bounds, amount)].inc()  # first bucket with amount <= bound


class HotValueFile:
    """This process's counters and histograms of the request path, in two files of the multiprocess folder.

    Same format as prometheus_client's (``MmapedDict`` entries keyed by ``mmap_key``); named
    ``counter_<pid>-requests.db`` and ``histogram_<pid>-requests.db``, beside its own
    ``counter_<pid>.db``, so the collector sums them like any other process's values. A value
    keeps its running total in Python, so there is exactly one ``FileValue`` per entry: asking
    twice for the same series gives the same writer. Open it in the process that writes it, after
    the fork. Not thread safe.
    """

    def __init__(self, folder: str, pid: int):
        # prometheus_client in functions only, as in app/telemetry/metrics.py: importing it fixes the mode
        from prometheus_client.mmap_dict import MmapedDict

        self.counters = MmapedDict(os.path.join(folder, f"counter_{pid}-requests.db"))
        self.histograms = MmapedDict(os.path.join(folder, f"histogram_{pid}-requests.db"))
        self._values: dict[str, FileValue] = {}
        self._histograms: dict[tuple, FileHistogram] = {}

    def counter(self, family: Family, values: tuple[str, ...]) -> Callable[..., None]:
        from prometheus_client.mmap_dict import mmap_key

        metric_name = family.name.removesuffix("_total")
        return self._value(self.counters, mmap_key(metric_name, family.name, family.labels, values,
                                                   family.documentation)).inc

    def histogram(self, family: Family, values: tuple[str, ...]) -> Callable[[float], None]:
        histogram = self._histograms.get((family, values))
        if histogram is None:
            histogram = self._histograms[(family, values)] = self._new_histogram(family, values)
        return histogram.observe

    def _new_histogram(self, family: Family, values: tuple[str, ...]) -> FileHistogram:
        from prometheus_client.mmap_dict import mmap_key
        from prometheus_client.utils import floatToGoString

        bounds = [*LATENCY_BUCKETS, float("inf")]
        labels = (*family.labels, "le")
        buckets = [self._value(self.histograms, mmap_key(family.name, family.name + "_bucket", labels,
                                                         (*values, floatToGoString(bound)), family.documentation))
                   for bound in bounds]
        total = self._value(self.histograms, mmap_key(family.name, family.name + "_sum", family.labels, values,
                                                      family.documentation))
        return FileHistogram(bounds, buckets, total)

    def _value(self, file: Any, key: str) -> FileValue:
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = FileValue(file, key)
        return value


class RegistryWriters:
    """Single-process mode: the writers are prometheus_client's own children."""

    def __init__(self, metrics: SiraMetrics):
        self.metrics = metrics

    def counter(self, family: Family, values: tuple[str, ...]) -> Callable[..., None]:
        return self.metrics.family(family).labels(*values).inc

    def histogram(self, family: Family, values: tuple[str, ...]) -> Callable[[float], None]:
        return self.metrics.family(family).labels(*values).observe


_hot_file: tuple[int, HotValueFile] | None = None


def value_writers(metrics: SiraMetrics) -> HotValueFile | RegistryWriters:
    """This process's hot value file in multiprocess mode (one per process), else registry children."""
    global _hot_file
    folder = multiprocess_dir()
    if folder is None:
        return RegistryWriters(metrics)
    pid = os.getpid()
    if _hot_file is None or _hot_file[0] != pid:
        _hot_file = (pid, HotValueFile(folder, pid))
    return _hot_file[1]


# -- counting ---------------------------------------------------------------------------------------

def _status_by_code() -> dict[str, str]:
    """error_code -> HTTP status, from the error classes of app.errors (batch items carry only the code)."""
    table, todo = {}, list(ApiError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == "app.errors":
            table[cls.code] = str(cls.status)
    return table


STATUS_BY_CODE = _status_by_code()


class InferenceMetrics:
    """What the request path counts, with each label set's writers kept after their first use.

    The prediction cache counts hits and misses in plain per-process integers (app/scoring/cache.py); they
    are mirrored into the counters after every request, at the cost of two integer comparisons.
    Not thread safe: one per worker, used from its event loop.
    """

    def __init__(self, metrics: SiraMetrics, models: Any, cache: Any = None):
        self.models = models  # app.scoring.models.ModelTable: which products this worker serves
        self.cache = cache
        self.writers = value_writers(metrics)
        self._outcomes: dict[str, dict[str, dict[str, tuple]]] = {}  # model_id -> role -> decision
        self._errors: dict[tuple, tuple] = {}
        self._kept = 0
        self._hits_seen = 0
        self._misses_seen = 0
        self._cache_hits = self.writers.counter(CACHE_HITS, (CACHE_TYPE,))
        self._cache_misses = self.writers.counter(CACHE_MISSES, (CACHE_TYPE,))

    def count_prediction(self, product: str, model_id: str, model_role: str, decision: str,
                         latency_s: float) -> None:
        """One answered prediction: its request counted, its latency observed."""
        try:
            count, observe = self._outcomes[model_id][model_role][decision]
        except KeyError:
            count, observe = self._outcome_writers(product, model_id, model_role, decision)
        count()
        observe(latency_s)
        cache = self.cache
        if cache is not None and (cache.hits != self._hits_seen or cache.misses != self._misses_seen):
            self.mirror_cache_counts()

    def count_error(self, product: str, model_id: str, model_role: str, error_type: str, status: str) -> None:
        """One request (or batch event) answered with an error."""
        key = (product, model_id, model_role, error_type, status)
        writers = self._errors.get(key)
        if writers is None:
            writers = self._error_writers(key)
        for count in writers:
            count()
        cache = self.cache
        if cache is not None and (cache.hits != self._hits_seen or cache.misses != self._misses_seen):
            self.mirror_cache_counts()

    def start_series_of(self, model: Any) -> None:
        """Create a served model's series at 0, so that dashboards and increase() see them from the start."""
        for decision in DECISIONS:
            self._outcome_writers(model.product, model.model_id, model.role, decision)
        for error_type in MODEL_ERROR_TYPES:
            self.writers.counter(PREDICTION_ERRORS, (model.product, model.model_id, error_type))

    def product_label(self, product: object) -> str:
        """The product as a label: one this worker serves, else 'unknown' (clients cannot add series)."""
        if type(product) is str and product in self.models.expected_products:
            return product
        return UNKNOWN

    def mirror_cache_counts(self) -> None:
        cache = self.cache
        hits, misses = cache.hits, cache.misses
        if hits > self._hits_seen:
            self._cache_hits(hits - self._hits_seen)
        if misses > self._misses_seen:
            self._cache_misses(misses - self._misses_seen)
        self._hits_seen, self._misses_seen = hits, misses

    def _outcome_writers(self, product: str, model_id: str, model_role: str, decision: str) -> tuple:
        self._make_room()
        writers = (self.writers.counter(REQUESTS, (product, model_id, model_role, decision, OK_STATUS)),
                   self.writers.histogram(LATENCY, (product, model_id, model_role)))
        self._outcomes.setdefault(model_id, {}).setdefault(model_role, {})[decision] = writers
        self._kept += 1
        return writers

    def _error_writers(self, key: tuple) -> tuple:
        self._make_room()
        product, model_id, model_role, error_type, status = key
        writers = (self.writers.counter(REQUESTS, (product, model_id, model_role, "", status)),
                   self.writers.counter(PREDICTION_ERRORS, (product, model_id, error_type)))
        self._errors[key] = writers
        self._kept += 1
        return writers

    def _make_room(self) -> None:
        if self._kept >= MAX_CACHED_LABEL_SETS:
            self._outcomes.clear()
            self._errors.clear()
            self._kept = 0


def start_inference_metrics(metrics: SiraMetrics, models: Any, cache: Any = None) -> InferenceMetrics:
    """An HTTP worker's startup (create_app): its gauges set, its counters at 0, and the request path's writers.

    ``models`` is the worker's model table (app/scoring/models.py); each production model's series start at 0.
    """
    start_worker_metrics(metrics, models.expected_products, len(models.production), models.generation())
    inference = InferenceMetrics(metrics, models, cache)
    for model in models.production.values():
        inference.start_series_of(model)
    return inference


class InferenceMetricsMiddleware:
    """Counts every POST /v1/infer, and every event of POST /v1/infer/batch, once its answer is ready.

    A middleware rather than code in the resources, so that a request refused before its resource
    ran (401, 403, 415, 413) is counted like any other. The single-event resource names the model
    it chose in `req.context.model`; `render_error` leaves the error code in `req.context.error_code`.
    """

    def __init__(self, metrics: InferenceMetrics):
        self.metrics = metrics
        self.warned = False

    async def process_response(self, req, resp, resource, req_succeeded):
        if req.method != "POST":
            return
        route = req.uri_template
        try:
            if route == INFER_ROUTE:
                self.count_single(req, resp, req_succeeded)
            elif route == BATCH_ROUTE:
                await self.count_batch(req, resp, req_succeeded)
        except (KeyError, TypeError, AttributeError) as exc:
            # An answer of a shape this code does not know: the answer must still leave (raising here
            # would turn it into a 500), and the gap in the counts is said once.
            if not self.warned:
                self.warned = True
                log.error("cannot count a %s answer in the metrics (%s: %s); the resource's answer changed shape?",
                          route, type(exc).__name__, exc)

    def count_single(self, req, resp, req_succeeded: bool) -> None:
        model = getattr(req.context, "model", None)
        if req_succeeded and model is not None:
            answer = resp.media
            self.metrics.count_prediction(model.product, model.model_id, model.role, answer["decision"],
                                          answer["latency_ms"] / 1000.0)
            return
        status = resp.status_code
        if model is None:
            self.metrics.count_error(UNKNOWN, "", "", error_code_of(req, status), str(status))
        else:
            self.metrics.count_error(model.product, model.model_id, model.role, error_code_of(req, status),
                                     str(status))

    async def count_batch(self, req, resp, req_succeeded: bool) -> None:
        if not req_succeeded:
            status = resp.status_code
            self.metrics.count_error(UNKNOWN, "", "", error_code_of(req, status), str(status))
            return
        events = (await req.get_media())["events"]  # parsed by the resource already: cached
        metrics = self.metrics
        for event, result in zip(events, resp.media["results"]):
            code = result.get("error_code")
            if code is None:
                metrics.count_prediction(event["product"], result["model_id"], result["model_role"],
                                         result["decision"], result["latency_ms"] / 1000.0)
            else:
                product = metrics.product_label(event.get("product") if type(event) is dict else None)
                metrics.count_error(product, "", "", code, STATUS_BY_CODE.get(code, "400"))


def error_code_of(req, status: int) -> str:
    code = getattr(req.context, "error_code", None)
    if code is None:
        code = CODE_BY_STATUS.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
    return code
