"""CPU placement: which logical CPU each child process is pinned to.

Data flow::

    read_topology() ──┐
    allowed_cpus() ───┼─> plan_order(policy, topology, allowed, max_cpus) -> [cpu, cpu, ...]
    parse_policy(conf)┘        plan_cpu(..., slot) = order[slot % len(order)]
                                                │
                         child start:  pin_current_process(cpu)

The planning half is pure (values in, values out) so every policy is tested on synthetic
topologies; the I/O half only reads sysfs and calls ``sched_{get,set}affinity`` and never
raises for a platform that lacks them, because a pool that cannot pin still works.

A child's *slot* is a small integer the pool reuses when a child is replaced, so a replacement
lands on the CPU its predecessor had and children never pile up on one core after churn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from celery_adaptive.errors import SettingsError

__all__ = [
    "SETTING",
    "LogicalCpu",
    "PlacementError",
    "PlacementPolicy",
    "PolicyKind",
    "allowed_cpus",
    "format_cpu_list",
    "parse_policy",
    "pin_current_process",
    "plan_cpu",
    "plan_order",
    "read_topology",
]

logger = logging.getLogger(__name__)

SETTING = "adaptive_cpu_placement"
SYSFS_CPU_ROOT = Path("/sys/devices/system/cpu")

PolicyKind = Literal["spread", "compact", "none", "explicit"]
_NAMED_KINDS: tuple[PolicyKind, ...] = ("spread", "compact", "none")
_EXPECTED = "expected spread, compact, none or a CPU list such as '0,2-3'"


class PlacementError(SettingsError):
    """The placement setting cannot be honoured; the message names ``adaptive_cpu_placement``.

    A `SettingsError`, hence a `ValueError`, so settings validation treats it like any bad value.
    """

    def __init__(self, value: object, problem: str) -> None:
        super().__init__(SETTING, value, problem)


@dataclass(frozen=True, slots=True)
class LogicalCpu:
    """One logical CPU. ``core`` is only unique within its ``package``, as Linux reports it."""

    cpu: int
    core: int
    package: int


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    kind: PolicyKind = "spread"
    cpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (*_NAMED_KINDS, "explicit"):
            raise PlacementError(self.kind, f"unknown policy kind; {_EXPECTED}")
        if self.kind == "explicit":
            if not self.cpus:
                raise PlacementError(self.cpus, "an explicit CPU list must not be empty")
            bad = [c for c in self.cpus if isinstance(c, bool) or not isinstance(c, int) or c < 0]
            if bad:
                raise PlacementError(self.cpus, f"CPU numbers must be integers >= 0, got {bad!r}")
        elif self.cpus:
            raise PlacementError(self.cpus, f"policy {self.kind!r} takes no CPU list")

    def describe(self) -> str:
        """The setting's value in the form ``parse_policy`` accepts, e.g. ``spread`` or ``0,2-3``."""
        return format_cpu_list(self.cpus) if self.kind == "explicit" else self.kind


# --- pure planning -------------------------------------------------------------------------------


def parse_policy(value: str | Sequence[int] | PlacementPolicy | None) -> PlacementPolicy:
    """Turn the setting's value into a policy; None means the default, ``spread``.

    Whether explicit CPUs exist in the worker's allowed set is checked later, by `plan_order`,
    because parsing happens before the topology is known.
    """
    if value is None:
        return PlacementPolicy("spread")
    if isinstance(value, PlacementPolicy):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        for kind in _NAMED_KINDS:
            if text == kind:
                return PlacementPolicy(kind)
        if not text or not (text[0].isdigit()):
            raise PlacementError(value, f"unknown policy; {_EXPECTED}")
        return PlacementPolicy("explicit", _parse_cpu_list(value))
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = tuple(c for c in value if isinstance(c, int) and not isinstance(c, bool))
        if len(items) != len(value):
            raise PlacementError(value, "a CPU list must hold integers only")
        return PlacementPolicy("explicit", items)
    raise PlacementError(value, _EXPECTED)


def _parse_cpu_list(text: str) -> tuple[int, ...]:
    # The kernel's cpulist format ("0,2-3", as in /sys/.../cpuset.cpus), minus stride syntax.
    cpus: list[int] = []
    for token in text.split(","):
        token = token.strip()
        lo_text, dash, hi_text = token.partition("-")
        lo_text, hi_text = lo_text.strip(), hi_text.strip()
        if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
            raise PlacementError(text, f"bad CPU list item {token!r}; {_EXPECTED}")
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
        if hi < lo:
            raise PlacementError(text, f"descending CPU range {token!r}")
        cpus.extend(range(lo, hi + 1))
    return tuple(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Cpulist notation, keeping the given order: ``[0, 2, 3, 1]`` -> ``"0,2-3,1"``."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def plan_order(
    policy: PlacementPolicy,
    topology: Sequence[LogicalCpu],
    allowed: Iterable[int],
    max_cpus: int | None = None,
) -> list[int]:
    """The CPUs that slots 0, 1, 2, ... map to (slot ``i`` gets ``order[i % len(order)]``).

    Empty for ``none`` or an empty allowed set. Only CPUs in ``allowed`` ever appear; an allowed
    CPU the topology does not list is treated as a core of its own (as if sysfs were missing).
    ``max_cpus`` (a CPU quota rounded up) keeps ``spread`` and ``compact`` to that many CPUs,
    the first of their order: a quota of 1.5 CPUs is spent on two CPUs, not spread thin over
    every CPU of the host. An explicit list is the user's choice and is kept whole.
    Raises `PlacementError` if an explicit CPU is outside ``allowed``.
    """
    if max_cpus is not None and max_cpus < 1:
        raise ValueError(f"max_cpus must be >= 1, got {max_cpus}")
    order = _plan_order(policy, topology, allowed)
    if max_cpus is not None and policy.kind in ("spread", "compact"):
        return order[:max_cpus]
    return order


