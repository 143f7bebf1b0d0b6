"""Deadlines shared by the event-loop thread (which sets them) and the I/O thread (which waits
for them). Callbacks never run here: the I/O thread only reports that something is due, and
the event-loop thread runs it, so every timer action happens where Celery's state lives."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class Deadline:
    due: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    label: str = field(compare=False, default="")
    cancelled: bool = field(compare=False, default=False)

    def cancel(self) -> None:
        self.cancelled = True


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def add(self, due: float, callback: Callable[[], None], label: str = "") -> tuple[Deadline, bool]:
        """Add a deadline; the flag says it is now the earliest (the waiter should re-arm)."""
        entry = Deadline(due, next(self._seq), callback, label)
        with self._lock:
            earliest = not self._heap or due < self._heap[0].due
            heapq.heappush(self._heap, entry)
        return entry, earliest

    def next_due(self) -> float | None:
        with self._lock:
            while self._heap and self._heap[0].cancelled:
                heapq.heappop(self._heap)
            return self._heap[0].due if self._heap else None

    def pop_due(self, now: float) -> list[Deadline]:
        due: list[Deadline] = []
        with self._lock:
            while self._heap and self._heap[0].due <= now:
                entry = heapq.heappop(self._heap)
                if not entry.cancelled:
                    due.append(entry)
        return due

    def clear(self) -> None:
        with self._lock:
            self._heap.clear()
