"""The ONNX scorer: one onnxruntime session per model, tuned for one row at a time.

A `ModelRunner` is built once per model and worker (never per request), checks that the model
and its feature spec agree, and scores rows through I/O bindings over preallocated buffers, so a
request allocates no input or output tensors. Explanations are occlusion against the spec's
baseline, computed in the same single `run` as the score.

Not thread safe: the runner reuses its buffers on every call. Each worker process owns its
runners and calls them from its single-threaded asyncio loop, inline (a run is microseconds).
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from app.scoring.features import FeatureSpec
from app.store.shared_weights import MappedWeights, SharedFormError, is_shared_form, open_shared_session

# What onnxruntime raises for a file it cannot load; they derive from Exception directly.
_ORT_LOAD_ERRORS = (
    OSError, _ort_state.Fail, _ort_state.InvalidProtobuf, _ort_state.NoSuchFile,
    _ort_state.InvalidArgument, _ort_state.InvalidGraph, _ort_state.NotImplemented,
    _ort_state.RuntimeException,
)
_QUIET = 3  # onnxruntime log severity: errors and fatal only


class ModelLoadError(ValueError):
    """A model file that cannot serve: unreadable, not ONNX, or failing its smoke check."""


class ModelSpecMismatch(ModelLoadError):
    """The model's input or output does not match its feature spec."""


LOGIT_EPSILON = 1e-7  # scores are float32 probabilities: 0 and 1 are reachable


def logit(probability: float) -> float:
    """Log-odds of a probability, clipped away from 0 and 1 so it stays finite."""
    p = min(max(probability, LOGIT_EPSILON), 1.0 - LOGIT_EPSILON)
    return math.log(p / (1.0 - p))


