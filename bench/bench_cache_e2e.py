"""The prediction cache end to end (hit against miss on a real server) and in the request path.

Run: ``python -m bench.bench_cache_e2e [--requests N] [--workers 2] [--database-url URL]``.

Part 1 starts a real ``sira serve`` (embedded Postgres unless --database-url) and sends, over one
keep-alive connection, interleaved in a shuffled order: hits (events stored beforehand), misses
(events never seen, so every one is scored and stored) and requests with ``enable_cache: false``
(the cost with no cache at all), each with and without an explanation. It prints the median and
p99 of the server-side ``latency_ms`` of the responses (request parsed, authorised, answered; the
response's serialisation and the socket are outside it) and of the client's round trip.

Part 2 times, in this process on the demo model, what the request path spends in the cache:
``PredictionCache`` (key + get + decode on a hit; key + get + encode + put on a miss) over the
shared-memory cache, a per-process LRU dict and Redis on 127.0.0.1:6379 (skipped unless the
``redis`` package is installed and a server answers; never a dependency of the server).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from app.auth.keys import mint_token
from app.config import ModelFile
from app.scoring.cache import VALUE_SIZE, PredictionCache
from app.scoring.models import ServingModel
from bench.bench_cache import LruTtlDict, redis_store
from shm.cache import ShmCache
from shm.segment import segment_name
from tests.fixtures.server import SiraServer, free_port, sira_env

DEMO = Path(__file__).resolve().parents[1] / "workers" / "demo"
JWT_SECRET = "bench-secret-0123456789abcdef-0123456789"
HIT_POOL = 200


def percentiles(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def median_p99(samples: list[float]) -> str:
    """'median / p99', two decimals each."""
    median, p99 = percentiles(samples)
    return f"{median:.2f} / {p99:.2f}"


class UniqueEvents:
    """Payment events whose feature rows never repeat (a counter in amount_avg_30d)."""

    def __init__(self) -> None:
        self.count = 0

    def next(self, explained: bool, enable_cache: bool = True) -> dict:
        self.count += 1
        payload = {
            "amount": 480.0, "currency": "USD", "country": "NG", "payment_method": "crypto",
            "features": {"hour_of_day": 3, "account_age_days": 12, "txn_count_24h": 6,
                         "amount_avg_30d": 10.0 + self.count * 0.5, "is_new_device": 1},
        }
        return {"event_id": str(uuid.uuid4()), "product": "fraud_score", "payload": payload,
                "options": {"include_explanation": explained, "enable_cache": enable_cache}}


def end_to_end(server: SiraServer, requests: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """Server-side latency_ms and client round trips (microseconds) per kind of request."""
    token = mint_token(role="sira_service", subject="bench", ttl_s=3600, secret=JWT_SECRET,
                       kid="default")
    events = UniqueEvents()
    pools = {explained: [events.next(explained) for _ in range(HIT_POOL)] for explained in (True, False)}
    kinds = {}
    for explained, label in ((True, "with explanation"), (False, "no explanation")):
        pool = pools[explained]
        kinds[f"hit, {label}"] = lambda n, pool=pool: {**pool[n % HIT_POOL], "event_id": str(uuid.uuid4())}
        kinds[f"miss, {label}"] = lambda n, e=explained: events.next(e)
        kinds[f"no cache, {label}"] = lambda n, e=explained: events.next(e, enable_cache=False)
    results = {kind: {"server": [], "client": []} for kind in kinds}
    order = [kind for kind in kinds for _ in range(requests)]
    random.Random(seed).shuffle(order)
    counters = dict.fromkeys(kinds, 0)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                      timeout=10) as client:
        for pool in pools.values():
            for request in pool:
                client.post("/v1/infer", json=request).raise_for_status()
        for _ in range(500):  # warm the connection and both code paths
            client.post("/v1/infer", json=events.next(True)).raise_for_status()
        for kind in order:
            request = kinds[kind](counters[kind])
            counters[kind] += 1
            started = time.perf_counter()
            response = client.post("/v1/infer", json=request)
            elapsed = time.perf_counter() - started
            body = response.json()
            expected = kind.startswith("hit")
            if response.status_code != 200 or body["cached"] is not expected:
                raise RuntimeError(f"{kind}: unexpected answer {response.status_code} {body}")
            results[kind]["server"].append(body["latency_ms"] * 1000.0)
            results[kind]["client"].append(elapsed * 1e6)
    return results


def print_end_to_end(results: dict[str, dict[str, list[float]]]) -> None:
    print(f"{'request':<32}{'server med us':>15}{'server p99 us':>15}{'client med us':>15}")
    medians = {}
    for kind, samples in results.items():
        server_median, server_p99 = percentiles(samples["server"])
        client_median, _ = percentiles(samples["client"])
        medians[kind] = server_median
        print(f"{kind:<32}{server_median:>15.1f}{server_p99:>15.1f}{client_median:>15.1f}")
    for label in ("with explanation", "no explanation"):
        hit, miss, bare = (medians[f"{k}, {label}"] for k in ("hit", "miss", "no cache"))
        print(f"{label}: a hit costs {hit / miss:.0%} of a miss; a miss costs "
              f"{miss - bare:+.1f} us against no cache")


def run_server(args: argparse.Namespace) -> None:
    """Part 1: a real two-worker server, hits against misses."""
    with tempfile.TemporaryDirectory(prefix="sira-bench-") as data_dir:
        port = free_port()
        env = sira_env(SIRA_DATA_DIR=data_dir, SIRA_BIND=f"127.0.0.1:{port}",
                       SIRA_WORKERS=str(args.workers), JWT_SECRET=JWT_SECRET, LOG_LEVEL="warning",
                       CACHE_MAX_ITEMS=str(args.cache_items))
        if args.database_url:
            env["DATABASE_URL"] = args.database_url
        server = SiraServer(data_dir, env, port)
        everywhere = os.sched_getaffinity(0)
        try:
            if args.pin:  # the server inherits the last CPU, the client keeps the others
                os.sched_setaffinity(0, {max(everywhere)})
            server.start(timeout=180)
            if args.pin:
                os.sched_setaffinity(0, everywhere - {max(everywhere)} or everywhere)
            results = end_to_end(server, args.requests, args.seed)
        finally:
            os.sched_setaffinity(0, everywhere)
            server.stop()
    print(f"end to end: {args.workers} workers, one keep-alive connection, {args.requests} "
          f"requests of each kind, interleaved; CACHE_MAX_ITEMS={args.cache_items}"
          f"{'; server pinned to one CPU, client to the rest' if args.pin else ''}")
    print_end_to_end(results)


def timed(call: Callable[[int], object], count: int) -> list[float]:
    """Microseconds of each call(i), GC off."""
    samples = [0.0] * count
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(count):
            start = clock()
            call(i)
            samples[i] = (clock() - start) / 1000
    finally:
        gc.enable()
    return samples


def request_path_costs(cache: PredictionCache, model: ServingModel, count: int) -> dict[str, list[float]]:
    """What one request spends in the cache: a hit, and a miss that stores its answer."""
    rows = np.zeros((count, len(model.spec)), dtype=np.float32)
    rows[:] = model.spec.baseline_row()
    rows[:, 0] = np.arange(count, dtype=np.float32) + 100.0  # amount: every row unique
    rows[:, 3] = 4.0  # payment_method crypto: a non-trivial explanation
    score, explanation = model.runner.explain_row(rows[0])
    stored = rows[:min(count, HIT_POOL)]
    for row in stored:
        cache.put(cache.key(model, row), score, explanation, True)
    misses = rows.copy()
    misses[:, 1] = 9.0  # another currency: rows never stored
    misses_plain = misses.copy()
    misses_plain[:, 2] = 9.0

    def hit(i: int, explained: bool) -> None:
        row = stored[i % len(stored)]
        if cache.get(cache.key(model, row), explained) is None:
            raise RuntimeError("expected a hit")

    def miss(i: int, source: np.ndarray, explained: bool) -> None:
        row = source[i]
        key = cache.key(model, row)
        if cache.get(key, explained) is None:
            cache.put(key, score, explanation if explained else [], explained)

    return {
        "key only": timed(lambda i: cache.key(model, rows[i]), count),
        "hit (key+get+decode), expl.": timed(lambda i: hit(i, True), count),
        "hit, no explanation": timed(lambda i: hit(i, False), count),
        "miss (key+get+put), expl.": timed(lambda i: miss(i, misses, True), count),
        "miss, no explanation": timed(lambda i: miss(i, misses_plain, False), count),
    }


def run_in_process(args: argparse.Namespace) -> None:
    """Part 2: the request path's cache costs over three stores."""
    model_file = ModelFile(model_id=str(uuid.uuid4()), name="fraud_score", version="bench",
                           product="fraud_score", path=str(DEMO / "fraud_score.onnx"),
                           spec=json.loads((DEMO / "fraud_score.spec.json").read_text()),
                           threshold=0.5)
    model = ServingModel(model_file)
    ttl_ms = 300_000
    results = {}
    name = segment_name(f"bench{uuid.uuid4().hex[:8]}", "cache")
    with ShmCache.create(name, max(args.cache_items, 2 * args.iterations), ttl_ms,
                         value_size=VALUE_SIZE) as shm:
        results["shm cache"] = request_path_costs(PredictionCache(shm), model, args.iterations)
    results["LRU dict"] = request_path_costs(
        PredictionCache(LruTtlDict(max(args.cache_items, 2 * args.iterations), ttl_ms)), model,
        args.iterations)
    store, note = redis_store()
    if store is not None:
        results["redis"] = request_path_costs(PredictionCache(store), model,
                                              min(args.iterations, 5_000))
    print(f"in process, the request path's cache work on the demo model ({note}):")
    stores = list(results)
    print(f"{'operation':<30}" + "".join(f"{s + ' med/p99 us':>26}" for s in stores))
    for operation in results[stores[0]]:
        cells = "".join(f"{median_p99(results[s][operation]):>26}" for s in stores)
        print(f"{operation:<30}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests of each kind")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-items", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=20_000, help="in-process calls per row")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-server", action="store_true", help="only the in-process part")
    parser.add_argument("--pin", action="store_true",
                        help="server on the last CPU, client on the others (less interference)")
    args = parser.parse_args()
    if not args.skip_server:
        run_server(args)
        print()
    run_in_process(args)


if __name__ == "__main__":
    main()
