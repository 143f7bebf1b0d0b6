"""Celery worker settings that prefork honours, with real workers: each test runs the same
scenario under prefork and under this pool and asserts what prefork does.

The settings here act in Celery's request and shutdown code, not in the pool; what the pool
must get right is what it reports (the result tuple, TimeLimitExceeded, Terminated) and that
its children, its `stop` and `terminate` behave like prefork's inside those paths.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.support import POOL, Broker, wait_until

pytestmark = pytest.mark.integration

POOLS = [pytest.param(["-P", "prefork"], id="prefork"), pytest.param(["-P", POOL], id="adaptive")]


def _runs(broker: Broker, token: str) -> list[int]:
    return [int(p) for p in broker.redis.lrange(f"runs:{token}", 0, -1)]


def _done(broker: Broker, token: str) -> list[int]:
    return [int(p) for p in broker.redis.lrange(f"done:{token}", 0, -1)]


def _queued_ids(broker: Broker) -> list[str]:
    """Task ids of the messages waiting in the test's queue (redelivered ones included)."""
    return [json.loads(raw)["headers"]["id"] for raw in broker.redis.lrange(broker.queue, 0, -1)]


def _held_ids(broker: Broker) -> list[str]:
    """Task ids of this test's queue in kombu's ``unacked`` hash: delivered to a worker and
    not yet acked. The hash is shared by every queue of the Redis database, so other tests'
    entries (and malformed ones) are left out."""
    ids = []
    for raw in broker.redis.hvals("unacked"):
        try:
            message, _exchange, routing_key = json.loads(raw)
            task_id = message["headers"]["id"]
        except (ValueError, TypeError, KeyError):
            continue
        if routing_key == broker.queue:
            ids.append(task_id)
    return ids


def _state(broker: Broker, task_id: str) -> tuple[str, object]:
    meta = broker.app.backend.get_task_meta(task_id, cache=False)
    return meta["status"], meta["result"]


def _conf(**settings: object) -> dict[str, str]:
    return {"TEST_CONF_JSON": json.dumps(settings)}


@pytest.mark.parametrize("pool_arg", POOLS)
def test_acks_on_failure_or_timeout_false_with_acks_late(worker_factory, broker, pool_arg):
    """task_acks_on_failure_or_timeout=False: a task that fails is rejected without requeue
    (it runs once, FAILURE), and one that hits its hard time limit is requeued and runs again
    (prefork's Request.on_failure; the pool's part is reporting the failure and the timeout)."""
    worker_factory("-c", "2", pool_arg=pool_arg,
                   env=_conf(task_acks_late=True, task_acks_on_failure_or_timeout=False))
    failing, hanging = uuid.uuid4().hex, uuid.uuid4().hex
    failed = broker.send("fail_counted", failing)
    timed_out = broker.send("hang_first_run", hanging, 30.0, time_limit=1)
    with pytest.raises(ValueError, match="fails on purpose"):
        failed.get(timeout=30)
    # The timeout is recorded as a FAILURE first (as prefork does), then the redelivered
    # message runs again and its result replaces it.
    wait_until(lambda: _state(broker, timed_out.id) == ("SUCCESS", 2), timeout=60,
               message="the redelivered task to succeed")
    wait_until(lambda: not _held_ids(broker) and broker.queue_length() == 0,
               message="nothing left queued or held")
    assert len(_runs(broker, failing)) == 1  # rejected without requeue: never redelivered
    assert len(_runs(broker, hanging)) == 2  # not acked on timeout: redelivered once


def _started_and_quit(worker, broker: Broker, tokens: list[str]) -> None:
    wait_until(lambda: all(_runs(broker, t) for t in tokens), timeout=30, message="tasks running")
    worker.signal(signal.SIGQUIT)
    wait_until(lambda: "Initiating Soft Shutdown" in worker.log() or not worker.alive(),
               timeout=30, message="the soft shutdown to begin")
    assert "Initiating Soft Shutdown" in worker.log()