def make_session_options() -> ort.SessionOptions:
    """Options for single-row latency: one thread, no spinning, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core between requests; with one thread there is nothing to wake.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = _QUIET
    return options


class ModelRunner:
    """Scores feature rows with one ONNX model and explains them; one per model per worker."""

    def __init__(self, model_path: str | os.PathLike, spec: FeatureSpec):
        self.model_path = os.fspath(model_path)
        self.spec = spec
        # A shared-form graph's weights are pages of a mapped file: they live as long as the runner.
        self._session, self._shared_weights = _open_session(self.model_path)
        n_features = len(spec)
        n_classes = _check_model_matches_spec(self._session, spec, self.model_path)
        self._positive = spec.positive_class_index
        self._names = spec.names
        self._baseline = spec.baseline_row()
        self._baseline_values = self._baseline.tolist()
        # Row 0 is the event; rows 1..k are the event with one feature at its baseline.
        self._batch = np.zeros((n_features + 1, n_features), dtype=np.float32)
        self._probabilities = np.zeros((n_features + 1, n_classes), dtype=np.float32)
        # Writing single cells through a flat memoryview costs a fifth of numpy fancy indexing.
        self._cells = memoryview(self._batch).cast("B").cast("f")
        self._bindings = [None] + [self._bind(rows) for rows in range(1, n_features + 2)]
        self.input_row = self._batch[0]

    def _bind(self, rows: int) -> ort.IOBinding:
        """A binding of the first `rows` rows of the preallocated input and output buffers."""
        binding = self._session.io_binding()
        binding.bind_input(self.spec.input_name, "cpu", 0, np.float32,
                           [rows, self._batch.shape[1]], self._batch.ctypes.data)
        binding.bind_output(self.spec.output_name, "cpu", 0, np.float32,
                            [rows, self._probabilities.shape[1]],
                            self._probabilities.ctypes.data)
        return binding

    def score_row(self, row: np.ndarray, run_options: ort.RunOptions | None = None) -> float:
        """The positive-class probability of one row (build it into `input_row` to skip a copy).

        ``run_options``: a deadline's (app/scoring/deadlines.py), for every method that runs the model.
        """
        if row is not self.input_row:
            self.input_row[:] = row
        self._session.run_with_iobinding(self._bindings[1], run_options)
        return float(self._probabilities[0, self._positive])

    def score_rows(self, rows: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Positive-class probabilities of a [n, F] batch, in one run."""
        probabilities = self._session.run([self.spec.output_name],
                                          {self.spec.input_name: self._as_batch(rows)}, run_options)[0]
        return np.ascontiguousarray(probabilities[:, self._positive])

    def _as_batch(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self._names):
            raise ValueError(f"expected rows of shape [n, {len(self._names)}], got {rows.shape}")
        return rows

    def explain_row(self, row: np.ndarray, top_k: int = 5,
                    run_options: ort.RunOptions | None = None) -> tuple[float, list[dict]]:
        """The score and the top_k signed occlusion attributions, from one batched run.

        Attribution of feature i = logit(score(event)) - logit(score(event with feature i at its
        baseline)), in log-odds, so a positive value pushes toward fraud. Log-odds rather than
        probabilities: near a score of 1.0 probability differences all round to 0.0000 and the
        explanation of a blocked payment said nothing. Features already at their baseline have
        exactly zero attribution and are not scored; zero attributions are listed only when all are.
        """
        batch, cells, n_features = self._batch, self._cells, len(self._names)
        if row is not self.input_row:
            batch[0] = row
        values = cells[:n_features].tolist()
        baseline = self._baseline_values
        changed = [i for i in range(n_features) if values[i] != baseline[i]]
        rows = len(changed) + 1
        batch[1:rows] = batch[0]
        for r, i in enumerate(changed, start=1):
            cells[r * n_features + i] = baseline[i]
        self._session.run_with_iobinding(self._bindings[rows], run_options)
        scores = self._probabilities[:rows, self._positive].tolist()
        log_odds = [logit(value) for value in scores]
        attributions = [(log_odds[0] - log_odds[r], i) for r, i in enumerate(changed, start=1)]
        return scores[0], self._top_attributions(attributions, top_k)

    def explain_rows(self, rows: np.ndarray, top_k: int = 5,
                     run_options: ort.RunOptions | None = None) -> tuple[np.ndarray, list[list[dict]]]:
        """explain_row for a [n, F] batch: scores and explanations from one run of all rows."""
        rows = self._as_batch(rows)
        changed = rows != self._baseline
        counts = changed.sum(axis=1)
        # Row i's block starts at starts[i]: the event, then one row per changed feature.
        starts = np.concatenate(([0], np.cumsum(counts + 1)[:-1]))
        before = np.concatenate(([0], np.cumsum(counts)[:-1]))
        grid = np.repeat(rows, counts + 1, axis=0)
        owner, feature = np.nonzero(changed)
        occluded = starts[owner] + 1 + np.arange(len(owner)) - before[owner]
        grid[occluded, feature] = self._baseline[feature]
        scores = self.score_rows(grid, run_options).astype(np.float64)
        event_scores = scores[starts]
        clipped = np.clip(scores, LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
        log_odds = np.log(clipped / (1.0 - clipped))
        values = (log_odds[starts[owner]] - log_odds[occluded]).tolist()
        pairs: list[list[tuple[float, int]]] = [[] for _ in range(len(rows))]
        for value, i, j in zip(values, owner.tolist(), feature.tolist()):
            pairs[i].append((value, j))
        return event_scores, [self._top_attributions(p, top_k) for p in pairs]

    def _top_attributions(self, attributions: list[tuple[float, int]], top_k: int) -> list[dict]:
        """The largest |attribution| first, ties in spec order; zeros only if nothing else."""
        nonzero = [a for a in attributions if a[0] != 0.0]
        if nonzero:
            nonzero.sort(key=lambda a: -abs(a[0]))
            return [{"feature": self._names[i], "importance": round(value, 4) + 0.0}
                    for value, i in nonzero[:top_k]]
        return [{"feature": name, "importance": 0.0} for name in self._names[:top_k]]

    def smoke_check(self) -> float:
        """Scores the baseline row; raises ModelLoadError unless it is a probability in [0, 1]."""
        score = self.score_row(self._baseline)
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise ModelLoadError(f"model {self.model_path}: smoke check scored the baseline row "
                                 f"{score!r}, not a probability in [0, 1]")
        return score


def _open_session(model_path: str) -> tuple[ort.InferenceSession, MappedWeights | None]:
    """The session with our options, or a ModelLoadError that says which file and why.

    A shared-form graph (app/store/shared_weights.py) gets its weights from the mapped weights file, so
    every worker holds the same pages; any other model loads the plain way.
    """
    try:
        if is_shared_form(model_path):
            return open_shared_session(model_path, make_session_options())
        return ort.InferenceSession(model_path, sess_options=make_session_options(),
                                    providers=["CPUExecutionProvider"]), None
    except _ORT_LOAD_ERRORS + (SharedFormError,) as exc:
        raise ModelLoadError(f"cannot load ONNX model {model_path}: {exc}") from exc


def _check_model_matches_spec(session: ort.InferenceSession, spec: FeatureSpec,
                              model_path: str) -> int:
    """Raises ModelSpecMismatch unless input and output agree with the spec; returns n_classes."""
    where = f"model {model_path} and spec {spec.name!r}"
    inputs = {i.name: i for i in session.get_inputs()}
    if list(inputs) != [spec.input_name]:
        raise ModelSpecMismatch(f"{where}: the model's inputs are {list(inputs)}, the spec "
                                f"expects exactly one named {spec.input_name!r}")
    model_input = inputs[spec.input_name]
    if model_input.type != "tensor(float)":
        raise ModelSpecMismatch(f"{where}: input {spec.input_name!r} is {model_input.type}, "
                                f"expected tensor(float)")
    shape = model_input.shape
    if len(shape) != 2 or shape[1] != len(spec):
        raise ModelSpecMismatch(f"{where}: input shape {shape}, the spec has {len(spec)} "
                                f"features (expected [batch, {len(spec)}])")
    outputs = {o.name: o for o in session.get_outputs()}
    if spec.output_name not in outputs:
        raise ModelSpecMismatch(f"{where}: no output {spec.output_name!r} "
                                f"(the model has {sorted(outputs)})")
    if outputs[spec.output_name].type != "tensor(float)":
        raise ModelSpecMismatch(f"{where}: output {spec.output_name!r} is "
                                f"{outputs[spec.output_name].type}, expected tensor(float) "
                                f"(was ZipMap left on?)")
    out_shape = outputs[spec.output_name].shape
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise ModelSpecMismatch(f"{where}: output {spec.output_name!r} has shape {out_shape}, "
                                f"expected [batch, n_classes]")
    if not spec.positive_class_index < out_shape[1]:
        raise ModelSpecMismatch(f"{where}: positive_class_index {spec.positive_class_index} "
                                f"but the output has {out_shape[1]} classes")
    return out_shape[1]
