"""Command-line entry points.

Two jobs:

1. Make ``celery worker -P celery_adaptive:Pool`` (and ``-P adaptive``) valid on stock Celery.
   The ``celery`` command loads every ``celery.commands`` entry point while it is being imported,
   after ``celery.bin.worker`` has built its ``-P`` choice list and before click parses argv
   (see docs/celery-pool-contract.md, section 1). Importing this module adds our names to
   that list. If a future Celery changes the internals, the patch is skipped with a debug log
   and ``worker_pool = "celery_adaptive:Pool"`` / ``-P custom`` keep working.
2. The ``celery adaptive ...`` subcommands and the ``celery-adaptive`` script.
"""

from __future__ import annotations

import logging
from typing import Any

import click

POOL_PATH = "celery_adaptive:Pool"
POOL_ALIAS = "adaptive"

logger = logging.getLogger(__name__)


def register_pool_choice() -> bool:
    """Add this pool to Celery's ``-P`` choices and aliases. Idempotent; True if it applied."""
    try:
        from celery import concurrency
        from celery.bin import worker as worker_cmd
    except ImportError:  # pragma: no cover - celery is a hard dependency
        return False
    aliases = getattr(concurrency, "ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault(POOL_ALIAS, POOL_PATH)
    choice = getattr(worker_cmd, "WORKERS_POOL", None)
    choices = getattr(choice, "choices", None)
    if choice is None or choices is None:
        logger.debug("celery.bin.worker.WORKERS_POOL not found; -P %s unavailable", POOL_PATH)
        return False
    current = tuple(choices)
    extra = tuple(name for name in (POOL_PATH, POOL_ALIAS) if name not in current)
    if extra:
        try:
            choice.choices = current + extra
        except (AttributeError, TypeError):
            logger.debug("could not extend -P choices", exc_info=True)
            return False
    return True


register_pool_choice()


@click.group(name="adaptive", help="celery-adaptive pool tools.")
def adaptive() -> None:
    pass


@adaptive.command(name="settings", help="List the pool's settings with defaults and meaning.")
def settings_command() -> None:
    from celery_adaptive.settings import describe_settings

    for line in describe_settings():
        click.echo(line)


# The demo's options live with it; importing it is cheap (stdlib and click only).
from celery_adaptive.demo import demo_command  # noqa: E402

adaptive.add_command(demo_command)

# `celery adaptive top`: cheap to import too (click, json; redis only when it runs).
from celery_adaptive.metrics.top import top_command  # noqa: E402

adaptive.add_command(top_command)


def main(argv: list[str] | None = None) -> Any:
    """The ``celery-adaptive`` script: the same group as ``celery adaptive``."""
    return adaptive.main(args=argv, prog_name="celery-adaptive")
