"""The supervisor: the pool's children, the jobs handed to them, and nothing that can freeze.

Parts, one concern each::

    core.Supervisor      the state machine: children, jobs on children, deadlines, callbacks
    children.ChildTable  every child and its state; `transition()` is the only writer, and
                         `TRANSITIONS` declares what is allowed
    channel.ChildChannel one child's pipes, parent side: non-blocking, framed, size-bounded
    deadlines            time limits, start/exit timeouts, drains, autoscaler ticks (a heap)
    reactor.Reactor      where the supervisor runs: Celery's hub, or one thread of its own
    launcher             forks (or spawns) a child with its two pipes

Threads and who may touch what::

    Celery's event loop (hub thread)           children (one process each)
    ───────────────────────────────           ─────────────────────────────
    Pool.on_apply ─> Supervisor.submit ─> Scheduler ─> ChildChannel.send ─ RunJob ─> child_main
    hub reader (result pipe) ─> Supervisor.on_readable <── JobAccepted / JobFinished /
    hub reader (sentinel)    ─> Supervisor.on_sentinel       ChildReady / ChildExiting
    hub timer (earliest deadline) ─> Supervisor.run_due: time limits, timeouts, respawn
        └─> Celery callbacks (accept, result, failure, timeout) on the same thread

    other threads (backlog probe, metrics sampler): Reactor.post(callback) only; read
    snapshots (`children()`), never the state itself

With a hub (every Redis/AMQP worker) the supervisor runs on the hub's thread and no thread of
ours exists. Before the hub is attached, and for transports without one, one ``adaptive-io``
thread runs the same code under the supervisor's lock. At shutdown the caller drives the same
loop (`Reactor.poll_once`). Reads never block: a child that writes half a frame and stops holds
up only itself, and its hard time limit still fires from the deadline heap. A signal handler
never waits on a lock another part of the same thread holds: kills go by pid, without a lock.
"""

from celery_adaptive.supervisor.children import Child, ChildState, ChildTable, IllegalTransition
from celery_adaptive.supervisor.core import Supervisor, SupervisorHooks, describe_exitcode, pids
from celery_adaptive.supervisor.deadlines import Deadline
from celery_adaptive.supervisor.launcher import Launched, ProcessLauncher

__all__ = [
    "Child", "ChildState", "ChildTable", "Deadline", "IllegalTransition", "Launched",
    "ProcessLauncher", "Supervisor", "SupervisorHooks", "describe_exitcode", "pids",
]
