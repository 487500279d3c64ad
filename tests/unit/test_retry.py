"""Retry back-off (kaiju_tasks.retry): 1x, 2x, 4x, ... the task's retry_delay after a failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kaiju_tasks.retry import next_attempt_at

FAILED = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_the_first_retry_waits_the_delay_then_each_waits_twice_as_long() -> None:
    waits = [next_attempt_at(30, n, FAILED) - FAILED for n in range(4)]
    assert waits == [timedelta(seconds=s) for s in (30, 60, 120, 240)]


def test_no_delay_means_at_once() -> None:
    assert next_attempt_at(0, 5, FAILED) == FAILED


def test_the_longest_allowed_back_off_is_a_date_not_an_overflow() -> None:
    # retry_delay <= 86,400 s and max_retries <= 10: the tenth retry waits 1,024 days.
    assert next_attempt_at(86_400, 10, FAILED) == FAILED + timedelta(days=1024)


def test_the_time_zone_of_the_failure_is_kept() -> None:
    assert next_attempt_at(10, 1, FAILED).tzinfo is UTC


@pytest.mark.parametrize(("delay", "retries"), [(-1, 0), (10, -1)])
def test_negative_inputs_are_refused(delay: int, retries: int) -> None:
    with pytest.raises(ValueError, match="at least 0"):
        next_attempt_at(delay, retries, FAILED)
