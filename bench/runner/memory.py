"""Memory: total and per-worker PSS of 1, 2 and 4 worker processes holding the demo model or a large
dense model (built here), the plain way and with shared weights, against processes with no model.

The measurement itself is bench/bench_memory.py's (`measure`: fresh interpreters that open the model
as a worker does, PSS summed from /proc/PID/smaps_rollup); this turns it into the report's rows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def pss_mib(pid: int) -> float:
    """PSS of one process in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_memory(worker_counts: list[int], hidden: int, layers: int, features: int = 13,
               say: Callable[[str], None] = print) -> dict:
    from app.store.shared_weights import split_model
    from bench.bench_memory import measure
    from tests.fixtures.models import build_dense_model
    from workers.bootstrap import demo_files

    rows = []
    with tempfile.TemporaryDirectory(prefix="sira-bench-memory-") as folder:
        dense = os.path.join(folder, "dense.onnx")
        weight_mib = build_dense_model(dense, features, hidden, layers) / 2**20
        shared_graph = split_model(dense)
        demo, spec = demo_files()
        runs = [("dense", "plain", dense, features), ("dense", "shared", shared_graph, features),
                ("demo trees", "plain", demo, len(spec["features"]))]
        if shared_graph is None:  # no initializer large enough to share: SIRA serves it the plain way
            runs.pop(1)
        floors = {}
        for workers in worker_counts:
            say(f"  memory: {workers} process(es) with no model")
            floors[workers] = measure("none", "", 0, workers)[0]
        for model, route, path, width in runs:
            for workers in worker_counts:
                say(f"  memory: {model}, {route}, {workers} worker(s)")
                total, load_s = measure(route, path, width, workers)
                rows.append({"model": model, "route": route, "workers": workers, "total_pss_mib": round(total, 1),
                             "per_worker_mib": round(total / workers, 1), "floor_mib": round(floors[workers], 1),
                             "model_cost_mib": round(total - floors[workers], 1), "load_s": round(load_s, 2)})
    return {"dense_weights_mib": round(weight_mib, 1), "hidden": hidden, "layers": layers, "rows": rows}
