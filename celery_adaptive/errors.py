"""Exceptions of celery-adaptive (Celery's own, like WorkerLostError, are reused as they are)."""

from __future__ import annotations


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
