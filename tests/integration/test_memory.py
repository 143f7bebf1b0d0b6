"""The memory guard with real workers on a real Redis: a task over the hard limit is stopped
while it runs, the soft limit recycles after the task, admission follows a cgroup-like file,
heavy tasks that would not fit run one after the other, and the parent stays small.

Allocations are modest (at most ~260 MB in one child at a time): the machine is shared.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import Broker, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
INTERVAL = 0.1
#: The parent may grow by this much while its children allocate hundreds of MB (it reads their
#: memory; it must never hold it).
PARENT_GROWTH_LIMIT = 40 * MiB


def _conf(**settings: Any) -> dict[str, str]:
    return {"TEST_CONF_JSON": json.dumps({"adaptive_memory_interval": INTERVAL, **settings})}


class ParentWatch:
    """The worker parent's RSS, sampled whenever a test waits (its peak is what counts)."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.process = psutil.Process(worker.pid)
        self.start = self.peak = self.process.memory_info().rss

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def until(self, predicate: Any, timeout: float, message: str) -> Any:
        def check() -> Any:
            self.sample()
            return predicate()

        return wait_until(check, timeout, message=message)


def _memory(worker: WorkerProcess) -> dict[str, Any]:
    return worker.pool_info().get("memory", {})


def _set_usage(directory: Path, used: int) -> None:
    """Replace memory.current in one step, as the kernel's file never shows half a number."""
    tmp = directory / "memory.current.tmp"
    tmp.write_text(f"{used}\n")
    os.replace(tmp, directory / "memory.current")


def _fake_cgroup(tmp_path: Path, limit: int, used: int) -> Path:
    directory = tmp_path / "cgroup"
    directory.mkdir()
    (directory / "memory.max").write_text(f"{limit}\n")
    _set_usage(directory, used)
    return directory


def test_over_the_hard_limit_the_task_is_stopped_while_it_runs_and_requeued(worker_factory, broker: Broker) -> None:
    worker = worker_factory("-c", "2", env=_conf(adaptive_memory_hard_limit="150MiB"))
    parent = ParentWatch(worker)
    before = set(worker.pool_info()["processes"])
    bystander = broker.send("sleep", 4)
    parent.until(lambda: worker.inspect().active().get(worker.hostname), 20, "the bystander to start")

    # 10 MiB every 0.1 s: 100 MiB/s, up to 400 MiB if nothing stops it.
    token = uuid.uuid4().hex
    grower = broker.send("grow", token, 400, 10, 0.1)
    with pytest.raises(Exception) as failure:
        parent.until(lambda: grower.ready(), 60, "the growing task to end")
        grower.get(timeout=1)
    error = failure.value
    assert type(error).__name__ == "MemoryLimitExceeded", repr(error)
    text = str(error)
    assert "adaptive_memory_hard_limit=150MiB" in text and "RSS " in text, text
    rss_at_kill = int(text.split("MiB (")[1].split(" bytes")[0])
    # Stopped within the watcher's interval plus a margin (1 s, for a loaded shared machine):
    # at 100 MiB/s that is at most 110 MiB above the limit; unstopped it would reach 400 MiB
    # above the child's own size.
    assert rss_at_kill <= 150 * MiB + 100 * MiB * (INTERVAL + 1.0), text
    grown = [int(v) for v in broker.redis.lrange(f"grown:{token}", 0, -1)]
    assert grown and grown[-1] < 400

    # The bystander on the other child is untouched; the stopped child is replaced.
    assert bystander.get(timeout=30) in before
    parent.until(lambda: len(worker.pool_info()["processes"]) == 2, 20, "the pool back at two children")
    after = set(worker.pool_info()["processes"])
    assert len(after & before) == 1

    # With acks_late and task_reject_on_worker_lost the message is requeued and runs again.
    token = uuid.uuid4().hex
    result = broker.send("grow_first_time", token, 400, 10, 0.1)
    assert result.get(timeout=60) == 2
    runs = broker.redis.lrange(f"runs:{token}", 0, -1)
    assert len(runs) == 2 and runs[0] != runs[1]

    counters = worker.pool_info()["counters"]
    assert counters["memory_hard_limit"] == 2 and counters["memory_stopped_tasks"] == 2
    assert counters["lost"] == 0
    assert "stopped: its pool child pid=" in worker.log()
    learnt = _memory(worker)["tasks"]
    assert learnt["tests.apps.proj.grow"] >= 50 * MiB, learnt
    parent.sample()
    assert worker.alive() and parent.peak - parent.start < PARENT_GROWTH_LIMIT, (parent.start, parent.peak)


def test_over_the_soft_limit_the_child_finishes_its_task_then_is_replaced(worker_factory, broker: Broker) -> None:
    worker = worker_factory("-c", "2", env=_conf(adaptive_memory_soft_limit="120MiB",
                                                  adaptive_memory_hard_limit="400MiB"))
    parent = ParentWatch(worker)
    token = uuid.uuid4().hex
    pid = broker.send("hold_memory", token, 150, 1.0).get(timeout=30)
    spans = [s.decode().split()[0] for s in broker.redis.lrange(f"spans:{token}", 0, -1)]
    assert spans == ["start", "end"]  # it ran to its end
    parent.until(lambda: pid not in worker.pool_info()["processes"]
                 and len(worker.pool_info()["processes"]) == 2, 20, "the child to be replaced")
    counters = worker.pool_info()["counters"]
    assert counters["memory_soft_limit"] >= 1 and counters["memory_stopped_tasks"] == 0
    assert "over adaptive_memory_soft_limit=120MiB" in worker.log()
    assert [broker.send("add", 1, 1).get(timeout=20) for _ in range(3)] == [2, 2, 2]
    assert parent.peak - parent.start < PARENT_GROWTH_LIMIT


