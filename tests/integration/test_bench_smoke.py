"""The benchmark harness works end to end: ``python -m bench run --quick`` on real workers.

Not a performance test: nothing here asserts on a duration or a latency. It checks that every
workload ran against every pool, that no task was lost, and that the report and plots exist.
The harness starts its own loopback Redis (celery_adaptive.embedded_redis).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
POOLS = ("prefork", "solo")


def test_schedules_are_seeded_and_pool_independent() -> None:
    from bench.workloads import BUILDERS, Sizing, build, fingerprint

    for name in BUILDERS:
        first = build(name, Sizing(cpus=2, quick=True, seed=7))
        again = build(name, Sizing(cpus=2, quick=True, seed=7))
        assert fingerprint(first) == fingerprint(again), name
        assert first.arrivals, name
        assert all(a.at >= 0 for a in first.arrivals), name
        assert [a.at for a in first.arrivals] == sorted(a.at for a in first.arrivals), name


def test_the_memory_workload_sends_one_heavy_task_alone_then_pairs() -> None:
    from bench.workloads import Sizing, build

    workload = build("memory", Sizing(cpus=2, quick=False, seed=7))
    heavy = [a.at for a in workload.arrivals if a.cls == "heavy"]
    assert len(heavy) == 13 and heavy[0] == 0.5
    # The first one has ended (1 s) before the first pair; each pair is 50 ms apart.
    assert heavy[1] - heavy[0] > 1.0
    assert [round(b - a, 3) for a, b in zip(heavy[1::2], heavy[2::2], strict=True)] == [0.05] * 6
    assert all(a.args == (160.0, 1000.0) for a in workload.arrivals if a.cls == "heavy")


def test_percentile_and_process_seconds_by_hand() -> None:
    from bench.metrics import percentile, process_seconds
    from bench.sampler import Sample

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    samples = [Sample(0.0, 3, 0.0, 0), Sample(1.0, 1, 0.0, 0), Sample(2.0, 2, 0.0, 0)]
    # 3 procs for [0.5, 1), 1 for [1, 2), 2 for [2, 2.5]
    assert process_seconds(samples, 0.5, 2.5) == pytest.approx(1.5 + 1.0 + 1.0)


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_run_writes_results(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "run", "--quick", "--pools", ",".join(POOLS),
           "--repeat", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    from bench.workloads import BUILDERS

    records = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    assert {(r["workload"], r["pool"]) for r in records} == {
        (w, p) for w in BUILDERS for p in POOLS
    }
    for r in records:
        assert r["status"] == "ok", (r["run_id"], r["failure"])
        assert r["figures"]["lost"] == 0, r["run_id"]
        assert r["figures"]["completed"] == r["figures"]["sent"] > 0, r["run_id"]
        assert r["timeseries"]["t"], r["run_id"]
    # One schedule per workload, whatever the pool.
    by_workload: dict[str, set[str]] = {}
    for r in records:
        by_workload.setdefault(r["workload"], set()).add(r["schedule_fingerprint"])
    assert all(len(prints) == 1 for prints in by_workload.values())

    summary = (folder / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| pool | runs ok"))
    assert "p99 vs prefork" in header
    assert "| solo |" in summary

    pngs = list((folder / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"latency-mixed.png", "timeline-ramp.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
