"""The memory watcher: a thread in the worker's parent that reads the children's memory.

Every ``adaptive_memory_interval`` seconds (``idle_interval`` while no child is busy and
nothing waits for memory) it takes the supervisor's snapshot of its children (``children()``,
safe from any thread), reads each ready child's RSS by pid with psutil (``/proc/<pid>/statm``,
a few microseconds), its USS and PSS every ``full_every`` seconds (``smaps_rollup``, costlier),
and the container's or host's memory, and hands a frozen `MemorySample` to ``deliver``, which
posts it to the supervisor's thread. It never touches the supervisor's state and never blocks
the event loop; the supervisor decides what a reading means (a pid that exited or was reused
meanwhile is recognised there: the child is no longer in its table).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from celery_adaptive.clock import Clock
from celery_adaptive.memory.cgroup import SystemMemory, SystemMemorySource
from celery_adaptive.memory.sample import ChildMemory, MemorySample
from celery_adaptive.supervisor.children import Child, ChildState

logger = logging.getLogger("celery_adaptive.memory")

#: Between readings while no child is busy and nothing waits for memory.
IDLE_INTERVAL_S = 1.0
#: Between USS/PSS readings of one child.
FULL_INFO_EVERY_S = 2.0
#: How long `stop` waits for the thread.
STOP_TIMEOUT_S = 1.0

_READ = frozenset({ChildState.IDLE, ChildState.BUSY, ChildState.DRAINING, ChildState.STOPPING})
_WORKING = frozenset({ChildState.BUSY, ChildState.DRAINING, ChildState.STOPPING})


class MemoryWatcher:
    def __init__(
        self,
        children: Callable[[], Iterable[Child]],
        deliver: Callable[[MemorySample], None],
        system: SystemMemorySource | None,
        interval: float,
        clock: Clock,
        hurry: Callable[[], bool] = lambda: False,
        idle_interval: float = IDLE_INTERVAL_S,
        full_every: float = FULL_INFO_EVERY_S,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._children = children
        self._deliver = deliver
        self._system = system
        self.interval = interval
        self.idle_interval = max(idle_interval, interval)
        self._clock = clock
        self._hurry = hurry
        self._full_every = full_every
        self._procs: dict[int, psutil.Process] = {}
        self._full_at: dict[int, float] = {}
        self._full: dict[int, tuple[int | None, int | None]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._idle = False  # waiting at the idle pace (a poke ends the wait)
        self._poked = False  # a task started since the last reading
        self._failing = False
        self.samples = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adaptive-memory", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A task started: read at the fast pace again, now if waiting at the idle pace (so a
        task that grows fast is seen within ``interval`` of its start). Called on every task
        start from the event loop: a flag, and an event set only while the watcher is idle."""
        self._poked = True
        if self._idle:
            self._wake.set()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Idempotent; safe in a signal handler (waits at most ``timeout``)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.sample_once()
                self._deliver(sample)
                if self._failing:
                    logger.info("Memory readings work again")
                self._failing = False
            except Exception:
                if not self._failing:  # once per outage, not every interval
                    logger.exception("Reading the pool's memory failed; will keep trying")
                self._failing = True
            # The fast pace is the floor: tasks that start and end between readings poke the
            # watcher, and must not make it read at their rate.
            self._stop.wait(self.interval)
            if self._busy or self._poked or self._hurry():
                self._poked = False
                continue
            self._idle = True
            if not self._poked:
                self._wake.wait(self.idle_interval - self.interval)
            self._idle = False
            self._wake.clear()
            self._poked = False

    def sample_once(self) -> MemorySample:
        at = self._clock.now()
        readings: list[ChildMemory] = []
        busy = False
        wanted: set[int] = set()
        for child in self._children():
            state = child.state
            if state not in _READ:
                continue
            # Read before the process: a count that moved on by the time the supervisor sees
            # the reading tells it the reading belongs to an earlier task.
            tasks_done = child.tasks_done
            pid = child.pid
            busy = busy or state in _WORKING
            wanted.add(pid)
            reading = self._read(child.child_id, pid, tasks_done, at)
            if reading is not None:
                readings.append(reading)
        for gone in set(self._procs) - wanted:
            self._forget(gone)
        self._busy = busy
        system: SystemMemory | None = self._system.read() if self._system is not None else None
        self.samples += 1
        return MemorySample(at, tuple(readings), system)

    def _read(self, child_id: int, pid: int, tasks_done: int, at: float) -> ChildMemory | None:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            rss = int(proc.memory_info().rss)
            uss, pss = self._full.get(pid, (None, None))
            if at - self._full_at.get(pid, -1e18) >= self._full_every:
                self._full_at[pid] = at
                uss, pss = self._full_info(proc)
                self._full[pid] = (uss, pss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            self._forget(pid)
            return None
        return ChildMemory(child_id, pid, tasks_done, rss, uss, pss)

    @staticmethod
    def _full_info(proc: psutil.Process) -> tuple[int | None, int | None]:
        try:
            full: Any = proc.memory_full_info()
        except (psutil.AccessDenied, NotImplementedError, OSError):
            return None, None
        uss = getattr(full, "uss", None)
        pss = getattr(full, "pss", None)
        return (None if uss is None else int(uss)), (None if pss is None else int(pss))

    def _forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._full_at.pop(pid, None)
        self._full.pop(pid, None)
