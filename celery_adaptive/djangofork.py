"""Django: the parent's database connections and connection pools are closed before a fork.

Celery's Django fixup (``celery/fixups/django.py``) keeps forked children from sharing the
parent's database sockets: at ``worker_init`` it closes the parent's connections, in each child
at ``worker_process_init`` it drops inherited ones, and around every task it closes again. Since
Celery 5.6.3 it also closes psycopg connection pools (Django 5.1+ ``OPTIONS['pool']``), but
only when the worker's pool module name contains "prefork" (``DjangoWorkerFixup._is_prefork``).
This pool forks children as prefork does, so without help a pool opened in the parent (its
connections and its worker threads) would be inherited by every child.

`ForkHygiene` does, with the fixup's own functions:

- tells the fixup that this pool pre-forks (its ``_is_prefork`` answers True for this worker),
  so every close the fixup makes in the parent and in the children closes pools too, as under
  prefork;
- before each fork (the first children and every replacement), runs the fixup's
  ``_close_database`` and ``close_cache`` in the parent, so a child never inherits a connection
  or a pool the parent opened after ``worker_init`` (prefork closes only at ``worker_init``).

An app without the Django fixup (no ``DJANGO_SETTINGS_MODULE``) gets an inactive object and
pays one attribute check per fork.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("celery_adaptive")

__all__ = ["ForkHygiene", "django_worker_fixup"]


def django_worker_fixup(app: Any) -> Any | None:
    """The app's installed ``DjangoWorkerFixup``, or None (not Django, or no worker yet).

    Celery keeps each fixup instance in ``app._fixups`` (``None`` for a non-Django app); the
    worker part is made and installed by the fixup's ``worker_init`` receiver.
    """
    module = sys.modules.get("celery.fixups.django")
    if module is None:
        return None
    fixup_cls = getattr(module, "DjangoFixup", None)
    for fixup in getattr(app, "_fixups", None) or ():
        if fixup_cls is not None and isinstance(fixup, fixup_cls):
            return getattr(fixup, "_worker_fixup", None)
    return None


class ForkHygiene:
    def __init__(self, app: Any) -> None:
        self._fixup = django_worker_fixup(app)
        if self._fixup is not None and hasattr(type(self._fixup), "_is_prefork"):
            # The fixup's only test for "the pool forks children" is the pool's module name;
            # answer it for this worker. Older Celery (before 5.6.3) has no such test: 5.6.0-5.6.2
            # close pools for every pool, 5.5 never does.
            self._fixup._is_prefork = lambda: True

    @property
    def active(self) -> bool:
        return self._fixup is not None

    def before_fork(self) -> None:
        """Close the parent's Django connections, pools and caches (on the forking thread)."""
        fixup = self._fixup
        if fixup is None:
            return
        try:
            fixup._close_database()
            fixup.close_cache()
        except Exception:
            # A close that fails must not stop the pool from starting children; the fixup's
            # worker_process_init receiver still drops what the child inherits.
            logger.warning("Could not close Django connections before forking a child", exc_info=True)
