"""Compare JUnit XML results of Celery's integration suite across pools and broker layouts.

Input: a directory of ``<layout>__<pool>__<label>.xml`` files written by
scripts/celery-conformance.sh, and its ``runs.tsv`` (one line per pytest invocation: layout,
pool, label, exit code, seconds). Output: a table of passed/failed/skipped per test file,
layout and pool; the tests that pass on prefork and fail on the adaptive pool (bugs); the
tests that fail on both, each with the first line of its failure message.

Usage: python report.py RESULTS_DIR [--markdown]
Exit status: 0 when the adaptive pool fails nothing prefork passes (or, without a prefork
run, fails nothing at all); 1 otherwise; 2 when a run left no results (timed out, crashed).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PREFORK = "prefork"
ADAPTIVE = "adaptive"
OUTCOMES = ("passed", "failed", "skipped")


@dataclass(frozen=True)
class Outcome:
    test: str  # e.g. test_tasks.py::test_tasks::test_expired
    file: str  # e.g. test_tasks.py
    status: str  # passed | failed | skipped
    message: str  # the failure or skip reason, first line


@dataclass(frozen=True)
class Run:
    layout: str
    pool: str
    label: str
    exit_code: int
    seconds: float


def _test_id(case: ET.Element) -> tuple[str, str]:
    """(node id relative to t/integration, file name) of a JUnit testcase."""
    classname = case.get("classname", "")  # t.integration.test_tasks.test_tasks
    name = case.get("name", "")
    parts = classname.split(".")
    if len(parts) >= 3 and parts[0] == "t" and parts[1] == "integration":
        parts = parts[2:]
    module, classes = parts[0], parts[1:]
    file = f"{module}.py"
    return "::".join([file, *classes, name]), file


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:240]
    return ""


def read_junit(path: Path) -> list[Outcome]:
    outcomes: dict[str, Outcome] = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        test, file = _test_id(case)
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, message = "failed", _first_line(child.get("message")) or _first_line(child.text)
                break
            if child.tag == "skipped":
                status, message = "skipped", _first_line(child.get("message"))
        previous = outcomes.get(test)
        # pytest reports a teardown error as a second testcase with the same name: worst wins.
        if previous is None or previous.status != "failed":
            outcomes[test] = Outcome(test, file, status, message)
    return list(outcomes.values())


def read_runs(directory: Path) -> list[Run]:
    runs = []
    tsv = directory / "runs.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 5:
                runs.append(Run(fields[0], fields[1], fields[2], int(fields[3]), float(fields[4])))
    return runs


@dataclass
class Results:
    # (layout, pool) -> test -> Outcome
    by_run: dict[tuple[str, str], dict[str, Outcome]]
    runs: list[Run]
    missing: list[str]  # runs that left no XML (timed out or crashed)

    @property
    def layouts(self) -> list[str]:
        return sorted({layout for layout, _ in self.by_run} | {r.layout for r in self.runs})

    def pools(self) -> list[str]:
        present = {pool for _, pool in self.by_run}
        return [p for p in (PREFORK, ADAPTIVE) if p in present] + sorted(present - {PREFORK, ADAPTIVE})

    def outcomes(self, layout: str, pool: str) -> dict[str, Outcome]:
        return self.by_run.get((layout, pool), {})


def load(directory: Path) -> Results:
    by_run: dict[tuple[str, str], dict[str, Outcome]] = defaultdict(dict)
    for path in sorted(directory.glob("*.xml")):
        fields = path.stem.split("__")
        if len(fields) != 3:
            continue
        layout, pool, _label = fields
        for outcome in read_junit(path):
            by_run[(layout, pool)][outcome.test] = outcome
    runs = read_runs(directory)
    missing = [
        f"{r.layout}/{r.pool}/{r.label} (exit {r.exit_code} after {r.seconds:.0f}s)"
        for r in runs
        if not (directory / f"{r.layout}__{r.pool}__{r.label}.xml").exists()
    ]
    return Results(dict(by_run), runs, missing)


def regressions(results: Results, layout: str) -> list[tuple[Outcome, Outcome | None]]:
    """Adaptive failures that prefork passes (or every adaptive failure without prefork)."""
    adaptive = results.outcomes(layout, ADAPTIVE)
    prefork = results.outcomes(layout, PREFORK)
    found = []
    for test, outcome in sorted(adaptive.items()):
        if outcome.status != "failed":
            continue
        reference = prefork.get(test)
        if not prefork or (reference is not None and reference.status == "passed"):
            found.append((outcome, reference))
    return found


def both_fail(results: Results, layout: str) -> list[tuple[Outcome, Outcome]]:
    adaptive = results.outcomes(layout, ADAPTIVE)
    prefork = results.outcomes(layout, PREFORK)
    return [
        (prefork[t], adaptive[t])
        for t in sorted(adaptive)
        if t in prefork and adaptive[t].status == "failed" and prefork[t].status == "failed"
    ]


def prefork_only_failures(results: Results, layout: str) -> list[Outcome]:
    adaptive = results.outcomes(layout, ADAPTIVE)
    prefork = results.outcomes(layout, PREFORK)
    return [
        prefork[t] for t in sorted(prefork)
        if prefork[t].status == "failed" and t in adaptive and adaptive[t].status == "passed"
    ]


def _counts(outcomes: dict[str, Outcome], file: str) -> str:
    tally = {o: 0 for o in OUTCOMES}
    for outcome in outcomes.values():
        if outcome.file == file:
            tally[outcome.status] += 1
    return "/".join(str(tally[o]) for o in OUTCOMES)


def render(results: Results, markdown: bool = False) -> str:
    lines: list[str] = []
    pools = results.pools()
    header = ["file", "broker layout", *(f"{p} pass/fail/skip" for p in pools)]
    rows: list[list[str]] = []
    for layout in results.layouts:
        files = sorted({o.file for p in pools for o in results.outcomes(layout, p).values()})
        for file in files:
            rows.append([file, layout, *(_counts(results.outcomes(layout, p), file) for p in pools)])
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    bullet = "- " if markdown else "  "
    for layout in results.layouts:
        found = regressions(results, layout)
        title = "pass on prefork, fail on adaptive" if results.outcomes(layout, PREFORK) else "fail on adaptive"
        lines += ["", f"{layout}: {title} ({len(found)}):"]
        lines += [f"{bullet}{o.test}: {o.message}" for o, _ in found] or [f"{bullet}(none)"]
        shared = both_fail(results, layout)
        if shared:
            lines += ["", f"{layout}: fail on both ({len(shared)}):"]
            for prefork, adaptive in shared:
                same = prefork.message == adaptive.message
                detail = prefork.message if same else f"prefork: {prefork.message} | adaptive: {adaptive.message}"
                lines.append(f"{bullet}{prefork.test}: {detail}")
        only_prefork = prefork_only_failures(results, layout)
        if only_prefork:
            lines += ["", f"{layout}: fail on prefork only ({len(only_prefork)}):"]
            lines += [f"{bullet}{o.test}: {o.message}" for o in only_prefork]
    if results.missing:
        lines += ["", "runs that left no results (timed out or crashed):"]
        lines += [f"{bullet}{m}" for m in results.missing]
    return "\n".join(lines)


def exit_status(results: Results) -> int:
    if results.missing:
        return 2
    return 1 if any(regressions(results, layout) for layout in results.layouts) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    results = load(args.directory)
    if not results.by_run and not results.runs:
        print(f"no results in {args.directory}")
        return 2
    print(render(results, markdown=args.markdown))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
