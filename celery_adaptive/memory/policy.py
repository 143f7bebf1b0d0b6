"""Memory policy, pure: limits per child, admission by the container's memory, what tasks need.

Nothing here reads a clock, a file or a process: readings and times are passed in, so the
supervisor's tests drive it on a fake clock.

- `MemoryConfig`: the resolved settings (bytes), built once at the pool's start.
- `child_verdict`: a child's RSS against the soft and hard limits.
- `Admission`: open or paused, with hysteresis, from the container's (or host's) memory in use.
- `TaskMemory`: the peak RSS growth learnt per task name (or declared), and which are heavy.
- `fits`: would a heavy task's expected growth fit under the ceiling now?
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from celery_adaptive.memory.cgroup import SystemMemory
from celery_adaptive.memory.sizes import MemoryAmount, format_bytes

__all__ = [
    "ADMISSION_HYSTERESIS",
    "Admission",
    "MemoryConfig",
    "TaskMemory",
    "Verdict",
    "child_verdict",
    "fits",
]

#: Admission resumes this share of the limit below the threshold, so a reading that hovers at
#: the threshold does not open and close it at every reading.
ADMISSION_HYSTERESIS = 0.02
#: Task names whose memory is remembered (least recently seen are forgotten first).
MAX_TASK_NAMES = 1000
#: How far a lower observation pulls a task's estimate down (a new peak replaces it at once).
DECAY = 0.2


@dataclass(frozen=True)
class MemoryConfig:
    """The memory guard's settings, resolved to bytes at the pool's start."""

    interval: float
    soft_limit: int | None = None
    hard_limit: int | None = None
    soft_text: str = ""
    hard_text: str = ""
    #: Memory in use (of the container, or the host) above which no task starts; a share is
    #: resolved against each reading's limit, so a resized container is followed.
    admission: MemoryAmount | None = None
    #: Learnt growth at which a task name counts as heavy (held until it fits).
    heavy_task: int = 64 * 1024 * 1024
    #: Growth declared per task name, used until one has been measured.
    task_memory: Mapping[str, int] = field(default_factory=dict)

    @property
    def enforces(self) -> bool:
        return self.soft_limit is not None or self.hard_limit is not None or self.admission is not None

    def describe(self, total: int | None) -> str:
        parts = []
        if self.soft_limit is not None:
            parts.append(f"soft limit {self.soft_text} ({format_bytes(self.soft_limit)}) per child")
        if self.hard_limit is not None:
            parts.append(f"hard limit {self.hard_text} ({format_bytes(self.hard_limit)}) per child")
        if self.admission is not None:
            parts.append(f"no task starts above {self.admission.describe(total)} in use")
        parts.append(f"tasks growing {format_bytes(self.heavy_task)}+ start only when they fit")
        parts.append(f"readings every {self.interval:g}s")
        return "; ".join(parts)


class Verdict(Enum):
    OK = "ok"
    SOFT = "soft"  # finish the task, then be replaced
    HARD = "hard"  # stopped now


def child_verdict(config: MemoryConfig, rss: int) -> Verdict:
    if config.hard_limit is not None and rss > config.hard_limit:
        return Verdict.HARD
    if config.soft_limit is not None and rss > config.soft_limit:
        return Verdict.SOFT
    return Verdict.OK


class Admission:
    """Whether new tasks may start, by the memory in use; and how long it has been paused."""

    def __init__(self, threshold: MemoryAmount | None) -> None:
        self.threshold = threshold
        self.open = True
        self.pauses = 0
        self._paused_since: float | None = None
        self._paused_total = 0.0
        self.reason = ""

    def threshold_bytes(self, reading: SystemMemory | None) -> int | None:
        if self.threshold is None or reading is None:
            return None
        return self.threshold.resolve(reading.limit)

    def update(self, reading: SystemMemory, now: float) -> str | None:
        """Apply one reading; "paused" or "resumed" when that changed, else None."""
        threshold = self.threshold_bytes(reading)
        if self.open:
            if threshold is not None and reading.used >= threshold:
                self.open = False
                self.pauses += 1
                self._paused_since = now
                self.reason = (
                    f"memory in use {format_bytes(reading.used)} ({reading.share:.0%} of "
                    f"{format_bytes(reading.limit)}, {reading.source}) is over "
                    f"adaptive_memory_admission_threshold {self._describe(reading)}"
                )
                return "paused"
            return None
        resume_at = None if threshold is None else threshold - int(ADMISSION_HYSTERESIS * reading.limit)
        if resume_at is None or reading.used < resume_at:
            self.open = True
            if self._paused_since is not None:
                self._paused_total += max(0.0, now - self._paused_since)
            self._paused_since = None
            self.reason = ""
            return "resumed"
        return None

    def _describe(self, reading: SystemMemory) -> str:
        assert self.threshold is not None
        return self.threshold.describe(reading.limit)

    def paused_seconds(self, now: float) -> float:
        """Total time paused so far, the current pause included."""
        current = 0.0 if self._paused_since is None else max(0.0, now - self._paused_since)
        return self._paused_total + current


class TaskMemory:
    """Peak RSS growth per task name: how much more a child held at the task's peak than
    before it started. A higher observation replaces the estimate at once (memory is what
    kills, so the estimate errs high); a lower one pulls it down by `DECAY`."""

    def __init__(self, declared: Mapping[str, int] | None = None, max_names: int = MAX_TASK_NAMES) -> None:
        self._declared = dict(declared or {})
        self._learnt: OrderedDict[str, int] = OrderedDict()
        self._max_names = max_names

    def observe(self, task_name: str, growth: int) -> None:
        growth = max(0, int(growth))
        old = self._learnt.get(task_name)
        if old is None or growth >= old:
            new = growth
        else:
            new = int(old + DECAY * (growth - old))
        self._learnt[task_name] = new
        self._learnt.move_to_end(task_name)
        while len(self._learnt) > self._max_names:
            self._learnt.popitem(last=False)

    def estimate(self, task_name: str) -> int | None:
        """What it is expected to grow by: measured, else declared, else unknown (None)."""
        learnt = self._learnt.get(task_name)
        return learnt if learnt is not None else self._declared.get(task_name)

    def learnt(self, limit: int) -> dict[str, int]:
        """The ``limit`` largest learnt estimates, by name."""
        largest = sorted(self._learnt.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return dict(sorted(largest))


def fits(need: int, used: int, reserved: int, ceiling: int) -> bool:
    """Does a task expected to grow by ``need`` fit, with ``reserved`` still to come from the
    heavy tasks already started, under ``ceiling``?"""
    return used + reserved + need <= ceiling
