"""Memory of N workers serving one model: plain sessions versus weights shared through a mapped file.

Builds a dense model of about 200 MB of float32 weights (a few large MatMul layers, with the onnx
helper), then starts N separate processes (fresh interpreters, as gunicorn's workers are separate
processes) that each open it the way a worker does and score one row, and sums their PSS from
/proc/PID/smaps_rollup (shared pages count 1/N in each process). Also measures a process with
onnxruntime imported and no model (the floor each worker pays anyway), and the demo tree ensemble
(which cannot share: ORT rebuilds trees into private memory), plain and through ORT format.

    python -m bench.bench_memory                   # 1, 2 and 4 workers, ~200 MB model
    python -m bench.bench_memory --workers 1 2 4 8 --hidden 4096 --layers 3

Needs the onnx package (test extras) to build the model; serving does not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in each measured process: open the model like a worker, score a row, report, wait.
CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
route, path, features = sys.argv[1], sys.argv[2], int(sys.argv[3])
import onnxruntime as ort
from app.scoring.runner import make_session_options
keep = None
if route == "plain":
    session = ort.InferenceSession(path, make_session_options(), providers=["CPUExecutionProvider"])
elif route == "shared":
    from app.store.shared_weights import open_shared_session
    session, keep = open_shared_session(path, make_session_options())
elif route == "ort-bytes":
    options = make_session_options()
    options.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
    options.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
if route != "none":
    row = np.random.default_rng(0).random((1, features), dtype=np.float32)
    session.run(None, {{session.get_inputs()[0].name: row}})
print("ready", flush=True)
sys.stdin.read()
"""


def convert_to_ort_format(onnx_path: str, ort_path: str) -> None:
    """ORT format of a model (what use_ort_model_bytes_directly reads), in a separate process."""
    code = ("import onnxruntime as ort, sys\n"
            "o = ort.SessionOptions(); o.optimized_model_filepath = sys.argv[2]\n"
            "o.add_session_config_entry('session.save_model_format', 'ORT')\n"
            "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
            "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n")
    subprocess.run([sys.executable, "-c", code, onnx_path, ort_path], check=True)


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line for pid {pid}")


def measure(route: str, path: str, features: int, workers: int) -> tuple[float, float]:
    """(total PSS in MiB, seconds to load) of `workers` processes holding the model at once."""
    code = CHILD.format(repo=REPO)
    started = time.perf_counter()
    children = [subprocess.Popen([sys.executable, "-c", code, route, path, str(features)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(workers)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{route} worker failed (exit {child.wait()})")
        loaded_s = time.perf_counter() - started
        return sum(pss_kib(child.pid) for child in children) / 1024, loaded_s
    finally:
        for child in children:
            child.stdin.close()
            child.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4, help="hidden layers (the first is small)")
    parser.add_argument("--features", type=int, default=13)
    args = parser.parse_args()

    from app.store.shared_weights import split_model
    from tests.fixtures.models import build_dense_model
    from workers.bootstrap import demo_files

    with tempfile.TemporaryDirectory(prefix="sira-bench-memory-") as folder:
        dense = os.path.join(folder, "dense.onnx")
        weight_bytes = build_dense_model(dense, args.features, args.hidden, args.layers)
        graph = split_model(dense)
        demo, spec = demo_files()
        demo_ort = os.path.join(folder, "demo.ort")
        convert_to_ort_format(demo, demo_ort)
        model_mib = weight_bytes / 2**20
        print(f"dense model: {model_mib:.0f} MiB of weights, file {os.path.getsize(dense) / 2**20:.0f} MiB; "
              f"demo trees: {os.path.getsize(demo) // 1024} KiB; cores {os.cpu_count()}; "
              f"python {sys.version.split()[0]}\n")
        # The floor: N processes with onnxruntime imported and no model (shared libraries count 1/N).
        floors = {workers: measure("none", "", 0, workers)[0] for workers in args.workers}
        print("| model | route | workers | total PSS MiB | floor MiB (no model) | model cost MiB "
              "| cost / model size | load s |")
        print("|---|---|---|---|---|---|---|---|")
        runs = [("dense", "plain", dense, args.features), ("dense", "shared", graph, args.features),
                ("demo trees", "plain", demo, len(spec["features"])),
                ("demo trees", "ort-bytes", demo_ort, len(spec["features"]))]
        for model, route, path, features in runs:
            for workers in args.workers:
                total, load_s = measure(route, path, features, workers)
                cost = total - floors[workers]
                ratio = f"{cost / model_mib:.2f}" if model == "dense" else f"{cost / workers:.1f} per worker"
                print(f"| {model} | {route} | {workers} | {total:.0f} | {floors[workers]:.0f} | "
                      f"{cost:.0f} | {ratio} | {load_s:.2f} |")

if __name__ == "__main__":
    main()
