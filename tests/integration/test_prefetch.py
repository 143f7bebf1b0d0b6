"""The consumer's prefetch with real workers on a real Redis: every resize path moves it relative
to what Celery added for held ETA/countdown tasks, a burst is fetched while they are held, and
it returns to children x multiplier once they ran (celery_adaptive/prefetch.py).

With Redis, kombu counts held ETA messages (received, not acknowledged) against the prefetch:
a prefetch set to ``children x multiplier`` while more ETA tasks than that are held fetches
nothing until they are due. "The burst finished while the ETA tasks were still held" is
therefore the observable difference, and no timing is asserted.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from celery_adaptive.embedded_redis import EmbeddedRedis
from tests.support import Broker, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

FAST = {"TEST_STABILIZATION": "3", "TEST_CONTROL_INTERVAL": "0.5"}
WITH_RETRYING = {"TEST_CONF_JSON": json.dumps({"include": ["tests.apps.proj", "tests.apps.retrying"]})}
#: Long enough for every step a test takes while the ETA tasks are held, on a loaded machine.
HELD_FOR = 20.0


def _prefetch(worker: WorkerProcess) -> tuple[int, int, int]:
    """(prefetch_count, its capacity part, target) from one `inspect stats` reply."""
    stats = worker.stats()
    pool = stats["pool"]
    return int(stats["prefetch_count"]), int(pool["prefetch"]["capacity"]), int(pool["target"])


def _scheduled(worker: WorkerProcess) -> int:
    replies = worker.inspect().scheduled() or {}
    return len(replies.get(worker.hostname, []))


def _wait_prefetch(worker: WorkerProcess, expected: tuple[int, int, int], message: str) -> None:
    seen: list[Any] = []

    def matches() -> bool:
        seen.append(_prefetch(worker))
        return seen[-1] == expected

    try:
        wait_until(matches, timeout=30, interval=0.2, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last (prefetch, capacity, target) {seen[-3:]}") from None


def _hold(broker: Broker, worker: WorkerProcess, countdown: float, count: int = 3,
          retries: int = 0) -> list[Any]:
    """Send countdown tasks (and tasks that retry with that countdown) and wait until the
    worker holds them all."""
    results = [broker.send("add", i, 1, countdown=countdown) for i in range(count)]
    results += [
        broker.app.send_task("tests.apps.retrying.retry_once", args=(uuid.uuid4().hex, countdown),
                             queue=broker.queue)
        for _ in range(retries)
    ]
    wait_until(lambda: _scheduled(worker) == len(results), timeout=30, interval=0.2,
               message=f"{len(results)} ETA tasks held")
    return results


def _burst_while_held(broker: Broker, worker: WorkerProcess, held: int) -> None:
    burst = [broker.send("sleep", 0.2) for _ in range(8)]
    assert all(isinstance(r.get(timeout=60), int) for r in burst)
    assert _scheduled(worker) == held, "the burst waited for the ETA tasks"


def test_pool_grow_shrink_and_restart_keep_the_eta_part(worker_factory, broker):
    """pool_grow/pool_shrink (Celery moves the prefetch; the pool must not move it again),
    pool_restart, with countdown tasks and ``self.retry(countdown=...)`` tasks held."""
    worker = worker_factory("-c", "2", env={"TEST_POOL_RESTARTS": "1", **WITH_RETRYING})
    assert _prefetch(worker) == (8, 8, 2)
    held = _hold(broker, worker, HELD_FOR, retries=2)
    _wait_prefetch(worker, (8 + 5, 8, 2), "5 held on top of 2 children")
    worker.control("pool_grow", n=2)
    _wait_prefetch(worker, (16 + 5, 16, 4), "grown to 4 under the held tasks")
    worker.control("pool_shrink", n=3)
    _wait_prefetch(worker, (4 + 5, 4, 1), "shrunk to 1 under the held tasks")
    before = set(worker.pool_info()["processes"])
    worker.control("pool_restart")
    wait_until(lambda: not before & set(worker.pool_info()["processes"]), message="children replaced")
    assert _prefetch(worker) == (4 + 5, 4, 1)
    _burst_while_held(broker, worker, held=5)  # 5 held > 4: an erased ETA part blocks this
    assert all(isinstance(r.get(timeout=HELD_FOR + 30), int) for r in held)
    _wait_prefetch(worker, (4, 4, 1), "children x multiplier once the ETA tasks ran")


def test_autoscaler_and_autoscale_control_keep_the_eta_part(worker_factory, broker):
    """The predictive autoscaler's resizes and the ``autoscale`` remote control, with countdown
    tasks held from a grown pool down to the minimum."""
    worker = worker_factory("--autoscale", "4,1", env=FAST)
    assert _prefetch(worker) == (4, 4, 1)
    warm = [broker.send("sleep", 0.3) for _ in range(16)]
    wait_until(lambda: worker.pool_info()["target"] > 1, timeout=20, message="growth")
    held = _hold(broker, worker, HELD_FOR)
    prefetch, capacity, target = _prefetch(worker)
    assert capacity == target * 4 and prefetch == capacity + 3
    assert all(isinstance(r.get(timeout=60), int) for r in warm)
    _wait_prefetch(worker, (4 + 3, 4, 1), "back to 1 child under the held tasks")
    reply = worker.control("autoscale", max=4, min=2)
    assert "max=4 min=2" in str(reply)
    _wait_prefetch(worker, (8 + 3, 8, 2), "min raised to 2 under the held tasks")
    _burst_while_held(broker, worker, held=3)
    assert all(isinstance(r.get(timeout=HELD_FOR + 30), int) for r in held)
    _wait_prefetch(worker, (8, 8, 2), "children x multiplier once the ETA tasks ran")


def test_reconnect_sizes_the_prefetch_for_the_pool_not_for_dash_c(worker_factory):
    """After a connection loss Celery builds a new QoS; it must be the pool's size (3 x 4),
    not the ``-c 1`` the worker started with."""
    with EmbeddedRedis() as server:
        own = Broker(url=server.url, queue=f"q-{uuid.uuid4().hex[:8]}")
        worker = worker_factory("-c", "1", broker_=own)
        worker.control("pool_grow", n=2)
        _wait_prefetch(worker, (12, 12, 3), "grown to 3")
        reconnected = worker.log().count("Connected to redis")
        server.restart()
        own._app = None
        wait_until(lambda: worker.log().count("Connected to redis") > reconnected, timeout=60,
                   interval=0.5, message="the worker reconnects")
        wait_until(worker.ping, timeout=30, interval=0.5, message="ping after reconnect")
        _wait_prefetch(worker, (12, 12, 3), "the pool's size after the reconnect")
        assert own.send("add", 2, 3).get(timeout=30) == 5


@pytest.mark.parametrize(
    ("conf", "unlimited"),
    [
        pytest.param({"worker_prefetch_multiplier": 0}, True, id="multiplier-0"),
        pytest.param({"worker_disable_prefetch": True}, False, id="disable-prefetch"),
    ],
)
def test_unlimited_and_disabled_prefetch(worker_factory, broker, conf, unlimited):
    """A multiplier of 0 means no limit: the pool never sets one. With
    ``worker_disable_prefetch`` (Redis) Celery also stops fetching while ``num_processes``
    tasks are reserved, which is the pool's target: the QoS still carries the ETA part."""
    worker = worker_factory("-c", "1", env={**FAST, "TEST_AUTOSCALE": "1", "TEST_MAX_CHILDREN": "4",
                                             "TEST_CONF_JSON": json.dumps(conf)})
    held = _hold(broker, worker, 10)
    burst = [broker.send("sleep", 0.3) for _ in range(16)]
    wait_until(lambda: worker.pool_info()["target"] > 1, timeout=30, message="growth")
    prefetch, capacity, target = _prefetch(worker)
    if unlimited:
        assert (prefetch, capacity) == (0, 0)
    else:
        assert capacity == target * 4 and prefetch == capacity + 3
    assert all(isinstance(r.get(timeout=60), int) for r in burst + held)
    prefetch, capacity, target = _prefetch(worker)
    assert prefetch == capacity == (0 if unlimited else target * 4)