def _plan_order(
    policy: PlacementPolicy, topology: Sequence[LogicalCpu], allowed: Iterable[int]
) -> list[int]:
    allowed_set = frozenset(allowed)
    if policy.kind == "none":
        return []
    if policy.kind == "explicit":
        bad = sorted(set(policy.cpus) - allowed_set)
        if bad:
            raise PlacementError(
                policy.describe(),
                f"CPUs {format_cpu_list(bad)} are not in the worker's allowed CPU set "
                f"{format_cpu_list(sorted(allowed_set)) or '(empty)'} (os.sched_getaffinity)",
            )
        return list(policy.cpus)

    cores = _cores_by_package(topology, allowed_set)
    if policy.kind == "compact":
        return [cpu for package in cores for core in package for cpu in core]

    # spread: take cores round-robin across packages, so the first children land on different
    # packages (separate caches and memory controllers), then repeat the walk for each rank of
    # hyperthread sibling, so a core gets its second child only after every core has one.
    core_walk: list[list[int]] = []
    for rank in range(max((len(p) for p in cores), default=0)):
        core_walk.extend(package[rank] for package in cores if rank < len(package))
    order: list[int] = []
    for sibling in range(max((len(c) for c in core_walk), default=0)):
        order.extend(core[sibling] for core in core_walk if sibling < len(core))
    return order


def _cores_by_package(
    topology: Sequence[LogicalCpu], allowed: frozenset[int]
) -> list[list[list[int]]]:
    """Allowed CPUs as packages -> cores -> cpus, each level sorted by its id."""
    known = {lc.cpu: lc for lc in topology}
    # Unlisted CPUs get a package of their own (after every real one), one core each.
    spare_package = max((lc.package for lc in topology), default=-1) + 1
    tree: dict[int, dict[int, list[int]]] = {}
    for cpu in sorted(allowed):
        lc = known.get(cpu)
        package, core = (lc.package, lc.core) if lc is not None else (spare_package, cpu)
        tree.setdefault(package, {}).setdefault(core, []).append(cpu)
    return [[tree[p][c] for c in sorted(tree[p])] for p in sorted(tree)]


def plan_cpu(
    policy: PlacementPolicy,
    topology: Sequence[LogicalCpu],
    allowed: Iterable[int],
    slot: int,
    max_cpus: int | None = None,
) -> int | None:
    """The CPU for the child in ``slot``, or None when it should not be pinned."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, got {slot}")
    order = plan_order(policy, topology, allowed, max_cpus)
    return order[slot % len(order)] if order else None


# --- I/O -----------------------------------------------------------------------------------------


def read_topology(root: Path = SYSFS_CPU_ROOT) -> list[LogicalCpu]:
    """Logical CPUs from sysfs; without sysfs, every CPU is its own core in package 0.

    CPUs whose topology files are unreadable (offline ones, on some kernels) are left out;
    `plan_order` still places them, as cores of their own, if they are allowed.
    """
    cpus: list[LogicalCpu] = []
    try:
        entries = list(root.glob("cpu[0-9]*"))
    except OSError:
        entries = []
    for entry in entries:
        suffix = entry.name[3:]
        if not suffix.isdigit():
            continue
        try:
            core = int((entry / "topology" / "core_id").read_text().strip())
            package = int((entry / "topology" / "physical_package_id").read_text().strip())
        except (OSError, ValueError):
            continue
        cpus.append(LogicalCpu(cpu=int(suffix), core=core, package=package))
    if not cpus:
        cpus = [LogicalCpu(cpu=c, core=c, package=0) for c in range(os.cpu_count() or 1)]
    return sorted(cpus, key=lambda lc: lc.cpu)


def allowed_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its cpuset/affinity mask, not the machine's CPUs)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return frozenset(getaffinity(0))
        except OSError as exc:
            logger.warning("sched_getaffinity failed (%s); assuming every CPU is allowed", exc)
    return frozenset(range(os.cpu_count() or 1))


def pin_current_process(cpu: int | None) -> int | None:
    """Pin the calling process to ``cpu``; return the CPU pinned to, or None if not pinned.

    Failure is logged, not raised: an unpinned child is slower at worst, while a child that dies
    at start over affinity would be replaced, fail again, and never serve a task.
    """
    if cpu is None:
        return None
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:
        return None
    try:
        setaffinity(0, {cpu})
    except (OSError, ValueError, OverflowError) as exc:
        logger.warning("could not pin process %d to CPU %d: %s", os.getpid(), cpu, exc)
        return None
    return cpu
