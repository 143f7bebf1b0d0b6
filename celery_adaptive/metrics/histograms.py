"""Cumulative histograms of task times, for Prometheus (``_bucket``/``_sum``/``_count``).

The windowed percentiles in `snapshot` answer "what is p99 now on this worker"; a histogram
answers the same across workers and over any range, in PromQL
(``histogram_quantile(0.99, sum by (le) (rate(..._bucket[5m])))``), which is what dashboards
and alerts need. Owned by the sampler thread (the `Aggregator`); pure otherwise.

Cardinality is bounded: at most `MAX_LABEL_SETS` label sets per histogram (task name and queue
are the usual labels); observations for further ones are counted under `OTHER`.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

#: Upper bounds in seconds, from a 5 ms task to a 5 min one (``+Inf`` is implied).
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
MAX_LABEL_SETS = 50
OTHER = "other"


@dataclass(frozen=True)
class HistogramSeries:
    """One label set's counts at one instant, in Prometheus' form."""

    labels: tuple[str, ...]
    cumulative: tuple[int, ...]
    """Observations <= each bound of `BUCKETS`, then the total (the ``+Inf`` bucket)."""
    sum: float
    count: int


class Histogram:
    def __init__(self, label_count: int, max_label_sets: int = MAX_LABEL_SETS) -> None:
        if label_count < 0 or max_label_sets < 1:
            raise ValueError("label_count must be >= 0 and max_label_sets >= 1")
        self.label_count = label_count
        self.max_label_sets = max_label_sets
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        if len(labels) != self.label_count:
            raise ValueError(f"expected {self.label_count} label values, got {len(labels)}")
        value = max(0.0, value)
        counts = self._counts.get(labels)
        if counts is None:
            if len(self._counts) >= self.max_label_sets - 1:
                labels = (OTHER,) * self.label_count
                counts = self._counts.get(labels)
            if counts is None:
                counts = self._counts[labels] = [0] * (len(BUCKETS) + 1)
                self._sums[labels] = 0.0
        counts[bisect_left(BUCKETS, value)] += 1
        self._sums[labels] += value

    def series(self) -> tuple[HistogramSeries, ...]:
        out = []
        for labels in sorted(self._counts):
            running, cumulative = 0, []
            for count in self._counts[labels]:
                running += count
                cumulative.append(running)
            out.append(HistogramSeries(labels, tuple(cumulative), self._sums[labels], running))
        return tuple(out)
