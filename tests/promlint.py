"""A Python port of promtool's metric lint (``promtool check metrics``, which runs
client_golang's ``testutil/promlint``), plus two conventions from Prometheus' naming guide.

``lint(text)`` takes a text exposition and returns one line per problem, like promtool:
``<metric> <problem>``. The format itself is checked by prometheus_client's parser (an
unparsable exposition raises). Rules, as promlint states them:

- every metric family has help text;
- counters end in ``_total``;
- base units: no prefixed or non-base units (``milliseconds``, ``kilobytes``, ``minutes``,
  ``bits``, ...) and no abbreviated units (``_ms``, ``_s``, ``_kb``, ...);
- the type is not part of the name (``_counter``, ``_gauge``, ``_histogram``, ``_summary``);
- ``_bucket`` only on histograms, ``_count``/``_sum`` only on histograms and summaries, the
  ``le`` label only on histograms, ``quantile`` only on summaries;
- no ``:`` (reserved for recording rules) and snake_case metric and label names;
- no two samples with the same name and labels.

And from the naming guide (https://prometheus.io/docs/practices/naming/): ratios, not percent
(``percent`` -> ``ratio``); ``_total`` only on counters.
"""

from __future__ import annotations

import re
from collections import Counter

BASE_UNITS = {
    "amperes": "amperes", "bytes": "bytes", "celsius": "celsius", "grams": "grams",
    "joules": "joules", "kelvin": "kelvin", "meters": "meters", "metres": "metres",
    "seconds": "seconds", "volts": "volts",
    "minutes": "seconds", "hours": "seconds", "days": "seconds", "weeks": "seconds",
    "kelvins": "kelvin", "fahrenheit": "celsius", "rankine": "celsius",
    "inches": "meters", "yards": "meters", "miles": "meters",
    "bits": "bytes", "calories": "joules", "pounds": "grams", "ounces": "grams",
    # The naming guide, not promlint:
    "percent": "ratio", "percentage": "ratio",
}
UNIT_PREFIXES = ("pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto", "kilo",
                 "kibi", "mega", "mibi", "giga", "gibi", "tera", "tebi", "peta", "pebi")
UNIT_ABBREVIATIONS = ("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d")
CAMEL = re.compile(r"[a-z][A-Z]")
META = re.compile(r"^# (HELP|TYPE) (\S+)(?: (.*))?$")


def _unit_problem(name: str) -> str | None:
    """promlint's metricUnits: the first part of the name that is a unit, bare or prefixed."""
    for part in name.split("_"):
        candidates = [part] + [part[len(p):] for p in UNIT_PREFIXES if part.startswith(p)]
        for unit in candidates:
            if unit in BASE_UNITS:
                base = BASE_UNITS[unit]
                return None if part == base else f'use base unit "{base}" instead of "{part}"'
    return None


def lint(text: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))  # raises on a malformed exposition
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        meta = META.match(line)
        if meta:
            kind, name, rest = meta.groups()
            (helps if kind == "HELP" else types)[name] = rest or ""
    problems: list[str] = []

    def problem(name: str, what: str) -> None:
        problems.append(f"{name} {what}")

    for name, kind in types.items():
        lower = name.lower()
        if not helps.get(name, "").strip():
            problem(name, "no help text")
        if kind == "counter" and not name.endswith("_total"):
            problem(name, 'counter metrics should have "_total" suffix')
        if kind != "counter" and name.endswith("_total"):
            problem(name, 'only counters should have "_total" suffix')
        unit = _unit_problem(lower)
        if unit:
            problem(name, unit)
        if any(f"_{abbr}_" in lower or lower.endswith(f"_{abbr}") for abbr in UNIT_ABBREVIATIONS):
            problem(name, "metric names should not contain abbreviated units")
        if f"_{kind}_" in lower or lower.endswith(f"_{kind}"):
            problem(name, f"metric name should not include type '{kind}'")
        if kind != "histogram" and name.endswith("_bucket"):
            problem(name, 'non-histogram metrics should not have "_bucket" suffix')
        if kind not in ("histogram", "summary") and name.endswith(("_count", "_sum")):
            problem(name, 'non-histogram and non-summary metrics should not have "_count" or "_sum" suffix')
        if ":" in name:
            problem(name, "metric names should not contain ':'")
        if CAMEL.search(name):
            problem(name, "metric names should be written in 'snake_case' not 'camelCase'")

    seen: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    for family in families:
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            seen[sample.name, labels] += 1
            for label in sample.labels:
                if CAMEL.search(label):
                    problem(family.name, "label names should be written in 'snake_case' not 'camelCase'")
                if label == "le" and family.type != "histogram":
                    problem(family.name, 'non-histogram metrics should not have "le" label')
                if label == "quantile" and family.type != "summary":
                    problem(family.name, 'non-summary metrics should not have "quantile" label')
    for (name, labels), count in seen.items():
        if count > 1:
            problem(name, f"duplicate series {dict(labels)}")
    return sorted(set(problems))
