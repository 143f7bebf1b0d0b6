"""CPU placement: pure planning on synthetic topologies, plus the thin sysfs/affinity I/O."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_adaptive.errors import SettingsError
from celery_adaptive.placement import (
    LogicalCpu,
    PlacementError,
    PlacementPolicy,
    allowed_cpus,
    format_cpu_list,
    parse_policy,
    pin_current_process,
    plan_cpu,
    plan_order,
    read_topology,
)

SPREAD = PlacementPolicy("spread")
COMPACT = PlacementPolicy("compact")
NONE = PlacementPolicy("none")


def topology(numbering: str) -> list[LogicalCpu]:
    """2 packages x 2 cores x 2 threads.

    "adjacent": siblings are neighbours (cpu0/1 share a core), as on many AMD machines.
    "linux": first threads of every core come first (cpu0/4 share a core), as on most Intel.
    """
    cpus = []
    for package in range(2):
        for core in range(2):
            for thread in range(2):
                if numbering == "adjacent":
                    cpu = package * 4 + core * 2 + thread
                else:
                    cpu = thread * 4 + package * 2 + core
                cpus.append(LogicalCpu(cpu=cpu, core=core, package=package))
    return sorted(cpus, key=lambda lc: lc.cpu)


ADJACENT = topology("adjacent")
LINUX = topology("linux")
ALL8 = frozenset(range(8))


def core_of(topo: list[LogicalCpu], cpu: int) -> tuple[int, int]:
    lc = next(lc for lc in topo if lc.cpu == cpu)
    return (lc.package, lc.core)


# --- spread --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topo", "expected"),
    [
        (ADJACENT, [0, 4, 2, 6, 1, 5, 3, 7]),
        (LINUX, [0, 2, 1, 3, 4, 6, 5, 7]),
    ],
)
def test_spread_order_alternates_packages_then_adds_siblings(
    topo: list[LogicalCpu], expected: list[int]
) -> None:
    assert plan_order(SPREAD, topo, ALL8) == expected


@pytest.mark.parametrize("topo", [ADJACENT, LINUX])
def test_spread_uses_every_physical_core_before_any_sibling(topo: list[LogicalCpu]) -> None:
    order = plan_order(SPREAD, topo, ALL8)
    first = [core_of(topo, cpu) for cpu in order[:4]]
    assert len(set(first)) == 4
    assert [p for p, _ in first] == [0, 1, 0, 1]


def test_spread_in_restricted_cpuset() -> None:
    # A container cpuset {2,3,5}: 2 and 3 are siblings on package 0, 5 is alone on package 1.
    assert plan_order(SPREAD, ADJACENT, {2, 3, 5}) == [2, 5, 3]
    assert [plan_cpu(SPREAD, ADJACENT, {2, 3, 5}, slot) for slot in range(4)] == [2, 5, 3, 2]


def test_spread_is_default() -> None:
    assert parse_policy(None) == SPREAD
    assert PlacementPolicy() == SPREAD


# --- compact -------------------------------------------------------------------------------------


def test_compact_keeps_siblings_together() -> None:
    assert plan_order(COMPACT, ADJACENT, ALL8) == list(range(8))
    assert plan_order(COMPACT, LINUX, ALL8) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert plan_order(COMPACT, ADJACENT, {5, 2, 3}) == [2, 3, 5]


@pytest.mark.parametrize("policy", [SPREAD, COMPACT])
def test_wraps_around_when_more_children_than_cpus(policy: PlacementPolicy) -> None:
    order = plan_order(policy, LINUX, ALL8)
    assert [plan_cpu(policy, LINUX, ALL8, slot) for slot in range(20)] == (order * 3)[:20]


# --- none and edge cases -------------------------------------------------------------------------


def test_none_never_pins() -> None:
    assert plan_order(NONE, LINUX, ALL8) == []
    assert plan_cpu(NONE, LINUX, ALL8, 0) is None
    assert plan_cpu(NONE, LINUX, ALL8, 7) is None


def test_empty_allowed_set_means_no_pinning() -> None:
    assert plan_cpu(SPREAD, LINUX, frozenset(), 0) is None


def test_allowed_cpus_missing_from_topology_are_their_own_cores() -> None:
    topo = [LogicalCpu(0, 0, 0), LogicalCpu(1, 0, 0)]  # one core with two threads
    assert plan_order(SPREAD, topo, {0, 1, 9}) == [0, 9, 1]
    assert plan_order(COMPACT, topo, {0, 1, 9}) == [0, 1, 9]


def test_negative_slot_is_rejected() -> None:
    with pytest.raises(ValueError, match="slot"):
        plan_cpu(SPREAD, LINUX, ALL8, -1)


# --- explicit lists ------------------------------------------------------------------------------


def test_explicit_list_maps_slots_in_given_order() -> None:
    policy = parse_policy([3, 0, 2])
    assert plan_order(policy, LINUX, ALL8) == [3, 0, 2]
    assert [plan_cpu(policy, LINUX, ALL8, slot) for slot in range(5)] == [3, 0, 2, 3, 0]


def test_explicit_cpus_outside_allowed_set_name_setting_cpus_and_allowed() -> None:
    policy = parse_policy("0,2-3")
    with pytest.raises(PlacementError) as info:
        plan_cpu(policy, ADJACENT, {2, 3, 5}, 0)
    message = str(info.value)
    assert "adaptive_cpu_placement" in message
    assert "CPUs 0 are not" in message
    assert "2-3,5" in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, SettingsError)
    assert info.value.setting == "adaptive_cpu_placement"


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("spread", SPREAD),
        (" Compact ", COMPACT),
        ("NONE", NONE),
        ("0,2-3", PlacementPolicy("explicit", (0, 2, 3))),
        (" 4 , 0 - 1 ", PlacementPolicy("explicit", (4, 0, 1))),
        ("7", PlacementPolicy("explicit", (7,))),
        ([0, 2, 3], PlacementPolicy("explicit", (0, 2, 3))),
        ((1,), PlacementPolicy("explicit", (1,))),
        (COMPACT, COMPACT),
    ],
)
def test_parse_policy(value: Any, expected: PlacementPolicy) -> None:
    assert parse_policy(value) == expected


@pytest.mark.parametrize(
    "value", ["fast", "", "3-1", "0,,2", "0-", "a-b", "-1", "1.5", [], [True], [-1], ["0"], 3]
)
def test_parse_policy_rejects_bad_values_naming_the_setting(value: Any) -> None:
    with pytest.raises(PlacementError, match="adaptive_cpu_placement"):
        parse_policy(value)


def test_policy_kind_is_validated() -> None:
    with pytest.raises(PlacementError, match="adaptive_cpu_placement"):
        PlacementPolicy("fastest")  # type: ignore[arg-type]
    with pytest.raises(PlacementError):
        PlacementPolicy("spread", (1,))


def test_describe() -> None:
    assert SPREAD.describe() == "spread"
    assert parse_policy([0, 2, 3, 1]).describe() == "0,2-3,1"
    assert format_cpu_list([]) == ""


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=30))
def test_describe_round_trips_through_parse(cpus: list[int]) -> None:
    policy = parse_policy(cpus)
    assert parse_policy(policy.describe()) == policy


# --- properties ----------------------------------------------------------------------------------


@st.composite
def machines(draw: st.DrawFn) -> tuple[list[LogicalCpu], frozenset[int]]:
    """A random topology and an allowed set, which may include CPUs the topology lacks."""
    n = draw(st.integers(min_value=1, max_value=24))
    topo = [
        LogicalCpu(
            cpu,
            draw(st.integers(min_value=0, max_value=5)),
            draw(st.integers(min_value=0, max_value=2)),
        )
        for cpu in range(n)
    ]
    allowed = draw(st.frozensets(st.integers(min_value=0, max_value=n + 3), min_size=1))
    return topo, allowed


@given(machines(), st.sampled_from([SPREAD, COMPACT, NONE]), st.integers(0, 200))
def test_planned_cpu_is_always_allowed(
    machine: tuple[list[LogicalCpu], frozenset[int]], policy: PlacementPolicy, slot: int
) -> None:
    topo, allowed = machine
    cpu = plan_cpu(policy, topo, allowed, slot)
    assert cpu is None if policy == NONE else cpu in allowed


@given(machines(), st.sampled_from([SPREAD, COMPACT]))
def test_order_is_a_permutation_of_allowed(
    machine: tuple[list[LogicalCpu], frozenset[int]], policy: PlacementPolicy
) -> None:
    topo, allowed = machine
    order = plan_order(policy, topo, allowed)
    assert sorted(order) == sorted(allowed)


@given(machines())
def test_spread_covers_distinct_cores_first(
    machine: tuple[list[LogicalCpu], frozenset[int]],
) -> None:
    topo, allowed = machine
    known = {lc.cpu: (lc.package, lc.core) for lc in topo}
    core = {cpu: known.get(cpu, (-1, cpu)) for cpu in allowed}
    n_cores = len(set(core.values()))
    order = plan_order(SPREAD, topo, allowed)
    assert len({core[cpu] for cpu in order[:n_cores]}) == n_cores


@given(machines(), st.lists(st.integers(0, 30), min_size=1, max_size=8), st.integers(0, 50))
def test_explicit_plan_is_allowed_or_raises(
    machine: tuple[list[LogicalCpu], frozenset[int]], cpus: list[int], slot: int
) -> None:
    topo, allowed = machine
    policy = parse_policy(cpus)
    if set(cpus) <= allowed:
        assert plan_cpu(policy, topo, allowed, slot) == cpus[slot % len(cpus)]
    else:
        with pytest.raises(PlacementError, match="adaptive_cpu_placement"):
            plan_cpu(policy, topo, allowed, slot)


# --- I/O: sysfs ----------------------------------------------------------------------------------


def write_fake_sysfs(root: Path, cpus: list[LogicalCpu]) -> None:
    for lc in cpus:
        topo_dir = root / f"cpu{lc.cpu}" / "topology"
        topo_dir.mkdir(parents=True)
        (topo_dir / "core_id").write_text(f"{lc.core}\n")
        (topo_dir / "physical_package_id").write_text(f"{lc.package}\n")


def test_read_topology_from_sysfs(tmp_path: Path) -> None:
    write_fake_sysfs(tmp_path, LINUX)
    (tmp_path / "cpufreq").mkdir()  # sibling entries that are not CPUs are ignored
    (tmp_path / "cpuidle").mkdir()
    (tmp_path / "cpu9").mkdir()  # offline CPU without topology files
    assert read_topology(tmp_path) == LINUX


def test_read_topology_without_sysfs_gives_one_core_per_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert read_topology(tmp_path / "missing") == [
        LogicalCpu(0, 0, 0),
        LogicalCpu(1, 1, 0),
        LogicalCpu(2, 2, 0),
    ]


def test_read_real_topology_covers_allowed_cpus() -> None:
    topo = read_topology()
    assert topo
    assert len({lc.cpu for lc in topo}) == len(topo)
    # Every allowed CPU gets planned, whatever this machine looks like.
    assert sorted(plan_order(SPREAD, topo, allowed_cpus())) == sorted(allowed_cpus())


# --- I/O: affinity -------------------------------------------------------------------------------


def test_allowed_cpus_matches_affinity() -> None:
    allowed = allowed_cpus()
    assert allowed
    if hasattr(os, "sched_getaffinity"):
        assert allowed == frozenset(os.sched_getaffinity(0))


def test_allowed_cpus_fallback_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert allowed_cpus() == frozenset(range(4))


def test_pin_none_does_nothing() -> None:
    assert pin_current_process(None) is None


def test_pin_without_sched_setaffinity_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    assert pin_current_process(0) is None


needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs sched_setaffinity and the fork start method",
)


def _pin_and_report(cpu: int, conn: Any) -> None:
    try:
        pinned = pin_current_process(cpu)
        conn.send((pinned, sorted(os.sched_getaffinity(0))))
    finally:
        conn.close()


def run_in_child(target: Callable[[int, Any], None], cpu: int) -> tuple[int | None, list[int]]:
    """Run ``target`` in a forked child so the test process's own affinity is never changed."""
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(cpu, child_conn))
    proc.start()
    child_conn.close()
    try:
        assert parent_conn.poll(30), "child did not report"
        result: tuple[int | None, list[int]] = parent_conn.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
    assert proc.exitcode == 0
    return result


@needs_affinity
def test_pin_real_child_process() -> None:
    before = allowed_cpus()
    cpu = plan_cpu(SPREAD, read_topology(), before, len(before) - 1)
    assert cpu is not None
    pinned, affinity = run_in_child(_pin_and_report, cpu)
    assert pinned == cpu
    assert affinity == [cpu]
    assert allowed_cpus() == before  # the parent is untouched


@needs_affinity
def test_pin_to_cpu_outside_allowed_set_returns_none_in_child() -> None:
    before = sorted(allowed_cpus())
    pinned, affinity = run_in_child(_pin_and_report, 100_000)
    assert pinned is None
    assert affinity == before
