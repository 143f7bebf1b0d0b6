"""The container's memory: its cgroup limit and usage (v1 and v2), or the host's.

Data flow::

    /proc/self/cgroup ──> own memory cgroup paths ──┐
    <root>/<path>/memory.max, memory.current (v2)  ─┼─> find_memory_cgroup(root) -> Cgroup (the
    <root>/memory/<path>/memory.limit_in_bytes (v1) ┘      ancestor with the smallest limit)
                                                            │
    SystemMemorySource.read() ──> SystemMemory(used, limit) ┘ (or psutil's host figures)

The same walk as `celery_adaptive.cpuquota` (from the process's own cgroup up to the root; v2
first, then v1) and the same ``root`` parameter, so tests lay out a fake ``/sys/fs/cgroup``.
"Used" is what the kernel will not give back on its own: the cgroup's charge less its inactive
file cache (``memory.stat``), as Kubernetes' working set; on the host, total less available.

Parsing is pure; the reads never raise for a missing, unreadable or half-written file (a
reading is then None, and the caller keeps its last one).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from celery_adaptive.cpuquota import CGROUP_ROOT, PROC_SELF_CGROUP

__all__ = [
    "Cgroup",
    "SystemMemory",
    "SystemMemorySource",
    "cgroup_at",
    "find_memory_cgroup",
    "parse_limit",
    "parse_stat",
    "read_cgroup",
    "read_host",
]

#: cgroup v1 writes "no limit" as the largest page-aligned 63-bit number; anything this large
#: is no limit either (no machine has 4 EiB).
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Cgroup:
    """One cgroup directory and which version's files it has."""

    path: Path
    version: int  # 1 or 2

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    @property
    def usage_file(self) -> Path:
        return self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes")

    def describe(self) -> str:
        return f"cgroup v{self.version} {self.path}"


@dataclass(frozen=True)
class SystemMemory:
    """Memory in use and the most there is, for the host or the container's cgroup."""

    used: int
    limit: int
    source: str

    @property
    def share(self) -> float:
        return self.used / self.limit if self.limit > 0 else 0.0


# --- pure ----------------------------------------------------------------------------------------


def parse_limit(text: str) -> int | None:
    """``memory.max`` (``"max"`` is none) or ``memory.limit_in_bytes`` (a huge value is none)."""
    value = text.strip()
    if not value.isdigit():
        return None
    number = int(value)
    if number <= 0 or number >= _V1_UNLIMITED:
        return None
    return number


def parse_usage(text: str) -> int | None:
    value = text.strip()
    return int(value) if value.isdigit() else None


def parse_stat(text: str) -> dict[str, int]:
    """``memory.stat``: ``key value`` lines; lines that are not are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def own_memory_paths(text: str) -> tuple[str | None, str | None, str]:
    """From ``/proc/self/cgroup``: (v2 path, v1 memory path, v1 mount name)."""
    v2 = v1 = None
    mount = "memory"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1, mount = path, controllers
    return v2, v1, mount


def _ancestors(path: str) -> list[str]:
    norm = posixpath.normpath("/" + path.lstrip("/"))
    out = [norm]
    while norm != "/":
        norm = posixpath.dirname(norm)
        out.append(norm)
    return out


# --- I/O -----------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_at(directory: Path) -> Cgroup | None:
    """The cgroup in ``directory`` (v2 if it has ``memory.current`` or ``memory.max``)."""
    if (directory / "memory.current").exists() or (directory / "memory.max").exists():
        return Cgroup(directory, 2)
    if (directory / "memory.usage_in_bytes").exists() or (directory / "memory.limit_in_bytes").exists():
        return Cgroup(directory, 1)
    return None


def _limit_of(cgroup: Cgroup) -> int | None:
    text = _read(cgroup.limit_file)
    return parse_limit(text) if text is not None else None


def _smallest(base: Path, own_path: str, version: int) -> tuple[int, Cgroup] | None:
    best: tuple[int, Cgroup] | None = None
    for rel in _ancestors(own_path):
        cgroup = Cgroup(base / rel.lstrip("/"), version)
        limit = _limit_of(cgroup)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, cgroup)
    return best


def find_memory_cgroup(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> Cgroup | None:
    """The cgroup whose memory limit binds this process (the smallest on the way to the root),
    or None when no cgroup has a limit."""
    text = _read(proc_cgroup)
    v2, v1, mount = own_memory_paths(text) if text is not None else (None, None, "memory")
    if v2 is None and v1 is None:
        v2 = v1 = "/"
    if v2 is not None:
        found = _smallest(root, v2, 2)
        if found is not None:
            return found[1]
    if v1 is not None:
        for name in dict.fromkeys((mount, "memory")):
            found = _smallest(root / name, v1, 1)
            if found is not None:
                return found[1]
    return None


def _no_limit() -> int | None:
    return None


def read_cgroup(cgroup: Cgroup, fallback_limit: Callable[[], int | None] = _no_limit) -> SystemMemory | None:
    """Usage (less inactive file cache) and limit of ``cgroup``; None when unreadable or when
    it has no limit and ``fallback_limit`` gives none."""
    usage_text = _read(cgroup.usage_file)
    usage = parse_usage(usage_text) if usage_text is not None else None
    if usage is None:
        return None
    limit = _limit_of(cgroup) or fallback_limit()
    if limit is None:
        return None
    stat_text = _read(cgroup.path / "memory.stat")
    if stat_text is not None:
        stat = parse_stat(stat_text)
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        usage = max(0, usage - inactive)
    return SystemMemory(usage, limit, cgroup.describe())


def read_host() -> SystemMemory | None:
    import psutil

    try:
        memory = psutil.virtual_memory()
    except Exception:
        return None
    return SystemMemory(int(memory.total - memory.available), int(memory.total), "host")


class SystemMemorySource:
    """What the memory watcher reads for admission: a cgroup, or the host.

    ``setting`` is ``adaptive_memory_cgroup``: None finds this process's own cgroup with a
    limit (else the host), ``"host"`` reads the host, a path reads the cgroup there (with the
    host's total as its limit when it has none).
    """

    def __init__(self, cgroup: Cgroup | None, explicit: bool = False) -> None:
        self.cgroup = cgroup
        self.explicit = explicit

    @classmethod
    def from_setting(cls, setting: str | None, root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = PROC_SELF_CGROUP) -> SystemMemorySource:
        if setting == "host":
            return cls(None)
        if setting:
            cgroup = cgroup_at(Path(setting))
            if cgroup is None:
                # Named but not (yet) there: read it as v2 (the files may appear later); a
                # reading is None until they do, and admission stays as it was.
                cgroup = Cgroup(Path(setting), 2)
            return cls(cgroup, explicit=True)
        return cls(find_memory_cgroup(root, proc_cgroup))

    def describe(self) -> str:
        return self.cgroup.describe() if self.cgroup is not None else "host"

    def total(self) -> int | None:
        """The limit shares resolve against: the cgroup's, else the host's memory."""
        if self.cgroup is not None:
            limit = _limit_of(self.cgroup)
            if limit is not None:
                return limit
        host = read_host()
        return host.limit if host is not None else None

    def read(self) -> SystemMemory | None:
        if self.cgroup is None:
            return read_host()
        if self.explicit:
            if self.cgroup.version == 2 and not self.cgroup.usage_file.exists():
                found = cgroup_at(self.cgroup.path)  # the files appeared since the start
                if found is not None:
                    self.cgroup = found
            return read_cgroup(self.cgroup, _host_total)
        return read_cgroup(self.cgroup) or read_host()


def _host_total() -> int | None:
    host = read_host()
    return host.limit if host is not None else None
