"""The start method on every supported Celery: passed by Celery (5.7+) or read by the pool."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_adaptive import compat
from celery_adaptive.errors import SettingsError
from celery_adaptive.settings import build_settings


def test_the_installed_celery_is_classified_by_its_settings():
    # 5.7 added worker_pool_start_method; the matrix (scripts/celery-versions.sh) runs this on
    # 5.5, 5.6 and 5.7, so a release that moves the boundary fails here first.
    assert compat.CELERY_PASSES_START_METHOD == (compat.CELERY_VERSION[:2] >= (5, 7))


@pytest.mark.parametrize("conf", [{}, {"worker_pool_start_method": "spawn"}])
def test_where_celery_passes_it_forking_enable_decides(conf):
    # Celery 5.7 folds the setting and --pool-start-method into forking_enable.
    assert compat.pool_start_method(conf, True, celery_passes_it=True) == "fork"
    assert compat.pool_start_method(conf, False, celery_passes_it=True) == "spawn"


@pytest.mark.parametrize(
    ("conf", "expected"),
    [({}, "fork"), ({"worker_pool_start_method": None}, "fork"),
     ({"worker_pool_start_method": "fork"}, "fork"), ({"worker_pool_start_method": "spawn"}, "spawn")],
)
def test_before_5_7_the_pool_reads_the_setting(conf, expected):
    # Celery 5.5/5.6 always pass forking_enable=True.
    assert compat.pool_start_method(conf, True, celery_passes_it=False) == expected


def test_before_5_7_an_explicit_forking_enable_false_still_means_spawn():
    conf = {"worker_pool_start_method": "fork"}
    assert compat.pool_start_method(conf, False, celery_passes_it=False) == "spawn"


@pytest.mark.parametrize("value", ["forkserver", "SPAWN", ""])
def test_before_5_7_a_bad_value_names_the_setting_and_the_release(value):
    with pytest.raises(SettingsError) as info:
        compat.pool_start_method({"worker_pool_start_method": value}, True, celery_passes_it=False)
    message = str(info.value)
    assert f"worker_pool_start_method={value!r}" in message
    assert "must be 'fork' or 'spawn'" in message and compat.celery_version() in message


def test_app_conf_hands_back_the_setting_on_the_installed_celery():
    # Before 5.7 the key is unknown to Celery; its configuration must still return it, and
    # the settings object carries what the pool read.
    app = Celery("compat-test", set_as_current=False)
    app.conf.update(worker_pool_start_method="spawn")
    assert compat.pool_start_method(app.conf, True, celery_passes_it=False) == "spawn"
    if not compat.CELERY_PASSES_START_METHOD:
        assert build_settings(app.conf, {"limit": 1, "forking_enable": True}).start_method == "spawn"
