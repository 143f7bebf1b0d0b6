"""The prefetch on a real RabbitMQ: quorum queues (per-consumer QoS, fixed when the consumer
starts) and classic queues (global QoS, moved with capacity). See celery_adaptive/prefetch.py.

The tasks are ``acks_late``: a message counts against the prefetch until its task finished, so
the number of tasks running at once shows the prefetch the broker really applies (``inspect
stats`` shows only what the worker asked for).

RabbitMQ: $AMQP_URL when it answers, else the local server (guest on 127.0.0.1:5672) in a
private vhost made for this module with rabbitmqctl and deleted afterwards, else skipped.
Results go to the Redis of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from celery import Celery
from kombu import Connection, Queue

from tests.support import Broker, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

FAST = {"TEST_STABILIZATION": "3", "TEST_CONTROL_INTERVAL": "0.5"}
LOCAL_SERVER = "amqp://guest:guest@127.0.0.1:5672"


def _answers(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("AMQP_URL")
    if url and _answers(url):
        yield url
        return
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("no RabbitMQ: $AMQP_URL unset or not answering, and no rabbitmqctl for a local vhost")
    if not _answers(f"{LOCAL_SERVER}//"):
        pytest.skip("no RabbitMQ: $AMQP_URL unset or not answering, and nothing on 127.0.0.1:5672")
    vhost = f"adaptive-prefetch-{uuid.uuid4().hex[:8]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot make a private RabbitMQ vhost with rabbitmqctl: {exc}")
    try:
        yield f"{LOCAL_SERVER}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@dataclass
class AmqpBroker(Broker):
    """A queue on RabbitMQ, declared (by the client and the worker alike) with its type."""

    queue_type: str = "classic"
    backend: str = ""

    @property
    def queue_arguments(self) -> dict[str, str]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = Celery("client", broker=self.url, backend=self.backend)
            self._app.conf.task_queues = [Queue(self.queue, queue_arguments=self.queue_arguments)]
        return self._app

    def worker_env(self, multiplier: int = 4) -> dict[str, str]:
        conf = {
            "task_queues": {self.queue: {"queue_arguments": self.queue_arguments}},
            "worker_prefetch_multiplier": multiplier,
        }
        return {**FAST, "TEST_BACKEND_URL": self.backend, "TEST_CONF_JSON": json.dumps(conf)}

    def delete_queue(self) -> None:
        with Connection(self.url) as conn:
            Queue(self.queue).bind(conn.default_channel).delete()


@pytest.fixture
def quorum(amqp_url: str, redis_url: str) -> Iterator[AmqpBroker]:
    yield from _broker(amqp_url, redis_url, "quorum")


@pytest.fixture
def classic(amqp_url: str, redis_url: str) -> Iterator[AmqpBroker]:
    yield from _broker(amqp_url, redis_url, "classic")


def _broker(amqp_url: str, redis_url: str, queue_type: str) -> Iterator[AmqpBroker]:
    broker = AmqpBroker(url=amqp_url, queue=f"q-{uuid.uuid4().hex[:10]}", queue_type=queue_type,
                        backend=redis_url)
    yield broker
    broker.close()
    try:
        broker.delete_queue()
    except Exception:
        pass  # never declared, or the vhost is already gone


@dataclass
class Sample:
    target: int
    in_flight: int
    queued: int
    prefetch: int
    capacity: int


class Sampler:
    """Polls `inspect stats` in a bounded background loop."""

    def __init__(self, worker: WorkerProcess, period: float = 0.25, limit: float = 120.0) -> None:
        self.worker = worker
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period, limit), daemon=True)

    def _run(self, period: float, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                stats = self.worker.stats()
                pool = stats["pool"]
                self.samples.append(Sample(int(pool["target"]), int(pool["in-flight"]), int(pool["queued"]),
                                           int(stats["prefetch_count"]), int(pool["prefetch"]["capacity"])))
            except Exception:
                pass
            self._stop.wait(period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def busiest(self) -> int:
        return max((s.in_flight for s in self.samples), default=0)


def _backlog(broker: AmqpBroker, worker: WorkerProcess, count: int, seconds: float) -> tuple[set[int], Sampler]:
    """Send ``count`` acks_late tasks at once; returns the pids that ran them and the samples."""
    with Sampler(worker) as sampler:
        results = [broker.send("late_sleep", seconds) for _ in range(count)]
        pids = {r.get(timeout=120) for r in results}
    return pids, sampler


def _prefetch_info(worker: WorkerProcess) -> dict[str, Any]:
    return dict(worker.pool_info()["prefetch"])


def _close_worker_connections(worker: WorkerProcess) -> None:
    """Make RabbitMQ close this worker's connections (only its own: matched by local port)."""
    ports = {c.laddr.port for c in psutil.Process(worker.pid).net_connections(kind="tcp")
             if c.raddr and c.raddr.port == 5672}
    listed = _rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "name").stdout
    rows = [line.split("\t", 1) for line in listed.splitlines() if "\t" in line]
    pids = [pid for pid, name in rows if any(name.startswith(f"127.0.0.1:{p} ->") for p in ports)]
    assert pids, f"no RabbitMQ connection of the worker found (ports {ports})"
    for pid in pids:
        _rabbitmqctl("close_connection", pid, "prefetch test: reconnect")


