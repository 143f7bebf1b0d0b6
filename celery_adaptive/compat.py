"""What differs between the supported Celery releases (``celery>=5.5,<6``), in one place.

The pool is written against Celery 5.7. The differences that reach it:

- **Start method.** Celery 5.7 added the ``worker_pool_start_method`` setting (and
  ``--pool-start-method``): it checks the value is ``fork`` or ``spawn`` and hands the pool
  ``forking_enable=(method == "fork")``. Celery 5.5 and 5.6 know no such setting and always
  pass ``forking_enable=True``, so a spawn asked for there would silently fork. On those
  releases the pool reads ``worker_pool_start_method`` from ``app.conf`` itself (Celery's
  configuration keeps keys it does not know), so one setting means the same on every release.
  There is no command-line option before 5.7.
- **Spawned children** need nothing more: Celery 5.7's ``process_initializer`` also sets
  ``celery.app.base.USING_EXECV`` in a child that is not forked, 5.5 and 5.6 do not, and the
  child's own set-up (``FORKED_BY_MULTIPROCESSING``, the task modules imported first, see
  `celery_adaptive.child`) fills the task registry on all three (the spawn test runs on each).

Everything else the pool uses (``BasePool``, the worker and consumer attributes, the autoscaler
base class, kombu's hub and QoS, billiard's contexts, pipes and exceptions) is the same from
Celery 5.5.0 / kombu 5.5.2 / billiard 4.2.1 on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import celery
from celery.app.defaults import NAMESPACES

from celery_adaptive.errors import SettingsError

#: The installed Celery release, as numbers (``(5, 7, 0)``).
CELERY_VERSION: tuple[int, ...] = tuple(
    int(part) for part in celery.__version__.split(".")[:3] if part.isdigit()
)

#: Celery validates ``worker_pool_start_method`` and passes it as ``forking_enable`` (5.7+).
#: Detected from Celery's own list of settings rather than from the version number.
CELERY_PASSES_START_METHOD: bool = "pool_start_method" in NAMESPACES["worker"]

START_METHOD_SETTING = "worker_pool_start_method"
START_METHODS = ("fork", "spawn")


def celery_version() -> str:
    return ".".join(str(part) for part in CELERY_VERSION)


def pool_start_method(
    conf: Mapping[str, Any] | Any,
    forking_enable: bool,
    celery_passes_it: bool = CELERY_PASSES_START_METHOD,
) -> str:
    """The start method of the pool's children: ``fork`` or ``spawn``.

    Where Celery passes the setting (5.7+) its ``forking_enable`` is the answer, as it also
    reflects ``--pool-start-method``. Before 5.7 ``forking_enable`` is always True from the
    worker, so ``worker_pool_start_method`` is read from ``conf`` and checked the way 5.7 does;
    a bad value raises `SettingsError` naming the setting.
    """
    if celery_passes_it or not forking_enable:
        return "fork" if forking_enable else "spawn"
    getter = getattr(conf, "get", None)
    value = getter(START_METHOD_SETTING, None) if getter is not None else None
    if value is None:
        return "fork"
    if value not in START_METHODS:
        raise SettingsError(
            START_METHOD_SETTING, value,
            f"must be 'fork' or 'spawn' (read by celery-adaptive itself: Celery "
            f"{celery_version()} does not know this setting)",
        )
    return str(value)


__all__ = [
    "CELERY_PASSES_START_METHOD",
    "CELERY_VERSION",
    "START_METHODS",
    "START_METHOD_SETTING",
    "celery_version",
    "pool_start_method",
]