@pytest.mark.parametrize("pool_arg", POOLS)
def test_soft_shutdown_lets_running_tasks_finish_then_requeues_the_rest(
    worker_factory, broker, pool_arg, tmp_path: Path
):
    """SIGQUIT with worker_soft_shutdown_timeout: a task that ends within the window completes
    and is acked (its result stays, it is not redelivered); one still running when the window
    closes is cancelled and its acks_late message goes back to the queue."""
    worker = worker_factory("-c", "2", pool_arg=pool_arg,
                            env=_conf(task_acks_late=True, worker_soft_shutdown_timeout=8.0))
    flag = tmp_path / "finish"
    quick, slow = uuid.uuid4().hex, uuid.uuid4().hex
    finishing = broker.send("wait_for_file", quick, str(flag), 60.0)
    cancelled = broker.send("wait_for_file", slow, str(tmp_path / "never"), 60.0)
    _started_and_quit(worker, broker, [quick, slow])
    flag.touch()  # during the soft shutdown window: this task ends inside it
    assert worker.wait_exit(60) is not None, "the worker did not exit"
    assert finishing.get(timeout=10) in _runs(broker, quick)  # acknowledged and its result kept
    assert len(_done(broker, quick)) == 1
    assert _done(broker, slow) == []
    # Nothing acknowledged is lost and nothing unfinished is dropped: exactly the cancelled
    # task's message is back in the queue.
    assert _queued_ids(broker) == [cancelled.id]
    assert _held_ids(broker) == []


@pytest.mark.parametrize("pool_arg", POOLS)
def test_soft_shutdown_on_idle_waits_and_requeues_held_eta_tasks(worker_factory, broker, pool_arg):
    """worker_enable_soft_shutdown_on_idle: an idle worker holding ETA tasks still takes the
    soft shutdown window on SIGQUIT, and the ETA messages go back to the queue."""
    worker = worker_factory("-c", "1", pool_arg=pool_arg,
                            env=_conf(worker_soft_shutdown_timeout=2.0,
                                      worker_enable_soft_shutdown_on_idle=True))
    later = [broker.send("add", i, i, countdown=3600) for i in range(2)]
    wait_until(lambda: sorted(_held_ids(broker)) == sorted(r.id for r in later),
               message="the worker to hold the ETA tasks")
    worker.signal(signal.SIGQUIT)
    assert worker.wait_exit(60) is not None, "the worker did not exit"
    assert "Initiating Soft Shutdown" in worker.log()
    assert sorted(_queued_ids(broker)) == sorted(r.id for r in later)
    assert _held_ids(broker) == []


@pytest.mark.parametrize("pool_arg", POOLS)
def test_disable_prefetch_holds_no_more_tasks_than_children(worker_factory, broker, pool_arg,
                                                            tmp_path: Path):
    """worker_disable_prefetch (Celery 5.6+, Redis): the worker takes a message only while it
    holds fewer than ``pool.num_processes``; the rest stay in the queue for other workers."""
    from celery.app.defaults import NAMESPACES

    if "disable_prefetch" not in NAMESPACES["worker"]:
        pytest.skip("this Celery has no worker_disable_prefetch (added in 5.6)")
    worker_factory("-c", "2", pool_arg=pool_arg,
                   env=_conf(task_acks_late=True, worker_disable_prefetch=True))
    tokens = [uuid.uuid4().hex for _ in range(5)]
    results = [broker.send("wait_for_file", t, str(tmp_path / t), 60.0) for t in tokens]
    most_held = 0

    def started() -> list[str]:
        nonlocal most_held
        most_held = max(most_held, len(_held_ids(broker)))  # sampled on every poll
        return [t for t in tokens if _runs(broker, t)]

    wait_until(lambda: len(started()) >= 2, message="two tasks running")
    released: set[str] = set()
    for _ in tokens:  # release one running task at a time; the next one starts in its place
        running = [t for t in started() if t not in released]
        if not running:
            break
        (tmp_path / running[0]).touch()
        released.add(running[0])
        wanted = min(len(tokens), len(released) + 2)
        wait_until(lambda wanted=wanted: len(started()) >= wanted, timeout=30,
                   message="the next task to start")
    for t in tokens:
        (tmp_path / t).touch()
    assert [r.get(timeout=30) > 0 for r in results] == [True] * len(tokens)
    assert most_held == 2, f"the worker held {most_held} messages at once with 2 children"


