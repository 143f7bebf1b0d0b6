"""What the memory watcher measured at one instant: small frozen values, safe across threads."""

from __future__ import annotations

from dataclasses import dataclass

from celery_adaptive.memory.cgroup import SystemMemory


@dataclass(frozen=True)
class ChildMemory:
    """One child's memory, with what identifies the moment: its pid and how many tasks it had
    finished when it was read (a later count means the reading belongs to an earlier task)."""

    child_id: int
    pid: int
    tasks_done: int
    rss: int
    uss: int | None = None
    pss: int | None = None


@dataclass(frozen=True)
class MemorySample:
    at: float  # the supervisor's clock, read before the processes were
    children: tuple[ChildMemory, ...]
    system: SystemMemory | None = None
