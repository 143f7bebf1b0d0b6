"""The consumer's prefetch, moved with the pool's capacity without undoing Celery's own moves.

Celery keeps the task consumer's QoS (``consumer.qos.value``) at::

    capacity x worker_prefetch_multiplier  +  one per ETA/countdown task it holds

It records the first term in ``consumer.initial_prefetch_count``; the second it adds with
``qos.increment_eventually()`` when an ETA task arrives and takes back with
``decrement_eventually()`` when the task becomes due (celery/worker/strategy.py,
``Consumer.apply_eta_task``). ``Consumer._update_prefetch_count`` (``pool_grow``/``pool_shrink``)
moves the value *relative* to where it is, so the ETA part survives a resize. Setting it to an
absolute ``capacity x multiplier`` instead erases the ETA part: on Redis the held (unacked) ETA
messages then fill the prefetch and nothing else is fetched until they are due. So the pool
moves the value by the change of the first term, as Celery does.

Where a move reaches the broker depends on the QoS mode:

* Redis (kombu applies ``prefetch_count`` on the client, at every fetch), or RabbitMQ with
  global QoS (classic queues: ``basic.qos(global=True)`` changes the running consumer):
  ``MOVING``, each move takes effect in the event loop's next iteration.
* RabbitMQ with per-consumer QoS, which Celery 5.5+ turns on when it detects a quorum queue
  (``worker_detect_quorum_queues``; celery/worker/consumer/tasks.py): RabbitMQ fixes a
  consumer's prefetch when it starts consuming, later ``basic.qos`` calls only affect consumers
  started after them. ``PER_CONSUMER``: the pool sizes the prefetch for its *ceiling* (the
  autoscaler's maximum) before the consumer starts, and admits the prefetched work to children
  itself (it queues prefetched tasks anyway: ``uses_semaphore = False``). Only a change of the
  ceiling (the ``autoscale`` remote control, ``pool_grow``/``pool_shrink``) re-establishes the
  consumer (``basic.cancel``, ``basic.qos``, ``basic.consume``): messages already delivered stay
  with the channel and are acknowledged as usual.
* A multiplier of 0 (or an initial prefetch of 0): ``UNLIMITED``, nothing to move.

Everything here runs on the event-loop thread, like Celery's own QoS changes.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

logger = logging.getLogger("celery_adaptive.prefetch")


class PrefetchMode(Enum):
    UNLIMITED = "unlimited"
    MOVING = "moving"
    PER_CONSUMER = "per-consumer"


def mode_of(consumer: Any) -> PrefetchMode:
    """How a change of the consumer's QoS reaches the broker (see the module docstring)."""
    if not getattr(consumer, "prefetch_multiplier", 0) or not getattr(consumer, "initial_prefetch_count", 0):
        return PrefetchMode.UNLIMITED
    # Recorded by Celery's Tasks bootstep (5.5+); None (unknown, or older Celery) keeps moving.
    per_consumer = getattr(consumer, "qos_global", None) is False
    if per_consumer and _driver_type(consumer) == "amqp":
        return PrefetchMode.PER_CONSUMER
    # Redis reports per-consumer semantics too, but its QoS lives in kombu and follows moves.
    return PrefetchMode.MOVING


def _driver_type(consumer: Any) -> str | None:
    connection = getattr(consumer, "connection", None) or getattr(consumer, "conninfo", None)
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_type", None)


def capacity_move(recorded: int, children: int, multiplier: int) -> int:
    """The change to apply to the QoS so that its capacity part becomes ``children x
    multiplier``, given the capacity part it holds now (``recorded``). What Celery added for
    held ETA tasks is untouched: this is the difference of the capacity parts only."""
    if children < 1:
        raise ValueError(f"the pool has at least one child (asked for {children})")
    return children * multiplier - recorded


def apply_move(qos: Any, step: int) -> None:
    """Move a kombu ``QoS`` by ``step``; the event loop sends it to the broker.

    Not through ``increment_eventually``: that caps the value at ``worker_eta_task_limit``,
    which bounds the ETA part (Celery does not cap the capacity it starts with either), and a
    capped increase followed by an uncapped decrease would leave the prefetch below capacity
    for good. Never below 1: 0 would mean unlimited."""
    if step:
        with qos._mutex:
            qos.value = max(1, int(qos.value) + step)


