"""The child process's main loop.

Runs in each pool child: pin to a CPU, initialise like a prefork child (Celery's
``process_initializer``), then receive `RunJob`s one at a time, announce each with
`JobAccepted`, run it, and answer with `JobFinished`. A planned exit (max tasks, max memory,
a drain request) is announced with `ChildExiting` first. The child keeps plain blocking pipes;
the parent reads them without blocking (supervisor.channel).
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import resource
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from billiard.context import ForkProcess

from celery_adaptive import protocol
from celery_adaptive.protocol import (
    ChildExiting,
    ChildReady,
    JobAccepted,
    JobFinished,
    RunJob,
    StopChild,
)


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to know, passed as the process argument (pickled under spawn)."""

    slot: int
    cpu: int | None
    initializer_args: tuple[Any, ...]  # (app, hostname), as prefork's process_initializer wants
    max_tasks: int | None
    max_memory_kib: int | None
    start_method: str
    task_modules: tuple[str, ...]  # imported first under spawn so the task registry is filled


def detach_inherited_connections() -> int:
    """In a freshly forked child: drop every TCP connection inherited from the parent.

    A forked child shares the parent's sockets, and the after-fork handlers, which run in the
    child next, close the connections of kombu's pools (``app.pool``) through the network:
    py-amqp closes with ``shutdown(SHUT_RDWR)``, which ends the TCP connection for both
    processes ("Connection reset by peer" in the parent), and kombu's Redis channel first reads
    the reply of a BRPOP still in flight, so the child took a reply meant for the parent (which
    then waited ~28 s for it) or, when the parent read it first, blocked in its start-up for
    good. It happens when a child is forked while the worker's process holds pooled broker
    connections: a client in the same process (``celery.contrib.testing``'s in-thread worker,
    so Celery's own integration suite) or main-process code that publishes. The child never
    owns these connections, so each is replaced, on its descriptor, by /dev/null before the
    handlers run: they then fail on it (ENOTSOCK, EOF), which they tolerate, and the parent
    keeps its connections. Sockets that are not connected TCP (the child's own pipe is a Unix
    socket pair, listening sockets have no peer) are left alone. Returns the number replaced.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0  # not Linux: nothing to enumerate cheaply
    null = os.open(os.devnull, os.O_RDWR)
    replaced = 0
    try:
        for name in names:
            fd = int(name)
            if fd == null or not _is_connected_tcp(fd):
                continue
            os.dup2(null, fd)  # atomically drops the child's reference, without a shutdown
            replaced += 1
    finally:
        os.close(null)
    return replaced


def _is_connected_tcp(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return False
        sock.getpeername()
        return True
    except OSError:
        return False
    finally:
        sock.detach()  # the descriptor stays open: this object only looked at it


class ForkedChildProcess(ForkProcess):
    """billiard's fork-started Process that drops the parent's TCP connections first thing
    in the child, before the after-fork handlers can shut them down
    (see `detach_inherited_connections`)."""

    def _bootstrap(self, *args: Any, **kwargs: Any) -> Any:
        detach_inherited_connections()
        return super()._bootstrap(*args, **kwargs)


def warm_up_parent() -> None:
    """Do once, in the parent, the imports every forked child would otherwise do after fork.

    Celery's ``process_initializer`` calls billiard's ``set_pdeathsig``, which, when cffi is
    loaded, builds a cffi ``FFI`` and parses a C declaration: the first parse imports pycparser
    and compiles its lexer's regular expressions. Done in each child that took ~90 of its
    ~100 ms start-up, and several children starting together on two cores took 150-250 ms
    each, which a burst waits for. Done here first, a forked child inherits the loaded modules
    and compiled patterns and starts in ~15 ms. Nothing here changes behaviour.
    """
    if "cffi" in sys.modules:
        try:
            import cffi

            cffi.FFI().cdef("int prctl (int __option, ...);")
        except Exception:  # only a warm-up: the child does the real call and reports errors
            pass
    from billiard.einfo import ExceptionInfo  # noqa: F401
    from celery.concurrency.prefork import process_destructor, process_initializer  # noqa: F401

    from celery_adaptive import placement  # noqa: F401


#: A SIGUSR1 this much earlier than the job's soft limit is taken as meant for an earlier job.
SOFT_LIMIT_TOLERANCE_S = 0.05


class _SoftLimitGuard:
    """Raise SoftTimeLimitExceeded on SIGUSR1 in the task it was meant for, exactly once.

    - Between tasks the signal is ignored (raising would break the loop's bookkeeping).
    - A signal that arrives before the task's code is entered (just after JobAccepted went
      out) is kept and raised on entry, so a short soft limit is never lost.
    - A signal sent for the previous job that lands early in the next one is ignored: the
      current job has not run for its soft limit yet.
    """

    def __init__(self) -> None:
        self.started: float | None = None
        self.soft_limit: float | None = None
        self.in_task = False
        self.pending = False
        self.fired = False

    def begin(self, soft_limit: float | None) -> None:
        self.started, self.soft_limit = time.monotonic(), soft_limit
        self.in_task = self.pending = self.fired = False

    def enter(self) -> None:
        self.in_task = True
        if self.pending:
            self._raise()

    def end(self) -> None:
        self.in_task = False
        self.started = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.started is None or self.fired:
            return
        limit = self.soft_limit
        if limit is not None and time.monotonic() - self.started < limit - SOFT_LIMIT_TOLERANCE_S:
            return
        if self.in_task:
            self._raise()
        self.pending = True

    def _raise(self) -> None:
        from billiard.exceptions import SoftTimeLimitExceeded

        self.pending, self.fired = False, True
        raise SoftTimeLimitExceeded()


def _peak_rss_kib() -> int:
    # ru_maxrss is KiB on Linux; prefork (billiard) compares the same figure.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _send(conn: Any, message: protocol.ChildMessage) -> None:
    conn.send_bytes(protocol.encode(message))


def _encode_result(job_id: int, value: Any, runtime: float) -> bytes:
    try:
        return protocol.encode(JobFinished(job_id, True, value, runtime))
    except Exception as exc:  # unpicklable result: report it the way billiard does
        from billiard.einfo import ExceptionInfo
        from billiard.pool import MaybeEncodingError

        try:
            raise MaybeEncodingError(exc, value)
        except MaybeEncodingError:
            einfo = ExceptionInfo()
        return protocol.encode(JobFinished(job_id, False, einfo, runtime))


def _initialise(spec: ChildSpec) -> int | None:
    from celery_adaptive.placement import pin_current_process

    cpu = pin_current_process(spec.cpu)
    try:
        # Celery may have replaced sys.stderr with a logging proxy that has no fd.
        if sys.__stderr__ is not None:
            faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):
        pass
    if spec.start_method != "fork":
        # A fresh interpreter: tell Celery so (docs/celery-pool-contract.md, section 3, "Start
        # methods") and load the modules that define tasks before the app is set up.
        import billiard

        billiard.set_start_method(spec.start_method, force=True)
        os.environ["FORKED_BY_MULTIPROCESSING"] = "1"
        for module in spec.task_modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                print(f"celery-adaptive child: cannot import {module}: {exc!r}", file=sys.stderr)
    from celery.concurrency.prefork import process_initializer

    process_initializer(*spec.initializer_args)
    return cpu


def _close_inherited(fds: tuple[int, ...]) -> None:
    """Close the parent's ends of other children's pipes that fork copied into this one."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def child_main(inbox: Any, outbox: Any, spec: ChildSpec, inherited_fds: tuple[int, ...] = ()) -> None:
    """Entry point of a pool child (the target of its Process): read RunJob/StopChild from
    ``inbox``, write replies to ``outbox`` (billiard Connections, blocking on this side)."""
    _close_inherited(inherited_fds)
    cpu = _initialise(spec)
    guard = _SoftLimitGuard()
    # After process_initializer, which resets SIGUSR1 to the default action.
    signal.signal(signal.SIGUSR1, guard.handler)
    pid = os.getpid()
    exitcode = 0
    done = 0
    _send(outbox, ChildReady(pid, cpu))
    try:
        while True:
            try:
                data = inbox.recv_bytes()
            except (EOFError, OSError):
                break  # the parent is gone
            message = protocol.decode(data)
            if isinstance(message, StopChild):
                _send(outbox, ChildExiting(pid, "stop", message.reason))
                break
            if not isinstance(message, RunJob):
                continue
            guard.begin(message.soft_limit)
            _send(outbox, JobAccepted(message.job_id, pid, time.monotonic()))
            started = time.monotonic()
            try:
                guard.enter()
                value = message.target(*message.args, **message.kwargs)
                ok = True
            except Exception:
                from billiard.einfo import ExceptionInfo

                value, ok = ExceptionInfo(), False
            finally:
                guard.end()
            runtime = time.monotonic() - started
            if ok:
                payload = _encode_result(message.job_id, value, runtime)
            else:
                payload = protocol.encode(JobFinished(message.job_id, False, value, runtime))
            outbox.send_bytes(payload)
            del value, message, payload
            done += 1
            if spec.max_tasks and done >= spec.max_tasks:
                _send(outbox, ChildExiting(pid, "max-tasks", f"{done} tasks"))
                break
            if spec.max_memory_kib and _peak_rss_kib() > spec.max_memory_kib:
                _send(
                    outbox,
                    ChildExiting(pid, "max-memory", f"{_peak_rss_kib()} KiB > {spec.max_memory_kib} KiB"),
                )
                break
    except (BrokenPipeError, ConnectionResetError):
        exitcode = 1
    finally:
        try:
            from celery.concurrency.prefork import process_destructor

            process_destructor(pid, exitcode)
        except Exception:
            pass
        inbox.close()
        outbox.close()
