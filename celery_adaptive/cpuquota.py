"""The container's CPU budget: the cgroup CFS quota and how many CPUs it is worth.

Data flow::

    /proc/self/cgroup ──> own_cgroups() ──┐
    <root>/<path>/cpu.max (v2)        ────┼─> read_cpu_quota(root) -> 1.5 CPUs (or None)
    <root>/<mount>/<path>/cpu.cfs_* (v1) ─┘            │
                                      cpu_budget(available, quota) -> min(available, ceil(quota))

The same rule as Celery 5.7's ``worker_concurrency = 'auto'`` for prefork
(``celery.utils.sysinfo.cpu_budget``): walk from the process's own cgroup up to the root, take
the smallest quota found (v2 first, then v1), and round it up (a fractional quota is used in
full). Written here, not imported, because Celery before 5.7 has no such function and because
the reader must take a root path, so tests can lay out a fake ``/sys/fs/cgroup``.

Parsing is pure; only `read_cpu_quota` and `available_cpus` touch the system, and they never
raise for a missing or unreadable file: no quota found means no cap.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "PROC_SELF_CGROUP",
    "CpuBudget",
    "OwnCgroups",
    "available_cpus",
    "cpu_budget",
    "own_cgroups",
    "parse_cfs_quota",
    "parse_cpu_max",
    "quota_cpus",
    "read_cpu_quota",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class OwnCgroups:
    """Where this process sits: its v2 path, its v1 ``cpu`` path and that hierarchy's mount."""

    v2: str | None
    v1: str | None
    v1_mount: str = "cpu"


@dataclass(frozen=True)
class CpuBudget:
    count: int  # CPUs the pool should size for
    available: int  # CPUs this process may run on (its affinity mask)
    quota: float | None  # the CFS quota in CPUs, None when there is none


# --- pure ----------------------------------------------------------------------------------------


def _quota(quota_us: str, period_us: str) -> float | None:
    try:
        quota, period = int(quota_us), int(period_us)
    except ValueError:
        return None  # "max" (v2) or garbage: no quota
    if quota <= 0 or period <= 0:
        return None  # -1 is v1's "no quota"
    return quota / period


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max``: ``"150000 100000"`` -> 1.5 CPUs; ``"max 100000"`` -> None."""
    parts = text.split()
    return _quota(parts[0], parts[1]) if len(parts) == 2 else None


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: ``-1`` means no quota."""
    return _quota(quota_text.strip(), period_text.strip())


def own_cgroups(text: str) -> OwnCgroups:
    """Parse ``/proc/self/cgroup`` (lines ``hierarchy:controllers:path``)."""
    v2 = v1 = None
    mount = "cpu"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1, mount = path, controllers
    return OwnCgroups(v2, v1, mount)


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``['/a/b', '/a', '/']`` (a namespaced ``/../x`` path is normalised first)."""
    norm = posixpath.normpath("/" + path.lstrip("/"))
    out = [norm]
    while norm != "/":
        norm = posixpath.dirname(norm)
        out.append(norm)
    return out


def quota_cpus(quota: float | None) -> int | None:
    """Whole CPUs a quota is worth, rounded up (1.5 -> 2); None without a quota."""
    return None if quota is None else max(1, math.ceil(quota))


def cpu_budget(available: int, quota: float | None) -> CpuBudget:
    """How many children ``worker_concurrency = 'auto'`` gives: the allowed CPUs, capped by
    the quota rounded up, never below one."""
    cap = quota_cpus(quota)
    count = max(1, available if cap is None else min(available, cap))
    return CpuBudget(count, available, quota)


# --- I/O -----------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _smallest(base: Path, own_path: str, read_one: str) -> float | None:
    quotas = []
    for rel in _ancestors(own_path):
        directory = base / rel.lstrip("/")
        if read_one == "v2":
            text = _read(directory / "cpu.max")
            quota = parse_cpu_max(text) if text is not None else None
        else:
            quota_text = _read(directory / "cpu.cfs_quota_us")
            period_text = _read(directory / "cpu.cfs_period_us")
            quota = (
                parse_cfs_quota(quota_text, period_text)
                if quota_text is not None and period_text is not None else None
            )
        if quota is not None:
            quotas.append(quota)
    return min(quotas) if quotas else None


def read_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CFS quota (in CPUs) that applies to this process, or None.

    ``root`` is where the cgroup file system is mounted and ``proc_cgroup`` the file that says
    where this process sits in it (when unreadable, the root itself is read).
    """
    text = _read(proc_cgroup)
    own = own_cgroups(text) if text is not None else OwnCgroups(None, None)
    if own.v2 is None and own.v1 is None:
        own = OwnCgroups("/", "/")
    if own.v2 is not None:
        quota = _smallest(root, own.v2, "v2")
        if quota is not None:
            return quota
    if own.v1 is not None:
        # The mount named after the hierarchy ("cpu,cpuacct") first, then the usual "cpu"
        # link, which some hosts do not create.
        for mount in dict.fromkeys((own.v1_mount, "cpu")):
            quota = _smallest(root / mount, own.v1, "v1")
            if quota is not None:
                return quota
    return None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cpusets), as Celery counts."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+
    count = counter() if counter is not None else None
    if count is None and hasattr(os, "sched_getaffinity"):
        try:
            count = len(os.sched_getaffinity(0))
        except OSError:
            count = None
    return count or os.cpu_count() or 2
