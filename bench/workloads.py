"""Named workloads as seeded, open-loop arrival schedules.

A workload is pure data: a tuple of ``Arrival`` (offset from the start, task, arguments, class)
built from the workload's parameters, the CPU count and a seed. The same schedule is replayed
against every pool in a run, and the sender keeps to it whatever the worker does (open loop).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import tasks


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the load starts
    task: str
    args: tuple[Any, ...]
    cls: str  # task class for per-class latency (short, long, io, ...)
    service_s: float  # CPU or sleep time the task needs; only used to bound the drain wait
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    params: dict[str, Any]
    arrivals: tuple[Arrival, ...]
    duration_s: float  # the schedule's length; the measured window lasts at least this long
    time_varying: bool  # plot processes and arrival rate over time
    seed: int

    @property
    def total_service_s(self) -> float:
        return sum(a.service_s for a in self.arrivals)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params,
            "seed": self.seed,
            "tasks": len(self.arrivals),
            "duration_s": self.duration_s,
            "total_service_s": round(self.total_service_s, 3),
        }


@dataclass(frozen=True)
class Sizing:
    """What a workload builder may depend on: never the pool, so every pool gets one schedule."""

    cpus: int
    quick: bool
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)


def machine_cpus() -> int:
    """CPUs this process may run on, which is what the workers get too."""
    return len(os.sched_getaffinity(0))


def poisson_times(rng: random.Random, rate: Callable[[float], float], peak: float,
                  duration: float) -> list[float]:
    """Arrival times of a (non-homogeneous) Poisson process on [0, duration), by thinning."""
    times: list[float] = []
    t = 0.0
    # Bounded: the expected number of candidates is peak * duration; allow a generous multiple.
    for _ in range(int(peak * duration * 4) + 100):
        t += rng.expovariate(peak)
        if t >= duration:
            break
        if rng.random() * peak <= rate(t):
            times.append(t)
    return times


def _pick(sizing: Sizing, full: Any, quick: Any, key: str) -> Any:
    if key in sizing.overrides:
        return sizing.overrides[key]
    return quick if sizing.quick else full


def _spin(at: float, ms: float, cls: str, task: str = "bench.spin") -> Arrival:
    return Arrival(at, task, (ms,), cls, ms / 1000.0)


def tiny(s: Sizing) -> Workload:
    n = int(_pick(s, 5000, 200, "tasks"))
    arrivals = tuple(Arrival(0.0, "bench.noop", (), "noop", 0.0) for _ in range(n))
    return Workload("tiny", "burst of no-op tasks: overhead and throughput ceiling",
                    {"tasks": n}, arrivals, 0.0, False, s.seed)


def mixed(s: Sizing) -> Workload:
    duration = float(_pick(s, 60.0, 3.0, "duration_s"))
    short_ms, long_ms, long_share, load = 5.0, 300.0, 0.05, 0.6
    mean_s = ((1 - long_share) * short_ms + long_share * long_ms) / 1000.0
    rate = load * s.cpus / mean_s
    rng = random.Random(s.seed)
    arrivals = []
    for t in poisson_times(rng, lambda _t: rate, rate, duration):
        is_long = rng.random() < long_share
        cls = "long" if is_long else "short"
        arrivals.append(_spin(t, long_ms if is_long else short_ms, cls, f"bench.spin_{cls}"))
    params = {"duration_s": duration, "short_ms": short_ms, "long_ms": long_ms,
              "long_share": long_share, "load": load, "rate_per_s": round(rate, 2)}
    return Workload("mixed", "CPU tasks of two types, 95% 5 ms + 5% 300 ms, Poisson at 60% of CPU"
                    " capacity: head-of-line blocking", params, tuple(arrivals), duration, False, s.seed)


def affinity(s: Sizing) -> Workload:
    # A burst, so throughput is what the pool can do, not the arrival rate. Each process keeps
    # tasks.TENANT_CACHE tenants warm: with 32 tenants and 2 processes, random placement misses
    # about half the time, while routing by tenant can keep every process's share warm.
    n = int(_pick(s, 1200, 150, "tasks"))
    tenants = int(_pick(s, 32, 32, "tenants"))
    rng = random.Random(s.seed)
    arrivals = []
    for _ in range(n):
        key = f"tenant-{rng.randrange(tenants)}"
        # The class is the tenant-task; hit or miss is only known from the result.
        arrivals.append(Arrival(0.0, "bench.tenant", (key,), "tenant", tasks.WARMUP_MS / 1000.0,
                                {"affinity": key}))
    params = {"tasks": n, "tenants": tenants, "cache_per_process": tasks.TENANT_CACHE,
              "warmup_ms": tasks.WARMUP_MS, "warm_ms": tasks.WARM_MS}
    return Workload("affinity", "a burst of tenant-keyed tasks: 50 ms warm-up per process and"
                    " tenant (16 kept warm per process), then 2 ms", params, tuple(arrivals), 0.0,
                    False, s.seed)


def io_spiky(s: Sizing) -> Workload:
    bursts = int(_pick(s, 5, 2, "bursts"))
    per_burst = int(_pick(s, 16 * s.cpus, 4 * s.cpus, "per_burst"))
    sleep_ms = float(_pick(s, 200.0, 100.0, "sleep_ms"))
    spread_s = float(_pick(s, 0.5, 0.2, "spread_s"))
    idle_s = float(_pick(s, 8.0, 1.0, "idle_s"))
    rng = random.Random(s.seed)
    arrivals = []
    for b in range(bursts):
        start = b * (spread_s + idle_s)
        for t in sorted(start + rng.uniform(0, spread_s) for _ in range(per_burst)):
            arrivals.append(Arrival(t, "bench.sleep", (sleep_ms,), "io", sleep_ms / 1000.0))
    duration = bursts * (spread_s + idle_s)
    params = {"bursts": bursts, "per_burst": per_burst, "sleep_ms": sleep_ms,
              "spread_s": spread_s, "idle_s": idle_s}
    return Workload("io_spiky", "bursts of sleeping (I/O-bound) tasks separated by idle time",
                    params, tuple(arrivals), duration, True, s.seed)


def ramp(s: Sizing) -> Workload:
    duration = float(_pick(s, 60.0, 4.0, "duration_s"))
    task_ms = 10.0
    # 0.8 of nominal capacity by default; a slower machine saturates earlier (the pool parent and
    # the load generator need CPU too), so it is a parameter: --param peak_load=0.5.
    peak_load = float(_pick(s, 0.8, 0.8, "peak_load"))
    peak = peak_load * s.cpus / (task_ms / 1000.0)

    def rate(t: float) -> float:  # triangle: 0 -> peak at the middle -> 0
        return peak * (1.0 - abs(2.0 * t / duration - 1.0))

    times = poisson_times(random.Random(s.seed), rate, peak, duration)
    params = {"duration_s": duration, "task_ms": task_ms, "peak_load": peak_load,
              "peak_rate_per_s": round(peak, 2)}
    return Workload("ramp", f"CPU tasks, arrival rate rising linearly to {peak_load:.0%} of capacity and back",
                    params, tuple(_spin(t, task_ms, "cpu") for t in times), duration, True, s.seed)


def steady(s: Sizing) -> Workload:
    duration = float(_pick(s, 60.0, 3.0, "duration_s"))
    task_ms, load = 10.0, 0.5
    rate = load * s.cpus / (task_ms / 1000.0)
    times = poisson_times(random.Random(s.seed), lambda _t: rate, rate, duration)
    params = {"duration_s": duration, "task_ms": task_ms, "load": load,
              "rate_per_s": round(rate, 2)}
    return Workload("steady", "CPU tasks at a constant Poisson rate (50% of capacity)",
                    params, tuple(_spin(t, task_ms, "cpu") for t in times), duration, True, s.seed)


def idle(s: Sizing) -> Workload:
    duration = float(_pick(s, 60.0, 3.0, "duration_s"))
    # One probe at each end: the second one shows the wake-up latency after the idle period.
    arrivals = (Arrival(0.0, "bench.noop", (), "probe", 0.0),
                Arrival(duration, "bench.noop", (), "probe", 0.0))
    return Workload("idle", "nothing arrives (one probe task at each end): the cost of being"
                    " ready", {"duration_s": duration}, arrivals, duration, True, s.seed)


def memory(s: Sizing) -> Workload:
    # Light CPU tasks with a few memory-heavy ones among them. The first heavy task arrives
    # alone (no pool knows a task's memory before it has run once); then pairs arrive 50 ms
    # apart, which a pool that starts whatever arrives runs side by side. Meant for a memory
    # budget (--memory-budget) that holds one heavy task at a time but not two.
    duration = float(_pick(s, 60.0, 4.0, "duration_s"))
    heavy_mb = float(_pick(s, 160.0, 20.0, "heavy_mb"))
    hold_ms = float(_pick(s, 1000.0, 200.0, "hold_ms"))
    pairs = int(_pick(s, 6, 1, "pairs"))
    light_ms, load = 5.0, float(_pick(s, 0.3, 0.3, "load"))
    rate = load * s.cpus / (light_ms / 1000.0)
    rng = random.Random(s.seed)
    arrivals = [_spin(t, light_ms, "light", "bench.spin_short")
                for t in poisson_times(rng, lambda _t: rate, rate, duration)]

    def heavy(at: float) -> Arrival:
        return Arrival(at, "bench.hold_memory", (heavy_mb, hold_ms), "heavy", hold_ms / 1000.0)

    arrivals.append(heavy(min(0.5, duration / 4)))
    for k in range(pairs):
        at = duration * (k + 1) / (pairs + 1)
        arrivals += [heavy(at), heavy(at + 0.05)]
    arrivals.sort(key=lambda a: a.at)
    params = {"duration_s": duration, "heavy_mb": heavy_mb, "hold_ms": hold_ms, "pairs": pairs,
              "light_ms": light_ms, "load": load, "rate_per_s": round(rate, 2)}
    return Workload("memory", f"5 ms CPU tasks at {load:.0%} of capacity, and {2 * pairs + 1} tasks"
                    f" holding {heavy_mb:.0f} MiB for {hold_ms:.0f} ms (one alone, then pairs 50 ms"
                    " apart)", params, tuple(arrivals), duration, True, s.seed)


BUILDERS: dict[str, Callable[[Sizing], Workload]] = {
    "tiny": tiny,
    "mixed": mixed,
    "affinity": affinity,
    "io_spiky": io_spiky,
    "ramp": ramp,
    "steady": steady,
    "idle": idle,
    "memory": memory,
}


def build(name: str, sizing: Sizing) -> Workload:
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(BUILDERS)}") from None
    return builder(sizing)


def fingerprint(workload: Workload) -> str:
    """Short hash of the schedule, stored with every run: equal across pools proves one schedule."""
    digest = hashlib.sha256(repr(workload.arrivals).encode()).hexdigest()
    return digest[:16]
