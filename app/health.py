"""GET /healthz (the process answers) and GET /readyz (this worker serves every product)."""

from __future__ import annotations

import os

from app.dependencies import POSTGRES, read_dependencies
from app.errors import ServiceUnavailable, utc_timestamp
from app.models import ModelTable


class HealthResource:
    """Liveness: 200 while the worker's event loop answers; touches nothing else."""

    async def on_get(self, req, resp):
        resp.media = {"ok": True, "service": "sira-inference", "timestamp": utc_timestamp()}


class ReadyResource:
    """Readiness: 503 until this worker has a production model for every product of the registry.

    With the supervisor (app/model_swap.py) that waits for its first generation; a product whose
    new model fails to go live keeps serving its current one, so the worker stays ready. Both
    answers carry `dependencies`, the supervisor's view of Postgres and the model store
    (app/dependencies.py): a worker serving from the registry snapshot while Postgres is away is
    ready, and says Postgres is down.
    """

    def __init__(self, models: ModelTable, dependencies_file: str | None = None):
        self.models = models
        self.dependencies_file = dependencies_file

    async def on_get(self, req, resp):
        models = self.models
        models.refresh()
        missing = models.missing_products()
        waiting = models.waiting_reason()
        dependencies = read_dependencies(self.dependencies_file)
        if waiting or missing or not models.expected_products:
            reason = waiting or "no production model loaded for " + (", ".join(missing) or "any product")
            if waiting and not dependencies.get(POSTGRES, {}).get("up", True):
                reason = "postgres unreachable and no registry snapshot"
            raise ServiceUnavailable(
                "not ready: " + reason,
                {"ready": False, "generation": models.generation(), "missing_products": missing,
                 "load_errors": models.load_errors, "dependencies": dependencies},
                {"Retry-After": "1"},
            )
        resp.media = {
            "ready": True,
            "worker_pid": os.getpid(),
            "generation": models.generation(),
            "models": {
                product: {"model_id": model.model_id, "version": model.version, "role": model.role,
                          "loaded_at": models.loaded_at(model.model_id)}
                for product, model in sorted(models.production.items())
            },
            "load_errors": models.load_errors,
            "dependencies": dependencies,
            "timestamp": utc_timestamp(),
        }
