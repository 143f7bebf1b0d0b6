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


class LazyGroup(click.Group):
    """A group whose subcommands are imported when they run (or when ``--help`` lists them).

    The ``celery`` command imports this module for every subcommand (``celery inspect``,
    ``celery worker``, ...); the demo alone is ~1,000 lines, so nothing behind a subcommand is
    imported until that subcommand is asked for.
    """

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy  # name -> "module:attribute" of a click.Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, _, attribute = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    name="adaptive",
    cls=LazyGroup,
    help="celery-adaptive pool tools.",
    lazy={
        "demo": "celery_adaptive.demo:demo_command",
        "top": "celery_adaptive.metrics.top:top_command",
        "health": "celery_adaptive.health.command:health_command",
    },
)
def adaptive() -> None:
    pass


@adaptive.command(name="settings", help="List the pool's settings with defaults and meaning.")
def settings_command() -> None:
    from celery_adaptive.settings import describe_settings

    for line in describe_settings():
        click.echo(line)


def main(argv: list[str] | None = None) -> Any:
    """The ``celery-adaptive`` script: the same group as ``celery adaptive``."""
    return adaptive.main(args=argv, prog_name="celery-adaptive")