class PrefetchLink:
    """Keeps one consumer's prefetch sized for the pool, through restarts of the consumer.

    Every call passes the pool's ``target`` (children it runs now) and ``ceiling`` (the most it
    may run: the autoscaler's maximum). ``MOVING`` sizes the prefetch for the target,
    ``PER_CONSUMER`` for the ceiling (see the module docstring).
    """

    def __init__(self) -> None:
        self.consumer: Any = None
        self.mode = PrefetchMode.UNLIMITED
        #: The prefetch the running broker consumer was started with (``PER_CONSUMER`` only).
        self.established: int | None = None
        self._reestablish_pending = False

    def on_consumer_start(self, consumer: Any, target: int, ceiling: int) -> None:
        """After Celery's Tasks bootstep made a fresh QoS, and before the event loop starts
        consuming (the pool's bootstep requires Tasks; the loop is the blueprint's last step)."""
        self.consumer = consumer
        self.mode = mode_of(consumer)
        self.established = None
        self._reestablish_pending = False
        self.follow(target, ceiling)
        if self.mode is PrefetchMode.PER_CONSUMER:
            # Send it now: the consumer the loop is about to start keeps this value for good.
            # (A reconnect has reset it to num_processes x multiplier, the current target.)
            qos = consumer.qos
            qos.set(qos.value)
            self.established = int(qos.value)

    def follow(self, target: int, ceiling: int) -> None:
        """Size the prefetch's capacity part for the pool, relative to its current value."""
        consumer = self.consumer
        qos = getattr(consumer, "qos", None)
        if consumer is None or qos is None or self.mode is PrefetchMode.UNLIMITED:
            return
        if getattr(consumer, "_maximum_prefetch_restored", True) is False:
            # Celery reduced the prefetch after a reconnect (tasks of the lost connection still
            # run) and restores it one multiplier per ack up to ``pool.num_processes x
            # multiplier``, the pool's target: it follows resizes by itself. A move here would
            # end that reduction early.
            return
        children = ceiling if self.mode is PrefetchMode.PER_CONSUMER else target
        multiplier = int(consumer.prefetch_multiplier)
        step = capacity_move(int(consumer.initial_prefetch_count), children, multiplier)
        if step == 0:
            return
        consumer.initial_prefetch_count = children * multiplier
        apply_move(qos, step)
        self.after_celery_move()

    def after_celery_move(self) -> None:
        """The QoS value moved (here, or by Celery's ``_update_prefetch_count``): a running
        per-consumer-QoS consumer only sees it when re-established."""
        if self.mode is PrefetchMode.PER_CONSUMER and self.established is not None:
            self._schedule_reestablish()

    def _schedule_reestablish(self) -> None:
        """Re-establish the broker consumer on the event loop, in a callback of its own: not
        inside a resize (messages delivered while waiting for ``cancel-ok`` are handed to the
        pool at once), and after ``pool_grow``'s own ``_update_prefetch_count``."""
        if self._reestablish_pending:
            return
        self._reestablish_pending = True
        self.consumer.call_soon(self._reestablish)

    def _reestablish(self) -> None:
        self._reestablish_pending = False
        consumer = self.consumer
        task_consumer = getattr(consumer, "task_consumer", None)
        qos = getattr(consumer, "qos", None)
        if task_consumer is None or qos is None or self.mode is not PrefetchMode.PER_CONSUMER:
            return
        wanted = int(qos.value)
        if wanted == self.established:
            return
        try:
            self._restart_consuming(task_consumer, qos, wanted)
        except Exception as exc:
            recoverable = tuple(getattr(consumer, "connection_errors", ())) + tuple(
                getattr(consumer, "channel_errors", ())
            )
            if isinstance(exc, recoverable):
                raise  # Celery reconnects, and the new consumer starts with the right prefetch
            # Anything else escaping a hub callback would stop the worker: keep the old one.
            logger.exception("Prefetch: could not re-establish the consumer; it keeps prefetch %s",
                             self.established)
            return
        self.established = wanted
        logger.info("Prefetch: consumer re-established with prefetch %d (per-consumer QoS)", wanted)

    @staticmethod
    def _restart_consuming(task_consumer: Any, qos: Any, prefetch: int) -> None:
        consuming = [q for q in task_consumer.queues if task_consumer.consuming_from(q)]
        # Per-consumer QoS: ``basic.qos(global=False)`` applies to consumers started after it.
        # Delivered, unacknowledged messages belong to the channel, not to the consumer tag, so
        # they survive the cancel and are acknowledged as usual; RabbitMQ delivers nothing for
        # a tag after its ``cancel-ok``.
        if consuming:
            task_consumer.cancel()
        qos.set(prefetch)
        if consuming:
            task_consumer.consume()

    def describe(self) -> dict[str, Any]:
        """For ``inspect stats``: the mode, and what the broker consumer was started with."""
        if self.consumer is None:
            return {}
        out: dict[str, Any] = {"mode": self.mode.value}
        capacity = getattr(self.consumer, "initial_prefetch_count", None)
        if capacity is not None:
            out["capacity"] = capacity  # the part of prefetch_count not added for ETA tasks
        if self.established is not None:
            out["established"] = self.established
        return out
