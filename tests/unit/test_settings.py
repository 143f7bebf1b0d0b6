from __future__ import annotations

import pytest

from celery_adaptive.errors import SettingsError
from celery_adaptive.settings import build_settings, describe_settings, unhonoured_settings

BASE = {"limit": 2, "forking_enable": True}


def test_defaults():
    s = build_settings({}, BASE)
    assert (s.concurrency, s.min_children, s.max_children) == (2, 2, 2)
    assert s.start_method == "fork" and s.dispatch_window == 1
    assert s.cpu_placement.describe() == "spread"
    assert s.soft_time_limit is None and s.hard_time_limit is None


def test_operator_facing_defaults_are_loopback_and_bounded():
    s = build_settings({}, BASE)
    assert s.metrics_prometheus_address == "127.0.0.1" and s.metrics_prometheus_port is None
    assert s.health_address == "127.0.0.1" and s.health_port is None
    assert s.health_file is None  # the default path for the worker's hostname
    assert build_settings({"adaptive_health_file": ""}, BASE).health_file == ""
    assert s.metrics_stream_max_age == 900.0 and s.metrics_stream_length == 1000


def test_celery_options_are_folded_in():
    s = build_settings({}, {**BASE, "forking_enable": False, "maxtasksperchild": 5,
                            "max_memory_per_child": 1000, "soft_timeout": 3, "timeout": 0})
    assert s.start_method == "spawn" and s.max_tasks_per_child == 5
    assert s.max_memory_per_child_kib == 1000 and s.soft_time_limit == 3.0
    assert s.hard_time_limit is None  # Celery's 0 means no limit


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("adaptive_cpu_placement", "fastest", "adaptive_cpu_placement"),
        ("adaptive_dispatch_window", 0, "must be >= 1"),
        ("adaptive_dispatch_window", "many", "expected an integer"),
        ("adaptive_long_task_threshold", -1, "must be > 0"),
        ("adaptive_short_task_reserve", -2, "must be >= 0"),
        ("adaptive_target_wait", 0, "must be > 0"),
        ("adaptive_max_utilization", 0, "fraction in (0, 1]"),
        ("adaptive_max_utilization", 1.5, "fraction in (0, 1]"),
        ("adaptive_max_utilization", "half", "fraction in (0, 1]"),
        ("adaptive_control_interval", "soon", "expected a number"),
        ("adaptive_metrics_redis_url", "http://x", "redis://"),
        ("adaptive_metrics_redis_url", "redis://host:notaport/0", "malformed"),
        ("adaptive_metrics_enabled", "maybe", "true or false"),
        ("adaptive_affinity_header", "", "non-empty"),
        ("adaptive_task_affinity", ["a"], "task name"),
        ("adaptive_min_children", -1, ">= 1"),
        ("adaptive_metrics_stream_max_age", 0, "must be > 0"),
        ("adaptive_metrics_prometheus_address", "0.0.0.0 ", "IP address or host name"),
        ("adaptive_health_port", 0, ">= 1"),
        ("adaptive_health_address", "", "IP address or host name"),
        ("adaptive_health_timeout", "never", "expected a number"),
        ("adaptive_health_file", 7, "a path"),
    ],
)
def test_bad_values_name_the_setting(name, value, fragment):
    with pytest.raises(SettingsError) as info:
        build_settings({name: value}, BASE)
    assert name in str(info.value) and fragment in str(info.value)


def test_min_above_max_is_refused():
    with pytest.raises(SettingsError, match="adaptive_min_children=5.*adaptive_max_children=3"):
        build_settings({"adaptive_min_children": 5, "adaptive_max_children": 3}, BASE)


def test_describe_lists_every_setting():
    lines = describe_settings()
    assert any(line.startswith("adaptive_cpu_placement") for line in lines)
    assert len(lines) >= 15


# -- Celery's worker settings that prefork honours ----------------------------------------------
def test_child_start_timeout_follows_worker_proc_alive_timeout():
    assert build_settings({}, BASE).child_start_timeout == 4.0  # Celery's default
    assert build_settings({"worker_proc_alive_timeout": 1.5}, BASE).child_start_timeout == 1.5


def test_explicit_adaptive_child_start_timeout_overrides_celery():
    conf = {"worker_proc_alive_timeout": 1.5, "adaptive_child_start_timeout": 30}
    assert build_settings(conf, BASE).child_start_timeout == 30.0


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_bad_proc_alive_timeout_names_the_setting(value):
    with pytest.raises(SettingsError, match="worker_proc_alive_timeout"):
        build_settings({"worker_proc_alive_timeout": value}, BASE)


def test_lost_wait_from_the_pool_option_then_the_setting():
    assert build_settings({}, BASE).lost_wait == 10.0
    assert build_settings({"worker_lost_wait": 3}, BASE).lost_wait == 3.0
    # The worker passes worker_lost_wait as lost_worker_timeout; that is what counts.
    assert build_settings({"worker_lost_wait": 3}, {**BASE, "lost_worker_timeout": 7}).lost_wait == 7.0
    # billiard reads 0 as its default; so does the pool.
    assert build_settings({}, {**BASE, "lost_worker_timeout": 0}).lost_wait == 10.0
    with pytest.raises(SettingsError, match="worker_lost_wait"):
        build_settings({"worker_lost_wait": -1}, BASE)


def test_unhonoured_settings_are_named_only_when_changed():
    from celery import Celery

    app = Celery("unhonoured", set_as_current=False)
    assert unhonoured_settings(app.conf, {}) == []
    app.conf.worker_autoscaler = "proj.scaling:MyAutoscaler"
    (warning,) = unhonoured_settings(app.conf, {"sched_strategy": "fair"})
    assert warning.startswith("worker_autoscaler='proj.scaling:MyAutoscaler' is not used")
    app.conf.worker_autoscaler = "celery.worker.autoscale:Autoscaler"
    (warning,) = unhonoured_settings(app.conf, {"sched_strategy": "fast"})
    assert warning.startswith("optimization='fast' is not used")


def test_every_unhonoured_default_is_celerys():
    from celery.app.defaults import DEFAULTS as CELERY_DEFAULTS

    from celery_adaptive.settings import CELERY_LOST_WAIT, CELERY_PROC_ALIVE_TIMEOUT, NOT_HONOURED

    for item in NOT_HONOURED:
        assert CELERY_DEFAULTS[item.name] == item.default, item.name
    assert CELERY_DEFAULTS["worker_proc_alive_timeout"] == CELERY_PROC_ALIVE_TIMEOUT
    assert CELERY_DEFAULTS["worker_lost_wait"] == CELERY_LOST_WAIT
