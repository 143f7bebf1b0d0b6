"""Starting a child process: its pipes, the process, and what the child must close.

The real launcher uses billiard (Celery's multiprocessing fork) so the child is what a prefork
child is; tests pass their own launcher to drive the supervisor with fake children.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from celery_adaptive.child import ChildSpec
from celery_adaptive.supervisor.channel import ChildChannel


@dataclass
class Launched:
    pid: int
    process: Any  # .exitcode (a non-blocking poll), .sentinel, .join(timeout)
    channel: Any  # parent side: read_frames(), send(), flush(), fds(), close()
    sentinel: int | None  # readable when the process has exited (None: no fd to watch)


class Launcher(Protocol):
    def launch(self, spec: ChildSpec, close_in_child: Iterable[int]) -> Launched: ...


#: What a child process runs: (reader of RunJob/StopChild, writer of replies, spec, fds to close).
ChildTarget = Callable[[Any, Any, ChildSpec, tuple[int, ...]], None]


class ProcessLauncher:
    """Forks (or spawns) real children with billiard, each with two one-way pipes."""

    def __init__(self, context: Any, target: ChildTarget, max_frame: int,
                 process_cls: Any = None) -> None:
        self._ctx = context
        self._target = target
        self._max_frame = max_frame
        # The Process class to start (the context's own unless given: see child.ForkedChildProcess).
        self._process_cls = process_cls or context.Process

    def launch(self, spec: ChildSpec, close_in_child: Iterable[int]) -> Launched:
        to_child_r, to_child_w = self._ctx.Pipe(duplex=False)
        from_child_r, from_child_w = self._ctx.Pipe(duplex=False)
        # The child closes the parent's ends of every other child's pipes (and of its own),
        # so a sibling's death is seen as EOF and no child can write into another's pipe.
        # Under spawn nothing is inherited, and those numbers mean nothing in the new process.
        inherited: tuple[int, ...] = ()
        if self._ctx.get_start_method() == "fork":
            inherited = (*close_in_child, to_child_w.fileno(), from_child_r.fileno())
        process = self._process_cls(
            target=self._target, args=(to_child_r, from_child_w, spec, inherited), daemon=True
        )
        try:
            process.start()
        except BaseException:
            to_child_w.close()
            from_child_r.close()
            raise
        finally:
            to_child_r.close()
            from_child_w.close()
        channel = ChildChannel(from_child_r, to_child_w, self._max_frame)
        return Launched(process.pid, process, channel, process.sentinel)
