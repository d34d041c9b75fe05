"""The master's part of the metrics: the multiprocess folder, and forgetting the gauges of dead processes.

Every process of a `sira serve` writes its metric values to its own files in one folder
(app/telemetry/metrics.py explains the scheme). The master empties that folder and names it in
PROMETHEUS_MULTIPROC_DIR before it forks anything, so every child inherits it; when a worker or a
sidecar dies, its files of live gauges are removed (counters stay: they are what makes a total
survive a restart). prometheus_client is imported here only after the variable is set.

The folder lives in /dev/shm (``sira-<data dir key>-metrics``), not in the data dir: prometheus_client
maps its files and grows them sparse, and a page first touched on a full filesystem kills the process
with SIGBUS. The data dir is where the prediction spool fills up, so there every worker would die and
be restarted into the same death; /dev/shm holds only the preallocated segments beside it.
"""

from __future__ import annotations

import os
import shutil
import sys

from app.telemetry.metrics import MULTIPROC_ENV
from shm.segment import DEFAULT_DIRECTORY, NAME_PREFIX
from workers.instance import data_dir_key


def metrics_dir(data_dir: str, directory: str = DEFAULT_DIRECTORY) -> str:
    """The metrics folder of the instances of ``data_dir``."""
    return os.path.join(directory, f"{NAME_PREFIX}{data_dir_key(data_dir)}-metrics")


def prepare_multiprocess_dir(data_dir: str, directory: str = DEFAULT_DIRECTORY) -> str:
    """Empty the metrics folder and point PROMETHEUS_MULTIPROC_DIR at it; before anything forks.

    Call it with the data dir lock held: the folder may hold the values of a dead predecessor.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set: "
                           "the workers' metrics would not add up")
    path = metrics_dir(data_dir, directory)
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):  # values of an earlier run: counters restart with the server
            os.unlink(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_multiprocess_dir(path: str) -> None:
    """At the master's exit: the folder goes with the instance (a successor starts it empty anyway)."""
    shutil.rmtree(path, ignore_errors=True)


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
