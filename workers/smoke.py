"""Load one model, check it against its spec and score a smoke row, in a process of its own.

    python -m workers.smoke MODEL_PATH SPEC_PATH
    python -m workers.smoke --wait-for-job     # imports first, then reads {"model", "spec"} on stdin

The supervisor runs this for every model before it goes live (keeping one process waiting, its
imports done, for the next model). It prints one JSON line:
``{"ok": true, "path": PATH_TO_SERVE, "shared": bool, "weights_bytes": N, "score": S}`` or
``{"ok": false, "reason": REASON, "error": MESSAGE}``, and exits 0 either way; any other ending
(a crash inside onnxruntime, a kill) is the supervisor's to name.

It also writes the model's shared form (app/store/shared_weights.py) beside it and serves that only when
it loads, passes the smoke check and scores the same rows as the original within ``TOLERANCE``.

Why a process of its own: onnxruntime must not be imported in the master or the supervisor (a
process forked from one that loaded it hangs at exit, see app/config.py), and a model that crashes
onnxruntime or eats the memory takes down only this process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from app.scoring.features import FeatureSpec
from app.scoring.runner import ModelLoadError, ModelRunner, ModelSpecMismatch
from app.store.shared_weights import SharedFormError, split_model, weights_path_for

TOLERANCE = 1e-4  # the shared form runs without prepacking: other kernels, last-bit differences
SELF_TIMEOUT_S = 600  # an orphan (its supervisor killed) never lingers longer than this
EXIT_OK, EXIT_USAGE = 0, 2
WAIT_FLAG = "--wait-for-job"


class SmokeFailed(Exception):
    """The model must not go live; `reason` labels it for the error counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_model(model_path: str, spec_path: str) -> dict:
    """Load, check and smoke-score the model; returns what to serve, or raises SmokeFailed."""
    try:
        with open(spec_path, encoding="utf-8") as handle:
            spec = FeatureSpec.from_dict(json.load(handle))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SmokeFailed("invalid_spec", f"feature spec {spec_path}: {exc}") from None
    try:
        runner = ModelRunner(model_path, spec)
    except ModelSpecMismatch as exc:
        raise SmokeFailed("spec_mismatch", str(exc)) from None
    except ModelLoadError as exc:
        raise SmokeFailed("invalid_model", str(exc)) from None
    try:
        score = runner.smoke_check()
    except ModelLoadError as exc:
        raise SmokeFailed("smoke_failed", str(exc)) from None
    shared = shared_form(model_path, spec, runner)
    if shared is None:
        return {"ok": True, "path": model_path, "shared": False, "weights_bytes": 0, "score": score}
    path, weights_bytes = shared
    return {"ok": True, "path": path, "shared": True, "weights_bytes": weights_bytes, "score": score}


def shared_form(model_path: str, spec, original) -> tuple[str, int] | None:
    """(graph path, size of its weights file) when the shared form exists and agrees with the original, else None."""
    try:
        graph_path = split_model(model_path)
        if graph_path is None:
            return None  # nothing large enough to share (tree ensembles)
        shared = ModelRunner(graph_path, spec)
        shared.smoke_check()
    except (SharedFormError, ModelLoadError, OSError) as exc:
        print(f"shared form of {model_path} unusable, serving it the plain way: {exc}", file=sys.stderr)
        return None
    rows = check_rows(spec)
    difference = float(np.max(np.abs(original.score_rows(rows) - shared.score_rows(rows))))
    if not difference <= TOLERANCE:
        print(f"shared form of {model_path} scores differ by {difference}: serving it the plain way",
              file=sys.stderr)
        return None
    return graph_path, os.path.getsize(weights_path_for(graph_path))


def check_rows(spec) -> np.ndarray:
    """The baseline row and a few rows around it, the same for both forms of the model."""
    baseline = spec.baseline_row()
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.5, 1.5, size=(4, len(baseline))).astype(np.float32)
    return np.vstack([baseline, baseline * noise]).astype(np.float32)


def main(argv: list[str]) -> int:
    if argv == [WAIT_FLAG]:
        job = wait_for_job()
        if job is None:
            return EXIT_OK  # the supervisor is gone or stopping: nothing to check
        model_path, spec_path = job
    elif len(argv) == 2:
        model_path, spec_path = argv
    else:
        print(f"usage: python -m workers.smoke MODEL_PATH SPEC_PATH | {WAIT_FLAG}", file=sys.stderr)
        return EXIT_USAGE
    signal.alarm(SELF_TIMEOUT_S)
    try:
        result = check_model(model_path, spec_path)
    except SmokeFailed as exc:
        result = {"ok": False, "reason": exc.reason, "error": str(exc)}
    print(json.dumps(result), flush=True)
    return EXIT_OK


def wait_for_job() -> tuple[str, str] | None:
    """Wait for one job on stdin: {"model", "spec"}; onnxruntime and the scorer are imported already.

    The supervisor keeps one such process ready, so a promotion does not wait for the imports
    (about half a second). End of input (the supervisor stopped or died) returns None.
    """
    line = sys.stdin.readline()
    if not line.strip():
        return None
    job = json.loads(line)
    return job["model"], job["spec"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
