"""Operating-system measurements: per-child CPU and memory, the host, the broker's backlog.

Runs on the metrics sampler thread, never on the event loop. It knows children only by pid,
so it needs no lock on the supervisor. A value psutil cannot give on this platform (or for a
process that just vanished) is ``None``, which the published snapshot leaves out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import psutil

from celery_adaptive.metrics.snapshot import HostReading, ProcessReading
from celery_adaptive.metrics.store import make_client

logger = logging.getLogger("celery_adaptive.metrics")

#: kombu's Redis transport keeps each priority level of a queue in its own list.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


class ProcessSampler:
    """CPU percent (since the previous sample) and RSS of each child."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pids: Iterable[int]) -> dict[int, ProcessReading]:
        out: dict[int, ProcessReading] = {}
        wanted = set(pids)
        for pid in wanted:
            proc = self._procs.get(pid)
            first = proc is None
            try:
                if proc is None or not proc.is_running():  # is_running also catches pid reuse
                    proc = psutil.Process(pid)
                    first = True
                    self._procs[pid] = proc
                with proc.oneshot():
                    cpu = proc.cpu_percent(None)
                    rss = int(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
                out[pid] = ProcessReading()
                continue
            # psutil's first cpu_percent call has nothing to compare with and returns 0.0:
            # that is not a measurement, so it is left out.
            out[pid] = ProcessReading(cpu_percent=None if first else float(cpu), rss_bytes=rss)
        for gone in set(self._procs) - wanted:
            del self._procs[gone]
        return out


class HostSampler:
    """CPU percent of the whole host since the previous sample, load average, memory."""

    def __init__(self) -> None:
        psutil.cpu_percent(None)  # the baseline for the first real sample

    def sample(self) -> HostReading:
        cpu: float | None
        try:
            cpu = float(psutil.cpu_percent(None))
        except Exception:
            cpu = None
        load: tuple[float, float, float] | None = None
        if hasattr(os, "getloadavg"):
            try:
                one, five, fifteen = os.getloadavg()
                load = (one, five, fifteen)
            except OSError:
                load = None
        memory_percent: float | None = None
        memory_used: int | None = None
        try:
            memory = psutil.virtual_memory()
            memory_percent, memory_used = float(memory.percent), int(memory.used)
        except Exception:
            pass
        return HostReading(cpu, load, memory_percent, memory_used)


def kombu_redis_lists(queue: str) -> list[str]:
    """The Redis lists kombu uses for one queue: the queue itself and its priority levels."""
    return [queue, *(f"{queue}{_KOMBU_PRIORITY_SEP}{step}" for step in _KOMBU_PRIORITY_STEPS)]


class BrokerBacklog:
    """Messages waiting in the worker's queues, when the broker is Redis (LLEN of kombu's lists).

    Counts what sits in the broker, not what this worker already prefetched. Any error makes the
    value unknown for that sample (``None``); the broker's health is Celery's business.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None

    def sample(self, queues: Sequence[str]) -> int | None:
        if not queues:
            return None
        import redis

        try:
            if self._client is None:
                self._client = make_client(self.url, timeout=0.5)
            pipe = self._client.pipeline(transaction=False)
            for queue in queues:
                for name in kombu_redis_lists(queue):
                    pipe.llen(name)
            return int(sum(pipe.execute()))
        except (redis.RedisError, OSError):
            return None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

