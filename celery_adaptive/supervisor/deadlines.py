"""Deadlines of the supervisor (time limits, start timeouts, drains, the autoscaler's ticks).

Owned by the thread that runs the supervisor (no lock): another thread that wants a timer
posts the request to that thread (`Reactor.post`). Times are on the supervisor's injected
clock, so a fake clock drives them in tests.
"""

from __future__ import annotations

import heapq
import itertools
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
        """Safe from any thread: a flag the owner checks before running it."""
        self.cancelled = True


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._seq = itertools.count()

    def make(self, due: float, callback: Callable[[], None], label: str = "") -> Deadline:
        """A deadline not yet in the heap (see `push`): lets another thread hold a handle."""
        return Deadline(due, next(self._seq), callback, label)

    def push(self, entry: Deadline) -> bool:
        """Add ``entry``; True when it is now the earliest (the waiter should re-arm)."""
        earliest = not self._heap or entry.due < self._heap[0].due
        heapq.heappush(self._heap, entry)
        return earliest

    def add(self, due: float, callback: Callable[[], None], label: str = "") -> tuple[Deadline, bool]:
        entry = self.make(due, callback, label)
        return entry, self.push(entry)

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
        return heap[0].due if heap else None

    def pop_due(self, now: float) -> list[Deadline]:
        due: list[Deadline] = []
        heap = self._heap
        while heap and heap[0].due <= now:
            entry = heapq.heappop(heap)
            if not entry.cancelled:
                due.append(entry)
        return due

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)
