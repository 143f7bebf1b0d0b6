from __future__ import annotations

import pickle

import pytest

from celery_adaptive import protocol
from celery_adaptive.errors import ProtocolError
from celery_adaptive.protocol import (
    ChildExiting,
    ChildReady,
    JobAccepted,
    JobFinished,
    RunJob,
    StopChild,
)


def _target(x: int) -> int:
    return x


@pytest.mark.parametrize(
    "message",
    [
        RunJob(7, _target, (1, "a"), {"k": b"v"}),
        StopChild("shrink"),
        ChildReady(123, 1),
        ChildReady(123, None),
        JobAccepted(7, 123, 10.5),
        JobFinished(7, True, (0, "3", 0.01), 0.01),
        ChildExiting(123, "max-tasks", "2 tasks"),
    ],
)
def test_round_trip(message):
    assert protocol.decode(protocol.encode(message)) == message


def test_garbage_is_refused():
    with pytest.raises(ProtocolError):
        protocol.decode(b"\x00not a pickle")
    with pytest.raises(ProtocolError, match="not a protocol message"):
        protocol.decode(pickle.dumps({"job": 1}))


def test_other_version_is_refused():
    message = ChildReady(1, None, version=99)
    with pytest.raises(ProtocolError, match="version 99"):
        protocol.decode(protocol.encode(message))


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        StopChild("x").reason = "y"  # type: ignore[misc]
