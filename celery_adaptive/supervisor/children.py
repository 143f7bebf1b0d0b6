"""The child table: every pool child, and the one place that changes a child's state.

A child's life::

    STARTING ──ready──> IDLE <──> BUSY
        │                 │        │
        └────────┬────────┴────────┘
                 v
             DRAINING ──idle──> STOPPING ──> DEAD
                 (any live state ──killed──> KILLED ──> DEAD; any state ──exit──> DEAD)

`ChildTable.transition` is the only writer of `Child.state`; `TRANSITIONS` declares what is
allowed, and anything else raises `IllegalTransition` (a bug in the supervisor, never a
child's doing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger("celery_adaptive.supervisor")


class ChildState(Enum):
    STARTING = "starting"  # forked, not yet reported ready
    IDLE = "idle"  # ready, holds no job
    BUSY = "busy"  # holds at least one job
    DRAINING = "draining"  # takes no new work; stopped once its jobs are done
    STOPPING = "stopping"  # told to exit (or announced a planned exit); waiting for it
    KILLED = "killed"  # signalled to die (time limit, bad message, start timeout)
    DEAD = "dead"  # exited and reaped


_LIVE = (ChildState.STARTING, ChildState.IDLE, ChildState.BUSY, ChildState.DRAINING, ChildState.STOPPING)

TRANSITIONS: dict[ChildState, frozenset[ChildState]] = {
    ChildState.STARTING: frozenset({ChildState.IDLE, ChildState.STOPPING,
                                    ChildState.KILLED, ChildState.DEAD}),
    ChildState.IDLE: frozenset({ChildState.BUSY, ChildState.DRAINING, ChildState.STOPPING,
                                ChildState.KILLED, ChildState.DEAD}),
    ChildState.BUSY: frozenset({ChildState.IDLE, ChildState.DRAINING, ChildState.STOPPING,
                                ChildState.KILLED, ChildState.DEAD}),
    ChildState.DRAINING: frozenset({ChildState.STOPPING, ChildState.KILLED, ChildState.DEAD}),
    ChildState.STOPPING: frozenset({ChildState.KILLED, ChildState.DEAD}),
    ChildState.KILLED: frozenset({ChildState.DEAD}),
    ChildState.DEAD: frozenset(),
}

#: States in which a child takes new work.
ACCEPTING = frozenset({ChildState.IDLE, ChildState.BUSY})
#: States in which a child counts towards the pool's size (it will, or does, take work).
SERVING = frozenset({ChildState.STARTING, ChildState.IDLE, ChildState.BUSY})


class IllegalTransition(RuntimeError):
    """The supervisor asked for a state change the table does not allow."""


@dataclass(eq=False)
class Child:
    """One child process, as the parent sees it. Only `ChildTable.transition` sets ``state``."""

    child_id: int
    slot: int
    cpu: int | None
    pid: int
    process: Any  # has .exitcode (non-blocking poll) and .sentinel
    channel: Any  # the parent's end of the pipes (channel.ChildChannel or a test double)
    created_at: float
    lane: bool = False  # a short-task lane: runs only short tasks, not counted in the size
    state: ChildState = ChildState.STARTING
    ready_at: float | None = None
    tasks_done: int = 0
    busy_since: float | None = None
    busy_seconds: float = 0.0
    exit_reason: str | None = None  # why it is leaving, when planned ("shrink", "max-tasks", ...)
    exitcode: int | None = None
    timers: list[Any] = field(default_factory=list)  # deadlines to cancel when it dies

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    @property
    def accepting(self) -> bool:
        return self.state in ACCEPTING

    @property
    def alive(self) -> bool:
        return self.state is not ChildState.DEAD


class ChildTable:
    """Owns the `Child` records; the supervisor's single source of who exists and in what state."""

    def __init__(self) -> None:
        self._by_id: dict[int, Child] = {}
        self._by_pid: dict[int, Child] = {}
        self._next_id = 0

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, child: Child) -> None:
        if child.state is not ChildState.STARTING:
            raise IllegalTransition(f"child {child.child_id} must enter the table STARTING")
        self._by_id[child.child_id] = child
        self._by_pid[child.pid] = child

    def transition(self, child: Child, new: ChildState, why: str = "") -> bool:
        """Move ``child`` to ``new``. Returns False (and changes nothing) when it is already
        there; raises `IllegalTransition` for a change the table forbids."""
        old = child.state
        if old is new:
            return False
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"child pid={child.pid}: {old.value} -> {new.value} ({why})")
        child.state = new
        if new is ChildState.DEAD:
            self._by_id.pop(child.child_id, None)
            self._by_pid.pop(child.pid, None)
        logger.debug("Child pid=%s %s -> %s%s", child.pid, old.value, new.value, f" ({why})" if why else "")
        return True

    def get(self, child_id: int) -> Child | None:
        return self._by_id.get(child_id)

    def by_pid(self, pid: int) -> Child | None:
        return self._by_pid.get(pid)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def snapshot(self) -> list[Child]:
        """A list safe to read from another thread (built in one step under the GIL)."""
        return list(self._by_id.values())

    def free_slot(self) -> int:
        used = {c.slot for c in list(self._by_id.values())}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def serving(self, lane: bool = False) -> list[Child]:
        return [c for c in list(self._by_id.values()) if c.serving and c.lane is lane]
