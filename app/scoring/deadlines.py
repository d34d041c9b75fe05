"""Stops a model run at its deadline, so that a worker whose request ran out of time is free at once.

A worker runs its models on the event loop's thread, one run at a time, and onnxruntime releases the
GIL while it runs. A run given a deadline (``arm``) gets the watchdog's ``RunOptions``; one watchdog
thread per worker sleeps until that deadline and then sets the options' ``terminate`` flag, which
onnxruntime checks between the graph's nodes (inside a Loop's body too), so the run returns with an
error right away. ``stopped(options)`` tells that error apart from a model that failed by itself.

Only runs with a deadline pay for it (a client's ``options.timeout_ms``, or a canary's budget):
1.5 us a run (``python -m bench.bench_run_deadlines``). A run of a single node is not interrupted
midway (the flag is read between nodes); its caller's after-run check still answers 504 rather than
a late score.

The thread starts on first use, in the worker (threads do not survive a fork).
"""

from __future__ import annotations

import math
import os
import threading
import time

import onnxruntime as ort

_SILENT = 4  # onnxruntime log severity: fatal only (a stopped run is not an error worth a log line)
perf_counter = time.perf_counter


class RunWatchdog:
    """Terminates the one current run of this process at its deadline (``perf_counter`` seconds).

    One ``RunOptions`` serves every run (its flag is reset at each arm), and the thread is woken
    only when a new deadline comes before the time it already sleeps until: with similar timeouts
    it wakes about once per timeout rather than once per run (measured: a deadline added 1.5 us to
    a run this way, 7.4 us with a wake per run).
    """

    def __init__(self):
        self._pid = 0
        self._condition = threading.Condition(threading.Lock())
        self._deadline: float | None = None
        self.stops = 0  # runs terminated by this watchdog, for tests and the bench

    def arm(self, deadline: float) -> ort.RunOptions:
        """The run options to pass to the run, terminated at ``deadline``; ``disarm`` once it returns."""
        if self._pid != os.getpid():
            self._start()
        options = self._options
        with self._condition:
            options.terminate = deadline <= perf_counter()  # already late: the run returns at once
            self._deadline = deadline
            if deadline < self._wake_at:
                self._condition.notify()
        return options

    def disarm(self) -> None:
        """The run has returned: no deadline is watched until the next arm."""
        with self._condition:
            self._deadline = None

    @staticmethod
    def stopped(options: ort.RunOptions | None) -> bool:
        """Whether the run given these options was terminated (ask before the next arm)."""
        return options is not None and options.terminate

    def _start(self) -> None:
        """This process' thread and state (a lock or thread from before a fork is not ours)."""
        self._pid = os.getpid()
        self._condition = threading.Condition(threading.Lock())
        self._deadline = None
        self._options = ort.RunOptions()
        self._options.log_severity_level = _SILENT
        # onnxruntime's Python wrapper looks this entry up on every run with options, and a missing
        # one raises and catches a RuntimeError inside: 30 us a run. "0" is its default (no graph capture).
        self._options.add_run_config_entry("gpu_graph_id", "0")
        self._wake_at = math.inf
        threading.Thread(target=self._watch, name="sira-run-watchdog", daemon=True).start()

    def _watch(self) -> None:
        condition = self._condition
        with condition:
            while True:
                deadline = self._deadline
                if deadline is None:
                    self._wake_at = math.inf
                    condition.wait()
                    continue
                remaining = deadline - perf_counter()
                if remaining > 0:
                    self._wake_at = deadline
                    condition.wait(remaining)  # a newer deadline may be there when it wakes: look again
                    continue
                self._options.terminate = True
                self.stops += 1
                self._deadline = None


WATCHDOG = RunWatchdog()
