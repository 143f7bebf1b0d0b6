"""The predictive autoscaler with real workers on a real Redis: grows under load, drains back
to the minimum afterwards, never loses or repeats a task, and prefetch follows capacity
(children x multiplier, plus one per ETA task Celery holds)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import wait_until

pytestmark = pytest.mark.integration

FAST = {"TEST_STABILIZATION": "3", "TEST_CONTROL_INTERVAL": "0.5"}


class Sampler:
    """Samples (children, prefetch, target, prefetch capacity) from `inspect stats` in a bounded
    background loop."""

    def __init__(self, worker, period: float = 0.5, limit: float = 120.0) -> None:
        self.worker = worker
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period, limit), daemon=True)

    def _run(self, period: float, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                stats = self.worker.stats()
                pool = stats["pool"]
                self.samples.append((time.monotonic(), len(pool["processes"]),
                                     int(stats["prefetch_count"]), int(pool["target"]),
                                     int(pool["prefetch"]["capacity"])))
            except Exception:
                pass
            self._stop.wait(period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _run_pattern(broker, batches: list[tuple[int, float, float]], eta: int = 0) -> list:
    """Send ``eta`` countdown tasks, then (count, task_seconds, pause_after) batches; returns
    the results."""
    results = [broker.send("late_sleep", 0.05, countdown=6) for _ in range(eta)]
    for count, seconds, pause in batches:
        results.extend(broker.send("late_sleep", seconds) for _ in range(count))
        time.sleep(pause)
    return results


def _check(worker, broker, results, sampler: Sampler, eta: int) -> None:
    values = [r.get(timeout=90) for r in results]
    assert all(isinstance(v, int) for v in values)
    assert "WorkerLostError" not in worker.log()
    assert max(s[3] for s in sampler.samples) > 1, sampler.samples  # it grew
    for _, _children, prefetch, target, capacity in sampler.samples:
        # The capacity part follows the target; Celery's one per held ETA task stays on top
        # (a resize that set the prefetch to target x 4 erased it).
        assert capacity == target * 4, sampler.samples
        assert 0 <= prefetch - capacity <= eta, sampler.samples
    if eta:
        assert any(s[2] - s[4] == eta and s[3] > 1 for s in sampler.samples), sampler.samples
    # Back to the minimum once the load has gone.
    try:
        wait_until(lambda: worker.pool_info()["target"] == 1 and len(worker.child_pids()) == 1,
                   timeout=60, interval=0.5, message="drain back to min")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {worker.pool_info()}\n{worker.log()[-3000:]}") from None
    assert worker.stats()["prefetch_count"] == 4  # the ETA tasks ran: children x multiplier
    # Every task ran exactly once: the worker's own count equals what we sent.
    total = sum(worker.stats()["total"].values())
    assert total == len(results)


@pytest.mark.parametrize(
    ("pattern", "eta"),
    [
        pytest.param([(12, 0.3, 3.0), (12, 0.3, 0.0)], 0, id="spiky"),
        # Countdown tasks held while the pool grows and shrinks under them.
        pytest.param([(12, 0.3, 3.0), (12, 0.3, 0.0)], 4, id="spiky-eta"),
        pytest.param([(2, 0.2, 0.25)] * 16, 0, id="steady"),
        pytest.param([(n, 0.2, 0.4) for n in (1, 2, 3, 5, 7, 5, 3, 2, 1)], 0, id="gradual"),
    ],
)
def test_grows_under_load_and_drains_back(worker_factory, broker, pattern, eta):
    worker = worker_factory("--autoscale", "4,1", env=FAST)
    assert worker.pool_info()["autoscale"] is True
    assert worker.stats()["prefetch_count"] == 4
    with Sampler(worker) as sampler:
        results = _run_pattern(broker, pattern, eta)
        for r in results:
            r.get(timeout=90)
        time.sleep(1.0)
    _check(worker, broker, results, sampler, eta)


def test_autoscale_remote_control_sets_bounds(worker_factory, broker):
    worker = worker_factory("--autoscale", "4,1", env=FAST)
    reply = worker.control("autoscale", max=3, min=2)
    assert "max=3 min=2" in str(reply)
    wait_until(lambda: len(worker.child_pids()) == 2, message="min raised to 2")
    info = worker.pool_info()
    assert (info["min-children"], info["max-children"]) == (2, 3)
    assert worker.stats()["prefetch_count"] == 8
    # As with prefork, manual resizing is refused while autoscaling (Celery 5.7's rule).
    assert "not supported with autoscale" in str(worker.control("pool_grow", n=2))
    results = [broker.send("late_sleep", 0.3) for _ in range(30)]
    wait_until(lambda: worker.pool_info()["target"] == 3, timeout=20, message="grow to max 3")
    assert all(isinstance(r.get(timeout=60), int) for r in results)
    assert max(len(worker.child_pids()), worker.pool_info()["target"]) <= 3


def test_autoscale_setting_without_cli_flag(worker_factory, broker):
    worker = worker_factory("-c", "1", env={**FAST, "TEST_AUTOSCALE": "1", "TEST_MAX_CHILDREN": "3"})
    info = worker.pool_info()
    assert info["autoscale"] is True and info["max-children"] == 3
    results = [broker.send("late_sleep", 0.3) for _ in range(20)]
    wait_until(lambda: worker.pool_info()["target"] > 1, timeout=20, message="growth")
    assert all(isinstance(r.get(timeout=60), int) for r in results)


def test_nonsense_bounds_fail_at_start(worker_factory, broker):
    worker = worker_factory("-c", "1", env={"TEST_AUTOSCALE": "1", "TEST_MIN_CHILDREN": "5",
                                            "TEST_MAX_CHILDREN": "2"}, wait=False)
    assert worker.wait_exit(40) not in (None, 0)
    assert "adaptive_min_children=5" in worker.log()
    assert worker.child_pids() == []
