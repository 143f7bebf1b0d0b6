"""Every way a task can go wrong, crossed with when it goes wrong (loky's table, for Celery).

causes x phases (right after the child receives it, while running, while returning its result),
asserting the Celery-visible outcome, that the message was acknowledged, that a task running
beside it on the other child is unaffected, and that the pool is back to full strength.
The table runs once on Redis and once on RabbitMQ (with the Redis result backend).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from tests.support import Broker, WorkerProcess, make_broker, start_worker_process, wait_until

pytestmark = pytest.mark.integration

CRASHES = {
    "system_exit": "exitcode 3",
    "keyboard_interrupt": "exitcode 1",
    "os_exit": "exitcode 7",
    "sigkill": "signal 9 (SIGKILL)",
    "segfault": "signal 11 (SIGSEGV)",
}

CASES: list[tuple[str, str, str, object]] = []
for _cause, _detail in CRASHES.items():
    CASES.append((_cause, "receive", "FAILURE", (WorkerLostError, _detail)))
    CASES.append((_cause, "run", "FAILURE", (WorkerLostError, _detail)))
    # The task already stored SUCCESS when its child died: the stored result stands.
    CASES.append((_cause, "return", "SUCCESS", "ok"))
CASES += [
    # Exceptions from signal receivers are logged by Celery; the task itself succeeds.
    ("raise", "receive", "SUCCESS", "ok"),
    ("raise", "run", "FAILURE", (ValueError, "misbehave: raise")),
    ("raise", "return", "SUCCESS", "ok"),
    ("unpicklable_result", "run", "FAILURE", ("EncodeError", "")),
    ("large_result", "run", "SUCCESS", 20 * 1024 * 1024),
    ("memory", "run", "SUCCESS", 300 * 1024 * 1024),
    ("hang", "run", "FAILURE", (TimeLimitExceeded, "")),
    ("ignore_soft_limit", "run", "FAILURE", (TimeLimitExceeded, "")),
]


@pytest.fixture(scope="module", params=["redis", "amqp"])
def table_worker(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    broker = make_broker(request.param, request, f"table-{uuid.uuid4().hex[:8]}")
    worker = start_worker_process(
        broker, ["-c", "2", "--max-memory-per-child", str(200 * 1024)],
        logdir=tmp_path_factory.mktemp("table"),
    )
    yield worker
    try:
        leaks = worker.stop()
        assert not leaks, leaks
        if broker.kind == "amqp":
            # RabbitMQ does not show another connection's unacknowledged messages over AMQP, so
            # a case cannot check its own; but the broker requeues every message the worker left
            # unacknowledged when its connection closes: an empty queue now means every message
            # of the table was acknowledged.
            assert broker.queue_length() == 0, "messages left unacknowledged by the table's worker"
    finally:
        broker.close()
        broker.delete_queue()


def _acknowledged(broker: Broker, task_id: str) -> bool:
    """Redis: the message is out of kombu's ``unacked`` hash. RabbitMQ: checked once for the
    whole table when its worker stops (see ``table_worker``)."""
    if broker.kind != "redis":
        return True
    return not any(task_id.encode() in value for value in broker.redis.hvals("unacked"))


@pytest.mark.parametrize(("cause", "phase", "state", "expected"), CASES,
                         ids=[f"{c}-{p}" for c, p, _, _ in CASES])
def test_failure_table(table_worker: WorkerProcess, cause, phase, state, expected):
    broker = table_worker.broker
    wait_until(lambda: len(table_worker.child_pids()) == 2, message="two children before")
    bystander = broker.send("sleep", 1.0)
    limits = {"time_limit": 2}
    if cause == "ignore_soft_limit":
        limits["soft_time_limit"] = 1
    result = broker.send("misbehave", cause, phase, **limits)
    if state == "SUCCESS":
        value = result.get(timeout=30)
        if isinstance(expected, int):
            assert (len(value) if isinstance(value, str) else value) == expected
        else:
            assert value == expected
    else:
        kind, fragment = expected
        with pytest.raises(Exception) as info:  # noqa: B017 - checked just below
            result.get(timeout=30)
        if isinstance(kind, str):
            assert type(info.value).__name__ == kind
        else:
            assert isinstance(info.value, kind), repr(info.value)
        assert fragment in str(info.value)
    assert result.state == state
    assert isinstance(bystander.get(timeout=30), int)  # the other child's task is unaffected
    wait_until(lambda: _acknowledged(broker, result.id), message="message acknowledged")
    assert broker.queue_length() == 0
    wait_until(lambda: len(table_worker.child_pids()) == 2, message="back to full strength")
    # The pool lists serving children only: a child being killed has left the list before
    # the OS has reaped it, and its replacement joins once it is forked.
    info = wait_until(lambda: (i := table_worker.pool_info()) and len(i.get("processes", [])) == 2 and i,
                      message="the pool listing two serving children")
    assert info["target"] == 2
