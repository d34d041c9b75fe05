"""What metrics and the access log cost a request.

    python -m bench.bench_metrics [--iterations N] [--skip-server] [--seconds 5] [--rounds 3]

Part 1, in a child interpreter in prometheus_client's multiprocess mode over a temporary folder (as
in a worker): what `InferenceMetrics` spends per answered request (one counter increment and one
histogram observation through its kept writers into the hot value file, plus the cache-counter
mirror) and per error; what the same counting costs through prometheus_client's own children (kept,
or looked up with `.labels(...)` on every request); for scale, a getpid() and one model run; and
what one /metrics scrape costs with the files of 1 and 16 processes.

Part 2 starts two real two-worker `sira serve` (embedded Postgres), one with SIRA_ACCESS_LOG=on and
one without, and loads them in turns with wrk (POST /v1/infer over keep-alive connections) and with
one sequential keep-alive client (latency of one request). It reports requests/s, and the CPU time
the server's processes spent per request (read from /proc), which other jobs on the machine disturb
far less than requests/s. The access log is written after the response is sent: this says what it
costs in CPU and whether one request waits for it.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JWT_SECRET = "bench-secret-0123456789abcdef-0123456789"


def per_call_ns(call, iterations: int, repeats: int = 5) -> float:
    """Best-of-`repeats` mean nanoseconds of call(), GC off."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(iterations):
                call()
            best = min(best, (time.perf_counter_ns() - start) / iterations)
    finally:
        gc.enable()
    return best


def in_process(iterations: int) -> None:
    """Part 1; runs in a child interpreter so that prometheus_client starts in multiprocess mode."""
    from app.telemetry.metrics import SiraMetrics, exposition
    from app.telemetry.request_metrics import InferenceMetrics

    metrics = SiraMetrics()
    model = SimpleNamespace(product="fraud_score", model_id="aa91be86-45aa-4f6b-9868-19e232bf92b5",
                            role="production")
    models = SimpleNamespace(expected_products=["fraud_score"], production={"fraud_score": model})
    cache = SimpleNamespace(hits=0, misses=0)
    inference = InferenceMetrics(metrics, models, cache)
    inference.start_series_of(model)
    product, model_id, role = model.product, model.model_id, model.role

    def cached_prediction():
        inference.count_prediction(product, model_id, role, "allow", 0.00042)

    def cached_prediction_with_cache_miss():
        cache.misses += 1
        inference.count_prediction(product, model_id, role, "allow", 0.00042)

    requests_child = metrics.requests.labels(product, model_id, role, "allow", "200")
    latency_child = metrics.latency.labels(product, model_id, role)

    def prometheus_client_children():
        requests_child.inc()
        latency_child.observe(0.00042)

    def prometheus_client_labels():
        metrics.requests.labels(product, model_id, role, "allow", "200").inc()
        metrics.latency.labels(product, model_id, role).observe(0.00042)

    def error():
        inference.count_error(product, model_id, role, "FEATURE_VALIDATION_FAILED", "400")

    rows = [
        ("answered request (InferenceMetrics)", cached_prediction),
        ("answered request + a cache miss mirrored", cached_prediction_with_cache_miss),
        ("error (InferenceMetrics)", error),
        ("same with prometheus_client children, kept", prometheus_client_children),
        ("same with prometheus_client .labels() each time", prometheus_client_labels),
    ]
    print(f"in-process, multiprocess mode, {iterations} calls, best of 5 (ns per call):")
    for label, call in rows:
        print(f"  {label:<50}{per_call_ns(call, iterations):>10.0f}")
    print("for scale, on this machine now:")
    print(f"  {'os.getpid()':<50}{per_call_ns(os.getpid, iterations):>10.0f}")
    score_row = demo_model_scorer()
    print(f"  {'one demo-model score (ONNX, one row)':<50}{per_call_ns(score_row, iterations // 20):>10.0f}")
    print(f"  {'one access log line (SIRA_ACCESS_LOG=on)':<50}{access_line_ns(iterations // 10):>10.0f}")
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    print(f"/metrics scrape (exposition) with the files of this process ({len(os.listdir(folder))} files): "
          f"{per_call_ns(lambda: exposition(None), 50, 3) / 1e6:.2f} ms")
    fake_processes(folder, 15)
    print(f"/metrics scrape with 16 processes' files ({len(os.listdir(folder))} files): "
          f"{per_call_ns(lambda: exposition(None), 20, 3) / 1e6:.2f} ms")


def access_line_ns(lines: int) -> float:
    """What gunicorn's call to our access log costs a worker, lines flushed every 16 (to /dev/null)."""
    import asyncio

    from gunicorn.config import Config

    from conf.logs import GunicornJsonLogger, configure_logging

    with open(os.devnull, "w") as sink:
        configure_logging("info", ["bench-secret-0123456789abcdef-0123456789"], stream=sink)
        config = Config()
        config.set("accesslog", "-")
        logger = GunicornJsonLogger(config)
        response = SimpleNamespace(status=200, sent=274, headers=[("content-type", "application/json"),
                                                                  ("x-request-id", "3f2a9c1e0b7d-42")])
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/infer", "QUERY_STRING": "",
                   "REMOTE_ADDR": "127.0.0.1", "HTTP_USER_AGENT": "wrk"}
        took = SimpleNamespace(seconds=0, microseconds=812)

        async def serve() -> float:
            start = time.perf_counter_ns()
            for index in range(lines):
                logger.access(response, None, environ, took)
                if index % 16 == 15:
                    await asyncio.sleep(0)  # the loop's iteration ends: the batch is written
            return (time.perf_counter_ns() - start) / lines

        return min(asyncio.run(serve()) for _ in range(3))


