"""A realistic mix of SIRA's callers, for locust (also run by `python -m bench --scenarios locust`).

    SIRA_TOKEN_SIRA_SERVICE=... SIRA_TOKEN_FRAUD_ANALYST=... SIRA_TOKEN_ML_OPS=... \
        locust -f bench/locustfile.py --host http://127.0.0.1:8080 --headless -u 30 -r 10 -t 30s

Payment services (sira_service) score events, mostly unique, some repeated, now and then a batch;
fraud analysts (fraud_analyst) score a case and look predictions up by id; ML ops (ml_ops) read the
model list and readiness. A role without its token variable uses SIRA_TOKEN_SIRA_SERVICE, and a
missing or refused token shows up as failures. Locust itself is Python: on a small machine it is the
bottleneck, so this measures the mix's correctness and latency, not the server's maximum.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid

from locust import FastHttpUser, between, task

CURRENCIES = ["USD", "EUR", "GBP", "XOF", "NGN", "KES"]
COUNTRIES = ["US", "FR", "GB", "SN", "NG", "KE", "DE"]
METHODS = ["card", "wallet", "bank_transfer", "mobile_money", "crypto"]
HOT_SET = 64
UNIQUE = itertools.count(random.randrange(1, 1_000_000) * 1000)


def token(role: str) -> str:
    return os.environ.get(f"SIRA_TOKEN_{role.upper()}") or os.environ.get("SIRA_TOKEN_SIRA_SERVICE", "")


def unique_event() -> dict:
    """A payment never seen before: its feature row misses the cache."""
    return {"event_id": f"l-{uuid.uuid4()}", "product": "fraud_score", "payload": {
        "amount": round(random.lognormvariate(4, 1.2), 2), "currency": random.choice(CURRENCIES),
        "country": random.choice(COUNTRIES), "payment_method": random.choice(METHODS),
        "features": {"hour_of_day": random.randrange(24), "is_weekend": random.randrange(2),
                     "account_age_days": random.randrange(3000), "txn_count_24h": random.randrange(30),
                     "amount_avg_30d": next(UNIQUE) % 10_000_000, "distinct_cards_7d": random.randrange(1, 5),
                     "ip_country_mismatch": random.randrange(2), "failed_logins_24h": random.randrange(4),
                     "is_new_device": random.randrange(2)}}}


def repeated_event() -> dict:
    """A payment whose features are one of a small hot set: a cache hit once seen."""
    hot = random.randrange(HOT_SET)
    return {"event_id": f"l-{uuid.uuid4()}", "product": "fraud_score", "payload": {
        "amount": 100 + hot, "currency": "USD", "country": "US", "payment_method": METHODS[hot % len(METHODS)],
        "features": {"hour_of_day": hot % 24, "is_weekend": 0, "account_age_days": 700, "txn_count_24h": 2,
                     "amount_avg_30d": 120, "distinct_cards_7d": 1, "ip_country_mismatch": 0,
                     "failed_logins_24h": 0, "is_new_device": hot % 2}}}


class SiraUser(FastHttpUser):
    abstract = True
    role = "sira_service"

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {token(self.role)}"}


class PaymentService(SiraUser):
    """A checkout backend: scores every payment; retries and duplicates make some rows repeat."""

    weight = 8
    wait_time = between(0.005, 0.02)

    @task(14)
    def score_new_payment(self) -> None:
        self.client.post("/v1/infer", json=unique_event(), headers=self.headers, name="POST /v1/infer (unique)")

    @task(5)
    def score_repeated_payment(self) -> None:
        self.client.post("/v1/infer", json=repeated_event(), headers=self.headers, name="POST /v1/infer (hot set)")

    @task(1)
    def score_batch(self) -> None:
        events = [unique_event() for _ in range(16)]
        self.client.post("/v1/infer/batch", json={"events": events}, headers=self.headers,
                         name="POST /v1/infer/batch (16)")


class FraudAnalyst(SiraUser):
    """An analyst's console: scores a case, then opens predictions by id."""

    role = "fraud_analyst"
    weight = 2
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        super().on_start()
        self.seen: list[str] = []

    @task(1)
    def score_case(self) -> None:
        response = self.client.post("/v1/infer", json=unique_event(), headers=self.headers,
                                    name="POST /v1/infer (analyst)")
        if response.status_code == 200:
            self.seen = [response.json()["prediction_id"], *self.seen[:99]]

    @task(3)
    def look_up_prediction(self) -> None:
        if not self.seen:
            return self.score_case()
        self.client.get(f"/v1/infer/{random.choice(self.seen)}", headers=self.headers,
                        name="GET /v1/infer/{prediction_id}")


class MlOps(SiraUser):
    """ML ops dashboards: the model list and readiness, a few times a second."""

    role = "ml_ops"
    weight = 1
    wait_time = between(0.2, 0.5)

    @task(3)
    def list_models(self) -> None:
        self.client.get("/v1/models", headers=self.headers, name="GET /v1/models")

    @task(1)
    def readiness(self) -> None:
        self.client.get("/readyz", name="GET /readyz")
