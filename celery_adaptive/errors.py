"""Exceptions of celery-adaptive (Celery's own, like WorkerLostError, are reused as they are)."""

from __future__ import annotations

from billiard.exceptions import WorkerLostError


class AdaptivePoolError(Exception):
    """Base class of this package's errors."""


class SettingsError(AdaptivePoolError, ValueError):
    """A setting has a value the pool cannot work with. The message names the setting."""

    def __init__(self, setting: str, value: object, problem: str) -> None:
        self.setting = setting
        self.value = value
        super().__init__(f"invalid {setting}={value!r}: {problem}")


class ProtocolError(AdaptivePoolError):
    """A child sent something that is not a message of the parent-child protocol."""


class MemoryLimitExceeded(WorkerLostError, AdaptivePoolError):
    """A task's child went over ``adaptive_memory_hard_limit`` and was stopped.

    A `WorkerLostError` (Celery's, which is billiard's), so a task with ``acks_late`` and
    ``task_reject_on_worker_lost`` is requeued exactly as after any lost child. The message
    names the limit and the measured RSS; it is the only argument, so a result backend can
    rebuild the exception from what it stored.
    """

    def __init__(self, message: str, rss: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.rss = rss
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.rss, self.limit))
