"""A child that stalls holds up nothing but itself (real workers).

Before the supervisor read pipes without blocking, a child that wrote part of a frame and
stopped froze the parent's only reader: other children's results went unread and the
stalled task's hard time limit never fired.
"""

from __future__ import annotations

import time

import pytest

from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("stall", ["stop_self", "half_frame"])
def test_a_stalled_child_does_not_hold_up_the_pool(worker_factory, broker, stall: str) -> None:
    worker = worker_factory("-c", "2", "--time-limit", "3")
    before = set(worker.pool_info()["processes"])
    assert len(before) == 2
    stalled = broker.send(stall)
    # Wait until a child has taken it (it will never answer on its own).
    wait_until(lambda: any(worker.inspect().active().get(worker.hostname, [])), 10,
               message="the stalling task to start")
    started = time.monotonic()
    quick = [broker.send("add", i, i) for i in range(6)]
    assert [r.get(timeout=20) for r in quick] == [2 * i for i in range(6)]
    with pytest.raises(Exception) as failure:
        stalled.get(timeout=20)
    elapsed = time.monotonic() - started
    assert "TimeLimitExceeded" in repr(failure.value) or stalled.state == "FAILURE"
    # The limit is 3 s from the task's start; generous margin for a loaded 2-core machine.
    assert elapsed < 15, f"hard limit fired after {elapsed:.1f}s"
    wait_until(lambda: len(worker.pool_info().get("processes", [])) == 2, 20,
               message="the pool back at full strength")
    after = set(worker.pool_info()["processes"])
    assert len(after & before) == 1  # the stalled child was replaced, the other kept
    assert [broker.send("add", 1, 1).get(timeout=20) for _ in range(3)] == [2, 2, 2]
