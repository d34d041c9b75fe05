"""app/scoring/deadlines.py on a model that never finishes by itself: only the watchdog's stop returns it."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from app.scoring.deadlines import RunWatchdog
from app.scoring.features import FeatureSpec
from app.scoring.runner import ModelRunner
from app.scoring.runs import RunStopped, run_model, run_model_rows
from tests.fixtures.models import build_dense_model, build_hanging_model, demo_spec

SPEC = FeatureSpec.from_dict(demo_spec())


@pytest.fixture(scope="module")
def hanging(tmp_path_factory) -> ModelRunner:
    path = str(tmp_path_factory.mktemp("hanging") / "hanging.onnx")
    build_hanging_model(path, SPEC.baseline_row().tolist())
    return ModelRunner(path, SPEC)


class Served:
    """What run_model needs of a serving model."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner


def off_baseline() -> np.ndarray:
    row = SPEC.baseline_row().copy()
    row[0] += 1.0
    return row


def test_a_run_past_its_deadline_is_stopped_and_told_apart(hanging):
    watchdog = RunWatchdog()
    options = watchdog.arm(time.perf_counter() + 0.05)
    with pytest.raises(Exception, match="terminate"):
        hanging.score_row(off_baseline(), options)
    watchdog.disarm()
    assert watchdog.stopped(options) and watchdog.stops == 1


def test_the_next_run_is_not_stopped_by_an_old_deadline(hanging):
    watchdog = RunWatchdog()
    options = watchdog.arm(time.perf_counter() + 0.05)
    score = hanging.score_row(SPEC.baseline_row(), options)  # the baseline: no loop at all
    watchdog.disarm()
    time.sleep(0.15)  # past the deadline of the disarmed run
    assert 0.0 <= score <= 1.0 and not watchdog.stopped(options) and watchdog.stops == 0
    later = watchdog.arm(time.perf_counter() + 10)
    assert 0.0 <= hanging.score_row(SPEC.baseline_row(), later) <= 1.0
    watchdog.disarm()
    assert not watchdog.stopped(later)


def test_a_deadline_already_passed_stops_the_run_before_it_starts(hanging):
    watchdog = RunWatchdog()
    options = watchdog.arm(time.perf_counter() - 1)
    assert watchdog.stopped(options)
    with pytest.raises(Exception, match="terminate"):
        hanging.score_row(SPEC.baseline_row(), options)


def test_run_model_raises_run_stopped_for_one_row_an_explanation_and_a_batch(hanging):
    model = Served(hanging)
    with pytest.raises(RunStopped):
        run_model(model, off_baseline(), False, time.perf_counter() + 0.05)
    with pytest.raises(RunStopped):
        run_model(model, off_baseline(), True, time.perf_counter() + 0.05)
    with pytest.raises(RunStopped):
        run_model_rows(model, np.stack([off_baseline(), SPEC.baseline_row()]), False, time.perf_counter() + 0.05)


def test_without_a_deadline_nothing_is_armed(tmp_path):
    path = str(tmp_path / "dense.onnx")
    build_dense_model(path, hidden=16)
    model = Served(ModelRunner(path, SPEC))
    score, _ = run_model(model, SPEC.baseline_row(), False)
    assert 0.0 <= score <= 1.0


def test_a_forked_worker_gets_its_own_watchdog_thread(hanging):
    watchdog = RunWatchdog()
    watchdog.disarm()
    options = watchdog.arm(time.perf_counter() + 5)  # the thread starts here, in this process
    hanging.score_row(SPEC.baseline_row(), options)
    watchdog.disarm()
    pid = os.fork()
    if pid == 0:  # a worker forked after the watchdog started: no thread came with it
        code = 1
        try:
            child = watchdog.arm(time.perf_counter() + 0.05)
            try:
                hanging.score_row(off_baseline(), child)
            except Exception:
                code = 0 if watchdog.stopped(child) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:  # its run was never stopped
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked process' run was not stopped at its deadline")
    assert os.waitstatus_to_exitcode(done[1]) == 0
