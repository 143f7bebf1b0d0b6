"""The memory guard's pure parts: sizes as written, the cgroup reader on fake trees, the
admission rule, the settings, and where the figures are published."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_adaptive.errors import SettingsError
from celery_adaptive.memory import cgroup
from celery_adaptive.memory.cgroup import SystemMemory, SystemMemorySource
from celery_adaptive.memory.policy import (
    ADMISSION_HYSTERESIS,
    Admission,
    MemoryConfig,
    Verdict,
    child_verdict,
    fits,
)
from celery_adaptive.memory.sizes import MemoryAmount, format_bytes, parse_amount
from celery_adaptive.settings import build_settings

KiB, MiB, GiB = 1024, 1024**2, 1024**3


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize(
    ("value", "size"),
    [
        (512000, 512000 * KiB),  # an int is KiB, as worker_max_memory_per_child
        ("512000", 512000 * KiB),
        ("512MiB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("1.5GB", 1_500_000_000),
        ("100 kB", 100_000),
        ("64KiB", 64 * KiB),
        ("4096B", 4096),
        (" 2 TiB ", 2 * 1024**4),
    ],
)
def test_sizes_in_every_documented_unit(value, size):
    assert parse_amount("x", value) == MemoryAmount(parse_amount("x", value).text, size=size)


def test_a_share_resolves_against_the_limit():
    amount = parse_amount("adaptive_memory_hard_limit", "80%")
    assert amount.share == 0.8 and amount.size is None
    assert amount.resolve(1000) == 800 and amount.resolve(None) is None
    assert amount.describe(GiB) == "80% = 819.2 MiB"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("512M", "ambiguous unit 'M': write MiB (binary) or MB (decimal)"),
        ("1g", "ambiguous unit 'g'"),
        ("12 parsecs", "unknown unit"),
        ("1.5", "without unit is KiB and must be an integer"),
        (1.5, "must be an integer"),
        (0, "must be > 0"),
        (-5, "must be > 0"),
        ("0%", "share must be in (0%, 100%]"),
        ("150%", "share must be in (0%, 100%]"),
        (True, "expected a size"),
        ("lots", "expected a size"),
        ([1], "expected a size"),
    ],
)
def test_bad_sizes_name_the_setting_and_say_why(value, problem):
    with pytest.raises(SettingsError) as failure:
        parse_amount("adaptive_memory_soft_limit", value)
    assert "adaptive_memory_soft_limit" in str(failure.value) and problem in str(failure.value)


def test_format_bytes():
    assert [format_bytes(v) for v in (None, 512, 1536, 600 * MiB, 3 * GiB)] == [
        "unknown", "512 B", "1.5 KiB", "600.0 MiB", "3.0 GiB"]


# ------------------------------------------------------------------ cgroup trees
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_the_smallest_limit_on_the_way_to_the_root_binds(tmp_path):
    root = tmp_path / "cg"
    _write(root / "memory.max", "max\n")
    _write(root / "a" / "memory.max", "2147483648\n")
    _write(root / "a" / "b" / "memory.max", "max\n")
    _write(root / "a" / "b" / "memory.current", "1000\n")
    proc = tmp_path / "proc"
    proc.write_text("0::/a/b\n")
    found = cgroup.find_memory_cgroup(root, proc)
    assert found == cgroup.Cgroup(root / "a", 2)


def test_v1_under_the_hierarchy_named_in_proc_self_cgroup(tmp_path):
    root = tmp_path / "cg"
    base = root / "memory" / "docker" / "abc"
    _write(base / "memory.limit_in_bytes", "536870912\n")
    _write(base / "memory.usage_in_bytes", "300000000\n")
    _write(base / "memory.stat", "cache 5\ntotal_inactive_file 100000000\nrss 7\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    proc = tmp_path / "proc"
    proc.write_text("4:memory:/docker/abc\n0::/\n")
    found = cgroup.find_memory_cgroup(root, proc)
    assert found == cgroup.Cgroup(base, 1)
    reading = cgroup.read_cgroup(found)
    assert reading == SystemMemory(200_000_000, 536870912, f"cgroup v1 {base}")


def test_no_limit_anywhere_is_none(tmp_path):
    root = tmp_path / "cg"
    _write(root / "memory.max", "max\n")
    proc = tmp_path / "proc"
    proc.write_text("0::/\n")
    assert cgroup.find_memory_cgroup(root, proc) is None
    assert cgroup.find_memory_cgroup(tmp_path / "missing", tmp_path / "missing-proc") is None


@pytest.mark.parametrize(
    ("text", "limit"),
    [("max\n", None), ("1073741824\n", GiB), ("9223372036854771712", None), ("", None), ("x", None)],
)
def test_parse_limit(text, limit):
    assert cgroup.parse_limit(text) == limit


def test_an_explicit_directory_is_read_as_it_changes(tmp_path):
    _write(tmp_path / "memory.max", "1000000\n")
    _write(tmp_path / "memory.current", "500000\n")
    source = SystemMemorySource.from_setting(str(tmp_path))
    assert source.read() == SystemMemory(500000, 1000000, f"cgroup v2 {tmp_path}")
    (tmp_path / "memory.current").write_text("900000\n")
    (tmp_path / "memory.stat").write_text("inactive_file 100000\nanon 5\n")
    assert source.read() == SystemMemory(800000, 1000000, f"cgroup v2 {tmp_path}")
    (tmp_path / "memory.current").write_text("")  # caught mid-write: no reading, not a wrong one
    assert source.read() is None
    # Without a limit of its own, the host's memory is the limit.
    (tmp_path / "memory.stat").unlink()
    (tmp_path / "memory.current").write_text("5\n")
    (tmp_path / "memory.max").write_text("max\n")
    reading = source.read()
    assert reading is not None and reading.used == 5 and reading.limit > 1000000


def test_a_directory_that_appears_later_is_found(tmp_path):
    where = tmp_path / "later"
    source = SystemMemorySource.from_setting(str(where))
    assert source.read() is None
    _write(where / "memory.limit_in_bytes", "1000\n")
    _write(where / "memory.usage_in_bytes", "10\n")
    assert source.read() == SystemMemory(10, 1000, f"cgroup v1 {where}")


def test_host_reading():
    source = SystemMemorySource.from_setting("host")
    reading = source.read()
    assert reading is not None and reading.source == "host" and 0 < reading.used < reading.limit
    assert source.total() == reading.limit


# ------------------------------------------------------------------ the rules
def test_child_verdicts():
    config = MemoryConfig(interval=0.25, soft_limit=100, hard_limit=200)
    assert [child_verdict(config, rss) for rss in (100, 101, 200, 201)] == [
        Verdict.OK, Verdict.SOFT, Verdict.SOFT, Verdict.HARD]
    assert child_verdict(MemoryConfig(interval=0.25), 10**12) is Verdict.OK


def test_admission_with_hysteresis_and_a_size_threshold():
    admission = Admission(parse_amount("t", "800MiB"))
    limit = 1000 * MiB
    assert admission.update(SystemMemory(799 * MiB, limit, "host"), 0.0) is None
    assert admission.update(SystemMemory(800 * MiB, limit, "host"), 1.0) == "paused"
    assert admission.update(SystemMemory(900 * MiB, limit, "host"), 2.0) is None
    just_below = 800 * MiB - int(ADMISSION_HYSTERESIS * limit)
    assert admission.update(SystemMemory(just_below, limit, "host"), 3.0) is None
    assert admission.update(SystemMemory(just_below - 1, limit, "host"), 4.0) == "resumed"
    assert admission.pauses == 1 and admission.paused_seconds(10.0) == 3.0


def test_no_threshold_never_pauses():
    admission = Admission(None)
    assert admission.update(SystemMemory(10**12, 10**12, "host"), 0.0) is None and admission.open


def test_fits():
    assert fits(200, 500, 200, 900) and not fits(201, 500, 200, 900)


# ------------------------------------------------------------------ settings
def test_memory_settings_defaults_and_values():
    settings = build_settings({}, {})
    assert settings.memory_interval == 0.25 and settings.memory_hard_limit is None
    assert settings.memory_heavy_task.size == 64 * MiB
    settings = build_settings({
        "adaptive_memory_soft_limit": "400MiB", "adaptive_memory_hard_limit": 512000,
        "adaptive_memory_admission_threshold": "90%", "adaptive_task_memory": {"t.big": "1GiB"},
        "adaptive_memory_cgroup": "host",
    }, {})
    assert settings.memory_soft_limit is not None and settings.memory_soft_limit.size == 400 * MiB
    assert settings.memory_hard_limit is not None and settings.memory_hard_limit.size == 500 * MiB
    assert settings.memory_admission_threshold is not None and settings.memory_admission_threshold.share == 0.9
    assert settings.task_memory == {"t.big": GiB} and settings.memory_cgroup == "host"


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"adaptive_memory_soft_limit": "600MiB", "adaptive_memory_hard_limit": "512MiB"},
         "adaptive_memory_soft_limit"),
        ({"adaptive_memory_soft_limit": "90%", "adaptive_memory_hard_limit": "80%"},
         "adaptive_memory_soft_limit"),
        ({"adaptive_memory_interval": 0, "adaptive_memory_hard_limit": "1GiB"}, "adaptive_memory_interval"),
        ({"adaptive_memory_interval": -1}, "adaptive_memory_interval"),
        ({"adaptive_memory_hard_limit": "1G"}, "adaptive_memory_hard_limit"),
        ({"adaptive_task_memory": {"t": "50%"}}, "adaptive_task_memory['t']"),
        ({"adaptive_task_memory": ["t"]}, "adaptive_task_memory"),
        ({"adaptive_memory_cgroup": 5}, "adaptive_memory_cgroup"),
        ({"adaptive_memory_heavy_task": "big"}, "adaptive_memory_heavy_task"),
    ],
)
def test_bad_memory_settings_fail_at_start_naming_the_setting(conf, named):
    with pytest.raises(SettingsError) as failure:
        build_settings(conf, {})
    assert str(failure.value).startswith(f"invalid {named}=")


# ------------------------------------------------------------------ autoscaler and metrics
def test_the_autoscaler_holds_instead_of_growing_under_memory_pressure():
    from celery_adaptive.autoscaler import AdaptiveAutoscaler

    settings = build_settings({"adaptive_min_children": 1, "adaptive_max_children": 8}, {})
    sizes = [1]
    pressure: list[str | None] = ["memory in use 95% is over adaptive_memory_admission_threshold 90%"]
    scaler = AdaptiveAutoscaler(settings, resize_to=lambda target, reason: sizes.append(target),
                                current=lambda: sizes[-1], pool_backlog=lambda: 50,
                                memory_pressure=lambda: pressure[0])
    for i in range(6):
        scaler.record_arrival(100.0 + i * 0.01, "io")
        scaler.record_completion(100.0 + i * 0.01, "io", 0.2)
    decision = scaler.tick(100.1)
    assert decision.direction == "hold" and sizes == [1]
    assert "adaptive_memory_admission_threshold" in decision.reason and "would be up 1->" in decision.reason
    assert scaler.state()["last-tick"]["reason"] == decision.reason
    pressure[0] = None
    assert scaler.tick(100.2).direction == "up" and sizes[-1] > 1


def _snapshot(memory: dict | None, counters: dict | None = None):
    from celery_adaptive.metrics.snapshot import Aggregator, ChildReading, PoolReading

    reading = PoolReading(
        at=10.0, wall=1000.0, hostname="w@h", target=1, min_children=1, max_children=1,
        counters=counters or {}, scheduler={}, queued=2, in_flight=1, completed=0,
        children=(ChildReading(1, 4242, 0, None, "busy", 0.0, 3, 1.0, 0, 0, "t.big", 1.0,
                               uss_bytes=50 * MiB, pss_bytes=60 * MiB),),
        memory=memory,
    )
    return Aggregator(2.0).aggregate(reading)


MEMORY_VIEW = {"admission": "paused", "pauses": 2, "paused_s": 1.5, "held": 1, "reserved_bytes": 0,
               "heavy_task_bytes": 64 * MiB, "tasks": {"t.big": 200 * MiB}, "used_bytes": 900,
               "limit_bytes": 1000, "source": "host", "threshold_bytes": 800,
               "paused_reason": "over"}


def test_the_snapshot_carries_memory_and_unmeasured_memory_is_absent():
    snapshot = _snapshot(MEMORY_VIEW)
    data = snapshot.to_dict()
    assert data["memory"]["admission"] == "paused" and data["memory"]["tasks"] == {"t.big": 200 * MiB}
    assert data["children"][0]["uss_bytes"] == 50 * MiB
    summary = snapshot.summary()
    assert summary["memory_admission"] == "paused" and summary["memory_held"] == 1
    bare = _snapshot(None).to_dict()
    assert "memory" not in bare
    assert "memory_admission" not in _snapshot(None).summary()


def test_prometheus_memory_families():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.utils import floatToGoString

    from celery_adaptive.metrics.prometheus import _Collector
    from tests.promlint import lint

    counters = {"memory_soft_limit": 3, "memory_hard_limit": 1, "memory_stopped_tasks": 1}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: _snapshot(MEMORY_VIEW, counters)))
    text = generate_latest(registry).decode()
    for line in (
        'celery_adaptive_memory_admission_paused{hostname="w@h"} 1.0',
        'celery_adaptive_memory_admission_pauses_total{hostname="w@h"} 2.0',
        'celery_adaptive_memory_admission_paused_seconds_total{hostname="w@h"} 1.5',
        'celery_adaptive_memory_limit_hits_total{hostname="w@h",limit="hard"} 1.0',
        'celery_adaptive_memory_limit_hits_total{hostname="w@h",limit="soft"} 3.0',
        'celery_adaptive_memory_stopped_tasks_total{hostname="w@h"} 1.0',
        'celery_adaptive_memory_used_bytes{hostname="w@h"} 900.0',
        'celery_adaptive_memory_limit_bytes{hostname="w@h"} 1000.0',
        'celery_adaptive_memory_admission_threshold_bytes{hostname="w@h"} 800.0',
        'celery_adaptive_memory_held_tasks{hostname="w@h"} 1.0',
        f'celery_adaptive_task_memory_growth_bytes{{hostname="w@h",name="t.big"}} {floatToGoString(200 * MiB)}',
        f'celery_adaptive_process_unique_memory_bytes{{hostname="w@h",slot="0"}} {floatToGoString(50 * MiB)}',
        f'celery_adaptive_process_proportional_memory_bytes{{hostname="w@h",slot="0"}} {floatToGoString(60 * MiB)}',
    ):
        assert line in text, line
    # Operator conventions (base units, _total counters, a slot label and never a pid).
    assert lint(text) == []
    assert "pid=" not in text and "worker=" not in text
    bare = CollectorRegistry(auto_describe=False)
    bare.register(_Collector(lambda: _snapshot(None)))
    assert "memory_admission" not in generate_latest(bare).decode()


def test_the_memory_event_refuses_reserved_field_names():
    from celery_adaptive.metrics.events import send_memory_event

    sent: list[tuple] = []

    class Dispatcher:
        enabled = True

        def send(self, type_: str, **fields: object) -> None:
            sent.append((type_, fields))

    class Consumer:
        event_dispatcher = Dispatcher()

    assert send_memory_event(Consumer(), "hard-limit", {"child_pid": 5, "rss_bytes": 9})
    assert sent == [("worker-adaptive-memory", {"kind": "hard-limit", "child_pid": 5, "rss_bytes": 9})]
    with pytest.raises(ValueError):
        send_memory_event(Consumer(), "hard-limit", {"pid": 5})
    assert not send_memory_event(None, "hard-limit", {})
