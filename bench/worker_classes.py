"""Which gunicorn worker class serves the same Falcon app fastest? Side by side, in one run.

    python -m bench.worker_classes [--seconds 10] [--connections 32] [--workers 2] [--rounds 3]

Runs the bare Falcon scoring app (bench/peers/bare_falcon.py: demo model, explanation, no auth) on
gunicorn with each worker class in turn, loads it with wrk over keep-alive connections, and prints
requests/s and latency (median of the rounds). Server and wrk share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUA = os.path.join(REPO, "bench", "wrk", "post_fixed.lua")

CLASSES = {
    "asgi (uvloop, C parser)": ["-k", "asgi", "--asgi-loop", "uvloop", "--http-parser", "fast",
                                "bench.peers.bare_falcon:asgi_app"],
    "gthread (4 threads, keep-alive)": ["-k", "gthread", "--threads", "4", "--keep-alive", "5",
                                        "bench.peers.bare_falcon:wsgi_app"],
    "sync": ["-k", "sync", "bench.peers.bare_falcon:wsgi_app"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/infer", method="POST",
                                             data=b"{}", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def run_wrk(url: str, seconds: int, connections: int, threads: int = 2) -> dict:
    output = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                             "--latency", "-s", LUA, url], capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("JSON "))
    result = json.loads(line[5:])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def serve(args: list[str], workers: int, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
               "--log-level", "warning", *args]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True)


def measure(name: str, args: list[str], options: argparse.Namespace) -> dict:
    port = free_port()
    server = serve(args, options.workers, port)
    try:
        wait_until_listening(port)
        url = f"http://127.0.0.1:{port}/v1/infer"
        run_wrk(url, 2, options.connections)  # warm-up
        rounds = [run_wrk(url, options.seconds, options.connections) for _ in range(options.rounds)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    return {
        "worker_class": name,
        "rps_median": statistics.median(r["rps"] for r in rounds),
        "p50_ms_median": statistics.median(r["p50_us"] for r in rounds) / 1000,
        "p99_ms_median": statistics.median(r["p99_us"] for r in rounds) / 1000,
        "errors": sum(r["errors"] + r["non2xx"] for r in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args()
    results = [measure(name, args, options) for name, args in CLASSES.items()]
    print(f"{'worker class':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in results:
        print(f"{r['worker_class']:34} {r['rps_median']:9.0f} {r['p50_ms_median']:8.2f} "
              f"{r['p99_ms_median']:8.2f} {r['errors']:7d}")
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump({"options": vars(options), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
