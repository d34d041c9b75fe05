"""The prediction cache of the request path: keys, values and counters over the shared segment.

One cache segment (``shm.cache.ShmCache``) serves every worker of a ``sira serve``: the master
creates it before the fork (``shared_cache``) and unlinks it at exit; each worker attaches by name
(``PredictionCache.attach``), so an answer computed by one worker is a hit in all of them.

Key: blake2b-128 over the model's identity (product, model id, version, role) and the bytes of the
float32 feature row the model would see. Two payloads that build the same row share an entry
('usd' and 'USD', an omitted optional feature and its default); a new model, version or role never
meets another's answer. The identity part is hashed once per model and copied per request.

Value, at most ``VALUE_SIZE`` bytes::

    +-------------+-------------------+------------------------------------------+
    | score f64   | explained u8      | explanation: orjson list of              |
    | (LE)        | (1: has one)      | {"feature", "importance"} (absent if 0)  |
    +-------------+-------------------+------------------------------------------+

The decision is not stored: ``app.scoring.runs.prediction`` derives it from the score and the model's
threshold in force, so a changed threshold never meets a stale decision. An entry stored without an
explanation does not answer a request that asks for one (a miss, then the full answer is stored).

Importing this module loads no model runtime: the master imports it before the fork.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import orjson

from shm.cache import ShmCache
from shm.segment import CACHE_KIND, segment_name

# Room for a five-item explanation with feature names up to ~60 characters; a longer value is
# simply not stored. 5,000 entries (the default CACHE_MAX_ITEMS) take about 3 MiB of /dev/shm.
VALUE_SIZE = 512
MAX_MODEL_PREFIXES = 1024  # model identities remembered; cleared beyond, never unbounded

_HEAD = struct.Struct("<dB")  # score, explained flag; the explanation JSON follows
_HEAD_SIZE = _HEAD.size
_EXPLAINED = 1
_NOT_EXPLAINED = 0
_blake2b = hashlib.blake2b
_dumps = orjson.dumps
_loads = orjson.loads


def cache_segment_name(instance_id: str, max_items: int) -> str | None:
    """Name of the cache segment of one ``sira serve`` instance; None when CACHE_MAX_ITEMS is 0."""
    return segment_name(instance_id, CACHE_KIND) if max_items > 0 else None


@contextlib.contextmanager
def shared_cache(name: str | None, max_items: int, ttl_ms: int) -> Iterator[ShmCache | None]:
    """The master creates the one cache segment before the fork and unlinks it when this exits.

    The exit also runs in forked workers, whose SystemExit unwinds the master's stack: there it
    only unmaps, because only the creating process may unlink (``Segment.is_owner``).
    """
    if name is None:
        yield None
        return
    with ShmCache.create(name, max_items, ttl_ms, value_size=VALUE_SIZE) as cache:
        yield cache


class PredictionCache:
    """A worker's handle on the shared cache: builds keys, encodes answers, counts hits and misses.

    Counters are per process and only ever incremented (read them for metrics). Not thread safe:
    one per worker, used from its event loop.
    """

    def __init__(self, shm: ShmCache):
        self.shm = shm
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.too_large = 0  # answers not stored because they exceed VALUE_SIZE
        self._prefixes: dict[tuple[str, str, str, str], Any] = {}

    @classmethod
    def attach(cls, name: str) -> PredictionCache:
        """Attach to the master's segment by name (in the worker, after the fork)."""
        return cls(ShmCache.attach(name))

    def key(self, model: Any, row: Any) -> bytes:
        """The 16-byte key of a model's answer to a feature row (C-contiguous float32)."""
        identity = (model.product, model.model_id, model.version, model.role)
        prefix = self._prefixes.get(identity)
        if prefix is None:
            prefix = self._remember_prefix(identity)
        digest = prefix.copy()
        digest.update(row)
        return digest.digest()

    def _remember_prefix(self, identity: tuple[str, str, str, str]) -> Any:
        """A blake2b state already fed with a model's identity, kept for its next requests."""
        if len(self._prefixes) >= MAX_MODEL_PREFIXES:
            self._prefixes.clear()
        prefix = _blake2b(digest_size=16)
        for part in identity:
            encoded = part.encode()
            prefix.update(len(encoded).to_bytes(4, "little"))  # ("ab", "c") != ("a", "bc")
            prefix.update(encoded)
        self._prefixes[identity] = prefix
        return prefix

    def get(self, key: bytes, need_explanation: bool) -> tuple[float, list] | None:
        """(score, explanation) of a usable entry, else None; counts the hit or the miss."""
        value = self.shm.get(key)
        if value is None:
            self.misses += 1
            return None
        score, explained = _HEAD.unpack_from(value)
        if not need_explanation:
            self.hits += 1
            return score, []
        if explained != _EXPLAINED:
            self.misses += 1
            return None
        self.hits += 1
        return score, _loads(value[_HEAD_SIZE:])

    def put(self, key: bytes, score: float, explanation: list, explained: bool) -> bool:
        """Store an answer (with its explanation when one was computed); False if too large."""
        if explained:
            value = _HEAD.pack(score, _EXPLAINED) + _dumps(explanation)
        else:
            value = _HEAD.pack(score, _NOT_EXPLAINED)
        if self.shm.put(key, value):
            self.stored += 1
            return True
        self.too_large += 1
        return False

    def close(self) -> None:
        """Unmap the segment in this worker (idempotent)."""
        self.shm.close()
