"""The pool inside a process that also talks to the broker: Celery's in-thread test worker
(``celery.contrib.testing``), which is how Celery's own integration suite runs a pool, and the
shape of any worker process whose main-process code publishes (signal handlers, embedding).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import TaskRevokedError

from celery_adaptive import Pool
from celery_adaptive.supervisor import ChildState
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def amqp_app(amqp_url: str, redis_url: str) -> Iterator[Celery]:
    app = Celery(f"embedded-{uuid.uuid4().hex[:6]}", broker=amqp_url, backend=redis_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()


@pytest.fixture
def redis_app(redis_url: str) -> Iterator[Celery]:
    """An app with no celery-adaptive settings at all: the pool's defaults."""
    app = Celery(f"embedded-{uuid.uuid4().hex[:6]}", broker=redis_url, backend=redis_url, set_as_current=False)

    @app.task(name="embedded.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="embedded.sleep")
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    yield app
    app.close()


def _ready_children(worker: Any) -> list[int]:
    children = worker.pool.supervisor.children()
    return [c.pid for c in children if c.state in (ChildState.IDLE, ChildState.BUSY)]


@pytest.mark.parametrize("broker", ["amqp", "redis"])
def test_a_new_child_leaves_the_process_broker_connections_alone(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """A child forked while the process holds pooled broker connections must not touch them.

    Celery's after-fork handlers close kombu's pooled connections in the child. py-amqp closes
    with shutdown(), which ended the parent's connection too: the client's next broadcast failed
    with ConnectionResetError (Celery's test_inspect::test_active, test_query_task). kombu's
    Redis channel first reads the reply of a BRPOP still in flight, from the socket it shares
    with the parent: the child took the parent's reply (the parent then waited ~28 s for it, and
    every broadcast meanwhile got no answer: test_stats, test_conf, ...) or, when the parent
    read it first, blocked in its start-up for good.
    """
    app: Celery = request.getfixturevalue("amqp_app" if broker == "amqp" else "redis_app")
    queue = f"q-{uuid.uuid4().hex[:10]}"
    with start_worker(app, pool=Pool, concurrency=1, perform_ping_check=False,
                      queues=[queue], shutdown_timeout=30) as worker:
        wait_until(lambda: len(_ready_children(worker)) == 1, timeout=30, message="the first child")
        # limit=2: wait out the whole timeout for replies, as Celery's suite does (it names no
        # destination). This leaves a connection in the app's pool, on Redis with a BRPOP in
        # flight.
        inspect = app.control.inspect(destination=[worker.hostname], timeout=1, limit=2)
        assert inspect.ping() == {worker.hostname: {"ok": "pong"}}

        # A fork while that pooled connection waits for this broadcast's replies.
        app.control.pool_grow(1, destination=[worker.hostname], reply=True, timeout=2, limit=2)
        wait_until(lambda: len(_ready_children(worker)) == 2, timeout=30, message="the new child")

        assert inspect.ping() == {worker.hostname: {"ok": "pong"}}


def test_by_default_no_more_tasks_run_than_the_concurrency(redis_app: Celery) -> None:
    """At -c 1, a task queued behind long ones waits for them, as in prefork: so it expires
    while it waits and is revoked, not run (Celery's test_tasks::test_expired), and the pool
    has one process (test_inspect::test_stats). A short-task lane, when on, breaks both."""
    queue = f"q-{uuid.uuid4().hex[:10]}"
    add, sleep = redis_app.tasks["embedded.add"], redis_app.tasks["embedded.sleep"]
    with start_worker(redis_app, pool=Pool, concurrency=1, perform_ping_check=False,
                      queues=[queue], shutdown_timeout=30) as worker:
        # The pool learns which task is short and which is long (what a lane waits for).
        assert add.apply_async((1, 1), queue=queue).get(timeout=30) == 2
        sleep.apply_async((0.3,), queue=queue).get(timeout=30)
        longs = [sleep.apply_async((1.0,), queue=queue) for _ in range(3)]
        late = add.apply_async((1, 1), queue=queue, expires=1.5)
        with pytest.raises(TaskRevokedError):
            late.get(timeout=30)
        assert len(worker.pool.info["processes"]) == 1
        assert worker.pool.info["max-concurrency"] == 1
        for result in longs:
            result.get(timeout=30)
