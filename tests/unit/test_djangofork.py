"""The Django fork hygiene costs nothing and does nothing for an app without Django."""

from __future__ import annotations


def test_fork_hygiene_is_inactive_without_django():
    from celery import Celery

    from celery_adaptive.djangofork import ForkHygiene

    hygiene = ForkHygiene(Celery("no-django", set_as_current=False))
    assert not hygiene.active
    hygiene.before_fork()  # nothing to close, nothing raised
