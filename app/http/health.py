"""GET /healthz (the process answers) and GET /readyz (this worker serves every product).

Both are public: Kubernetes probes them without a token, and their status codes are the same
with any token or none. What they say is not: /readyz answers anyone whether this worker is
ready, its generation and the models it serves (the facts probes and rollout checks compare, none
of which describes a model's inputs), and a 503 says why in fixed words (the missing products,
`postgres unreachable and no registry snapshot`). It keeps the details, `dependencies` (the last
error of Postgres or the model store, which names hosts, users and paths) and `load_errors` (file
paths, exception texts), for a request with an ml_ops token (the `models:read` action, or the
internal token) or one that came in on METRICS_BIND's port, which ops restrict to the scraper
and themselves. /healthz has nothing to hide: `ok`, the service's name and the time.

`OptionalToken` is how a public endpoint that shows more to some callers reads a token:
/openapi.json (app/http/openapi.py) uses it too.
"""

from __future__ import annotations

import os
from typing import Any

from app.dependencies import POSTGRES, read_dependencies
from app.errors import Forbidden, ServiceUnavailable, Unauthorized, utc_timestamp
from app.scoring.models import ModelTable
from app.telemetry.metrics import listening_port

DETAILS_ACTION = "models:read"  # who may read /readyz's details on SIRA_BIND: ml_ops and the internal token


class OptionalToken:
    """A token on a public endpoint: it may add to the answer, never take from it.

    Checked by the same Authenticator as the rest of the API. No Authorization header, a bad or
    expired token, or a role that may not do the action: the public answer, with the same status
    code, so that a probe, or a client that sends its token on every request of a session, always
    reads readiness. Nothing is spent from SIRA_RATE_LIMITS, which govern the protected endpoints
    (app/auth/ratelimit.py); a valid token's verification is cached, as it is for those.
    """

    def __init__(self, authenticator: Any):
        self.authenticator = authenticator  # app.auth.tokens.Authenticator

    def principal(self, req) -> Any:
        """The request's app.auth.tokens.Principal, or None without a valid token."""
        header = req.get_header("Authorization")
        if not header:
            return None
        try:
            return self.authenticator.authenticate(header)
        except Unauthorized:
            return None

    def may(self, req, action: str) -> bool:
        """True when the request has a valid token whose roles grant `action` (app/auth/tokens.py)."""
        principal = self.principal(req)
        if principal is None:
            return False
        try:
            self.authenticator.authorize(principal, action)
        except Forbidden:
            return False
        return True


class HealthResource:
    """Liveness: 200 while the worker's event loop answers; touches nothing else."""

    async def on_get(self, req, resp):
        resp.media = {"ok": True, "service": "sira-inference", "timestamp": utc_timestamp()}


class ReadyResource:
    """Readiness: 503 until this worker has a production model for every product of the registry.

    With the supervisor (app/store/swap.py) that waits for its first generation; a product whose
    new model fails to go live keeps serving its current one, so the worker stays ready. With
    details (see the module's docstring) both answers carry `dependencies`, the supervisor's view
    of Postgres and the model store (app/dependencies.py), and `load_errors`: a worker serving
    from the registry snapshot while Postgres is away is ready, and says Postgres is down.
    """

    def __init__(self, models: ModelTable, dependencies_file: str | None = None,
                 token: OptionalToken | None = None, metrics_port: int | None = None):
        self.models = models
        self.dependencies_file = dependencies_file
        self.token = token  # None: no authenticator (an app built without one), so no details on SIRA_BIND
        self.metrics_port = metrics_port

    def details_allowed(self, req) -> bool:
        """Details on METRICS_BIND's port, or for a token that may read the models (ml_ops)."""
        if self.metrics_port is not None and listening_port(req) == self.metrics_port:
            return True
        return self.token is not None and self.token.may(req, DETAILS_ACTION)

    async def on_get(self, req, resp):
        details = self.details_allowed(req)
        models = self.models
        models.refresh()
        missing = models.missing_products()
        waiting = models.waiting_reason()
        dependencies = read_dependencies(self.dependencies_file) if details else {}
        if waiting or missing or not models.expected_products:
            raise self.not_ready(waiting, missing, dependencies, details)
        resp.media = {
            "ready": True,
            "worker_pid": os.getpid(),
            "generation": models.generation(),
            "models": {
                product: {"model_id": model.model_id, "version": model.version, "role": model.role,
                          "loaded_at": models.loaded_at(model.model_id)}
                for product, model in sorted(models.production.items())
            },
            **({"load_errors": models.load_errors, "dependencies": dependencies} if details else {}),
            "timestamp": utc_timestamp(),
        }

    def not_ready(self, waiting: str | None, missing: list[str], dependencies: dict,
                  details: bool) -> ServiceUnavailable:
        """The 503: its message says why in fixed words; only the details carry the errors."""
        models = self.models
        reason = waiting or "no production model loaded for " + (", ".join(missing) or "any product")
        if waiting and not self.postgres_up(dependencies if details else None):
            reason = "postgres unreachable and no registry snapshot"
        body = {"ready": False, "generation": models.generation(), "missing_products": missing}
        if details:
            body.update(load_errors=models.load_errors, dependencies=dependencies)
        return ServiceUnavailable("not ready: " + reason, body, {"Retry-After": "1"})

    def postgres_up(self, dependencies: dict | None) -> bool:
        """Whether the supervisor last reached Postgres (True before it looked)."""
        if dependencies is None:
            dependencies = read_dependencies(self.dependencies_file)
        return dependencies.get(POSTGRES, {}).get("up", True)
