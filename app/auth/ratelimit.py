"""Rate limits per token subject, shared by every worker of the host (SIRA_RATE_LIMITS).

The master creates one rate-limit table in shared memory before the fork (``shared_rate_limits``,
``shm/ratelimit.py``); each worker attaches it (``open_rate_limiter``) and ``AuthMiddleware`` asks
its ``RateLimiter`` once a request is authenticated, before it is authorised. So a client's
requests count against one bucket whichever worker answers them, and a refusal is the same 429
from every worker.

What is counted:

- an authenticated request to a protected endpoint spends one request of the bucket keyed by
  (role, token subject). The role is picked among the principal's roles that grant the request's
  action (``app/auth/roles.py``): the most generous of them (unlimited wins), never a role that does
  not grant that action, so an extra role lends no room to actions it cannot do. Roles SIRA does
  not know are ignored (app/auth/tokens.py drops them; a JWT claiming ``internal_service`` is refused).
  A request that none of the principal's roles grants (it will be refused with 403) spends from
  the least generous of its roles, and a principal with no known role from ``anonymous`` keyed by
  its subject. A batch is one request. A request later refused with 403 was spent.
- a request to a protected endpoint that fails authentication (no token, a bad or expired one)
  spends one request of the ``anonymous`` bucket of its client address (the TCP peer, never a
  forwarded-for header a client could write). Over the limit it is answered 429 instead of 401.
  Only failures are charged, so clients behind one proxy address never lose valid requests to
  someone else's failures. Guessing a token is hopeless anyway (secrets of 32 bytes or more):
  this bounds how much a broken or hostile client makes the server verify and log.
- public endpoints (/healthz, /readyz, /metrics, /openapi.json, /docs) are never limited.

Over the limit: ``RateLimitExceeded`` (429 ``RATE_LIMIT_EXCEEDED`` in the error schema) with
``Retry-After`` (whole seconds until one more request is admitted, at least 1) and the role and
limit in ``details``; counted in ``sira_rate_limited_total{role}``. No ``X-RateLimit-*`` headers on
admitted requests: they would cost every answer a few header writes for a figure clients rarely use.

A check must never fail a request: if the table cannot be locked (an OSError from the kernel), the
request is admitted and the failure logged (at most once a minute per worker).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

from app.auth.roles import KNOWN_ROLES, granting_roles
from app.errors import RateLimitExceeded
from conf.ratelimit import ANONYMOUS, RateLimit, RateLimits
from shm.ratelimit import RateLimitTable, rate_key
from shm.segment import RATE_LIMIT_KIND, segment_name

log = logging.getLogger("sira.ratelimit")

MAX_REMEMBERED = 10_000  # keys and role sets kept per worker; cleared beyond, never unbounded
LOCK_FAILURE_LOG_INTERVAL_NS = 60_000_000_000
_NS_PER_S = 1_000_000_000
_UNKNOWN_ADDRESS = "unknown"


def rate_limit_segment_name(instance_id: str) -> str:
    """Name of the rate-limit segment of one ``sira serve`` instance."""
    return segment_name(instance_id, RATE_LIMIT_KIND)


@contextlib.contextmanager
def shared_rate_limits(name: str) -> Iterator[RateLimitTable]:
    """The master creates the table before the fork and unlinks it when this exits.

    In a forked worker unwinding the master's stack it only unmaps (only the creator unlinks).
    """
    with RateLimitTable.create(name) as table:
        yield table


def retry_after_s(wait_ns: int) -> int:
    """Whole seconds a client should wait (``Retry-After`` is an integer), at least 1."""
    return max(1, -(-wait_ns // _NS_PER_S))


def most_generous(roles: frozenset[str], limits: RateLimits) -> tuple[str, RateLimit | None]:
    """(role, limit) that governs a principal: the most generous of its known roles, else anonymous."""
    known = sorted(role for role in roles if role in limits.by_role)
    if not known:
        return ANONYMOUS, limits.by_role[ANONYMOUS]
    unlimited = [role for role in known if limits.by_role[role] is None]
    if unlimited:
        return unlimited[0], None
    best = max(known, key=lambda role: Fraction(limits.by_role[role].requests, limits.by_role[role].period_s))
    return best, limits.by_role[best]


def least_generous(roles: frozenset[str], limits: RateLimits) -> tuple[str, RateLimit | None]:
    """(role, limit) of the strictest of the known roles, else anonymous; unlimited only when all are."""
    known = sorted(role for role in roles if role in limits.by_role)
    if not known:
        return ANONYMOUS, limits.by_role[ANONYMOUS]
    limited = [role for role in known if limits.by_role[role] is not None]
    if not limited:
        return known[0], None
    worst = min(limited, key=lambda role: Fraction(limits.by_role[role].requests, limits.by_role[role].period_s))
    return worst, limits.by_role[worst]


def governing_limit(principal: Any, action: str | None, limits: RateLimits) -> tuple[str, RateLimit | None]:
    """(role, limit) that a principal's request for `action` spends from.

    The internal principal has its one role. A JWT principal is limited by the roles that grant
    the action, the most generous of them: a token that also lists an unlimited role cannot use
    it for an action that role may not do. When none grants it (a 403 follows), the strictest
    role is charged, so that holding more roles never buys more refused requests. With no action
    (a caller outside a route) every known role counts.
    """
    if principal.internal:
        return most_generous(principal.roles, limits)
    roles = KNOWN_ROLES.intersection(principal.roles)
    if action is None:
        return most_generous(roles, limits)
    granting = granting_roles(roles, action)
    if granting:
        return most_generous(granting, limits)
    return least_generous(roles, limits)


class RateLimiter:
    """A worker's handle on the shared table: picks the bucket of a request and spends from it.

    ``on_refusal(role)`` is called for every 429 (the metrics counter). Not thread safe: one per
    worker, used from its event loop (the check never awaits).
    """

    def __init__(self, table: RateLimitTable, limits: RateLimits,
                 on_refusal: Callable[[str], None] = lambda role: None,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.table = table
        self.limits = limits
        self.refusals = 0
        self.lock_failures = 0
        self._on_refusal = on_refusal
        self._clock = clock
        # action -> role set -> rule: nested, so that a request allocates no key. A role set names the
        # internal principal alone when it is {internal_service} (app/auth/tokens.py refuses a JWT that claims it).
        self._rules: dict[str | None, dict[frozenset[str], tuple[str, RateLimit | None]]] = {}
        self._rule_count = 0
        self._keys: dict[tuple[str, str], bytes] = {}
        self._last_failure_log_ns: int | None = None

    def admit(self, principal: Any, action: str | None = None) -> None:
        """Spend one request of the bucket the action picks (``governing_limit``); RateLimitExceeded when empty."""
        rules = self._rules.get(action)
        rule = rules.get(principal.roles) if rules is not None else None
        if rule is None:
            rule = self._remember_rule(principal, action)
        role, limit = rule
        if limit is not None:
            self._spend(role, principal.subject, limit)

    def admit_failed_authentication(self, address: str | None) -> None:
        """Spend one request of the client address's anonymous bucket (called before the 401)."""
        limit = self.limits.by_role[ANONYMOUS]
        if limit is not None:
            self._spend(ANONYMOUS, address or _UNKNOWN_ADDRESS, limit)

    def close(self) -> None:
        """Unmap the table in this worker (idempotent)."""
        self.table.close()

    def _spend(self, role: str, subject: str, limit: RateLimit) -> None:
        key = self._keys.get((role, subject))
        if key is None:
            key = self._remember_key(role, subject)
        now = self._clock()
        try:
            wait_ns = self.table.acquire(key, limit.interval_ns, limit.burst_ns, now)
        except OSError as exc:
            self._admit_despite(exc, now)
            return
        if wait_ns:
            self._refuse(role, limit, wait_ns)

    def _refuse(self, role: str, limit: RateLimit, wait_ns: int) -> None:
        self.refusals += 1
        self._on_refusal(role)
        seconds = retry_after_s(wait_ns)
        raise RateLimitExceeded(
            f"rate limit of {limit} for role {role} exceeded; retry in {seconds} s",
            details={"role": role, "limit": str(limit), "retry_after_s": seconds},
            headers={"Retry-After": str(seconds)},
        )

    def _admit_despite(self, exc: OSError, now: int) -> None:
        """The table could not be locked: admit (a limit is not worth a failed request), log rarely."""
        self.lock_failures += 1
        last = self._last_failure_log_ns
        if last is None or now - last >= LOCK_FAILURE_LOG_INTERVAL_NS:
            self._last_failure_log_ns = now
            log.warning("rate-limit table %s could not be locked (%s): requests admitted unchecked "
                        "(%d so far)", self.table.segment.name, exc, self.lock_failures)

    def _remember_rule(self, principal: Any, action: str | None) -> tuple[str, RateLimit | None]:
        if self._rule_count >= MAX_REMEMBERED:
            self._rules.clear()
            self._rule_count = 0
        rule = governing_limit(principal, action, self.limits)
        self._rules.setdefault(action, {})[principal.roles] = rule
        self._rule_count += 1
        return rule

    def _remember_key(self, role: str, subject: str) -> bytes:
        if len(self._keys) >= MAX_REMEMBERED:
            self._keys.clear()
        key = self._keys[(role, subject)] = rate_key(role.encode(), subject.encode("utf-8", "surrogatepass"))
        return key


def open_rate_limiter(name: str | None, limits: RateLimits | None,
                      on_refusal: Callable[[str], None]) -> RateLimiter | None:
    """In the worker, after the fork: attach the master's table; None when there is none.

    ``on_refusal(role)`` is called for every 429 (create_app passes the metrics counter, and creates
    every limited role's ``sira_rate_limited_total`` series at 0).
    """
    if name is None or limits is None:
        return None
    return RateLimiter(RateLimitTable.attach(name), limits, on_refusal=on_refusal)
