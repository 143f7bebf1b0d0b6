"""The pool keeps prefork's promises: real `celery worker` processes on a real Redis.

Each test names the item of the acceptance checklist of docs/celery-pool-contract.md (section 8) it proves.
"""

from __future__ import annotations

import json
import signal
import time
import uuid

import psutil
import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from tests.support import both_brokers, wait_until

pytestmark = pytest.mark.integration


def test_runs_tasks_and_reports_errors(worker_factory, broker):
    """Checklist 4: success and task errors reach the right callback."""
    worker = worker_factory("-c", "2")
    assert broker.send("add", 2, 3).get(timeout=20) == 5
    result = broker.send("boom", "expected")
    with pytest.raises(ValueError, match="expected"):
        result.get(timeout=20)
    assert result.state == "FAILURE"
    pids = {broker.send("pid").get(timeout=20) for _ in range(4)}
    assert pids <= set(worker.child_pids())
    assert worker.pid not in pids  # tasks run in children, not the worker process


def test_inspect_stats_has_prefork_keys(worker_factory):
    """Checklist 19: `_get_info` is JSON-serialisable, with prefork's keys plus the pool's own."""
    worker = worker_factory("-c", "2", "--max-tasks-per-child", "50", "--soft-time-limit", "30",
                            "--time-limit", "60")
    stats = worker.stats()
    pool = stats["pool"]
    json.dumps(pool)
    assert pool["implementation"] == "celery_adaptive:Pool"
    assert pool["max-concurrency"] == 2
    assert sorted(pool["processes"]) == sorted(worker.child_pids())
    assert pool["max-tasks-per-child"] == 50
    assert pool["timeouts"] == [30.0, 60.0]
    assert "put-guarded-by-semaphore" in pool and "writes" in pool
    assert len(pool["children"]) == 2
    assert {c["state"] for c in pool["children"]} <= {"idle", "starting", "busy"}
    assert stats["prefetch_count"] == 2 * 4


def test_children_are_pinned_one_cpu_each(worker_factory, broker):
    """Children are pinned to CPUs from the worker's allowed set; the pinning shows in info."""
    import os

    worker = worker_factory("-c", "2")
    allowed = sorted(os.sched_getaffinity(0))
    children = wait_until(lambda: [c for c in worker.pool_info()["children"] if c["cpu"] is not None
                                   and c["state"] != "starting"] or None, message="ready children")
    for child in children:
        assert child["cpu"] in allowed
    if len(allowed) >= 2:
        assert len({c["cpu"] for c in children}) == len(children)
    seen = broker.send("whoami").get(timeout=20)
    by_pid = {c["pid"]: c["cpu"] for c in worker.pool_info()["children"]}
    assert seen["cpus"] == [by_pid[seen["pid"]]]


def test_pinning_can_be_turned_off(worker_factory, broker):
    import os

    worker_factory("-c", "1", env={"TEST_CPU_PLACEMENT": "none"})
    assert broker.send("whoami").get(timeout=20)["cpus"] == sorted(os.sched_getaffinity(0))


def test_accept_before_result_and_inspect_active_shows_child_pid(worker_factory, broker):
    """Checklist 5: accept_callback(child pid) comes first; `inspect active` shows the pid."""
    worker = worker_factory("-c", "2")
    result = broker.send("sleep", 2.0)
    active = wait_until(
        lambda: (worker.inspect().active() or {}).get(worker.hostname), message="an active task"
    )
    assert active[0]["id"] == result.id
    assert active[0]["worker_pid"] in worker.child_pids()
    assert result.get(timeout=20) == active[0]["worker_pid"]


def test_sigkill_mid_task_gives_worker_lost_error_and_replaces_child(worker_factory, broker):
    """Checklist 6: a child killed mid-task fails the task at once and is replaced."""
    worker = worker_factory("-c", "2")
    before = set(worker.child_pids())
    result = broker.send("kill_self")
    with pytest.raises(WorkerLostError, match="signal 9"):
        result.get(timeout=20)
    after = wait_until(lambda: len(worker.child_pids()) == 2 and set(worker.child_pids()),
                       message="replacement child")
    assert len(after - before) == 1
    assert broker.send("add", 1, 1).get(timeout=20) == 2
    assert "exited with signal 9" in worker.log()


