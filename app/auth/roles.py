"""The roles a JWT may hold and the actions each role grants.

A JWT names its roles in a `role` string and / or a `roles` list. Of those, only the roles of
KNOWN_ROLES count: any other name grants nothing and sets no rate limit, as if it were absent.
`internal_service` is the role of the internal service token alone (INTERNAL_SERVICE_TOKEN or
INTERNAL_SERVICE_TOKEN_FILE); a JWT that claims it is refused outright (app/auth/tokens.py), so that no
signed token can present itself as the platform's own caller.

The same table decides two things per request: whether the principal may do the action (one role
that grants it is enough), and which roles' rate limits apply to it (only the roles that grant it,
app/auth/ratelimit.py).
"""

from __future__ import annotations

from collections.abc import Iterable

KNOWN_ROLES = frozenset({"sira_service", "fraud_analyst", "ml_ops", "pay_admin"})
INTERNAL_ROLE = "internal_service"

# action -> roles that may do it; the internal principal may do everything.
PERMISSIONS: dict[str, frozenset[str]] = {
    "infer": frozenset({"sira_service", "fraud_analyst"}),
    "predictions:read": frozenset({"sira_service", "fraud_analyst", "ml_ops"}),
    "models:read": frozenset({"ml_ops"}),
    "models:write": frozenset({"ml_ops"}),
    "canary:read": frozenset({"ml_ops", "pay_admin"}),
    "canary:write": frozenset({"ml_ops"}),
    "outcomes:write": frozenset({"sira_service", "fraud_analyst"}),
}
REQUIRED_ROLES = {action: sorted(roles) for action, roles in PERMISSIONS.items()}


def granting_roles(roles: Iterable[str], action: str) -> frozenset[str]:
    """The roles among `roles` that grant `action`; ValueError names an action the table lacks.

    An unknown action is a resource declaring a name the table does not hold: a programming
    error, never a client's, so it must not pass silently as "no role grants it".
    """
    allowed = PERMISSIONS.get(action)
    if allowed is None:
        raise ValueError(f"unknown action {action!r}; known actions: {sorted(PERMISSIONS)}")
    return allowed.intersection(roles)


def jwt_roles(claimed: Iterable[str]) -> frozenset[str]:
    """The roles of a JWT that count: the known ones (the caller has already refused internal_service)."""
    return KNOWN_ROLES.intersection(claimed)