@pytest.mark.parametrize("pool_arg", POOLS)
def test_replacement_child_hung_in_process_init_is_killed_after_proc_alive_timeout(
    worker_factory, broker, pool_arg, tmp_path: Path
):
    """worker_proc_alive_timeout: a new child that has not reported ready (here: stuck in a
    worker_process_init receiver) within it is killed and replaced, as prefork does."""
    worker = worker_factory("-c", "1", pool_arg=pool_arg,
                            env={**_conf(worker_proc_alive_timeout=1.0),
                                 "TEST_HANG_INIT_ONCE": str(tmp_path)})
    (tmp_path / "armed").touch()
    first = broker.send("pid").get(timeout=30)
    os.kill(first, signal.SIGKILL)  # a child of the worker this test started
    # Its replacement hangs; well within the pool's old fixed 60 s start timeout, that one is
    # killed and the next replacement serves.
    assert broker.send("add", 2, 2).get(timeout=40) == 4
    assert (tmp_path / "hung").exists()
    log = worker.log()
    assert "Timed out waiting for UP message" in log or "did not report ready in 1s" in log


def test_first_children_get_the_start_timeout_too(worker_factory, broker, tmp_path: Path):
    """Unlike prefork, whose start timer covers only children forked after the event loop
    runs (its first children are created before; one hung there hangs the worker), this pool
    times every child out, the first ones included."""
    (tmp_path / "armed").touch()
    worker = worker_factory("-c", "1", env={**_conf(worker_proc_alive_timeout=1.0),
                                            "TEST_HANG_INIT_ONCE": str(tmp_path)})
    assert broker.send("add", 2, 2).get(timeout=40) == 4
    assert (tmp_path / "hung").exists()
    assert "did not report ready in 1s" in worker.log()


@pytest.mark.parametrize("pool_arg", POOLS)
def test_auto_concurrency_sizes_the_pool_as_prefork(worker_factory, broker, pool_arg):
    """-c auto (Celery 5.7): allowed CPUs capped by the cgroup CPU quota, for both pools (the
    quota arithmetic itself is tested on fake cgroup trees in tests/unit/test_cpuquota.py)."""
    sysinfo = pytest.importorskip("celery.utils.sysinfo")
    if not hasattr(sysinfo, "cpu_budget"):
        pytest.skip("this Celery has no 'auto' concurrency (added in 5.7)")
    expected = sysinfo.cpu_budget(use_cgroup_quota=True).count
    worker = worker_factory("-c", "auto", pool_arg=pool_arg)
    assert len(worker.pool_info()["processes"]) == expected
    pool_name = "celery_adaptive:Pool" if POOL in pool_arg else "prefork"
    wait_until(lambda: f"worker_concurrency='auto' resolved to {expected} (pool={pool_name}"
               in worker.log(), message="the resolution to be logged")


def test_settings_the_pool_does_not_honour_are_named_at_start(worker_factory, broker):
    """Prefork-honoured settings this pool does not use get a startup warning naming them."""
    worker = worker_factory("--autoscale", "2,1",
                            env=_conf(worker_autoscaler="tests.apps.proj:CustomAutoscaler"))
    assert broker.send("add", 1, 2).get(timeout=30) == 3
    log = worker.log()
    assert "worker_autoscaler='tests.apps.proj:CustomAutoscaler' is not used by celery_adaptive:Pool" in log
