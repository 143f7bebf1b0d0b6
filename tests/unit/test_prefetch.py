"""The prefetch arithmetic against kombu's real `QoS` and Celery's real `_update_prefetch_count`.

The consumer is a plain stand-in holding the attributes Celery's consumer has; the broker side
(what reaches Redis or RabbitMQ) is covered by tests/integration/test_prefetch*.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker.consumer.consumer import Consumer
from kombu.common import QoS

from celery_adaptive.prefetch import PrefetchLink, PrefetchMode, capacity_move, mode_of


@dataclass
class TaskConsumerLog:
    """Records what a re-establish does to the task consumer, in order."""

    calls: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=lambda: ["q"])
    consuming: bool = True

    def consuming_from(self, queue: str) -> bool:
        return self.consuming

    def cancel(self) -> None:
        self.calls.append("cancel")
        self.consuming = False

    def consume(self) -> None:
        self.calls.append("consume")
        self.consuming = True


@dataclass
class ConsumerStandIn:
    multiplier: int
    children: int
    driver: str = "redis"
    qos_global: bool | None = None
    sent: list[int] = field(default_factory=list)
    soon: list[Callable[[], None]] = field(default_factory=list)
    task_consumer: TaskConsumerLog = field(default_factory=TaskConsumerLog)

    def __post_init__(self) -> None:
        self.prefetch_multiplier = self.multiplier
        self.initial_prefetch_count = self.children * self.multiplier
        self.pool = SimpleNamespace(num_processes=self.children)
        self.connection = SimpleNamespace(transport=SimpleNamespace(driver_type=self.driver))
        self.qos = QoS(self._send, self.initial_prefetch_count)

    def _send(self, prefetch_count: int, **_: Any) -> None:
        self.sent.append(prefetch_count)
        self.task_consumer.calls.append(f"qos {prefetch_count}")

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run_soon(self) -> None:
        while self.soon:
            self.soon.pop(0)()

    # Celery's own pool_grow/pool_shrink arithmetic, unchanged.
    def celery_update_prefetch_count(self, index: int) -> None:
        Consumer._update_prefetch_count(self, index)  # type: ignore[arg-type]

    def _update_qos_eventually(self, index: int) -> Any:
        return Consumer._update_qos_eventually(self, index)  # type: ignore[arg-type]

    # What celery/worker/strategy.py and Consumer.apply_eta_task do for an ETA task.
    def hold_eta(self, n: int = 1) -> None:
        for _ in range(n):
            self.qos.increment_eventually()

    def eta_due(self, n: int = 1) -> None:
        for _ in range(n):
            self.qos.decrement_eventually()


def linked(consumer: ConsumerStandIn, target: int, ceiling: int | None = None) -> PrefetchLink:
    link = PrefetchLink()
    link.on_consumer_start(consumer, target, ceiling or target)
    return link


def test_capacity_move_is_the_difference_of_capacity_parts() -> None:
    assert capacity_move(4, 4, 4) == 12
    assert capacity_move(16, 1, 4) == -12
    assert capacity_move(8, 2, 4) == 0
    with pytest.raises(ValueError, match="at least one child"):
        capacity_move(4, 0, 4)


def test_resizes_keep_what_celery_added_for_held_eta_tasks() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=1)
    link = linked(consumer, 1)
    consumer.hold_eta(6)
    assert consumer.qos.value == 4 + 6
    link.follow(4, 4)  # the autoscaler grows while the six are held
    assert consumer.qos.value == 16 + 6 and consumer.initial_prefetch_count == 16
    link.follow(1, 1)  # and shrinks back
    assert consumer.qos.value == 4 + 6
    consumer.eta_due(6)
    assert consumer.qos.value == 4  # children x multiplier once they ran


def test_the_consumer_built_for_autoscale_max_is_moved_down_to_the_target() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=4)  # --autoscale 4,1: sized for MAX
    consumer.hold_eta(2)  # arrived before the autoscaler started
    link = PrefetchLink()
    link.on_consumer_start(consumer, 1, 4)
    assert consumer.qos.value == 4 + 2


def test_pool_grow_is_moved_by_celery_alone_and_composes_with_later_resizes() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=2)
    link = linked(consumer, 2)
    consumer.hold_eta(3)
    consumer.pool.num_processes = 4  # pool.grow(2), which leaves the prefetch to Celery...
    link.after_celery_move()
    consumer.celery_update_prefetch_count(2)  # ...and pool_grow's own move
    assert consumer.qos.value == 16 + 3
    link.follow(4, 4)  # a later follow sees Celery's record and has nothing to add
    assert consumer.qos.value == 16 + 3
    link.follow(1, 1)
    assert consumer.qos.value == 4 + 3


def test_unlimited_prefetch_is_never_moved() -> None:
    consumer = ConsumerStandIn(multiplier=0, children=2)
    link = linked(consumer, 2)
    assert link.mode is PrefetchMode.UNLIMITED
    link.follow(8, 8)
    assert consumer.qos.value == 0 and consumer.initial_prefetch_count == 0


def test_a_prefetch_reduced_after_a_reconnect_is_left_to_celerys_restore() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=4)
    consumer.initial_prefetch_count = 4  # Celery: 3 tasks of the lost connection still run
    consumer.qos = QoS(consumer._send, 4)
    consumer._maximum_prefetch_restored = False  # type: ignore[attr-defined]
    linked(consumer, 2)
    assert consumer.qos.value == 4 and consumer.initial_prefetch_count == 4


@pytest.mark.parametrize(
    ("driver", "qos_global", "mode"),
    [
        ("redis", False, PrefetchMode.MOVING),  # kombu applies Redis's QoS itself
        ("redis", None, PrefetchMode.MOVING),
        ("amqp", True, PrefetchMode.MOVING),  # RabbitMQ global QoS (classic queues)
        ("amqp", None, PrefetchMode.MOVING),  # Celery before 5.5 did not record it
        ("amqp", False, PrefetchMode.PER_CONSUMER),  # quorum queues detected
    ],
)
def test_mode_follows_where_the_broker_applies_qos(driver: str, qos_global: bool | None,
                                                   mode: PrefetchMode) -> None:
    assert mode_of(ConsumerStandIn(multiplier=4, children=1, driver=driver, qos_global=qos_global)) is mode


def test_per_consumer_qos_is_sized_for_the_ceiling_before_consuming() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=1, driver="amqp", qos_global=False)
    link = PrefetchLink()
    link.on_consumer_start(consumer, 1, 8)
    # Sent at once (the loop consumes next), and the running consumer keeps it.
    assert consumer.sent == [32] and link.established == 32
    link.follow(5, 8)  # the autoscaler resizes within the ceiling: nothing to do
    link.follow(1, 8)
    assert consumer.qos.value == 32 and consumer.soon == []


def test_per_consumer_qos_re_establishes_the_consumer_when_the_ceiling_changes() -> None:
    consumer = ConsumerStandIn(multiplier=1, children=2, driver="amqp", qos_global=False)
    link = linked(consumer, 1, 2)
    consumer.hold_eta(1)
    consumer.task_consumer.calls.clear()
    link.follow(1, 6)  # autoscale max=6
    link.follow(1, 6)
    assert len(consumer.soon) == 1  # once, on the event loop, not inside the resize
    consumer.run_soon()
    assert consumer.task_consumer.calls == ["cancel", "qos 7", "consume"]
    assert link.established == 7
    consumer.run_soon()
    assert consumer.task_consumer.calls == ["cancel", "qos 7", "consume"]


def test_per_consumer_qos_follows_pool_grow_after_celerys_move() -> None:
    consumer = ConsumerStandIn(multiplier=1, children=1, driver="amqp", qos_global=False)
    link = linked(consumer, 1)
    consumer.pool.num_processes = 4
    link.after_celery_move()  # pool.grow(3) runs before Celery's move...
    consumer.celery_update_prefetch_count(3)
    consumer.task_consumer.calls.clear()
    consumer.run_soon()  # ...and the re-establish after it
    assert consumer.task_consumer.calls == ["cancel", "qos 4", "consume"]
    assert link.established == 4


class BrokerGone(Exception):
    pass


@pytest.mark.parametrize("recoverable", [True, False])
def test_a_failed_re_establish_reconnects_or_keeps_the_old_consumer(recoverable: bool,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    consumer = ConsumerStandIn(multiplier=1, children=1, driver="amqp", qos_global=False)
    consumer.connection_errors = (BrokerGone,) if recoverable else ()  # type: ignore[attr-defined]
    consumer.channel_errors = ()  # type: ignore[attr-defined]
    link = linked(consumer, 1)

    def cancel() -> None:
        raise BrokerGone("connection reset")

    consumer.task_consumer.cancel = cancel  # type: ignore[method-assign]
    link.follow(1, 3)
    if recoverable:  # Celery's consumer restarts, and sizes the new one at start
        with pytest.raises(BrokerGone):
            consumer.run_soon()
    else:  # anything else escaping the event loop would stop the worker
        consumer.run_soon()
        assert "could not re-establish" in caplog.text
    assert link.established == 1


@pytest.mark.skipif(
    "max_prefetch" not in inspect.signature(QoS.__init__).parameters,
    reason="this kombu's QoS has no max_prefetch (worker_eta_task_limit: kombu and Celery 5.6+)",
)
def test_the_eta_task_limit_caps_the_eta_part_only() -> None:
    consumer = ConsumerStandIn(multiplier=4, children=1)
    consumer.qos = QoS(consumer._send, 4, max_prefetch=6)  # worker_eta_task_limit=6
    link = linked(consumer, 1)
    consumer.hold_eta(1)
    link.follow(4, 4)
    assert consumer.qos.value == 16 + 1  # a capped grow...
    link.follow(1, 1)
    consumer.eta_due(1)
    assert consumer.qos.value == 4  # ...would end here at 1, below one child's share