def test_quorum_backlog_grows_the_pool_and_every_child_gets_work(worker_factory, quorum):
    worker = worker_factory("--autoscale", "8,1", broker_=quorum, env=quorum.worker_env())
    assert _prefetch_info(worker) == {"mode": "per-consumer", "capacity": 32, "established": 32}
    pids, sampler = _backlog(quorum, worker, 160, 0.2)
    grown = max(s.target for s in sampler.samples)
    assert grown >= 4, sampler.samples
    # As many tasks ran at once as the pool had children, each in its own child.
    assert sampler.busiest() == grown, sampler.samples
    assert len(pids) >= grown
    assert all(s.prefetch == 32 for s in sampler.samples), sampler.samples


def test_quorum_reconnect_keeps_the_prefetch_sized_for_the_maximum(worker_factory, quorum):
    """After a reconnect Celery recomputes the prefetch from num_processes (1 child here): the
    new consumer must still start with MAX x multiplier."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("closing the worker's connections needs rabbitmqctl")
    worker = worker_factory("--autoscale", "8,1", broker_=quorum, env=quorum.worker_env())
    connected = worker.log().count("Connected to amqp")
    _close_worker_connections(worker)
    wait_until(lambda: worker.log().count("Connected to amqp") > connected, timeout=60, interval=0.5,
               message="the worker reconnects")
    wait_until(worker.ping, timeout=30, interval=0.5, message="ping after the reconnect")
    assert _prefetch_info(worker) == {"mode": "per-consumer", "capacity": 32, "established": 32}
    pids, sampler = _backlog(quorum, worker, 160, 0.2)
    grown = max(s.target for s in sampler.samples)
    assert grown >= 4 and sampler.busiest() == grown, sampler.samples
    assert len(pids) >= grown


@pytest.mark.parametrize("path", ["autoscale-control", "pool-grow"])
def test_quorum_ceiling_change_re_establishes_the_consumer(worker_factory, quorum, path):
    """Multiplier 1, so the prefetch alone bounds the tasks running at once: 2 before, 6 after
    raising ``autoscale`` max (or growing a fixed pool by 4)."""
    if path == "autoscale-control":
        worker = worker_factory("--autoscale", "2,1", broker_=quorum, env=quorum.worker_env(1))
        assert _prefetch_info(worker)["established"] == 2
        assert "max=6 min=6" in str(worker.control("autoscale", max=6, min=6))
    else:
        worker = worker_factory("-c", "2", broker_=quorum, env=quorum.worker_env(1))
        assert _prefetch_info(worker)["established"] == 2
        worker.control("pool_grow", n=4)
    wait_until(lambda: _prefetch_info(worker)["established"] == 6, timeout=20, interval=0.2,
               message="consumer re-established with prefetch 6")
    wait_until(lambda: len(worker.child_pids()) == 6, timeout=20, message="6 children")
    pids, sampler = _backlog(quorum, worker, 36, 0.3)
    assert sampler.busiest() == 6, sampler.samples
    assert len(pids) == 6
    assert "Restoring" not in worker.log()  # nothing was handed back by the re-establish


def test_classic_queue_moves_the_prefetch_with_capacity(worker_factory, classic):
    """Global QoS: the running consumer follows each resize, with held countdown tasks on top
    (multiplier 1: one held task more than the prefetch would stop all delivery)."""
    worker = worker_factory("--autoscale", "8,1", broker_=classic, env=classic.worker_env(1))
    assert _prefetch_info(worker) == {"mode": "moving", "capacity": 1}
    held = [classic.send("add", i, 1, countdown=60) for i in range(3)]
    wait_until(lambda: worker.stats()["prefetch_count"] == 1 + 3, timeout=30, interval=0.2,
               message="3 countdown tasks held")
    pids, sampler = _backlog(classic, worker, 80, 0.2)
    grown = max(s.target for s in sampler.samples)
    assert grown >= 4 and sampler.busiest() == grown, sampler.samples
    assert all(s.capacity == s.target and s.prefetch == s.capacity + 3 for s in sampler.samples), sampler.samples
    wait_until(lambda: worker.pool_info()["target"] == 1, timeout=60, interval=0.5, message="drain back to 1")
    assert worker.stats()["prefetch_count"] == 1 + 3
    assert len(held) == 3  # still held: the queue is deleted with them
