"""The child's soft-limit guard: a SIGUSR1 raises in the task it was meant for, exactly once.

Driven by calling the handler directly (as the signal would), on a real clock with limits far
from the tolerance so the test is not timing-sensitive."""

from __future__ import annotations

import time

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from celery_adaptive.child import SOFT_LIMIT_TOLERANCE_S, _SoftLimitGuard


def test_a_signal_between_tasks_is_ignored() -> None:
    guard = _SoftLimitGuard()
    guard.handler(0, None)
    guard.begin(None)
    guard.enter()  # nothing pending from before the task


def test_a_signal_inside_the_task_raises_once() -> None:
    guard = _SoftLimitGuard()
    guard.begin(None)
    guard.enter()
    with pytest.raises(SoftTimeLimitExceeded):
        guard.handler(0, None)
    guard.handler(0, None)  # a second one (the task caught the first) does nothing
    guard.end()


def test_a_signal_before_the_task_code_is_kept_until_it_starts() -> None:
    guard = _SoftLimitGuard()
    guard.begin(0.0)  # a soft limit already due when the child accepted the job
    guard.handler(0, None)  # lands between JobAccepted and the task's first line
    with pytest.raises(SoftTimeLimitExceeded):
        guard.enter()
    guard.end()


def test_a_late_signal_for_the_previous_job_spares_the_next() -> None:
    guard = _SoftLimitGuard()
    guard.begin(60.0)  # the next job: it has not run anywhere near its limit
    guard.enter()
    guard.handler(0, None)  # meant for the job before
    guard.end()


def test_the_tolerance_covers_a_signal_sent_on_time() -> None:
    guard = _SoftLimitGuard()
    guard.begin(SOFT_LIMIT_TOLERANCE_S / 2)
    guard.enter()
    time.sleep(0.001)
    with pytest.raises(SoftTimeLimitExceeded):
        guard.handler(0, None)
