"""`celery adaptive top` rendering: pure, within 80 columns, shows what was measured."""

from __future__ import annotations

import pytest

from celery_adaptive.metrics.snapshot import (
    Aggregator,
    ChildReading,
    Completion,
    HostReading,
    PoolReading,
    ProcessReading,
)
from celery_adaptive.metrics.top import fmt_bytes, fmt_seconds, render, short_task

NOW = 1_700_000_100.0


def _snapshot(hostname: str = "celery@a-rather-long-hostname.example.com", taken_at: float = NOW - 1) -> dict:
    children = (
        ChildReading(1, 41001, 0, 0, "busy", 0.0, 12, 9.5, 3, 2,
                     "myproject.very.deeply.nested.module.tasks.compute_something_long", 12.3),
        ChildReading(2, 41002, 1, 1, "idle", 0.0, 7, 0.1, 0, 0),
    )
    reading = PoolReading(
        at=10.0, wall=taken_at, hostname=hostname, target=2, min_children=1, max_children=8,
        counters={"received": 123456, "started": 123450, "succeeded": 123000, "failed": 400, "lost": 2},
        scheduler={"steals": 2}, queued=6, in_flight=1, completed=123402, children=children,
        completions=tuple(
            Completion(9.0, name, 0.004 * i, 0.25 * i)
            for i in range(1, 30)
            for name in ("proj.add", "myproject.very.deeply.nested.module.tasks.compute_something_long")
        ),
        autoscaler={
            "forecast": {"predicted_rate": 41.5, "arrival_rate": 40.0},
            "change": {"direction": "up", "target": 2,
                       "reason": "forecast 41.5/s x 0.05 s needs 2 children to keep the wait under 200 ms"},
        },
    )
    snap = Aggregator(interval=2.0).aggregate(
        reading,
        processes={41001: ProcessReading(99.7, 90 * 1024 * 1024), 41002: ProcessReading(0.0, 60 * 1024 * 1024)},
        host=HostReading(55.0, (1.5, 1.25, 0.75), 43.0, 10**9),
        broker_backlog=17,
    )
    return snap.to_dict()


def test_render_fits_80_columns_and_shows_the_worker():
    lines = render([_snapshot(), _snapshot("celery@b")], NOW, width=80, source="redis://127.0.0.1:6379/0")
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    text = "\n".join(lines)
    assert "2 worker(s)" in text
    assert "celery@a-rather-long-hostname.example.com" in text and "celery@b" in text
    assert "41001" in text and "41002" in text
    assert "compute_something_long" in text
    assert "99.7" in text and "90.0M" in text
    assert "backlog 17" in text
    assert "up -> 2" in text and "needs 2 children" in text
    assert "recv 123456" in text
    assert "load 1.50 1.25 0.75" in text


def test_render_marks_stale_workers_and_handles_none():
    stale = render([_snapshot(taken_at=NOW - 60)], NOW)
    assert any("STALE" in line for line in stale)
    empty = render([], NOW)
    assert "0 worker(s)" in empty[0]
    assert any("no worker" in line for line in empty)


def test_render_tolerates_a_minimal_snapshot():
    lines = render([{"hostname": "w@h", "taken_at": NOW, "pool": {}, "children": [{"pid": 1}]}], NOW)
    assert any("w@h" in line for line in lines)
    assert all(len(line) <= 80 for line in lines)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_render_respects_any_width(width):
    assert all(len(line) <= width for line in render([_snapshot()], NOW, width=width))


def test_formatters():
    assert fmt_seconds(None) == "-"
    assert fmt_seconds(0.0042) == "4.2ms"
    assert fmt_seconds(0.25) == "250ms"
    assert fmt_seconds(12.34) == "12.3s"
    assert fmt_seconds(600) == "10.0m"
    assert fmt_bytes(512) == "512B"
    assert fmt_bytes(1536) == "1.5K"
    assert fmt_bytes(3 * 1024**3) == "3.0G"
    assert short_task("a.b.c.task", 20) == "a.b.c.task"
    assert short_task("pkg.module.sub.task", 12) == "sub.task"
    assert short_task("x.averyveryverylongtaskname", 10) == "~gtaskname"
    assert len(short_task("x.averyveryverylongtaskname", 10)) == 10
