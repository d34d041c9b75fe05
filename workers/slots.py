"""Worker slots: which prediction-log ring each HTTP worker appends to.

gunicorn numbers nothing: a worker is a pid in ``Arbiter.WORKERS``. The master gives each new
worker the lowest slot no live worker holds (``pre_fork``, in the master, so two workers never
share a ring), and the worker hands it to the application (``post_fork``, in the child) before
gunicorn calls ``SiraApplication.load()``. A worker that replaces a dead one takes the dead one's
slot and appends after what it left, which the writer drains.

There are as many slots as ``SIRA_WORKERS``. A worker beyond them (``TTIN`` raised the count)
gets no slot: it is refused at once, with a log line, and the worker count stays at the slots.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("sira.master")

SLOT_ATTRIBUTE = "sira_slot"


def lowest_free_slot(held: set[int], slots: int) -> int | None:
    """The lowest slot in ``range(slots)`` not in ``held``; None when all are held."""
    for slot in range(slots):
        if slot not in held:
            return slot
    return None


def assign_worker_slot(server, worker) -> None:
    """gunicorn pre_fork hook, in the master: the new worker's slot, from the live workers' ones."""
    slots = server.app.app_config.prediction_log.slots
    held = {getattr(live, SLOT_ATTRIBUTE, None) for live in server.WORKERS.values()}
    slot = lowest_free_slot(held, slots)
    if slot is None:
        log.error("no prediction-log slot left for a new worker: SIRA_WORKERS=%d fixes the number "
                  "of workers; restart with more to grow", slots)
        server.num_workers = slots
    setattr(worker, SLOT_ATTRIBUTE, slot)


def take_worker_slot(server, worker) -> None:
    """In the new worker (post_fork): hand the slot to the application, or leave without one."""
    slot = getattr(worker, SLOT_ATTRIBUTE, None)
    if slot is None:
        sys.exit(0)  # the master's count was already lowered: it does not replace this worker
    server.app.worker_slot = slot
