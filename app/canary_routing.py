"""Which model an event meets: a stable hash of product and event id into 10,000 buckets.

    bucket = int.from_bytes(sha256(product + "\\x00" + event_id, UTF-8)[:8], "big") % 10000
    canary  iff  bucket < canary basis points   (canary_percent 12.34 -> 1234 basis points)

Any other service can compute an event's route with the same two lines. The bucket depends on
nothing but the product and the event id, so an event meets the same model on every worker, host
and restart; raising the percent only adds buckets, so it only moves events from production to
the canary, never back. The product is in the hash so that two products' canaries do not pick
the same events.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000
_sha256 = hashlib.sha256


def canary_bucket(product: str, event_id: str) -> int:
    """The event's bucket in [0, 10000)."""
    digest = _sha256(f"{product}\x00{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def goes_to_canary(product: str, event_id: str, basis_points: int) -> bool:
    return basis_points > 0 and canary_bucket(product, event_id) < basis_points
