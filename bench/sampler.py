"""Periodic psutil samples of a worker's process tree, on a background thread.

Each sample: wall time, number of processes in the tree (the worker itself included), the tree's
cumulative CPU seconds and its summed RSS. CPU is kept per process (keyed by pid and create time)
and the last value of a process that exited stays in the total, so a pool that recycles children
is not credited with their CPU disappearing. A child born and dead between two samples is missed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Sample:
    t: float  # time.time()
    processes: int
    cpu_s: float  # cumulative user+system of every process seen so far
    rss_bytes: int


class TreeSampler:
    def __init__(self, root_pid: int, interval: float = 0.1, max_duration: float = 6 * 3600) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.max_samples = int(max_duration / interval) + 1
        self.samples: list[Sample] = []
        self._cpu: dict[tuple[int, float], float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tree(self) -> list[psutil.Process]:
        try:
            root = self._procs.get(self.root_pid) or psutil.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        # Reuse Process objects so psutil's cached create_time identifies them cheaply.
        fresh: dict[int, psutil.Process] = {}
        for proc in tree:
            known = self._procs.get(proc.pid)
            fresh[proc.pid] = known if known is not None and known == proc else proc
        self._procs = fresh
        return list(fresh.values())

    def sample_now(self) -> Sample:
        processes, rss = 0, 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    mem = proc.memory_info().rss
                    key = (proc.pid, proc.create_time())
                    zombie = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue
            # A zombie's CPU times are final: keep them, but it is no longer a worker process.
            self._cpu[key] = times.user + times.system
            if zombie:
                continue
            processes += 1
            rss += mem
        sample = Sample(time.time(), processes, sum(self._cpu.values()), rss)
        with self._lock:
            if len(self.samples) < self.max_samples:
                self.samples.append(sample)
        return sample

    def _run(self) -> None:
        for _ in range(self.max_samples):
            self.sample_now()
            if self._stop.wait(self.interval):
                break

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            return list(self.samples)


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy since boot (all CPUs, steal excluded)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def process_cpu_seconds(pid: int) -> float:
    """user+system of one process (all its threads); 0 if it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)
