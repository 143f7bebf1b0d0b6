"""The parent-child protocol: small frozen messages over a duplex pipe.

parent -> child:  RunJob, StopChild
child -> parent:  ChildReady, JobAccepted, JobFinished, ChildExiting

Every message carries the protocol version; `decode` refuses anything else, so a child that
writes garbage is detected (and replaced) instead of confusing the parent.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_adaptive.errors import ProtocolError

PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class RunJob:
    job_id: int
    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # The job's soft time limit, so the child can tell a timely SIGUSR1 from a late one.
    soft_limit: float | None = None
    version: int = field(default=PROTOCOL_VERSION)


@dataclass(frozen=True)
class StopChild:
    """Finish what you hold, then exit cleanly."""

    reason: str
    version: int = field(default=PROTOCOL_VERSION)


@dataclass(frozen=True)
class ChildReady:
    pid: int
    cpu: int | None
    version: int = field(default=PROTOCOL_VERSION)


@dataclass(frozen=True)
class JobAccepted:
    job_id: int
    pid: int
    started_at: float  # time.monotonic() in the child: CLOCK_MONOTONIC is system-wide on Linux
    version: int = field(default=PROTOCOL_VERSION)


@dataclass(frozen=True)
class JobFinished:
    """``ok``: value is what the target returned. Otherwise value is an ExceptionInfo for a
    failure outside the task (an exception escaping the target, an unpicklable result)."""

    job_id: int
    ok: bool
    value: Any
    runtime: float
    version: int = field(default=PROTOCOL_VERSION)


@dataclass(frozen=True)
class ChildExiting:
    """Sent before a planned exit, so the parent does not mistake it for a crash."""

    pid: int
    reason: str  # "max-tasks", "max-memory", "stop"
    detail: str = ""
    version: int = field(default=PROTOCOL_VERSION)


ParentMessage = RunJob | StopChild
ChildMessage = ChildReady | JobAccepted | JobFinished | ChildExiting
_KNOWN = (RunJob, StopChild, ChildReady, JobAccepted, JobFinished, ChildExiting)


def encode(message: ParentMessage | ChildMessage) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> ParentMessage | ChildMessage:
    try:
        message = pickle.loads(data)
    except Exception as exc:
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {exc!r}") from exc
    if not isinstance(message, _KNOWN):
        raise ProtocolError(f"not a protocol message: {type(message).__name__}")
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {message.version}, expected {PROTOCOL_VERSION}")
    return message
