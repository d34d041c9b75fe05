"""The master's part of the metrics: the multiprocess folder, and forgetting the gauges of dead processes.

Every process of a `sira serve` writes its metric values to its own files in one folder
(app/metrics.py explains the scheme). The master empties that folder and names it in
PROMETHEUS_MULTIPROC_DIR before it forks anything, so every child inherits it; when a worker or a
sidecar dies, its files of live gauges are removed (counters stay: they are what makes a total
survive a restart). prometheus_client is imported here only after the variable is set.
"""

from __future__ import annotations

import os
import sys

from app.metrics import MULTIPROC_ENV
from workers.paths import data_path

METRICS_DIR = "metrics"


def prepare_multiprocess_dir(data_dir: str) -> str:
    """Empty `<data dir>/metrics` and point PROMETHEUS_MULTIPROC_DIR at it; before anything forks."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set: "
                           "the workers' metrics would not add up")
    path = data_path(data_dir, METRICS_DIR)
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):  # values of an earlier run: counters restart with the server
            os.unlink(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    return path


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a process that exited (its counters keep counting in the totals)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not pid:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


def mark_worker_dead(server, worker) -> None:
    """gunicorn child_exit hook, in the master, after a worker exited (however it died)."""
    mark_process_dead(worker.pid)
