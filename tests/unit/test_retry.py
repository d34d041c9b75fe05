"""workers/retry.py: the one backoff of SIRA's outbound calls."""

from __future__ import annotations

import itertools

import pytest

from workers.retry import Backoff, call_with_retries


def test_delays_double_from_first_to_the_cap_without_jitter():
    backoff = Backoff(1.0, 10.0, jitter=0)
    assert [backoff.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_every_delay_stays_within_its_jittered_step(jitter):
    backoff = Backoff(0.5, 5.0, jitter=jitter)
    for failure in range(200):
        step = min(5.0, 0.5 * 2 ** failure)
        delay = backoff.next_delay()
        assert step * (1 - jitter) <= delay <= step


def test_jitter_spreads_over_the_whole_range():
    shortest = Backoff(8.0, 8.0, jitter=0.5, rng=lambda: 1.0)
    longest = Backoff(8.0, 8.0, jitter=0.5, rng=lambda: 0.0)
    assert (shortest.next_delay(), longest.next_delay()) == (4.0, 8.0)
    draws = {round(Backoff(8.0, 8.0, jitter=0.5).next_delay(), 3) for _ in range(200)}
    assert len(draws) > 100  # not a constant: two instances do not retry in step


def test_reset_starts_again_from_first():
    backoff = Backoff(1.0, 30.0, jitter=0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0 and backoff.next_delay() == 1.0


def test_many_failures_stay_at_the_cap():
    backoff = Backoff(1.0, 30.0, jitter=0)
    backoff.failures = 10_000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize("args", [(0, 1), (2, 1), (1, 2, 1.5), (1, 2, -0.1)])
def test_bad_parameters_are_refused(args):
    with pytest.raises(ValueError):
        Backoff(*args)


def test_call_with_retries_returns_once_the_call_succeeds():
    answers = iter([ConnectionError("down"), ConnectionError("down"), "ok"])
    slept = []

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = call_with_retries(call, Backoff(1.0, 4.0, jitter=0), (ConnectionError,), 60, "test",
                               sleep=slept.append, clock=lambda: 0.0)
    assert result == "ok" and slept == [1.0, 2.0]


def test_call_with_retries_gives_up_when_the_next_attempt_would_pass_the_deadline():
    now = itertools.count()  # every clock read is one second later
    slept = []

    def call():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        call_with_retries(call, Backoff(1.0, 1.0, jitter=0), (ConnectionError,), 5, "test",
                          sleep=slept.append, clock=lambda: float(next(now)))
    assert 0 < len(slept) < 5


def test_call_with_retries_does_not_retry_other_errors():
    calls = []

    def call():
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call_with_retries(call, Backoff(1.0, 1.0), (ConnectionError,), 60, "test", sleep=lambda s: None)
    assert len(calls) == 1
