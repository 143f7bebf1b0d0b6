"""The ``worker-adaptive-metrics`` Celery event.

Sent on the event-loop thread through the consumer's event dispatcher, read afresh for every
event because Celery recreates it on each reconnect (docs/celery-pool-contract.md, section 6). ``worker-*`` events
go out whenever the dispatcher is enabled (heartbeats or gossip on, or ``-E``).

``celery.events.State`` and Flower treat every ``worker-*`` event as a heartbeat and copy its
fields onto their Worker object, so the fields must not reuse the names they read.
"""

from __future__ import annotations

from typing import Any

from celery_adaptive.metrics.snapshot import Snapshot

EVENT_TYPE = "worker-adaptive-metrics"
#: One per memory limit hit and admission pause or resume (see `celery_adaptive.memory`).
MEMORY_EVENT_TYPE = "worker-adaptive-memory"

#: Names Celery's dispatcher sets itself, or that State/Flower read from worker events (or
#: that are attributes/methods of their Worker object).
RESERVED_FIELDS = frozenset(
    {
        "type", "hostname", "timestamp", "utcoffset", "pid", "clock", "local_received",
        "active", "processed", "freq", "loadavg", "heartbeats", "sw_ident", "sw_ver", "sw_sys",
        "event", "update", "alive", "id", "status_string", "heartbeat_expires",
    }
)


def event_fields(snapshot: Snapshot) -> dict[str, Any]:
    """The event's fields: the published snapshot without ``hostname`` (the dispatcher adds it)."""
    fields = snapshot.to_dict()
    fields.pop("hostname", None)
    clash = RESERVED_FIELDS.intersection(fields)
    if clash:  # a programming error: fail loudly in tests rather than corrupt Flower's state
        raise ValueError(f"metrics event fields reuse reserved names: {sorted(clash)}")
    return fields


def send_metrics_event(consumer: Any, snapshot: Snapshot) -> bool:
    """Send the event if the consumer has an enabled dispatcher. On the event-loop thread only."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return False
    dispatcher.send(EVENT_TYPE, **event_fields(snapshot))
    return True


def send_memory_event(consumer: Any, kind: str, fields: dict[str, Any]) -> bool:
    """``worker-adaptive-memory`` with ``kind`` (hard-limit, soft-limit, admission-paused,
    admission-resumed) and plain fields (pids, bytes, task name and id; never arguments)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return False
    clash = RESERVED_FIELDS.intersection(fields)
    if clash:  # a programming error, as for the metrics event
        raise ValueError(f"memory event fields reuse reserved names: {sorted(clash)}")
    dispatcher.send(MEMORY_EVENT_TYPE, kind=kind, **fields)
    return True
