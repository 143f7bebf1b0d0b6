"""celery-adaptive: a Celery execution pool.

Select it with ``celery -A proj worker -P celery_adaptive:Pool`` or ``worker_pool =
"celery_adaptive:Pool"``. ``Pool`` is imported lazily so that the ``celery`` command's plugin
hook (which imports this package for every subcommand) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pool", "__version__"]

if TYPE_CHECKING:
    from celery_adaptive.pool import Pool


def __getattr__(name: str) -> Any:
    if name == "Pool":
        from celery_adaptive.pool import Pool

        return Pool
    raise AttributeError(f"module 'celery_adaptive' has no attribute {name!r}")
