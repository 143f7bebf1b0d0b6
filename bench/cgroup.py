"""A memory budget for one worker: a cgroup this harness creates, fills and removes.

``--memory-budget SIZE`` runs every worker in a fresh memory cgroup with that limit, nested
under the harness's own cgroup (so nothing else on the machine can be charged or OOM-killed for
it), and records the cgroup's peak usage and its OOM kills with the run. cgroup v1 (the
``memory`` hierarchy) and v2 (the unified one, where the harness's cgroup delegates the memory
controller) are supported; creating one needs root, or a delegated cgroup.

The worker is moved in right after it is started, before it forks its pool (which takes the
worker a second or more of imports), so every pool process is inside.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from celery_adaptive.memory.cgroup import own_memory_paths

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Removing the cgroup waits this long for its processes to be reaped.
REMOVE_TIMEOUT_S = 10.0


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here (not root, no memory controller, ...)."""


@dataclass(frozen=True)
class BudgetFigures:
    limit_bytes: int
    peak_bytes: int | None
    oom_kills: int | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


class MemoryBudget:
    """One cgroup with a memory limit; `close` removes it (it must be empty by then)."""

    def __init__(self, limit_bytes: int, root: Path = CGROUP_ROOT,
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> None:
        self.limit_bytes = limit_bytes
        text = _read(proc_cgroup) or ""
        v2_path, v1_path, mount = own_memory_paths(text)
        name = f"celery-adaptive-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        v1_base = root / mount / (v1_path or "/").lstrip("/")
        v2_base = root / (v2_path or "/").lstrip("/")
        if v1_path is not None and (v1_base / "memory.limit_in_bytes").exists():
            self.version, self.path = 1, v1_base / name
        elif "memory" in (_read(v2_base / "cgroup.subtree_control") or "").split():
            self.version, self.path = 2, v2_base / name
        else:
            raise CgroupUnavailable(
                f"no memory cgroup to nest under (v1 {v1_base}, v2 {v2_base} without +memory in "
                "cgroup.subtree_control)")
        try:
            self.path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {self.path}: {exc}") from None
        try:
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            else:
                (self.path / "memory.max").write_text(str(limit_bytes))
                swap = self.path / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")  # the budget is memory, not memory plus swap
        except OSError as exc:
            self.close()
            raise CgroupUnavailable(f"cannot set the limit of {self.path}: {exc}") from None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def figures(self) -> BudgetFigures:
        if self.version == 1:
            peak_text = _read(self.path / "memory.max_usage_in_bytes")
            kills = _keyed(_read(self.path / "memory.oom_control"), "oom_kill")
        else:
            peak_text = _read(self.path / "memory.peak")
            kills = _keyed(_read(self.path / "memory.events"), "oom_kill")
        peak = int(peak_text) if peak_text and peak_text.strip().isdigit() else None
        return BudgetFigures(self.limit_bytes, peak, kills)

    def close(self) -> None:
        """Remove the cgroup once its processes are gone (bounded wait)."""
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
