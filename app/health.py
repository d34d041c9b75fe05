"""GET /healthz (the process answers) and GET /readyz (this worker serves every product)."""

from __future__ import annotations

import os

from app.errors import ServiceUnavailable, utc_timestamp
from app.models import ModelTable


class HealthResource:
    """Liveness: 200 while the worker's event loop answers; touches nothing else."""

    async def on_get(self, req, resp):
        resp.media = {"ok": True, "service": "sira-inference", "timestamp": utc_timestamp()}


class ReadyResource:
    """Readiness: 503 until this worker has a production model for every product of the registry."""

    def __init__(self, models: ModelTable):
        self.models = models

    async def on_get(self, req, resp):
        missing = self.models.missing_products()
        if missing or not self.models.expected_products:
            raise ServiceUnavailable(
                "not ready: no production model loaded for " + (", ".join(missing) or "any product"),
                {"ready": False, "missing_products": missing, "load_errors": self.models.load_errors},
                {"Retry-After": "1"},
            )
        resp.media = {
            "ready": True,
            "worker_pid": os.getpid(),
            "models": {
                product: {"model_id": model.model_id, "version": model.version, "role": model.role}
                for product, model in sorted(self.models.production.items())
            },
            "timestamp": utc_timestamp(),
        }
