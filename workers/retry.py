"""Jittered exponential backoff with a cap: the one retry policy of SIRA's outbound calls.

The supervisor (registry syncs, the NOTIFY listener), the prediction writer (Postgres while it is
away) and the master (Postgres at start) all wait between attempts with a `Backoff`, never with a
loop of their own. The n-th delay after a failure (n from 0) is drawn uniformly from

    [(1 - jitter) * step, step]    where step = min(cap_s, first_s * 2 ** n)

jitter=1 is "full jitter", jitter=0.5 "equal jitter" (the AWS Architecture Blog's names). We use 0.5
by default: instances that lost the same Postgres at the same moment spread their retries over half
of each step, and none retries in a tight loop (a delay is never below half its step).

S3 is not retried here: boto3 retries each request itself (botocore's "standard" retry mode,
exponential backoff with jitter, a capped number of attempts, connect and read timeouts, set
explicitly in app/store/buckets.py). Wrapping it in a loop of ours would multiply the attempts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sira.retry")

T = TypeVar("T")


class Backoff:
    """The delays between attempts of one call: `next_delay()` after each failure, `reset()` after a success.

    Not thread safe: one per retrying loop.
    """

    def __init__(self, first_s: float, cap_s: float, jitter: float = 0.5,
                 rng: Callable[[], float] = random.random):
        if not 0 < first_s <= cap_s:
            raise ValueError(f"a backoff needs 0 < first_s <= cap_s, got {first_s} and {cap_s}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be from 0 to 1, got {jitter}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.jitter = jitter
        self.rng = rng
        self.failures = 0  # failures since the last reset

    def step(self) -> float:
        """The upper bound of the next delay: first_s doubled per failure, at most cap_s."""
        if self.failures >= 64:  # 2 ** 64 * first_s is past any cap; avoid float overflow
            return self.cap_s
        return min(self.cap_s, self.first_s * 2 ** self.failures)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; counts one more failure."""
        step = self.step()
        self.failures += 1
        return step * (1 - self.jitter * self.rng())

    def reset(self) -> None:
        """The call succeeded: the next failure starts again from first_s."""
        self.failures = 0


def call_with_retries(call: Callable[[], T], backoff: Backoff, retry_on: tuple[type[BaseException], ...],
                      give_up_after_s: float, what: str, *, sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> T:
    """call() until it returns, waiting backoff's delays after the errors of retry_on.

    Raises the last error once the next attempt would start more than give_up_after_s after the
    first; any other error at once. Each retry is logged at debug level only: the caller says once
    what the outcome means.
    """
    deadline = clock() + give_up_after_s
    while True:
        try:
            return call()
        except retry_on as exc:
            delay = backoff.next_delay()
            if clock() + delay > deadline:
                raise
            log.debug("%s failed (%s: %s); attempt %d in %.2fs", what, type(exc).__name__, exc,
                      backoff.failures + 1, delay)
            sleep(delay)
