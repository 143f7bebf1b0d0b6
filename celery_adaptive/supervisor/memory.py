"""The supervisor's side of the memory guard: what a memory reading means for children and jobs.

Owned by the supervisor's thread, like the rest of its books (no lock of its own): the
watcher's readings arrive as posts (`Supervisor.on_memory_sample`). `MemoryControl` applies the
pure policy of `celery_adaptive.memory.policy` and answers with actions; the supervisor carries
them out, because only it changes a child's state (`ChildTable.transition`) or reports a job.

Its books:

- the latest reading of each child, and per running job its child's RSS before the job
  started (the baseline) and the highest seen since (the peak): peak - baseline is what the
  job's task name is learnt to need;
- admission: paused while the memory in use is over the threshold (with hysteresis);
- heavy jobs (task names learnt or declared to grow by ``adaptive_memory_heavy_task`` or more)
  held back until they fit, and the growth still expected from the heavy jobs let through.

A reading is used only if it still describes the present: the child is the same process
(pid, not yet reaped), has finished no task since (``tasks_done``), and started its current job
before the reading was taken. Anything else is a reading of the past, and the next one follows
within the watcher's interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_adaptive.jobs import Job
from celery_adaptive.memory.cgroup import SystemMemory
from celery_adaptive.memory.policy import (
    Admission,
    MemoryConfig,
    TaskMemory,
    Verdict,
    child_verdict,
    fits,
)
from celery_adaptive.memory.sample import ChildMemory, MemorySample
from celery_adaptive.supervisor.children import Child, ChildState

#: Task names listed in metrics, the largest learnt first.
MAX_TASKS_SHOWN = 20

_GONE = frozenset({ChildState.STARTING, ChildState.KILLED, ChildState.DEAD})
_TAKES_WORK = frozenset({ChildState.IDLE, ChildState.BUSY})


@dataclass(frozen=True)
class Recycle:
    """Over the soft limit: the child takes no more work, finishes what it runs, is replaced."""

    child: Child
    reading: ChildMemory
    limit: int


@dataclass(frozen=True)
class OverHardLimit:
    """Over the hard limit: the child is killed now and its running job fails."""

    child: Child
    reading: ChildMemory
    limit: int
    job: Job | None  # the job it was running when it was read, if any


MemoryAction = Recycle | OverHardLimit


@dataclass
class _Run:
    job: Job
    child_id: int
    baseline: int | None  # the child's RSS before the job started (None: not read yet)
    peak: int | None = None


class MemoryControl:
    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self.tasks = TaskMemory(config.task_memory)
        self.admission = Admission(config.admission)
        self.system: SystemMemory | None = None
        self.readings: dict[int, ChildMemory] = {}  # child id -> its latest reading
        self._runs: dict[int, _Run] = {}  # job id -> run
        self._running_on: dict[int, int] = {}  # child id -> job id
        self._held: deque[Job] = deque()
        self._reserved: dict[int, int] = {}  # job id -> growth expected when it was let through
        #: Read by the watcher's thread (a plain bool): read at the fast pace while True.
        self.waiting = False
        #: Called when a job starts: the watcher reads at once if it was idle (set by the pool).
        self.poke: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ jobs
    def holds(self, job: Job) -> bool:
        """Keep ``job`` back (True) when its task name is heavy; `release` lets it go."""
        need = self.tasks.estimate(job.task_name)
        if need is None or need < self.config.heavy_task:
            return False
        self._held.append(job)
        self.waiting = True
        return True

    def release(self) -> list[Job]:
        """The held jobs that fit now, oldest first; each keeps its growth reserved until it
        ends. One heavy job at a time may always run (it would never fit otherwise)."""
        if not self._held:
            return []
        out: list[Job] = []
        keep: deque[Job] = deque()
        for _ in range(len(self._held)):
            job = self._held.popleft()
            need = self.tasks.estimate(job.task_name) or 0
            if self._fits(need):
                self._reserved[job.job_id] = need
                out.append(job)
            else:
                keep.append(job)
        self._held = keep
        self._note_waiting()
        return out

    def _fits(self, need: int) -> bool:
        if not self._reserved:
            return True
        system = self.system
        if system is None:
            return False  # no headroom known: one heavy job at a time
        ceiling = self.admission.threshold_bytes(system) or system.limit
        return fits(need, system.used, self.reserved_remaining(), ceiling)

    def reserved_remaining(self) -> int:
        """Growth still expected from the heavy jobs let through (less what they already took)."""
        total = 0
        for job_id, need in self._reserved.items():
            run = self._runs.get(job_id)
            grown = 0
            if run is not None and run.baseline is not None:
                reading = self.readings.get(run.child_id)
                if reading is not None:
                    grown = max(0, reading.rss - run.baseline)
            total += max(0, need - grown)
        return total

    def started(self, job: Job, child_id: int) -> None:
        reading = self.readings.get(child_id)
        self._runs[job.job_id] = _Run(job, child_id, reading.rss if reading is not None else None)
        self._running_on[child_id] = job.job_id
        self.poke()

    def ended(self, job: Job) -> None:
        """``job`` is over (finished, failed, lost, revoked or dropped): learn and unreserve."""
        self._reserved.pop(job.job_id, None)
        run = self._runs.pop(job.job_id, None)
        if run is not None:
            if self._running_on.get(run.child_id) == job.job_id:
                del self._running_on[run.child_id]
            if run.peak is not None and run.baseline is not None:
                self.tasks.observe(job.task_name, run.peak - run.baseline)
        self._note_waiting()

    def flush(self) -> list[Job]:
        """Drop every held job (the broker redelivers them)."""
        dropped = list(self._held)
        self._held.clear()
        self._note_waiting()
        return dropped

    def held_count(self) -> int:
        return len(self._held)

    def oldest_held_at(self) -> float | None:
        return min((job.submitted_at for job in self._held), default=None)

    def child_gone(self, child_id: int) -> None:
        self.readings.pop(child_id, None)

    # ------------------------------------------------------------------ readings
    def assess(self, sample: MemorySample, lookup: Callable[[int], Child | None]) -> tuple[list[MemoryAction], str | None]:
        """Book a reading; the actions it calls for, and "paused"/"resumed" if admission changed."""
        change = None
        if sample.system is not None:
            self.system = sample.system
            change = self.admission.update(sample.system, sample.at)
        actions: list[MemoryAction] = []
        for reading in sample.children:
            child = lookup(reading.child_id)
            if child is None or not self.current(child, reading, sample.at):
                continue
            self.readings[child.child_id] = reading
            run = self._run_on(child.child_id)
            if run is not None:
                if run.baseline is None:  # never read before it started: from now on
                    run.baseline = reading.rss
                run.peak = reading.rss if run.peak is None else max(run.peak, reading.rss)
            verdict = child_verdict(self.config, reading.rss)
            if verdict is Verdict.HARD:
                assert self.config.hard_limit is not None
                actions.append(OverHardLimit(child, reading, self.config.hard_limit,
                                             run.job if run is not None else None))
            elif verdict is Verdict.SOFT and child.state in _TAKES_WORK:
                assert self.config.soft_limit is not None
                actions.append(Recycle(child, reading, self.config.soft_limit))
        self._note_waiting()
        return actions, change

    def current(self, child: Child, reading: ChildMemory, at: float) -> bool:
        """Does ``reading`` still describe ``child`` as it is now (see the module docstring)?"""
        if child.pid != reading.pid or child.state in _GONE:
            return False
        if child.tasks_done != reading.tasks_done:
            return False
        run = self._run_on(child.child_id)
        return run is None or run.job.accepted_at is None or run.job.accepted_at <= at

    def _run_on(self, child_id: int) -> _Run | None:
        job_id = self._running_on.get(child_id)
        return None if job_id is None else self._runs.get(job_id)

    def _note_waiting(self) -> None:
        self.waiting = bool(self._held) or not self.admission.open

    # ------------------------------------------------------------------ views
    def pressure(self) -> str | None:
        """Why no task starts now (admission paused), or None."""
        return None if self.admission.open else self.admission.reason

    def describe(self, now: float) -> dict[str, Any]:
        """Plain data for metrics and ``inspect stats`` (what was not measured is left out)."""
        system = self.system
        out: dict[str, Any] = {
            "admission": "open" if self.admission.open else "paused",
            "pauses": self.admission.pauses,
            "paused_s": round(self.admission.paused_seconds(now), 3),
            "held": len(self._held),
            "reserved_bytes": self.reserved_remaining(),
            "heavy_task_bytes": self.config.heavy_task,
            "tasks": self.tasks.learnt(MAX_TASKS_SHOWN),
        }
        if not self.admission.open:
            out["paused_reason"] = self.admission.reason
        if self.config.soft_limit is not None:
            out["soft_limit_bytes"] = self.config.soft_limit
        if self.config.hard_limit is not None:
            out["hard_limit_bytes"] = self.config.hard_limit
        if system is not None:
            out["used_bytes"] = system.used
            out["limit_bytes"] = system.limit
            out["source"] = system.source
            threshold = self.admission.threshold_bytes(system)
            if threshold is not None:
                out["threshold_bytes"] = threshold
        return out
