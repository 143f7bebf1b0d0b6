"""Helpers for tests that run real `celery worker` processes against a real broker.

Two layouts: Redis as broker and result backend, and Celery's own CI layout, RabbitMQ (AMQP)
as broker with Redis as result backend. Tests that hold on both take ``@both_brokers``.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection

from celery_adaptive.publish_time import stamp_publish_time

ROOT = Path(__file__).resolve().parent.parent
POOL = "celery_adaptive:Pool"

# Runs a test once per broker: it overrides the `broker_kind` fixture (tests/conftest.py).
both_brokers = pytest.mark.parametrize("broker_kind", ["redis", "amqp"])
# Tests publish as a producer that stamps its publish time (the queue-wait metric needs it).
stamp_publish_time()


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Broker:
    """A broker URL and this test's queue; ``backend_url`` is the Redis results go to."""

    url: str
    queue: str
    backend_url: str = ""
    _app: Celery | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.backend_url and self.kind == "redis":
            self.backend_url = self.url

    @property
    def kind(self) -> str:
        if self.url.startswith(("redis://", "rediss://")):
            return "redis"
        if self.url.startswith(("amqp://", "amqps://", "pyamqp://")):
            return "amqp"
        raise ValueError(f"not a Redis or AMQP broker URL: {self.url!r}")

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = Celery("client", broker=self.url, backend=self.backend_url)
            self._app.conf.broker_connection_retry_on_startup = True
        return self._app

    @property
    def redis(self) -> redis.Redis:
        """The Redis of this layout: the broker's for Redis, the result backend's for AMQP
        (where the test tasks keep their bookkeeping)."""
        if not self.backend_url:
            raise ValueError(f"no Redis for {self.url}: give this AMQP Broker a backend_url")
        return redis.Redis.from_url(self.backend_url)

    def send(self, name: str, *args: Any, **options: Any) -> AsyncResult:
        options.setdefault("queue", self.queue)
        return self.app.send_task(f"tests.apps.proj.{name}", args=args, **options)

    def queue_length(self) -> int:
        """Messages ready in the queue (not those a worker holds unacknowledged), read with a
        passive queue_declare, which both transports answer; a queue not there yet holds 0."""
        with Connection(self.url) as connection:
            channel = connection.channel()
            try:
                return int(channel.queue_declare(queue=self.queue, passive=True).message_count)
            except connection.channel_errors:
                return 0

    def delete_queue(self) -> None:
        """Delete this test's queue and the exchange Celery named after it (on a shared AMQP
        server they would otherwise stay; Celery's shared pidbox exchanges are left alone)."""
        with Connection(self.url) as connection:
            channel = connection.channel()
            channel.queue_delete(queue=self.queue)
            channel.exchange_delete(exchange=self.queue)

    def close(self) -> None:
        """Let go of the client app while its Redis still answers.

        Celery 5.5 and 5.6 unsubscribe a result from its Redis channel only when the
        AsyncResult is collected (5.7 also when ``get`` returns). Collected after the server
        has stopped, each one retries its reconnection for seconds (and the tracebacks, made
        inside the garbage collector, can trip CPython 3.11.7's "AST constructor recursion
        depth mismatch"). So drop the app and collect now.
        """
        if self._app is not None:
            self._app.close()
            self._app = None
            gc.collect()


def make_broker(kind: str, request: pytest.FixtureRequest, queue: str) -> Broker:
    """Redis as broker and backend, or RabbitMQ as broker with the Redis backend."""
    redis_url: str = request.getfixturevalue("redis_url")
    if kind == "redis":
        return Broker(url=redis_url, queue=queue)
    if kind == "amqp":
        return Broker(url=request.getfixturevalue("amqp_url"), queue=queue, backend_url=redis_url)
    raise ValueError(f"unknown broker kind {kind!r}")


class WorkerProcess:
    def __init__(self, popen: subprocess.Popen[bytes], hostname: str, logfile: Path, broker: Broker) -> None:
        self.popen = popen
        self.hostname = hostname
        self.logfile = logfile
        self.broker = broker
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def child_pids(self) -> list[int]:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = [k.pid for k in kids if _alive(k)]
        self.seen.update(pids)
        return pids

    def control(self, command: str, **arguments: Any) -> Any:
        reply = self.broker.app.control.broadcast(
            command, arguments=arguments, destination=[self.hostname], reply=True, timeout=5
        )
        return reply

    def inspect(self) -> Any:
        return self.broker.app.control.inspect(destination=[self.hostname], timeout=5)

    def stats(self) -> dict[str, Any]:
        replies = self.inspect().stats() or {}
        return replies.get(self.hostname, {})

    def pool_info(self) -> dict[str, Any]:
        return self.stats().get("pool", {})

    def ping(self) -> bool:
        try:
            replies = self.broker.app.control.ping(destination=[self.hostname], timeout=0.5)
        except Exception:
            return False
        return any(self.hostname in r for r in replies or [])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Warm-stop the worker (SIGTERM), then make sure no process it started is left.

        Returns a description of each leaked process (a test fails on any)."""
        if self.alive():
            self.child_pids()
            self.signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                self.signal(signal.SIGKILL)
                self.wait_exit(10)
        leaked: list[str] = []
        deadline = time.monotonic() + 10
        for pid in sorted(self.seen):
            while time.monotonic() < deadline:
                try:
                    proc = psutil.Process(pid)
                    if proc.status() == psutil.STATUS_ZOMBIE or proc.ppid() not in (self.pid, 1):
                        break
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.05)
            else:
                leaked.append(f"pid {pid} of worker {self.hostname}")
                try:
                    os.kill(pid, signal.SIGKILL)  # one of the worker's own children
                except ProcessLookupError:
                    pass
        return leaked


def start_worker_process(
    broker: Broker,
    args: list[str],
    *,
    logdir: Path,
    env: dict[str, str] | None = None,
    pool_arg: list[str] | None = None,
    wait: bool = True,
    timeout: float = 40.0,
    app: str = "tests.apps.proj",
) -> WorkerProcess:
    hostname = f"w{uuid.uuid4().hex[:8]}@localhost"
    logfile = logdir / "worker.log"
    full_env = dict(os.environ)
    full_env.update({"TEST_BROKER_URL": broker.url, "TEST_QUEUE": broker.queue, "PYTHONUNBUFFERED": "1"})
    if broker.backend_url:
        full_env["TEST_BACKEND_URL"] = broker.backend_url
    full_env.update(env or {})
    if pool_arg is None:
        pool_arg = ["-P", POOL]
    cmd = [
        sys.executable, "-m", "celery", "-A", app, "worker", *pool_arg,
        "-Q", broker.queue, "-n", hostname, "--without-gossip", "--without-mingle",
        "-l", os.environ.get("TEST_WORKER_LOGLEVEL", "info"), *args,
    ]
    with open(logfile, "wb") as out:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    worker = WorkerProcess(popen, hostname, logfile, broker)
    if wait:
        try:
            wait_until(lambda: worker.ping() or not worker.alive(), timeout, 0.2, "worker to answer ping")
        except AssertionError:
            worker.stop()
            raise AssertionError(f"worker did not start; log:\n{worker.log()[-4000:]}") from None
        if not worker.alive():
            raise AssertionError(f"worker exited at start; log:\n{worker.log()[-4000:]}")
        worker.child_pids()
    return worker


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie; a child that exits between the two reads is not alive."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
