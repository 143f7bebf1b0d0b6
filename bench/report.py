"""``summary.md`` from the run records: medians over repetitions, min-max beside them, ratios.

Only runs with ``status: ok`` are aggregated; failed runs (lost or errored tasks, a worker that
did not start) are listed separately with their reason, never averaged in.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]
Getter = Callable[[Record], float | None]


def _lat(key: str, cls: str | None = None) -> Getter:
    def get(r: Record) -> float | None:
        f = r["figures"]
        stats = f["latency_ms"] if cls is None else f["latency_ms_by_class"].get(cls)
        return None if stats is None else stats.get(key)
    return get


def _count(cls: str) -> Getter:
    def get(r: Record) -> float | None:
        stats = r["figures"]["latency_ms_by_class"].get(cls)
        return None if stats is None else float(stats["count"])
    return get


def _fig(key: str, scale: float = 1.0) -> Getter:
    def get(r: Record) -> float | None:
        value = r["figures"].get(key)
        return None if value is None else float(value) * scale
    return get


COLUMNS: list[tuple[str, Getter]] = [
    ("throughput /s", _fig("throughput_per_s")),
    ("p50 ms", _lat("p50")),
    ("p95 ms", _lat("p95")),
    ("p99 ms", _lat("p99")),
    ("max ms", _lat("max")),
    ("CPU s", _fig("cpu_seconds")),
    ("proc·s", _fig("process_seconds")),
    ("peak RSS MB", _fig("peak_rss_bytes", 1 / 2**20)),
]
HIT_COLUMN = ("hit %", _fig("hit_ratio", 100.0))
# Ratios against the baseline's median: lower is better except for throughput.
RATIOS: list[tuple[str, Getter]] = [
    ("p99", _lat("p99")),
    ("throughput", _fig("throughput_per_s")),
    ("CPU", _fig("cpu_seconds")),
    ("proc·s", _fig("process_seconds")),
]


def fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def values(records: Sequence[Record], get: Getter) -> list[float]:
    out = []
    for r in records:
        v = get(r)
        if v is not None and math.isfinite(v):
            out.append(v)
    return out


def median(records: Sequence[Record], get: Getter) -> float | None:
    vs = values(records, get)
    return statistics.median(vs) if vs else None


def fmt_count(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.0f}"


def cell(records: Sequence[Record], get: Getter, form: Callable[[float | None], str] = fmt) -> str:
    vs = values(records, get)
    if not vs:
        return "–"
    text = form(statistics.median(vs))
    if len(vs) > 1:
        text += f" ({form(min(vs))}–{form(max(vs))})"
    return text


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "–"
    return f"×{value / base:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def workload_section(name: str, records: Sequence[Record], pools: Sequence[str], baseline: str,
                     time_varying: bool) -> list[str]:
    spec = records[0]["workload_spec"]
    ok_by_pool: dict[str, list[Record]] = defaultdict(list)
    all_by_pool: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        all_by_pool[r["pool"]].append(r)
        if r["status"] == "ok":
            ok_by_pool[r["pool"]].append(r)
    columns = list(COLUMNS)
    if any(r.get("figures", {}).get("hit_ratio") is not None for r in records):
        columns.append(HIT_COLUMN)
    has_base = bool(ok_by_pool.get(baseline))
    header = ["pool", "runs ok"] + [h for h, _ in columns]
    if has_base:
        header += [f"{h} vs {baseline}" for h, _ in RATIOS]
    rows = []
    for pool in pools:
        ok = ok_by_pool.get(pool, [])
        row = [pool, f"{len(ok)}/{len(all_by_pool.get(pool, []))}"]
        row += [cell(ok, get) for _, get in columns]
        if has_base:
            row += [ratio(median(ok, get), median(ok_by_pool[baseline], get)) for _, get in RATIOS]
        rows.append(row)
    params = ", ".join(f"{k}={v}" for k, v in spec["params"].items())
    lines = [f"## {name}", "", f"{spec['description']}. {spec['tasks']} tasks; {params}; "
             f"seed {spec['seed']}.", ""]
    lines += table(header, rows)
    if not has_base:
        lines += ["", f"(no ratios: the baseline `{baseline}` has no successful run here)"]
    classes = sorted({c for rs in ok_by_pool.values() for r in rs
                      for c in r["figures"]["latency_ms_by_class"]})
    if len(classes) > 1:
        class_rows = [[pool, c, *(cell(ok_by_pool[pool], _lat(k, c)) for k in
                                  ("p50", "p95", "p99", "max")),
                       cell(ok_by_pool[pool], _count(c), fmt_count)]
                      for pool in pools if ok_by_pool.get(pool) for c in classes]
        lines += ["", "Latency per task class (ms):", ""]
        lines += table(["pool", "class", "p50", "p95", "p99", "max", "tasks"], class_rows)
    lines += ["", f"![latency](plots/latency-{name}.png)"]
    if time_varying:
        lines += ["", f"![timeline](plots/timeline-{name}.png)"]
    return lines + [""]


NOISY_SHARE = 0.10


def noise_note(records: Sequence[Record]) -> list[str]:
    """How much CPU other processes on the host took during the measured windows."""
    shares = values(records, _fig("other_cpu_share", 100.0))
    if not shares:
        return []
    lines = [f"CPU taken by other processes on the host during the measured windows: median "
             f"{fmt(statistics.median(shares))}% of capacity, max {fmt(max(shares))}%."]
    if max(shares) > NOISY_SHARE * 100:
        noisy = [r["run_id"] for r in records
                 if (r.get("figures") or {}).get("other_cpu_share", 0) > NOISY_SHARE]
        lines.append(f"**Warning: the host was busy with other work during {len(noisy)} run(s) "
                     f"(over {NOISY_SHARE:.0%} of capacity); their figures are skewed.**")
    return lines + [""]


def budget_section(records: Sequence[Record]) -> list[str]:
    """With ``--memory-budget``: every run (failed ones too: that is the point), what got done
    inside the budget, and what the kernel's OOM killer did."""
    runs = [r for r in records if r.get("memory_budget")]
    if not runs:
        return []
    rows = []
    for r in sorted(runs, key=lambda r: (r["workload"], r["pool"], r["repetition"])):
        budget, f = r["memory_budget"], r.get("figures") or {}
        failed = f.get("failed_by_class") or {}
        peak = budget.get("peak_bytes")
        rows.append([
            r["workload"], r["pool"], str(r["repetition"]),
            f"{f.get('completed', '–')}/{f.get('sent', '–')}",
            ", ".join(f"{n} {c}" for c, n in failed.items()) or "0",
            "–" if budget.get("oom_kills") is None else str(budget["oom_kills"]),
            "–" if peak is None else f"{peak / 2**20:.0f}",
            fmt(_fig("peak_rss_bytes", 1 / 2**20)(r)) if f else "–",
        ])
    limit = runs[0]["memory_budget"]["limit_bytes"] / 2**20
    lines = ["## Memory budget", "",
             f"Each worker ran in its own memory cgroup limited to {limit:.0f} MiB (`--memory-budget`)."
             " Peak is the cgroup's own high-water mark; peak RSS sums the process tree's RSS"
             " (shared pages once per process).", ""]
    lines += table(["workload", "pool", "rep", "completed/sent", "not completed (by class)",
                    "OOM kills", "cgroup peak MiB", "peak RSS MB"], rows)
    return lines + [""]


