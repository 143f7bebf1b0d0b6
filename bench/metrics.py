"""Figures of one run, computed from what was sent, what came back and the tree samples.

Pure functions of plain values: no clock, no I/O, so they can be checked by hand.
The measured window runs from the first send to the moment the last result was seen (or the
drain deadline); CPU, process-seconds and memory are taken over that window only, so worker
start-up (imports, forking) is not counted.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from bench.loadgen import Sent
from bench.sampler import Sample

PERCENTILES = (50.0, 95.0, 99.0)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return float(sorted_values[low] * (1 - frac) + sorted_values[high] * frac)


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float | int]:
    values = sorted(latencies_ms)
    stats: dict[str, float | int] = {f"p{int(p)}": percentile(values, p) for p in PERCENTILES}
    stats["max"] = values[-1] if values else math.nan
    stats["mean"] = sum(values) / len(values) if values else math.nan
    stats["count"] = len(values)
    return stats


def _value_at(samples: Sequence[Sample], t: float, attr: str) -> float:
    """The sampled value in force at time t (last sample at or before t, else the first)."""
    times = [s.t for s in samples]
    i = bisect.bisect_right(times, t) - 1
    return float(getattr(samples[max(i, 0)], attr))


def process_seconds(samples: Sequence[Sample], start: float, end: float) -> float:
    """Integral of the process count over [start, end], each sample held until the next."""
    if not samples or end <= start:
        return 0.0
    total = 0.0
    edges = [s.t for s in samples[1:]] + [math.inf]
    for sample, next_t in zip(samples, edges, strict=True):
        lo, hi = max(sample.t, start), min(next_t, end)
        if hi > lo:
            total += sample.processes * (hi - lo)
    # Before the first sample: assume the first value (the worker was already running).
    if samples[0].t > start:
        total += samples[0].processes * (min(samples[0].t, end) - start)
    return total


def cpu_seconds(samples: Sequence[Sample], start: float, end: float) -> float:
    if not samples:
        return math.nan
    return max(0.0, _value_at(samples, end, "cpu_s") - _value_at(samples, start, "cpu_s"))


def peak_rss(samples: Sequence[Sample], start: float, end: float) -> int:
    inside = [s.rss_bytes for s in samples if start <= s.t <= end]
    return max(inside or [s.rss_bytes for s in samples] or [0])


def task_rows(sent: Sequence[Sent], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per sent task: class (hit/miss resolved), send offset, latency, status."""
    rows = []
    for s in sent:
        meta = results.get(s.task_id)
        row: dict[str, Any] = {"cls": s.cls, "sched": round(s.scheduled, 4), "sent": s.sent_at,
                               "status": "LOST", "latency_ms": None, "pid": None}
        if meta is not None:
            row["status"] = meta.get("status")
            value = meta.get("result")
            if row["status"] == "SUCCESS" and isinstance(value, dict):
                row["latency_ms"] = (float(value["finished"]) - s.sent_at) * 1000.0
                row["finished"] = float(value["finished"])
                row["pid"] = value.get("pid")
                if "hit" in value:
                    row["cls"] = "hit" if value["hit"] else "miss"
        rows.append(row)
    return rows


def arrival_rate(send_times: Sequence[float], at: Sequence[float], window: float) -> list[float]:
    """Sends per second in the ``window`` seconds up to each time in ``at`` (send_times sorted)."""
    out = []
    for t in at:
        n = bisect.bisect_right(send_times, t) - bisect.bisect_right(send_times, t - window)
        out.append(n / window)
    return out


def summarise(sent: Sequence[Sent], results: dict[str, dict[str, Any]],
              samples: Sequence[Sample], start: float, end: float,
              rate_window: float) -> dict[str, Any]:
    """The run's figures, its per-task rows and its time series."""
    rows = task_rows(sent, results)
    ok = [r for r in rows if r["latency_ms"] is not None]
    by_class: dict[str, list[float]] = defaultdict(list)
    for r in ok:
        by_class[r["cls"]].append(r["latency_ms"])
    lost = sum(1 for r in rows if r["status"] == "LOST")
    errors = sum(1 for r in rows if r["status"] not in ("LOST", "SUCCESS"))
    hits = sum(1 for r in ok if r["cls"] == "hit")
    misses = sum(1 for r in ok if r["cls"] == "miss")
    window = max(end - start, 1e-9)
    first_sent = min((s.sent_at for s in sent), default=start)
    last_finish = max((r["finished"] for r in ok), default=first_sent)
    busy = last_finish - first_sent
    proc_s = process_seconds(samples, start, end)
    lags = sorted(s.lag_s * 1000.0 for s in sent)
    in_window = [s for s in samples if start <= s.t <= end] or list(samples)
    send_times = sorted(s.sent_at for s in sent)
    figures: dict[str, Any] = {
        "sent": len(sent),
        "completed": len(ok),
        "errors": errors,
        "lost": lost,
        "throughput_per_s": len(ok) / busy if busy > 0 else math.nan,
        "latency_ms": latency_stats([r["latency_ms"] for r in ok]),
        "latency_ms_by_class": {c: latency_stats(v) for c, v in sorted(by_class.items())},
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
        # Tasks that did not succeed (errors and lost), per class: which kind of work failed.
        "failed_by_class": dict(sorted(Counter(r["cls"] for r in rows if r["status"] != "SUCCESS").items())),
        "window_s": window,
        "cpu_seconds": cpu_seconds(samples, start, end),
        "process_seconds": proc_s,
        "mean_processes": proc_s / window,
        "max_processes": max((s.processes for s in in_window), default=0),
        "peak_rss_bytes": peak_rss(samples, start, end),
        "distinct_pids": len({r["pid"] for r in ok if r["pid"] is not None}),
        "send_lag_ms": {"p99": percentile(lags, 99.0), "max": lags[-1] if lags else math.nan},
    }
    series = {
        "t": [round(s.t - start, 3) for s in samples],
        "processes": [s.processes for s in samples],
        "cpu_s": [round(s.cpu_s, 3) for s in samples],
        "rss_mb": [round(s.rss_bytes / 2**20, 2) for s in samples],
        "arrival_rate": [round(r, 2) for r in
                         arrival_rate(send_times, [s.t for s in samples], rate_window)],
    }
    compact_rows = [{**r, "sent": round(r["sent"] - start, 4),
                     "finished": round(r["finished"] - start, 4) if "finished" in r else None,
                     "latency_ms": None if r["latency_ms"] is None else round(r["latency_ms"], 3)}
                    for r in rows]
    return {"figures": figures, "timeseries": series, "tasks": compact_rows}