@pytest.mark.xfail(strict=False, reason=(
    "under load on main the pool sometimes reaches its maximum while admission is paused "
    "(autoscaler decisions 'hold 3'): a growth path that bypasses the memory hold, open in issue 18"))
def test_admission_pauses_over_the_threshold_and_resumes_when_memory_falls(
        worker_factory, broker: Broker, tmp_path: Path) -> None:
    limit = 1_000_000_000
    cgroup = _fake_cgroup(tmp_path, limit, 500_000_000)
    env = _conf(adaptive_memory_cgroup=str(cgroup), adaptive_memory_admission_threshold="80%")
    worker = worker_factory("--autoscale", "3,1", env={**env, "TEST_STABILIZATION": "1"})
    # A task of a second, so that a backlog of them asks the autoscaler for more children;
    # then back to one child before memory runs short.
    assert broker.send("sleep", 1.0).get(timeout=20)
    def settled() -> bool:
        info = worker.pool_info()
        tick = info.get("autoscaler", {}).get("last-tick", {})
        return info["target"] == 1 and "forecast 0.0/s" in tick.get("reason", "")

    wait_until(settled, 30, message="the pool back at one child, the load over")
    assert _memory(worker)["source"] == f"cgroup v2 {cgroup}"

    _set_usage(cgroup, 900_000_000)
    wait_until(lambda: _memory(worker)["admission"] == "paused", 20, message="admission to pause")
    # Three: within the prefetch of one child (x4), so all of them reach the pool.
    results = [broker.send("sleep", 1.0) for _ in range(3)]
    info = wait_until(lambda: (lambda i: i if i["queued"] == 3 else None)(worker.pool_info()), 20,
                      message="the tasks to wait in the pool")
    assert info["memory"]["threshold_bytes"] == 800_000_000 and info["memory"]["used_bytes"] == 900_000_000
    assert not any(r.ready() for r in results)  # nothing started
    # The autoscaler sees the backlog, and says why it does not grow.
    tick = wait_until(lambda: worker.pool_info().get("autoscaler", {}).get("last-tick"), 20,
                      message="an autoscaler decision")
    wait_until(lambda: "adaptive_memory_admission_threshold" in
               worker.pool_info()["autoscaler"]["last-tick"]["reason"], 20,
               message=f"the autoscaler to hold for memory (last: {tick})")
    assert worker.pool_info()["target"] == 1

    _set_usage(cgroup, 300_000_000)
    pids = {r.get(timeout=30) for r in results}
    assert pids
    memory = _memory(worker)
    assert memory["admission"] == "open" and memory["pauses"] == 1 and memory["paused_s"] > 0
    assert worker.pool_info()["counters"]["admission_pauses"] == 1
    assert "No task starts until memory falls" in worker.log()


class TrackingCgroup:
    """A cgroup-like directory whose memory.current follows the worker's children: a fixed
    base plus the sum of their RSS, rewritten every 50 ms (as the kernel's charge would move)."""

    def __init__(self, directory: Path, worker: WorkerProcess, limit: int, free: int) -> None:
        self.directory = directory
        self.worker = worker
        # What is left free while the children are idle, whatever their size on this machine.
        self.base = limit - free - self._children_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrackingCgroup:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _children_rss(self) -> int:
        total = 0
        for pid in self.worker.child_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            _set_usage(self.directory, self.base + self._children_rss())


def test_heavy_tasks_that_would_not_fit_together_run_one_after_the_other(
        worker_factory, broker: Broker, tmp_path: Path) -> None:
    # 160 MB free next to the idle children: one task growing by ~100 MiB fits, two do not.
    cgroup = _fake_cgroup(tmp_path, 1_000_000_000, 800_000_000)
    worker = worker_factory("-c", "2", env=_conf(adaptive_memory_cgroup=str(cgroup)))
    parent = ParentWatch(worker)
    with TrackingCgroup(cgroup, worker, 1_000_000_000, 160_000_000):
        learn = uuid.uuid4().hex
        broker.send("hold_memory", learn, 100, 0.5).get(timeout=30)  # alone: now it is known
        learnt = wait_until(lambda: _memory(worker)["tasks"].get("tests.apps.proj.hold_memory"), 10,
                            message="the task's memory to be learnt")
        assert 80 * MiB <= learnt <= 140 * MiB, _memory(worker)

        token = uuid.uuid4().hex
        first, second = (broker.send("hold_memory", token, 100, 1.0) for _ in range(2))
        quick = broker.send("add", 2, 2)
        assert quick.get(timeout=20) == 4  # light work is not held behind the heavy ones
        parent.until(lambda: first.ready() and second.ready(), 60, "both heavy tasks")
    spans = [s.decode().split() for s in broker.redis.lrange(f"spans:{token}", 0, -1)]
    assert [kind for kind, _, _ in spans] == ["start", "end", "start", "end"], spans
    assert parent.peak - parent.start < PARENT_GROWTH_LIMIT
