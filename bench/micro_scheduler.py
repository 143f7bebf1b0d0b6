"""Micro-benchmark of the work-stealing scheduler alone: the cost per task as the backlog grows.

``python -m bench.micro_scheduler [--sizes 1000,10000,100000] [--repeat 5] [--tasks 2000]``

No processes, no Redis, no clock inside the scheduler: a loop drives ``Scheduler`` the way the
supervisor does in steady state, with ``held`` tasks waiting in its queues. Each step is one
task through its whole life::

    finished(oldest in flight) -> submit(a new task) -> dispatch(now) -> accepted(each handed over)

so the backlog stays at ``held`` queued tasks plus one per child in flight. The figure is the
CPU time of ``--tasks`` steps divided by ``--tasks``, in microseconds, the median of
``--repeat`` repetitions (gc collected before each; the sizes take turns). Filling the backlog
is not timed (before the scheduler was indexed, filling 100,000 took about 10 CPU minutes). CPU
time (``time.process_time``), not wall time: on a shared machine the time other processes
take the CPU away would otherwise land on whichever cell was running.

Variants (every one with ``--children`` children, an in-flight window of 1, the pool's options
where they matter):

- ``basic``: unkeyed tasks, placed on the child predicted free soonest, taken locally.
- ``steal``: every task keyed to a key owned by child 0 and no steal delay, so the other
  children steal from child 0's queue: 7 of every 8 hand-overs are steals (with 8 children).
- ``keyed``: keys from 1,000 tenants, balanced key ownership and the keyed steal delay, as
  the pool configures the scheduler.
- ``mixed``: short and long task names (one in five long) with a short-task reserve of one
  child, so long tasks are held back and short ones are picked from behind them.

The goal is a cost at 100k held within 2x of the cost at 1k: the last column.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any

from celery_adaptive.scheduler import Scheduler, ServiceTimes

SHORT_RUNTIME = 0.005
LONG_RUNTIME = 0.5
#: Simulated seconds between two tasks (10,000 tasks per second).
STEP = 0.0001


def _trained() -> ServiceTimes:
    times = ServiceTimes()
    times.observe("short", SHORT_RUNTIME)
    times.observe("long", LONG_RUNTIME)
    return times


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[], Any]  # a Scheduler (Any: the benchmark also runs against older versions)
    #: (scheduler, rng, how many) -> the (task name, key) of that many tasks, in order.
    tasks: Callable[[Any, Random, int], list[tuple[str, str | None]]]


def _basic() -> Any:
    return Scheduler(
        window=1, short_task_reserve=0, learn_from_running=True, vnodes=160, balanced_keys=True,
        service_times=_trained(),
    )


def _basic_tasks(s: Any, rng: Random, n: int) -> list[tuple[str, str | None]]:
    return [("short", None)] * n


def _steal() -> Any:
    return Scheduler(window=1, short_task_reserve=0, vnodes=160, service_times=_trained())


def _steal_tasks(s: Any, rng: Random, n: int) -> list[tuple[str, str | None]]:
    owned = [k for k in (f"hot-{i}" for i in range(5000)) if s.owner_of(k) == 0][:16]
    if not owned:
        raise RuntimeError("no key hashes to child 0")
    return [("short", rng.choice(owned)) for _ in range(n)]


def _keyed() -> Any:
    return Scheduler(
        window=1, short_task_reserve=0, keyed_steal_factor=3.0, keyed_steal_floor=0.005,
        learn_from_running=True, vnodes=160, balanced_keys=True, service_times=_trained(),
    )


def _keyed_tasks(s: Any, rng: Random, n: int) -> list[tuple[str, str | None]]:
    return [("short", f"tenant-{rng.randrange(1000)}") for _ in range(n)]


def _mixed() -> Any:
    return Scheduler(
        window=1, short_task_reserve=1, learn_from_running=True, vnodes=160, balanced_keys=True,
        service_times=_trained(),
    )


def _mixed_tasks(s: Any, rng: Random, n: int) -> list[tuple[str, str | None]]:
    return [("long" if rng.random() < 0.2 else "short", None) for _ in range(n)]


VARIANTS = {
    v.name: v
    for v in (
        Variant("basic", _basic, _basic_tasks),
        Variant("steal", _steal, _steal_tasks),
        Variant("keyed", _keyed, _keyed_tasks),
        Variant("mixed", _mixed, _mixed_tasks),
    )
}


class Driver:
    """One scheduler with a backlog, stepped the way the supervisor steps it."""

    def __init__(self, variant: Variant, children: int, held: int, seed: int) -> None:
        self.s = variant.make()
        for child in range(children):
            self.s.add_child(child)
        self.rng = Random(seed)
        self.now = 0.0
        self.next_id = 0
        self.in_flight: deque[int] = deque()
        self.runtime: dict[int, float] = {}  # of every task not finished yet
        self._step(variant.tasks(self.s, self.rng, held + children), finish=False)

    def _step(self, tasks: Sequence[tuple[str, str | None]], finish: bool = True) -> None:
        s, in_flight, runtime = self.s, self.in_flight, self.runtime
        now, next_id = self.now, self.next_id
        for name, key in tasks:
            if finish:
                if not in_flight:
                    raise RuntimeError("nothing in flight: the backlog ran dry")
                job_id = in_flight.popleft()
                s.finished(job_id, now, runtime.pop(job_id))
            runtime[next_id] = LONG_RUNTIME if name == "long" else SHORT_RUNTIME
            s.submit(next_id, name, key, now)
            next_id += 1
            if finish:
                for d in s.dispatch(now):
                    s.accepted(d.job_id, now)
                    in_flight.append(d.job_id)
                now += STEP
        if not finish:  # filling: hand the children their first tasks
            for d in s.dispatch(now):
                s.accepted(d.job_id, now)
                in_flight.append(d.job_id)
        self.now, self.next_id = now, next_id

    def run(self, tasks: Sequence[tuple[str, str | None]]) -> float:
        """Step through ``tasks``; return the CPU time it took."""
        start = time.process_time()
        self._step(tasks)
        return time.process_time() - start


def measure(
    variant: Variant, sizes: Sequence[int], children: int, tasks: int, repeat: int, seed: int
) -> list[float]:
    """Median microseconds per task at each size, over ``repeat`` repetitions of ``tasks``
    steps. The repetitions of the sizes take turns, so a slow moment of a shared machine
    does not land on one size alone."""
    drivers = []
    for held in sizes:
        started = time.monotonic()
        driver = Driver(variant, children, held, seed)
        driver.run(variant.tasks(driver.s, driver.rng, min(tasks, 500)))  # warm up
        drivers.append(driver)
        print(f"  ({variant.name} {held:,}: filled in {time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
    figures: list[list[float]] = [[] for _ in sizes]
    for _ in range(repeat):
        for driver, row in zip(drivers, figures, strict=True):
            batch = variant.tasks(driver.s, driver.rng, tasks)
            gc.collect()
            row.append(driver.run(batch) / tasks * 1e6)
    return [statistics.median(row) for row in figures]


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_scheduler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_sizes, default=[1000, 10000, 100000],
                        help="tasks held (queued), comma-separated (default 1000,10000,100000)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (the median is shown)")
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.children < 2 or args.tasks < 1 or args.repeat < 1 or not args.sizes:
        parser.error("need --children >= 2, --tasks >= 1, --repeat >= 1 and some --sizes")

    print(f"# scheduler micro-benchmark: {args.children} children, window 1, {args.tasks} tasks "
          f"per repetition, median of {args.repeat}; Python {platform.python_version()}")
    print("# us per task (finished + submit + dispatch + accepted) with N tasks held")
    header = ["variant", *(f"{n:,}" for n in args.sizes)]
    if len(args.sizes) > 1:
        header.append(f"{args.sizes[-1]:,}/{args.sizes[0]:,}")
    print(" | ".join(f"{h:>10}" for h in header), flush=True)
    for name in names:
        row = measure(VARIANTS[name], args.sizes, args.children, args.tasks, args.repeat, args.seed)
        cells = [name, *(f"{v:.1f}" for v in row)]
        if len(row) > 1:
            cells.append(f"x{row[-1] / row[0]:.2f}")
        print(" | ".join(f"{c:>10}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
