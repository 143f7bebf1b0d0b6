"""A job: one ``apply_async`` call, from submission until its outcome is reported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Callback = Callable[..., Any]


class Job:
    """What ``Pool.apply_async`` returns (Celery keeps a weak reference to it).

    ``terminate(signum)`` is what Celery calls to revoke a job that has not started yet; the
    kill itself happens in ``terminate_job`` once the child has accepted it.
    """

    __slots__ = (
        "job_id", "target", "args", "kwargs", "callback", "error_callback", "accept_callback",
        "timeout_callback", "soft_timeout", "hard_timeout", "correlation_id", "task_name",
        "affinity_key", "submitted_at", "child_id", "pid", "accepted_at", "terminate_signal",
        "reported", "soft_timer", "hard_timer", "queue", "publish_wait", "__weakref__",
    )

    def __init__(
        self,
        job_id: int,
        target: Callback,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        callback: Callback | None,
        error_callback: Callback | None,
        accept_callback: Callback | None,
        timeout_callback: Callback | None,
        soft_timeout: float | None,
        hard_timeout: float | None,
        correlation_id: str | None,
        task_name: str,
        affinity_key: str | None,
        submitted_at: float,
    ) -> None:
        self.job_id = job_id
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.callback = callback
        self.error_callback = error_callback
        self.accept_callback = accept_callback
        self.timeout_callback = timeout_callback
        self.soft_timeout = soft_timeout
        self.hard_timeout = hard_timeout
        self.correlation_id = correlation_id
        self.task_name = task_name
        self.affinity_key = affinity_key
        self.submitted_at = submitted_at
        self.child_id: int | None = None
        self.pid: int | None = None
        self.accepted_at: float | None = None
        self.terminate_signal: int | None = None
        # True once the outcome went to Celery (a hard time limit reports before the child dies).
        self.reported = False
        self.soft_timer: Any = None
        self.hard_timer: Any = None
        #: For metrics: the message's routing key (the queue, under default routing), and the
        #: seconds from its publish (see `celery_adaptive.publish_time`) to the pool receiving it.
        self.queue: str | None = None
        self.publish_wait: float | None = None

    def terminate(self, signum: int | None = None) -> None:
        self.terminate_signal = signum

    def is_revoked(self) -> bool:
        """Ask the Celery request whether it was revoked; for a revoked one this acks the
        message and records REVOKED (docs/celery-pool-contract.md, section 2), so skipping it loses nothing."""
        request = getattr(self.callback, "__self__", None)
        revoked = getattr(request, "revoked", None)
        if revoked is None:
            return False
        return bool(revoked())

    def __repr__(self) -> str:
        return f"<Job {self.job_id} {self.task_name} {self.correlation_id}>"