def demo_model_scorer():
    """score_row of the demo model on its baseline row: the cheapest useful work of a request."""
    from app.scoring.features import load_spec
    from app.scoring.runner import ModelRunner

    demo = os.path.join(REPO, "workers", "demo")
    runner = ModelRunner(os.path.join(demo, "fraud_score.onnx"), load_spec(os.path.join(demo, "fraud_score.spec.json")))
    row = runner.input_row
    row[:] = runner.spec.baseline_row()
    return lambda: runner.score_row(row)


def fake_processes(folder: str, count: int) -> None:
    """Copies of this process's files under other pids: what a scrape reads after restarts."""
    import shutil

    own = [name for name in os.listdir(folder) if name.endswith(f"_{os.getpid()}.db")]
    for index in range(count):
        for name in own:
            shutil.copy(os.path.join(folder, name),
                        os.path.join(folder, name.replace(f"_{os.getpid()}.db", f"_{900000 + index}.db")))


def run_in_process_part(iterations: int) -> None:
    with tempfile.TemporaryDirectory(prefix="sira-bench-metrics-") as folder:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=folder, PYTHONPATH=REPO)
        subprocess.run([sys.executable, "-c", f"from bench.bench_metrics import in_process; in_process({iterations})"],
                       env=env, cwd=REPO, check=True)


# -- part 2: the access log on a real server ---------------------------------------------------------

def start_server(data_dir: str, access_log: bool):
    from tests.fixtures.server import SiraServer, free_port, sira_env

    port = free_port()
    env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}", SIRA_WORKERS="2", JWT_SECRET=JWT_SECRET,
                   LOG_LEVEL="info", SIRA_ACCESS_LOG="on" if access_log else "off")
    return SiraServer(data_dir, env, port).start(timeout=180)


def sequential_latency_us(url: str, token: str, requests: int) -> float:
    """Median client round trip of one POST /v1/infer over one keep-alive connection."""
    import httpx

    body = {"event_id": "bench-1", "product": "fraud_score",
            "payload": {"amount": 150.5, "currency": "USD", "country": "US", "payment_method": "card"}}
    samples = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(50):
            client.post("/v1/infer", json=body)
        for _ in range(requests):
            start = time.perf_counter_ns()
            client.post("/v1/infer", json=body)
            samples.append((time.perf_counter_ns() - start) / 1000)
    return statistics.median(samples)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used (from /proc): robust to other load, unlike requests/s."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_server_part(seconds: int, rounds: int, connections: int) -> None:
    from app.auth.keys import mint_token
    from bench.worker_classes import run_wrk

    token = mint_token(role="sira_service", subject="bench", ttl_s=3600, secret=JWT_SECRET, kid="default")
    os.environ["SIRA_TOKEN"] = token  # read by bench/wrk/post_fixed.lua
    results = {flag: {"rps": [], "cpu_us": [], "p99": [], "seq": []} for flag in (False, True)}
    with tempfile.TemporaryDirectory(prefix="sira-bench-") as off_dir, \
            tempfile.TemporaryDirectory(prefix="sira-bench-") as on_dir:
        servers = {False: start_server(off_dir, False), True: start_server(on_dir, True)}
        try:
            for server in servers.values():
                run_wrk(server.url + "/v1/infer", 2, connections)  # warm-up
            for round_index in range(rounds):
                order = (False, True) if round_index % 2 == 0 else (True, False)  # neither always goes first
                for access_log in order:
                    server = servers[access_log]
                    children = server.worker_pids()  # HTTP workers and sidecars
                    cpu_before = cpu_seconds(children)
                    result = run_wrk(server.url + "/v1/infer", seconds, connections)
                    cpu = cpu_seconds(children) - cpu_before
                    results[access_log]["rps"].append(result["rps"])
                    results[access_log]["cpu_us"].append(cpu / result["requests"] * 1e6)
                    results[access_log]["p99"].append(result["p99_us"])
                    results[access_log]["seq"].append(sequential_latency_us(server.url, token, 1000))
        finally:
            for server in servers.values():
                server.stop()
    print(f"two servers side by side (2 workers each), wrk {connections} connections x {seconds}s, {rounds} rounds "
          "taking turns (medians); CPU: the server's processes' CPU time per request; one request: a sequential "
          "keep-alive client, 1000 requests")
    print(f"  {'SIRA_ACCESS_LOG':<16}{'requests/s':>12}{'CPU us/req':>12}{'p99 us':>10}{'one request us':>16}")
    for access_log in (False, True):
        r = results[access_log]
        print(f"  {'on' if access_log else 'off':<16}{statistics.median(r['rps']):>12.0f}"
              f"{statistics.median(r['cpu_us']):>12.0f}{statistics.median(r['p99']):>10.0f}"
              f"{statistics.median(r['seq']):>16.0f}   CPU by round: {' '.join(f'{x:.0f}' for x in r['cpu_us'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--skip-server", action="store_true", help="only the in-process part")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    run_in_process_part(args.iterations)
    if not args.skip_server:
        run_server_part(args.seconds, args.rounds, args.connections)


if __name__ == "__main__":
    main()
