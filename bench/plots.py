"""PNG plots of a results folder (matplotlib, Agg backend: no display needed).

- ``latency-<workload>.png``: CDF of end-to-end latency per pool, successful runs pooled.
- ``timeline-<workload>.png`` (time-varying workloads): one panel per pool, from its first
  successful run: worker processes (step, left axis) and arrival rate (right axis) over time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def _pyplot() -> Any:
    # Imported here so `import bench` stays light and never picks an interactive backend.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(name: str, records: Sequence[Record], pools: Sequence[str], path: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for pool in pools:
        lat = sorted(t["latency_ms"] for r in records if r["pool"] == pool and r["status"] == "ok"
                     for t in r["tasks"] if t["latency_ms"] is not None)
        if not lat:
            continue
        frac = [(i + 1) / len(lat) for i in range(len(lat))]
        ax.step([max(v, 1e-3) for v in lat], frac, where="post", label=f"{pool} (n={len(lat)})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms, log scale)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title(f"{name}: latency CDF per pool")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def timeline(name: str, records: Sequence[Record], pools: Sequence[str], path: Path) -> bool:
    first: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r["repetition"]):
        if r["status"] == "ok" and r["pool"] not in first:
            first[r["pool"]] = r
    shown = [p for p in pools if p in first]
    if not shown:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.4 * len(shown) + 0.6), sharex=True,
                             squeeze=False)
    max_procs = max(max(first[p]["timeseries"]["processes"] or [1]) for p in shown)
    max_rate = max(max(first[p]["timeseries"]["arrival_rate"] or [1]) for p in shown)
    for ax, pool in zip(axes[:, 0], shown, strict=True):
        series = first[pool]["timeseries"]
        ax.step(series["t"], series["processes"], where="post", color="tab:blue")
        ax.set_ylabel("processes", color="tab:blue")
        ax.set_ylim(0, max_procs + 1)
        rate_ax = ax.twinx()
        rate_ax.plot(series["t"], series["arrival_rate"], color="tab:orange", alpha=0.8)
        rate_ax.set_ylabel("arrivals /s", color="tab:orange")
        rate_ax.set_ylim(0, max_rate * 1.1 + 1)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{pool} ({first[pool]['run_id']})", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the first send")
    fig.suptitle(f"{name}: worker processes and arrival rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_all(records: Sequence[Record], pools: Sequence[str], time_varying: dict[str, bool],
              out_dir: Path) -> list[Path]:
    by_workload: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_workload[r["workload"]].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, runs in by_workload.items():
        path = out_dir / f"latency-{name}.png"
        if latency_cdf(name, runs, pools, path):
            written.append(path)
        if time_varying.get(name):
            path = out_dir / f"timeline-{name}.png"
            if timeline(name, runs, pools, path):
                written.append(path)
    return written