@both_brokers
def test_acks_late_reject_on_worker_lost_reruns(worker_factory, broker):
    """Checklist 6: with acks_late + reject_on_worker_lost the task runs again and succeeds."""
    worker_factory("-c", "2")
    marker = uuid.uuid4().hex
    result = broker.send("kill_once", marker)
    assert isinstance(result.get(timeout=40), int)
    assert broker.redis.get(f"kill-once:{marker}") == b"1"


def test_soft_time_limit_raises_inside_task(worker_factory, broker):
    """Checklist 7: SoftTimeLimitExceeded is raised in the task, which may handle it."""
    worker_factory("-c", "1")
    result = broker.send("soft_limited", 10, soft_time_limit=0.5)
    assert result.get(timeout=20) == "soft-limit-caught"


def test_hard_time_limit_fails_task_and_replaces_child(worker_factory, broker):
    """Checklist 8: TimeLimitExceeded, the child is killed and replaced."""
    worker = worker_factory("-c", "1")
    first = broker.send("pid").get(timeout=20)
    result = broker.send("sleep", 30, time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    second = broker.send("pid").get(timeout=20)
    assert second != first
    assert worker.child_pids() == [second]
    assert "Hard time limit (1s) exceeded" in worker.log()


@both_brokers
def test_revoke_terminate_ends_revoked(worker_factory, broker):
    """Checklist 9: revoke(terminate=True) of a running task ends REVOKED, not FAILURE."""
    worker = worker_factory("-c", "1")
    result = broker.send("sleep", 30)
    wait_until(lambda: (worker.inspect().active() or {}).get(worker.hostname), message="task start")
    result.revoke(terminate=True, signal="SIGKILL")
    wait_until(lambda: result.state == "REVOKED", message="REVOKED state")
    assert broker.send("add", 2, 2).get(timeout=20) == 4


@both_brokers
def test_revoke_before_start_never_runs(worker_factory, broker):
    """A task revoked while it waits in the pool's queue is acked, REVOKED and never started."""
    worker = worker_factory("-c", "1")
    blocker = broker.send("sleep", 2)
    wait_until(lambda: (worker.inspect().active() or {}).get(worker.hostname), message="blocker")
    waiting = broker.send("add", 5, 5)
    wait_until(lambda: (worker.inspect().reserved() or {}).get(worker.hostname), message="reserved")
    waiting.revoke()
    blocker.get(timeout=20)
    wait_until(lambda: waiting.state == "REVOKED", message="REVOKED")
    assert broker.send("add", 1, 2).get(timeout=20) == 3
    assert worker.pool_info()["counters"]["revoked_before_start"] == 1


def test_max_tasks_per_child_recycles_without_failing(worker_factory, broker):
    """Checklist 10: children are recycled after N tasks; no task fails."""
    worker = worker_factory("-c", "1", "--max-tasks-per-child", "2")
    pids = [broker.send("pid").get(timeout=20) for _ in range(6)]
    assert len(set(pids)) == 3, pids
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    wait_until(lambda: len(worker.child_pids()) == 1, message="one child")


def test_max_memory_per_child_recycles_after_task(worker_factory, broker):
    """Checklist 10: past the memory limit (KiB) the child finishes the task, then is replaced."""
    worker = worker_factory("-c", "1", "--max-memory-per-child", str(150 * 1024))
    first = broker.send("allocate", 300).get(timeout=30)  # succeeds although it crossed the limit
    second = broker.send("pid").get(timeout=20)
    assert second != first
    wait_until(lambda: worker.child_pids() == [second], message="one fresh child")


def test_unpicklable_result_fails_cleanly(worker_factory, broker):
    """A result that cannot be sent back fails that task; the child stays and serves others."""
    worker = worker_factory("-c", "1")
    before = worker.child_pids()
    result = broker.send("unpicklable")
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
        result.get(timeout=20)
    assert type(info.value).__name__ == "EncodeError"  # the JSON result serializer refused it
    # An exception that cannot be pickled back to the parent (billiard's MaybeEncodingError path).
    raised = broker.send("raise_unpicklable")
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is checked below
        raised.get(timeout=20)
    assert raised.state == "FAILURE"
    assert "cannot pickle me" in str(info.value)
    assert broker.send("add", 3, 4).get(timeout=20) == 7
    assert worker.child_pids() == before


def test_process_signals_fire(worker_factory, broker, tmp_path):
    """Checklist 11: worker_process_init, worker_process_shutdown and
    worker_before_create_process fire."""
    worker = worker_factory("-c", "2", "--max-tasks-per-child", "1",
                            env={"TEST_SIGNAL_DIR": str(tmp_path)})
    assert broker.send("process_init_seen").get(timeout=20) is True
    wait_until(lambda: len(list(tmp_path.glob("shutdown-*"))) >= 1, message="worker_process_shutdown")
    wait_until(lambda: len(list(tmp_path.glob("before-create-*"))) >= 3, message="before_create_process")
    assert len(list(tmp_path.glob("init-*"))) >= 2
    assert worker.alive()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_start_methods_run_fast_trace_task(worker_factory, broker, start_method):
    """Checklist 12: fork and spawn children both run tasks through fast_trace_task (the CLI)."""
    worker = worker_factory("-c", "2", env={"TEST_START_METHOD": start_method})
    info = worker.pool_info()
    assert info["start-method"] == start_method
    # The children really were started that way: billiard's spawn runs a fresh interpreter
    # with `--billiard-fork` on its command line; a forked child keeps the worker's.
    spawned = ["--billiard-fork" in psutil.Process(pid).cmdline() for pid in info["processes"]]
    assert spawned == [start_method == "spawn"] * 2
    assert broker.send("add", 20, 22).get(timeout=30) == 42
    assert broker.send("process_init_seen").get(timeout=20) is True
    with pytest.raises(ValueError):
        broker.send("boom").get(timeout=20)


def test_an_unknown_start_method_refuses_to_start(worker_factory):
    """Celery 5.7 refuses it itself; on 5.5/5.6, which do not know the setting, the pool does,
    rather than fork silently (celery_adaptive.compat)."""
    worker = worker_factory("-c", "2", env={"TEST_START_METHOD": "forkserver"}, wait=False)
    code = worker.wait_exit(40)
    assert code not in (None, 0)
    log = worker.log()
    assert "worker_pool_start_method" in log and "'forkserver'" in log
    assert worker.child_pids() == []


def test_pool_grow_and_shrink_update_processes_and_prefetch(worker_factory, broker):
    """Checklist 17: pool_grow / pool_shrink resize the pool and the consumer's prefetch."""
    worker = worker_factory("-c", "2")
    assert worker.stats()["prefetch_count"] == 8
    worker.control("pool_grow", n=2)
    wait_until(lambda: len(worker.child_pids()) == 4, message="4 children")
    stats = worker.stats()
    assert stats["prefetch_count"] == 16 and stats["pool"]["target"] == 4
    worker.control("pool_shrink", n=3)
    wait_until(lambda: len(worker.child_pids()) == 1, message="1 child")
    stats = worker.stats()
    assert stats["prefetch_count"] == 4 and stats["pool"]["target"] == 1
    assert broker.send("add", 1, 1).get(timeout=20) == 2


def test_shrink_drains_busy_child_without_killing_it(worker_factory, broker):
    """Shrinking while every child is busy drains one: its task finishes, then it exits."""
    worker = worker_factory("-c", "2")
    results = [broker.send("sleep", 1.5) for _ in range(2)]
    wait_until(lambda: len((worker.inspect().active() or {}).get(worker.hostname, [])) == 2,
               message="2 active")
    worker.control("pool_shrink", n=1)
    assert all(isinstance(r.get(timeout=20), int) for r in results)
    wait_until(lambda: len(worker.child_pids()) == 1, message="drained to 1")
    assert "WorkerLostError" not in worker.log()


def test_celery_autoscale_option_works(worker_factory, broker):
    """Checklist 17: `--autoscale MAX,MIN` works with this pool (Celery's autoscaler)."""
    worker = worker_factory("--autoscale", "3,1")
    assert len(worker.child_pids()) == 1
    results = [broker.send("sleep", 2) for _ in range(6)]
    wait_until(lambda: len(worker.child_pids()) == 3, timeout=20, message="autoscale up to 3")
    assert all(isinstance(r.get(timeout=30), int) for r in results)


def test_pool_restart_replaces_children(worker_factory, broker):
    """Checklist 20: pool_restart replaces the children."""
    worker = worker_factory("-c", "2", env={"TEST_POOL_RESTARTS": "1"})
    before = set(worker.child_pids())
    worker.control("pool_restart")
    wait_until(lambda: len(set(worker.child_pids()) - before) == 2 and len(worker.child_pids()) == 2,
               message="2 new children")
    assert broker.send("add", 2, 2).get(timeout=20) == 4


@both_brokers
def test_warm_shutdown_finishes_running_and_restores_unstarted(worker_factory, broker):
    """Checklist 15: SIGTERM lets running tasks finish and be acked; unstarted ones go back."""
    worker = worker_factory("-c", "1")
    running = broker.send("late_sleep", 2)
    waiting = [broker.send("late_sleep", 0.1) for _ in range(2)]
    wait_until(lambda: (worker.inspect().active() or {}).get(worker.hostname), message="running")
    wait_until(lambda: len((worker.inspect().reserved() or {}).get(worker.hostname, [])) == 2,
               message="2 reserved")
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(30) == 0
    assert isinstance(running.get(timeout=5), int)
    assert all(w.state == "PENDING" for w in waiting)
    # The unstarted messages are back in the queue before any other worker runs. Redis: kombu's
    # virtual transport holds them in its `unacked` hash and restores them when the worker closes
    # its channel, and says so. RabbitMQ: the broker itself requeues a consumer's unacknowledged
    # messages when its channel closes; the worker logs nothing about it.
    if broker.kind == "redis":
        assert "Restoring 2 unacknowledged message(s)" in worker.log()
    wait_until(lambda: broker.queue_length() == 2, message="2 messages back in the queue")
    # The restored tasks run on the next worker, exactly once.
    worker_factory("-c", "1")
    assert all(isinstance(w.get(timeout=30), int) for w in waiting)
    assert broker.queue_length() == 0


@both_brokers
def test_cold_shutdown_redelivers_acks_late(worker_factory, broker):
    """Checklist 16: SIGQUIT ends the worker promptly; an unfinished acks_late task is redelivered."""
    worker = worker_factory("-c", "1")
    result = broker.send("late_sleep", 4)
    wait_until(lambda: (worker.inspect().active() or {}).get(worker.hostname), message="running")
    worker.signal(signal.SIGQUIT)
    assert worker.wait_exit(20) is not None
    assert result.state != "SUCCESS"
    # Back in the queue at once on both: RabbitMQ requeues it when the worker's connection
    # closes; kombu's Redis transport restores its unacked messages at the cold shutdown too.
    wait_until(lambda: broker.queue_length() == 1, message="the message back in the queue")
    worker_factory("-c", "1")
    assert isinstance(result.get(timeout=40), int)


def test_redis_restart_under_load_loses_nothing(worker_factory, private_redis, tmp_path):
    """Checklist 13: a broker restart leaves the worker consuming again, with no task lost."""
    from tests.support import Broker

    own = Broker(url=private_redis.url, queue=f"q-{uuid.uuid4().hex[:8]}")
    try:
        worker = worker_factory("-c", "2", broker_=own)
        first = [own.send("late_sleep", 0.05) for _ in range(10)]
        assert all(isinstance(r.get(timeout=30), int) for r in first)
        private_redis.restart()  # a Redis without persistence: queued messages are gone; send after
        time.sleep(1.0)
        own._app = None
        # Celery retries the broker with growing pauses (2 s, 4 s, 6 s, ...): on a loaded
        # machine, where Redis takes a while to come back, the reconnect can take over 40 s.
        wait_until(worker.ping, timeout=90, interval=0.5, message="worker reconnected")
        second = [own.send("add", i, i) for i in range(20)]
        assert [r.get(timeout=40) for r in second] == [2 * i for i in range(20)]
        assert len(worker.child_pids()) == 2
        log = worker.log()
        assert "Connection to broker lost" in log or "Cannot connect" in log or "consumer" in log.lower()
    finally:
        own.close()  # while private_redis still answers (see Broker.close)
