"""Which model an event meets: a keyed hash of product and event id into 10,000 buckets.

    bucket = int.from_bytes(sha256(seed + product + "\\x00" + event_id, UTF-8)[:8], "big") % 10000
    canary  iff  bucket < canary basis points   (canary_percent 12.34 -> 1234 basis points)

``seed`` is the canary's routing seed: 16 random bytes that ``POST /v1/canary`` draws (``secrets``)
each time a canary starts, kept in ``sira_canary_config.routing_seed`` and mirrored by every
supervisor into the control block, so every worker of every pod uses the same one. It is never
answered by the API: a client that picks its own event ids and sees ``model_role`` in the answers
cannot compute buckets, so it cannot search offline for ids that land on one model, and the ids it
found by asking stop meaning anything when the next canary starts with a new seed.

For one canary the bucket depends on nothing but the seed, the product and the event id, so an
event meets the same model on every worker, host and restart; raising the percent keeps the seed
and only adds buckets, so it only moves events from production to the canary, never back. The
product is in the hash so that two products' canaries do not pick the same events. The seed has a
fixed length, and a product never holds "\\x00", so no two (seed, product, event id) share an input.
An empty seed gives the unkeyed hash (used by benchmarks only; the control block always holds 16
bytes).
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000
SEED_BYTES = 16
_sha256 = hashlib.sha256


def canary_bucket(product: str, event_id: str, seed: bytes = b"") -> int:
    """The event's bucket in [0, 10000) under the canary's routing seed."""
    digest = _sha256(seed + f"{product}\x00{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def goes_to_canary(product: str, event_id: str, basis_points: int, seed: bytes = b"") -> bool:
    return basis_points > 0 and canary_bucket(product, event_id, seed) < basis_points
