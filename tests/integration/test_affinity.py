"""Affinity keys and work stealing with a real worker on a real Redis."""

from __future__ import annotations

import time

import pytest

from tests.support import wait_until

pytestmark = pytest.mark.integration


def test_keyed_stream_sticks_to_one_child_and_moves_on_recycle(worker_factory, broker):
    worker = worker_factory("-c", "3", "--max-tasks-per-child", "8")
    wait_until(lambda: all(c["state"] == "idle" for c in worker.pool_info()["children"]),
               message="children ready")
    headers = {"affinity": "tenant-42"}

    def one() -> int:
        # The client sees the result before the pool has processed the child's report, so wait
        # for the pool to be idle: the owner then has capacity when the next task arrives.
        pid = broker.send("pid", headers=headers).get(timeout=20)
        wait_until(lambda: worker.pool_info()["in-flight"] == 0, message="pool idle")
        return pid

    first = [one() for _ in range(8)]
    assert len(set(first)) == 1, first
    owner = first[0]
    # The owner reached max-tasks-per-child and was recycled: the key moves to one other child.
    wait_until(lambda: owner not in worker.child_pids() and len(worker.child_pids()) == 3,
               message="owner recycled")
    second = [one() for _ in range(5)]
    assert len(set(second)) == 1 and second[0] != owner, second
    info = worker.pool_info()
    assert info["scheduler"]["keyed"] >= 13
    assert info["scheduler"]["local-hits"] >= 13


def test_different_keys_spread_over_children(worker_factory, broker):
    worker = worker_factory("-c", "3")
    wait_until(lambda: all(c["state"] == "idle" for c in worker.pool_info()["children"]),
               message="children ready")
    owners = {}
    for tenant in range(24):
        owners[tenant] = broker.send("pid", headers={"affinity": f"t{tenant}"}).get(timeout=20)
    assert len(set(owners.values())) == 3  # 24 keys over 3 children: every child owns some
    # And the mapping is stable.
    for tenant in range(0, 24, 5):
        assert broker.send("pid", headers={"affinity": f"t{tenant}"}).get(timeout=20) == owners[tenant]


def test_idle_child_steals_when_owner_is_busy(worker_factory, broker):
    worker = worker_factory("-c", "2")
    wait_until(lambda: all(c["state"] == "idle" for c in worker.pool_info()["children"]),
               message="children ready")
    headers = {"affinity": "hot-tenant"}
    results = [broker.send("sleep", 0.5, headers=headers) for _ in range(6)]
    pids = [r.get(timeout=30) for r in results]
    assert len(set(pids)) == 2, pids  # the non-owner stole queued work instead of idling
    assert worker.pool_info()["scheduler"]["steals"] >= 1


def test_short_tasks_not_stuck_behind_long_ones(worker_factory, broker):
    """With long tasks running on every child and work waiting, a head-of-line child serves
    the short ones (triggered by what runs, not by task names)."""
    worker = worker_factory("-c", "2", env={"TEST_SHORT_LANES": "1"})
    wait_until(lambda: all(c["state"] == "idle" for c in worker.pool_info()["children"]),
               message="children ready")
    assert len(worker.child_pids()) == 2  # no lane until a long task shows up
    longs = [broker.send("spin", 1.5) for _ in range(4)]
    # Both general children are now busy for 1.5 s; spin runs past the 0.1 s threshold, so it
    # counts as long and a lane starts.
    lane = wait_until(lambda: [c for c in worker.pool_info()["children"]
                               if c["lane"] and c["state"] != "starting"], message="a lane")
    started = time.monotonic()
    shorts = [broker.send("add", i, i).get(timeout=20) for i in range(5)]
    elapsed = time.monotonic() - started
    assert shorts == [2 * i for i in range(5)]
    info = worker.pool_info()
    lane_pid = lane[0]["pid"]
    assert [c for c in info["children"] if c["pid"] == lane_pid][0]["tasks"] >= 5, (info, elapsed)
    assert all(isinstance(r.get(timeout=30), int) for r in longs)  # long tasks still ran
    # The lane only ever ran short tasks, and it retires once the head of the line is clear.
    wait_until(lambda: lane_pid not in worker.child_pids(), timeout=30, interval=0.5,
               message="lane retired")
