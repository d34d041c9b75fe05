"""SIRA_RATE_LIMITS: how many requests each role may make, per token subject, and its parser.

Syntax: comma-separated ``ROLE=N/second``, ``ROLE=N/minute``, ``ROLE=N/hour`` or ``ROLE=unlimited``,
e.g. ``fraud_analyst=100/minute,sira_service=50000/minute``. A role the value does not name keeps its
default:

| role | default | why |
|---|---|---|
| ``fraud_analyst``, ``ml_ops``, ``pay_admin`` | 100/minute | people and tools (the seed's per API key) |
| ``sira_service``, ``internal_service`` (internal token) | unlimited | the platform's callers: capacity, not quota |
| ``anonymous`` | 100/minute | requests that fail authentication, per client address |

N is a whole number from 1 to 1,000,000,000; the period is a whole second, minute or hour. A limit
is a token bucket that holds N requests and refills N per period: N requests may come at once,
then one every period/N. Anything else (an unknown role, 0, a negative number, another unit, a role
named twice, an empty entry) is refused with one line naming the variable (``conf/settings.py``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final

EXTERNAL_ROLES: Final = ("fraud_analyst", "ml_ops", "pay_admin")
INTERNAL_ROLES: Final = ("sira_service", "internal_service")
ANONYMOUS: Final = "anonymous"  # failed authentication, keyed by client address
ROLES: Final = tuple(sorted((*EXTERNAL_ROLES, *INTERNAL_ROLES, ANONYMOUS)))
UNITS: Final = {"second": 1, "minute": 60, "hour": 3600}
MAX_REQUESTS: Final = 1_000_000_000
UNLIMITED: Final = "unlimited"

_NUMBER = re.compile(r"-?\d+")
_SYNTAX = "ROLE=N/second|minute|hour or ROLE=unlimited, comma separated"


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """``requests`` per ``period_s`` seconds, as a token bucket of ``requests`` tokens."""

    requests: int
    period_s: int

    @property
    def interval_ns(self) -> int:
        """Time one request's token takes to come back."""
        return self.period_s * 1_000_000_000 // self.requests

    @property
    def burst_ns(self) -> int:
        """The bucket's depth in time: exactly ``requests`` intervals, so exactly ``requests`` at once."""
        return self.interval_ns * self.requests

    def __str__(self) -> str:
        unit = next(name for name, seconds in UNITS.items() if seconds == self.period_s)
        return f"{self.requests}/{unit}"


DEFAULT_LIMITS: Final[Mapping[str, RateLimit | None]] = {
    **{role: RateLimit(100, 60) for role in EXTERNAL_ROLES},
    **{role: None for role in INTERNAL_ROLES},
    ANONYMOUS: RateLimit(100, 60),
}


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """The limit of every role (None: unlimited); ``str`` is the whole table in the setting's syntax."""

    by_role: Mapping[str, RateLimit | None]

    def limited_roles(self) -> list[str]:
        """Roles with a limit, sorted: the label values of sira_rate_limited_total."""
        return sorted(role for role, limit in self.by_role.items() if limit is not None)

    def __str__(self) -> str:
        return ",".join(f"{role}={self.by_role[role] or UNLIMITED}" for role in sorted(self.by_role))


def parse_rate_limits(value: str) -> RateLimits:
    """The defaults, overridden by each ROLE=... entry of ``value``; ValueError says what was expected."""
    limits = dict(DEFAULT_LIMITS)
    if not value.strip():
        return RateLimits(limits)
    named: set[str] = set()
    for item in value.split(","):
        role, limit = _parse_entry(item.strip())
        if role in named:
            raise ValueError(f"each role once, got {role!r} twice")
        named.add(role)
        limits[role] = limit
    return RateLimits(limits)


def _parse_entry(item: str) -> tuple[str, RateLimit | None]:
    """One ROLE=N/unit or ROLE=unlimited entry."""
    if not item:
        raise ValueError(f"{_SYNTAX}, got an empty entry")
    role, sep, rule = (part.strip() for part in item.partition("="))
    if not sep or not role or not rule:
        raise ValueError(f"{_SYNTAX}, got {item!r}")
    if role not in ROLES:
        raise ValueError(f"a role among {', '.join(ROLES)}, got {role!r} in {item!r}")
    if rule == UNLIMITED:
        return role, None
    count, sep, unit = (part.strip() for part in rule.partition("/"))
    if not sep or not _NUMBER.fullmatch(count):
        raise ValueError(f"{_SYNTAX}, got {item!r}")
    if not 1 <= int(count) <= MAX_REQUESTS:
        raise ValueError(f"a number of requests from 1 to {MAX_REQUESTS}, got {count} in {item!r}")
    if unit not in UNITS:
        raise ValueError(f"a period of second, minute or hour, got {unit!r} in {item!r}")
    return role, RateLimit(int(count), UNITS[unit])
