"""Cumulative histograms, the compact history entry, and the publish-time stamp."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from celery_adaptive.metrics.histograms import BUCKETS, MAX_LABEL_SETS, OTHER, Histogram
from celery_adaptive.metrics.snapshot import HISTORY_FIELDS
from celery_adaptive.publish_time import HEADER, _stamp, publish_wait
from tests.snapshots import full_snapshot


# -- histograms ----------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram(1)
    for value in (0.005, 0.0051, 0.3, 400.0, -1.0):
        h.observe(("a",), value)
    [series] = h.series()
    assert series.labels == ("a",) and series.count == 5
    counts = dict(zip((*BUCKETS, float("inf")), series.cumulative, strict=True))
    assert counts[0.005] == 2  # -1 counts as 0, and le is inclusive
    assert counts[0.01] == 3 and counts[0.5] == 4 and counts[300.0] == 4 and counts[float("inf")] == 5
    assert series.sum == pytest.approx(0.005 + 0.0051 + 0.3 + 400.0)


def test_histogram_label_sets_are_bounded():
    h = Histogram(2, max_label_sets=MAX_LABEL_SETS)
    for i in range(MAX_LABEL_SETS * 3):
        h.observe((f"task{i}", "q"), 0.1)
    series = h.series()
    assert len(series) == MAX_LABEL_SETS
    other = next(s for s in series if s.labels == (OTHER, OTHER))
    assert other.count == MAX_LABEL_SETS * 3 - (MAX_LABEL_SETS - 1)
    assert sum(s.count for s in series) == MAX_LABEL_SETS * 3
    with pytest.raises(ValueError):
        h.observe(("only-one",), 1.0)


# -- history entries -------------------------------------------------------------------------
def test_history_entry_is_flat_short_and_always_has_the_same_fields():
    snapshot = full_snapshot()
    entry = snapshot.to_history()
    assert tuple(entry) == HISTORY_FIELDS
    assert all(isinstance(v, str) for v in entry.values())
    assert entry["children"] == "3" and entry["target"] == "4" and entry["lost"] == "1"
    assert entry["scaled"] == "up:4" and entry["forecast_per_s"] == "14.25"
    assert entry["taken_at_ms"] == str(int(snapshot.taken_at * 1000))
    assert sum(len(v) for v in entry.values()) < 120  # values only: names are stored per node
    assert len(str(snapshot.to_dict())) > 10 * sum(len(v) for v in entry.values())


# -- publish time ------------------------------------------------------------------------------
def test_stamp_adds_the_publish_time_to_the_headers():
    headers: dict = {"id": "x"}
    before = time.time()
    _stamp(sender="t", headers=headers)
    assert before <= headers[HEADER] <= time.time()
    _stamp(sender="t", headers=None)  # nothing to stamp: no error


def test_publish_wait_starts_at_the_stamp_or_the_eta():
    assert publish_wait({}, 100.0) is None
    assert publish_wait({HEADER: "soon"}, 100.0) is None
    assert publish_wait({HEADER: True}, 100.0) is None
    assert publish_wait({HEADER: 90.0}, 100.0) == 10.0
    assert publish_wait({HEADER: 110.0}, 100.0) == 0.0  # a producer clock ahead: not negative
    published = datetime(2026, 1, 1, tzinfo=timezone.utc)
    eta = (published + timedelta(seconds=30)).isoformat()
    now = (published + timedelta(seconds=32)).timestamp()
    assert publish_wait({HEADER: published.timestamp(), "eta": eta}, now) == pytest.approx(2.0)
    assert publish_wait({HEADER: published.timestamp(), "eta": "not a date"}, now) == pytest.approx(32.0)
