"""The cgroup CPU quota reader on fake /sys/fs/cgroup trees, and what the pool does with it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from celery_adaptive import cpuquota
from celery_adaptive.placement import LogicalCpu, PlacementPolicy, plan_cpu, plan_order


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2_tree(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount under tmp_path/cgroup, and a /proc/self/cgroup placing us at ``own``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in limits.items():
        _write(root / rel.lstrip("/") / "cpu.max", text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("150000 100000\n", 1.5), ("max 100000\n", None), ("200000 100000", 2.0),
     ("", None), ("garbage", None), ("0 100000", None), ("50000 0", None)],
)
def test_parse_cpu_max(text, cpus):
    assert cpuquota.parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("quota", "period", "cpus"),
    [("150000\n", "100000\n", 1.5), ("-1\n", "100000\n", None), ("x", "100000", None)],
)
def test_parse_cfs_quota(quota, period, cpus):
    assert cpuquota.parse_cfs_quota(quota, period) == cpus


def test_own_cgroups_reads_v2_and_v1_lines():
    text = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/system.slice/x.service\n"
    own = cpuquota.own_cgroups(text)
    assert own == cpuquota.OwnCgroups("/system.slice/x.service", "/docker/abc", "cpu,cpuacct")


def test_v2_quota_is_the_smallest_on_the_way_to_the_root(tmp_path):
    root, proc = _v2_tree(tmp_path, "/a/b", {
        "/": "max 100000", "/a": "150000 100000", "/a/b": "300000 100000",
    })
    assert cpuquota.read_cpu_quota(root, proc) == 1.5


def test_no_quota_anywhere_is_none(tmp_path):
    root, proc = _v2_tree(tmp_path, "/a", {"/": "max 100000", "/a": "max 100000"})
    assert cpuquota.read_cpu_quota(root, proc) is None
    assert cpuquota.read_cpu_quota(tmp_path / "absent", tmp_path / "absent-proc") is None


def test_unreadable_proc_cgroup_reads_the_mount_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "250000 100000")  # a container's namespaced view
    assert cpuquota.read_cpu_quota(root, tmp_path / "no-such-file") == 2.5


def test_v1_quota_under_the_hierarchy_named_mount_or_cpu(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpuquota.read_cpu_quota(root, proc) == 0.5
    # A host that mounts the hierarchy only as "cpu".
    other = tmp_path / "cgroup2"
    _write(other / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    _write(other / "cpu" / "docker" / "cpu.cfs_quota_us", "300000\n")
    for directory in (other / "cpu" / "docker" / "abc", other / "cpu" / "docker"):
        _write(directory / "cpu.cfs_period_us", "100000\n")
    assert cpuquota.read_cpu_quota(other, proc) == 3.0


def test_budget_caps_available_by_the_quota_rounded_up():
    assert cpuquota.cpu_budget(4, 1.5) == cpuquota.CpuBudget(2, 4, 1.5)
    assert cpuquota.cpu_budget(4, None).count == 4
    assert cpuquota.cpu_budget(2, 8.0).count == 2  # a cpuset smaller than the quota wins
    assert cpuquota.cpu_budget(4, 0.2).count == 1
    assert cpuquota.quota_cpus(1.5) == 2 and cpuquota.quota_cpus(None) is None


def test_same_answers_as_celerys_reader_on_the_same_tree(tmp_path):
    """Celery 5.7's prefork rule (celery.utils.sysinfo), run on the same fake tree."""
    sysinfo = pytest.importorskip("celery.utils.sysinfo")
    if not hasattr(sysinfo, "_min_quota"):
        pytest.skip("this Celery has no cgroup-aware 'auto' concurrency (added in 5.7)")
    root, proc = _v2_tree(tmp_path, "/k/pod/c", {
        "/k": "400000 100000", "/k/pod": "150000 100000", "/k/pod/c": "max 100000",
    })
    ours = cpuquota.read_cpu_quota(root, proc)
    theirs = sysinfo._min_quota(str(root), "/k/pod/c", sysinfo._read_v2_quota)
    assert ours == theirs == 1.5
    v1 = tmp_path / "v1"
    _write(v1 / "cpu" / "x" / "cpu.cfs_quota_us", "70000\n")
    _write(v1 / "cpu" / "x" / "cpu.cfs_period_us", "100000\n")
    own_v1 = tmp_path / "own-v1"
    own_v1.write_text("2:cpu:/x\n")
    ours = cpuquota.read_cpu_quota(v1, own_v1)
    theirs = sysinfo._min_quota(str(v1 / "cpu"), "/x", sysinfo._read_v1_quota)
    assert ours == theirs == 0.7


# -- placement under a quota: a 4-CPU host, two cores with two hyperthreads each -----------------
TOPOLOGY = [LogicalCpu(0, 0, 0), LogicalCpu(1, 1, 0), LogicalCpu(2, 0, 0), LogicalCpu(3, 1, 0)]


def test_quota_of_one_and_a_half_places_children_on_two_cpus():
    cap = cpuquota.quota_cpus(1.5)
    spread = plan_order(PlacementPolicy("spread"), TOPOLOGY, range(4), cap)
    assert spread == [0, 1]  # one per core first
    assert {plan_cpu(PlacementPolicy("spread"), TOPOLOGY, range(4), slot, cap) for slot in range(4)} == {0, 1}
    assert plan_order(PlacementPolicy("compact"), TOPOLOGY, range(4), cap) == [0, 2]  # siblings
    assert plan_order(PlacementPolicy("spread"), TOPOLOGY, range(4), None) == [0, 1, 2, 3]
    # An explicit list is the user's choice; none pins nothing.
    assert plan_order(PlacementPolicy("explicit", (0, 1, 2)), TOPOLOGY, range(4), cap) == [0, 1, 2]
    assert plan_order(PlacementPolicy("none"), TOPOLOGY, range(4), cap) == []


def test_auto_concurrency_is_resolved_for_this_pool_only():
    from celery_adaptive.pool import Pool, size_auto_concurrency

    expected = cpuquota.cpu_budget(cpuquota.available_cpus(), cpuquota.read_cpu_quota()).count
    for pool_cls in (Pool, "celery_adaptive:Pool", "celery_adaptive.pool:Pool"):
        worker = SimpleNamespace(concurrency="auto", pool_cls=pool_cls)
        size_auto_concurrency(sender=worker)
        assert worker.concurrency == expected
    other = SimpleNamespace(concurrency="auto", pool_cls="prefork")
    size_auto_concurrency(sender=other)
    assert other.concurrency == "auto"  # Celery resolves it for other pools
    explicit = SimpleNamespace(concurrency=3, pool_cls=Pool)
    size_auto_concurrency(sender=explicit)
    assert explicit.concurrency == 3


def test_auto_concurrency_matches_celerys_prefork_rule_on_this_host():
    sysinfo = pytest.importorskip("celery.utils.sysinfo")
    if not hasattr(sysinfo, "cpu_budget"):
        pytest.skip("this Celery has no 'auto' concurrency (added in 5.7)")
    ours = cpuquota.cpu_budget(cpuquota.available_cpus(), cpuquota.read_cpu_quota())
    assert ours.count == sysinfo.cpu_budget(use_cgroup_quota=True).count
