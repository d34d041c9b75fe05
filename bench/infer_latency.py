"""Latency of one uncached /v1/infer, with and without the explanation, on a running server.

    python -m bench.infer_latency --url http://127.0.0.1:8080 --token "$(sira token --role sira_service --sub bench)"

Sends requests one at a time over one keep-alive connection (no queueing: this is the cost of a
request, not a load test), every event unique with varied features and `enable_cache: false`, and
interleaves the two variants so that both see the same machine noise. Prints, per variant, the
server-side `latency_ms` (resource entry to response body) and the client round trip, p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid

import httpx

CURRENCIES = ["USD", "EUR", "GBP", "XOF", "NGN", "KES"]
COUNTRIES = ["US", "FR", "GB", "SN", "NG", "KE", "DE"]
METHODS = ["card", "wallet", "bank_transfer", "mobile_money", "crypto"]


def random_event(rng: random.Random, explain: bool) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "product": "fraud_score",
        "payload": {
            "amount": round(rng.lognormvariate(4, 1.2), 2), "currency": rng.choice(CURRENCIES),
            "country": rng.choice(COUNTRIES), "payment_method": rng.choice(METHODS),
            "features": {"hour_of_day": rng.randrange(24), "is_weekend": rng.randrange(2),
                         "account_age_days": rng.randrange(3000), "txn_count_24h": rng.randrange(30),
                         "amount_avg_30d": round(rng.lognormvariate(4, 1), 2),
                         "distinct_cards_7d": rng.randrange(1, 5), "ip_country_mismatch": rng.randrange(2),
                         "failed_logins_24h": rng.randrange(4), "is_new_device": rng.randrange(2)},
        },
        "options": {"include_explanation": explain, "enable_cache": False},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--requests", type=int, default=4000, help="per variant")
    parser.add_argument("--seed", type=int, default=7)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    samples = {True: ([], []), False: ([], [])}
    with httpx.Client(base_url=options.url, headers={"Authorization": f"Bearer {options.token}"}) as client:
        for _ in range(200):  # warm-up
            client.post("/v1/infer", json=random_event(rng, True))
        for _ in range(options.requests):
            for explain in (True, False):
                started = time.perf_counter()
                response = client.post("/v1/infer", json=random_event(rng, explain))
                round_trip = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                samples[explain][0].append(response.json()["latency_ms"])
                samples[explain][1].append(round_trip)
    report = {}
    for explain, (server, client_rt) in samples.items():
        name = "with explanation" if explain else "score only"
        report[name] = {"server_p50_ms": statistics.median(server), "server_p99_ms": percentile(server, 0.99),
                        "client_p50_ms": statistics.median(client_rt), "client_p99_ms": percentile(client_rt, 0.99),
                        "requests": len(server)}
    print(json.dumps(report, indent=2))
    with_x, without = report["with explanation"], report["score only"]
    print(f"explanation costs {with_x['server_p50_ms'] - without['server_p50_ms']:.3f} ms at the median server-side "
          f"({with_x['server_p50_ms'] / without['server_p50_ms']:.2f}x)")


if __name__ == "__main__":
    main()
