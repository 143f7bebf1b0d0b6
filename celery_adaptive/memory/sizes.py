"""Memory amounts as users write them: sizes, and shares of the container's memory.

Units are explicit, because Celery's own ``worker_max_memory_per_child`` is a number of KiB:

=====================  ========================================================================
value                  meaning
=====================  ========================================================================
``512000`` (an int)    KiB, as ``worker_max_memory_per_child`` (so 512000 is 500 MiB)
``"512000"``           the same: a string of digits is KiB too
``"512MiB"``           binary units: ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024)
``"1.5GB"``            decimal units: ``kB``/``KB``, ``MB``, ``GB``, ``TB`` (powers of 1000)
``"80%"``              a share of the container's memory limit (cgroup ``memory.max`` or
                       ``memory.limit_in_bytes``), or of the host's memory without one
=====================  ========================================================================

Unit names are case-insensitive. A bare letter (``"512M"``, ``"1G"``) is refused: Kubernetes
reads ``M`` as 10**6 and Docker as 2**20, and a limit off by 5% is a limit that surprises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from celery_adaptive.errors import SettingsError

__all__ = ["MemoryAmount", "format_bytes", "parse_amount"]

_UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}
_AMOUNT = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-zA-Z%]*)\s*$")


@dataclass(frozen=True)
class MemoryAmount:
    """A size in bytes, or a share of the container's (or host's) memory; exactly one is set."""

    text: str
    size: int | None = None
    share: float | None = None  # in (0, 1]

    def resolve(self, total: int | None) -> int | None:
        """Bytes: the size, or the share of ``total`` (None when a share has no total)."""
        if self.size is not None:
            return self.size
        if self.share is None or total is None:
            return None
        return int(total * self.share)

    def describe(self, total: int | None = None) -> str:
        resolved = self.resolve(total)
        if self.share is None:
            return format_bytes(resolved)
        if resolved is None:
            return f"{self.share:.0%}"
        return f"{self.share:.0%} = {format_bytes(resolved)}"


def format_bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def parse_amount(name: str, value: object, allow_share: bool = True) -> MemoryAmount:
    """Parse one setting's value; raises `SettingsError` naming ``name``."""
    if isinstance(value, bool):
        raise SettingsError(name, value, "expected a size such as '512MiB' or KiB as an integer")
    if isinstance(value, int):
        if value <= 0:
            raise SettingsError(name, value, "must be > 0 (KiB)")
        return MemoryAmount(f"{value} KiB", size=value * 1024)
    if isinstance(value, float):
        raise SettingsError(name, value, "a number is KiB and must be an integer; or write '1.5GiB'")
    if not isinstance(value, str):
        raise SettingsError(name, value, "expected a size such as '512MiB', '1.5GB', '80%' or KiB")
    match = _AMOUNT.match(value)
    if match is None:
        raise SettingsError(name, value, "expected a size such as '512MiB', '1.5GB', '80%' or KiB")
    number, unit = float(match["number"]), match["unit"].lower()
    if unit == "%":
        if not allow_share:
            raise SettingsError(name, value, "must be a size, not a share")
        if not 0 < number <= 100:
            raise SettingsError(name, value, "a share must be in (0%, 100%]")
        return MemoryAmount(value.strip(), share=number / 100)
    if unit == "":
        if "." in match["number"]:
            raise SettingsError(name, value, "a number without unit is KiB and must be an integer")
        multiplier = 1024
    elif unit in _UNITS:
        multiplier = _UNITS[unit]
    elif unit in ("k", "m", "g", "t"):
        upper = unit.upper()
        raise SettingsError(
            name, value, f"ambiguous unit {match['unit']!r}: write {upper}iB (binary) or {upper}B (decimal)"
        )
    else:
        raise SettingsError(name, value, f"unknown unit {match['unit']!r}; use B, KiB, MiB, GiB, kB, MB, GB or %")
    size = number * multiplier
    if not math.isfinite(size) or size < 1:
        raise SettingsError(name, value, "must be at least 1 byte")
    return MemoryAmount(value.strip(), size=int(size))