def render(records: Sequence[Record], meta: dict[str, Any],
           time_varying: dict[str, bool]) -> str:
    pools = list(meta["pools"])
    baseline = meta["baseline"]
    lines = [
        f"# Benchmark {meta['stamp']}",
        "",
        f"`{meta['command']}`",
        "",
        f"Host: {meta['host']['cpus']} CPUs, Python {meta['host']['python']}, Celery "
        f"{meta['host']['celery']}. Concurrency {meta['concurrency']}, {meta['repeat']} "
        f"repetition(s), {'quick' if meta['quick'] else 'full'} sizes, baseline `{baseline}`.",
        "",
        "Cells are the median over successful repetitions, (min–max) when there are several. "
        "Latency is end to end (send → task finished). CPU s, proc·s (integral of the number of "
        "worker processes) and peak RSS cover the worker's whole process tree from the first send "
        f"to the last result. Ratios are medians divided by `{baseline}`'s (×1.00 = equal; for "
        "throughput higher is better, for the others lower).",
        "",
    ]
    lines += noise_note(records)
    by_workload: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_workload[r["workload"]].append(r)
    for name in meta["workloads"]:
        if by_workload.get(name):
            lines += workload_section(name, by_workload[name], pools, baseline,
                                      time_varying.get(name, False))
    lines += budget_section(records)
    failed = [r for r in records if r["status"] != "ok"]
    lines += ["## Failed runs", ""]
    if failed:
        lines += [f"- `{r['run_id']}`: {r['failure']} (log: `logs/{r['run_id']}.log`)"
                  for r in failed]
    else:
        lines.append("None: every run completed every task it sent.")
    return "\n".join(lines) + "\n"
