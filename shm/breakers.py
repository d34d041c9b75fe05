"""Circuit breakers of canary models, at the end of the model stats segment: one writer, every worker reads.

The supervisor (workers/canary_watch.py) is the only writer: it opens a canary's breaker after
too many failures, half-opens it after a cool-down and closes it once the canary answers again.
A worker reads one cell per canary-routed event: while the breaker is open the event goes to
production (``app/store/swap.py``). The layout follows the stats regions of shm/model_stats.py::

    breaker b = BREAKER_CELLS cells from breaker_base(block) + b * BREAKER_CELLS:
        0 model id, high u64 | 1 model id, low u64 | 2 used (1) | 3 state (0 closed, 1 open, 2 half-open)
        4 times opened | 5 unix ms of the last change | 6 the canary's errors when it last changed
        7 the canary's requests when it last changed
"""

from __future__ import annotations

import uuid
from typing import Final

from shm.counters import CounterBlock

BREAKERS: Final = 16
BREAKER_CELLS: Final = 8
CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES: Final = ("closed", "open", "half_open")
_KEY_HIGH, _KEY_LOW, _USED, STATE, TRIPS, CHANGED_MS, ERRORS_MARK, REQUESTS_MARK = range(BREAKER_CELLS)


def breaker_cells() -> int:
    return BREAKERS * BREAKER_CELLS


def breaker_base(block: CounterBlock) -> int:
    """The first breaker cell: the breakers are the block's last cells."""
    return block.cells - breaker_cells()


def model_id_cells(model_id: str) -> tuple[int, int]:
    """A model id (a UUID) as the two u64 cells that key it, here and in shm/model_stats.py."""
    value = uuid.UUID(model_id).int
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def model_id_of(high: int, low: int) -> str:
    return str(uuid.UUID(int=(high << 64) | low))


def used_breakers(block: CounterBlock) -> list[tuple[int, str]]:
    """(first cell, model id) of every breaker in use."""
    base = breaker_base(block)
    cells = [base + index * BREAKER_CELLS for index in range(BREAKERS)]
    return [(cell, model_id_of(block.get(cell + _KEY_HIGH), block.get(cell + _KEY_LOW)))
            for cell in cells if block.get(cell + _USED)]


def find_breaker(block: CounterBlock, model_id: str) -> int | None:
    """The first cell of the model's breaker, or None."""
    return next((cell for cell, used_by in used_breakers(block) if used_by == model_id), None)


def claim_breaker(block: CounterBlock, model_id: str, keep: set[str]) -> int | None:
    """The model's breaker (writer only), claimed closed if new; an entry that is free, or of a model
    not in ``keep``, is reused. None when every entry is taken by a kept model."""
    in_use = dict(used_breakers(block))
    for cell, used_by in in_use.items():
        if used_by == model_id:
            return cell
    base = breaker_base(block)
    for cell in (base + index * BREAKER_CELLS for index in range(BREAKERS)):
        if in_use.get(cell) in keep:
            continue
        for offset in range(BREAKER_CELLS):
            block.set(cell + offset, 0)
        high, low = model_id_cells(model_id)
        block.set(cell + _KEY_HIGH, high)
        block.set(cell + _KEY_LOW, low)
        block.set(cell + _USED, 1)  # last: the entry is complete, closed
        return cell
    return None


def breaker_states(block: CounterBlock) -> dict[str, tuple[int, int]]:
    """model id -> (state, times opened) of every breaker in use (the metrics' reader)."""
    return {model_id: (block.get(cell + STATE), block.get(cell + TRIPS)) for cell, model_id in used_breakers(block)}
