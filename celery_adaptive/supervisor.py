"""The supervisor: owns the child processes and the one I/O thread.

Threads and data flow::

     event-loop thread (L)                         I/O thread                 children
     ─────────────────────                         ──────────                 ────────
     submit(job) ─> Scheduler ─> dispatch ─> pipe (or sender thread) ─ RunJob ─> child_main
                                                                             │
     process_events() <── wake pipe / direct <── wait(result pipes,  <── JobAccepted,
       │ accept/result/error callbacks             sentinels, wake,        JobFinished,
       │ time limits, respawn, drain               deadlines)              ChildExiting
       └─> Scheduler bookkeeping, dispatch again

Every stateful step (callbacks to Celery, timers, respawning, scheduler changes) runs in
`process_events`, on the event-loop thread when Celery runs one (the hub): the I/O thread wakes
it through a pipe registered as a hub reader. Without a hub the I/O thread calls
`process_events` itself, under the same lock (billiard does the same).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import wait as wait_for
from typing import Any

from celery_adaptive import protocol
from celery_adaptive.child import ChildSpec
from celery_adaptive.clock import Clock, MonotonicClock
from celery_adaptive.errors import ProtocolError
from celery_adaptive.jobs import Job
from celery_adaptive.protocol import (
    ChildExiting,
    ChildReady,
    JobAccepted,
    JobFinished,
    RunJob,
    StopChild,
)
from celery_adaptive.scheduler import Scheduler
from celery_adaptive.settings import PoolSettings
from celery_adaptive.timers import Deadline, DeadlineHeap

logger = logging.getLogger("celery_adaptive.supervisor")

#: While L has not yet run a due timer it was told about, the I/O thread looks again this often.
TIMER_RECHECK_S = 0.005
#: How long a hard-time-limited child gets between SIGTERM and SIGKILL (prefork: 0.1 s).
KILL_GRACE = 0.1
#: How long warm shutdown waits for idle children to exit after StopChild before SIGKILL.
CHILD_EXIT_TIMEOUT = 10.0


class ChildState(Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class ChildHandle:
    child_id: int
    slot: int
    cpu: int | None
    process: Any
    conn: Any
    pid: int
    created_at: float
    state: ChildState = ChildState.STARTING
    ready_at: float | None = None
    tasks_done: int = 0
    busy_since: float | None = None
    busy_seconds: float = 0.0
    exit_reason: str | None = None
    stop_sent: bool = False
    in_scheduler: bool = False
    short_only: bool = False  # a short-task lane (see Supervisor.short_lanes)
    jobs: set[int] = field(default_factory=set)
    start_timer: Deadline | None = None

    @property
    def leaving(self) -> bool:
        """Will not take new work (draining, announced a planned exit, or dead)."""
        return self.state in (ChildState.DRAINING, ChildState.DEAD) or self.exit_reason is not None


def describe_exitcode(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown exit code"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"signal {-exitcode} ({name})"
    return f"exitcode {exitcode}"


def _einfo(exc: BaseException) -> Any:
    from billiard.einfo import ExceptionInfo

    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


@dataclass
class SupervisorHooks:
    """What the Celery adapter lets the supervisor call back into (no Celery policy here)."""

    before_create_process: Callable[[], None] = lambda: None
    on_child_started: Callable[[ChildHandle], None] = lambda child: None
    on_child_gone: Callable[[ChildHandle, int | None], None] = lambda child, code: None
    on_job_done: Callable[[Job, float | None], None] = lambda job, runtime: None


class Supervisor:
    def __init__(
        self,
        settings: PoolSettings,
        spec_for_slot: Callable[[int], ChildSpec],
        process_factory: Callable[[Any, ChildSpec], Any],
        pipe_factory: Callable[[], tuple[Any, Any]],
        scheduler: Scheduler,
        hooks: SupervisorHooks | None = None,
        clock: Clock | None = None,
        short_lanes: int = 0,
    ) -> None:
        self.settings = settings
        # Extra children that only run short tasks, kept while long tasks are around: with
        # every general child busy on long work, the OS still time-slices a short task in,
        # instead of it waiting for a long one to end.
        self.short_lanes = short_lanes
        self.scheduler = scheduler
        self.hooks = hooks or SupervisorHooks()
        self.clock = clock or MonotonicClock()
        self.target = settings.concurrency
        self._spec_for_slot = spec_for_slot
        self._process_factory = process_factory
        self._pipe_factory = pipe_factory
        self._lock = threading.RLock()
        self._children: dict[int, ChildHandle] = {}
        self._by_pid: dict[int, ChildHandle] = {}
        self._jobs: dict[int, Job] = {}
        self._next_child_id = 0
        self._next_job_id = 0
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._deadlines = DeadlineHeap()
        self._closing = False
        self._stopped = False
        self._hub: Any = None
        self._threaded = True  # until a hub is attached, the I/O thread processes events itself
        self._spawn_pending = False  # a `_continue_spawning` is scheduled
        self._start_failures = 0
        self._respawn_timer: Deadline | None = None
        self._steal_timer: Deadline | None = None
        self.counters: dict[str, int] = {
            "received": 0, "started": 0, "succeeded": 0, "failed": 0, "lost": 0,
            "revoked_before_start": 0, "children_started": 0, "children_exited": 0,
            "children_crashed": 0, "hard_timeouts": 0, "soft_timeouts": 0,
        }
        # The I/O thread watches these; guarded by _watch_lock because L adds and removes.
        self._watch_lock = threading.Lock()
        self._watched_conns: dict[Any, int] = {}
        self._watched_sentinels: dict[int, int] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._notify_r, self._notify_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._notify_r, self._notify_w):
            os.set_blocking(fd, False)
        self._io_thread: threading.Thread | None = None
        self._io_stop = threading.Event()
        self._sender: queue.SimpleQueue[tuple[ChildHandle, Job | bytes] | None] = queue.SimpleQueue()
        self._sender_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Fork the first children, then start the threads (forking with no threads is safest)."""
        with self._lock:
            for _ in range(self.target):
                self._spawn_child()
        self._io_thread = threading.Thread(target=self._io_loop, name="adaptive-io", daemon=True)
        self._io_thread.start()
        self._sender_thread = threading.Thread(target=self._send_loop, name="adaptive-send", daemon=True)
        self._sender_thread.start()
        with self._lock:
            self.call_later(1.0, self._periodic, "periodic")

    def attach_hub(self, hub: Any) -> None:
        """Route processing onto Celery's event loop. Called on every consumer (re)start."""
        with self._lock:
            if self._hub is not None and self._hub is not hub:
                try:
                    self._hub.remove_reader(self._notify_r)
                except Exception:
                    pass
            self._hub = hub
            self._threaded = False
            hub.add_reader(self._notify_r, self._on_notify)
        self._notify()

    def did_start_ok(self) -> bool:
        with self._lock:
            return any(c.state is not ChildState.DEAD for c in self._children.values())

    def close(self) -> None:
        """Stop dispatching and respawning (the first step of any shutdown)."""
        with self._lock:
            self._closing = True

    def flush(self) -> list[Job]:
        """Drop every job no child has received; the broker redelivers their messages."""
        with self._lock:
            dropped = [self._jobs.pop(job_id) for job_id in self.scheduler.flush()]
        if dropped:
            logger.info("Dropped %d unstarted task(s); the broker will redeliver them", len(dropped))
        return dropped

    def join(self, run_ready_callbacks: Callable[[], None] | None = None) -> None:
        """Warm stop: wait for every job handed to a child, then let the children exit.

        Runs on the event-loop thread (or in a signal handler during cold shutdown), when the
        hub no longer polls: so it processes the supervisor's events itself, and runs the
        ack/reject callbacks Celery queued (``run_ready_callbacks``) so that late acks are
        sent before the connection closes.
        """
        self.close()
        with self._lock:
            self._threaded = False  # this thread does the processing from now on
        while True:
            with self._lock:
                busy = self.scheduler.in_flight_count()
                alive = [c for c in self._children.values() if c.state is not ChildState.DEAD]
            if busy == 0:
                break
            if not alive:
                break
            self._wait_and_process(0.1)
            if run_ready_callbacks is not None:
                run_ready_callbacks()
        self._stop_children()
        if run_ready_callbacks is not None:
            run_ready_callbacks()
        self._shutdown_threads()

    def terminate(self) -> None:
        """Cold stop: kill every child now. Idempotent."""
        with self._lock:
            self._closing = True
            children = [c for c in self._children.values() if c.state is not ChildState.DEAD]
        for child in children:
            self._kill(child.pid, signal.SIGKILL)
        for child in children:
            try:
                child.process.join(2.0)
            except Exception:
                pass
        self._process_pending()
        self._shutdown_threads()

    # ------------------------------------------------------------------ jobs
    def new_job_id(self) -> int:
        with self._lock:
            self._next_job_id += 1
            return self._next_job_id

    def submit(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = job
            self.counters["received"] += 1
            self.scheduler.submit(job.job_id, job.task_name, job.affinity_key, job.submitted_at)
            if self.short_lanes and not self.live_lanes():
                self._maintain_lanes()
            self._dispatch()

    def terminate_job(self, pid: int, signum: int) -> None:
        """Kill the child running a job (revoke terminate, cold shutdown). Signal-handler safe:
        it only marks the job and sends the signal; the death is handled as an event."""
        child = self._by_pid.get(pid)
        if child is not None:
            for job_id in list(child.jobs):
                job = self._jobs.get(job_id)
                if job is not None and job.accepted_at is not None:
                    job.terminate_signal = signum
        self._kill(pid, signum)

    # ------------------------------------------------------------------ sizing
    def live_children(self) -> list[ChildHandle]:
        """General children that take new work (the pool's size; lanes are extra)."""
        return [c for c in self._children.values() if not c.leaving and not c.short_only]

    def live_lanes(self) -> list[ChildHandle]:
        return [c for c in self._children.values() if not c.leaving and c.short_only]

    def set_target(self, target: int) -> None:
        if target < 1:
            raise ValueError(f"the pool needs at least one child (asked for {target})")
        with self._lock:
            self.target = target
            self._maintain()
            self._dispatch()

    def grow(self, n: int = 1) -> None:
        self.set_target(self.target + n)

    def shrink(self, n: int = 1) -> None:
        if self.target - n < 1:
            raise ValueError(f"cannot shrink by {n}: the pool has {self.target} and keeps at least one")
        self.set_target(self.target - n)

    def maintain(self) -> None:
        with self._lock:
            self._maintain()
            self._dispatch()

    def restart(self) -> None:
        """Replace every child: each drains (finishing its work) while a fresh one starts."""
        with self._lock:
            for child in self.live_children() + self.live_lanes():
                self._drain(child, "restart")
            self._maintain()

    # ------------------------------------------------------------------ introspection
    def children(self) -> list[ChildHandle]:
        with self._lock:
            return list(self._children.values())

    def jobs_in_flight(self) -> int:
        with self._lock:
            return self.scheduler.in_flight_count()

    def jobs_queued(self) -> int:
        with self._lock:
            return self.scheduler.queued_count()

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting queued task has waited so far (0 when none waits)."""
        with self._lock:
            oldest = self.scheduler.oldest_queued_at()
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def running_ages(self, now: float) -> dict[str, float]:
        """Longest time any running job of each task name has run so far (``now`` on the
        monotonic clock children stamp their start with)."""
        ages: dict[str, float] = {}
        with self._lock:
            for job in self._jobs.values():
                if job.accepted_at is not None and job.pid is not None:
                    age = max(0.0, now - job.accepted_at)
                    if age > ages.get(job.task_name, -1.0):
                        ages[job.task_name] = age
        return ages

    # ================================================================== internals
    # -- children ------------------------------------------------------------------
    def _free_slot(self) -> int:
        used = {c.slot for c in self._children.values()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _spawn_children(self, count: int, short_only: bool = False) -> None:
        """Start ``count`` children.

        On Celery's event loop, one per loop turn: a fork takes the loop ~5-10 ms while the
        children already forked compete for the CPUs, and a child that is ready should take a
        task then, not after the last of a burst's forks (a later `_maintain` starts the next).
        Without the loop, all at once.
        """
        if count <= 0:
            return
        if not self._threaded and count > 1:
            self._spawn_child(short_only)
            if not self._spawn_pending:
                self._spawn_pending = True
                self.call_later(0.0, self._continue_spawning, "spawn")
            return
        for _ in range(count):
            self._spawn_child(short_only)

    def _continue_spawning(self) -> None:
        self._spawn_pending = False
        self._dispatch()  # children that became ready meanwhile take work before the next fork
        self._maintain()

    def _spawn_child(self, short_only: bool = False) -> ChildHandle | None:
        slot = self._free_slot()
        spec = self._spec_for_slot(slot)
        self.hooks.before_create_process()
        parent_conn, child_conn = self._pipe_factory()
        process = self._process_factory(child_conn, spec)
        try:
            process.start()
        except Exception:
            logger.exception("Could not start a pool child")
            parent_conn.close()
            child_conn.close()
            return None
        child_conn.close()
        self._next_child_id += 1
        child = ChildHandle(
            child_id=self._next_child_id, slot=slot, cpu=spec.cpu, process=process,
            conn=parent_conn, pid=process.pid, created_at=self.clock.now(), short_only=short_only,
        )
        self._children[child.child_id] = child
        self._by_pid[child.pid] = child
        child.start_timer = self._call_later(
            self.settings.child_start_timeout, lambda: self._on_start_timeout(child), "start-timeout"
        )
        with self._watch_lock:
            self._watched_conns[parent_conn] = child.child_id
            self._watched_sentinels[process.sentinel] = child.child_id
        self._wake_io()
        self.counters["children_started"] += 1
        logger.debug("Started child pid=%s slot=%s cpu=%s", child.pid, slot, spec.cpu)
        return child

    def _on_start_timeout(self, child: ChildHandle) -> None:
        if child.state is ChildState.STARTING:
            logger.error(
                "Child pid=%s did not report ready in %.0fs; killing it",
                child.pid, self.settings.child_start_timeout,
            )
            self._kill(child.pid, signal.SIGKILL)

    def _maintain(self) -> None:
        """Bring the number of live children to the target: spawn, or drain the surplus."""
        if self._closing or self._stopped:
            return
        self._maintain_lanes()
        live = self.live_children()
        surplus = len(live) - self.target
        if surplus > 0:
            for child in self._drain_candidates(live)[:surplus]:
                self._drain(child, "shrink")
            return
        missing = -surplus
        if missing <= 0 or (self._respawn_timer is not None and not self._respawn_timer.cancelled):
            return
        if self._start_failures:
            # A child that dies before it is ready will likely die again (a broken import, a bad
            # initializer): back off instead of respawning in a tight loop.
            delay = min(0.1 * 2 ** (self._start_failures - 1), 10.0)
            if self._start_failures in (1, 3, 10) or self._start_failures % 50 == 0:
                logger.error(
                    "Pool child died during start-up %d time(s) in a row; retrying in %.1fs",
                    self._start_failures, delay,
                )
            self._respawn_timer = self._call_later(delay, self._respawn_now, "respawn")
            return
        self._spawn_children(missing)

    def _maintain_lanes(self) -> None:
        if not self.short_lanes:
            return
        now = self.clock.now()
        # A lane helps only when short tasks share the pool with long ones.
        mixed = self.scheduler.long_tasks_recently(now) and self.scheduler.short_tasks_recently(now)
        wanted = self.short_lanes if mixed else 0
        lanes = self.live_lanes()
        if len(lanes) > wanted:
            for child in self._drain_candidates(lanes)[: len(lanes) - wanted]:
                self._drain(child, "no long tasks lately")
        elif len(lanes) < wanted and not self._start_failures:
            self._spawn_children(wanted - len(lanes), short_only=True)

    def _periodic(self) -> None:
        """Housekeeping once a second (lanes come and go with long tasks)."""
        if self._closing or self._stopped:
            return
        self._maintain()
        self.call_later(1.0, self._periodic, "periodic")

    def _respawn_now(self) -> None:
        self._respawn_timer = None
        if self._closing or self._stopped:
            return
        if len(self.live_children()) < self.target:
            self._spawn_child()
        self._maintain()

    def _drain_candidates(self, live: list[ChildHandle]) -> list[ChildHandle]:
        """Idle children first (starting ones before ready ones), then the soonest to finish."""
        now = self.clock.now()

        def rank(child: ChildHandle) -> tuple[int, float, int]:
            if child.state is ChildState.STARTING:
                return (0, 0.0, -child.child_id)
            if not child.jobs:
                return (1, 0.0, -child.child_id)
            free_at = self.scheduler.predicted_free_at(child.child_id, now) if child.in_scheduler else now
            return (2, free_at, -child.child_id)

        return sorted(live, key=rank)

    def _drain(self, child: ChildHandle, reason: str) -> None:
        if child.state is ChildState.DEAD:
            return
        child.state = ChildState.DRAINING
        if child.in_scheduler:
            self.scheduler.drain_child(child.child_id)
        logger.info("Draining child pid=%s (%s)", child.pid, reason)
        self._maybe_stop_drained(child, reason)

    def _maybe_stop_drained(self, child: ChildHandle, reason: str = "drained") -> None:
        if child.state is ChildState.DRAINING and not child.jobs and not child.stop_sent:
            child.stop_sent = True
            self._send(child, protocol.encode(StopChild(reason)))

    def _on_child_ready(self, child: ChildHandle, message: ChildReady) -> None:
        if child.start_timer is not None:
            child.start_timer.cancel()
        child.ready_at = self.clock.now()
        child.cpu = message.cpu
        self._start_failures = 0
        logger.debug("Child pid=%s ready %.0f ms after it was started", child.pid,
                     (child.ready_at - child.created_at) * 1000)
        if child.state is ChildState.DRAINING:
            self._maybe_stop_drained(child)
            return
        child.state = ChildState.IDLE
        self.scheduler.add_child(child.child_id, short_only=child.short_only)
        child.in_scheduler = True
        self.hooks.on_child_started(child)

    def _on_child_exiting(self, child: ChildHandle, message: ChildExiting) -> None:
        # A planned exit: take it out of rotation now and start its replacement early.
        child.exit_reason = message.reason
        logger.info("Child pid=%s is leaving: %s %s", child.pid, message.reason, message.detail)
        if child.in_scheduler and child.state is not ChildState.DRAINING:
            self.scheduler.drain_child(child.child_id)
        if child.state is not ChildState.DEAD:
            child.state = ChildState.DRAINING
        child.stop_sent = True
        self._maintain()

    def _on_child_exit(self, child: ChildHandle) -> None:
        if child.state is ChildState.DEAD:
            return
        try:
            child.process.join(1.0)
        except Exception:
            pass
        exitcode = getattr(child.process, "exitcode", None)
        was_ready = child.ready_at is not None
        planned = child.exit_reason is not None and exitcode == 0
        child.state = ChildState.DEAD
        if child.start_timer is not None:
            child.start_timer.cancel()
        self._by_pid.pop(child.pid, None)
        del self._children[child.child_id]
        with self._watch_lock:
            self._watched_conns.pop(child.conn, None)
            self._watched_sentinels.pop(child.process.sentinel, None)
        try:
            child.conn.close()
        except Exception:
            pass
        self.counters["children_exited"] += 1
        lost: tuple[int, ...] = ()
        if child.in_scheduler:
            removal = self.scheduler.remove_child(child.child_id)
            lost = removal.lost
        for job_id in lost:
            self._report_lost(self._jobs.pop(job_id), child, exitcode)
        if planned:
            logger.debug("Child pid=%s exited (%s)", child.pid, child.exit_reason)
        else:
            self.counters["children_crashed"] += 1
            if not self._closing:
                logger.error("Process pid=%s exited with %s", child.pid, describe_exitcode(exitcode))
            if not was_ready:
                self._start_failures += 1
        self.hooks.on_child_gone(child, exitcode)
        self._maintain()

    def _report_lost(self, job: Job, child: ChildHandle, exitcode: int | None) -> None:
        self._cancel_job_timers(job)
        if child.busy_since is not None:
            child.busy_seconds += self.clock.now() - child.busy_since
            child.busy_since = None
        if job.reported:
            return
        job.reported = True
        self.hooks.on_job_done(job, None)
        if job.terminate_signal is not None:
            from celery.exceptions import Terminated

            self._call(job.error_callback, _einfo(Terminated(job.terminate_signal)))
            return
        from celery.exceptions import WorkerLostError

        self.counters["lost"] += 1
        error = WorkerLostError(
            f"Worker exited prematurely: {describe_exitcode(exitcode)} Job: {job.job_id}."
        )
        self._call(job.error_callback, _einfo(error))

    # -- jobs ----------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._closing or self._stopped:
            return
        now = self.clock.now()
        for _attempt in range(1000):  # bounded: a revoked job frees its slot for the next one
            dispatches = self.scheduler.dispatch(now)
            if not dispatches:
                return
            skipped = False
            for d in dispatches:
                job = self._jobs[d.job_id]
                child = self._children[d.child_id]
                if job.is_revoked():
                    # Celery acked it and recorded REVOKED; just forget it.
                    self.scheduler.finished(d.job_id, now)
                    del self._jobs[d.job_id]
                    self.counters["revoked_before_start"] += 1
                    skipped = True
                    continue
                job.child_id = child.child_id
                child.jobs.add(job.job_id)
                if child.state is ChildState.IDLE:
                    child.state = ChildState.BUSY
                self._send(child, job)
            if not skipped:
                break
        self._arm_steal_timer(now)

    def _arm_steal_timer(self, now: float) -> None:
        """Dispatch again when a keyed task held for its busy owner may be stolen."""
        at = self.scheduler.next_steal_at
        if at is None:
            return
        pending = self._steal_timer
        if pending is not None and not pending.cancelled and pending.due <= at:
            return
        self._steal_timer = self.call_later(max(0.0, at - now), self._on_steal_timer, "steal")

    def _on_steal_timer(self) -> None:
        self._steal_timer = None
        self._dispatch()

    def _send(self, child: ChildHandle, item: Job | bytes) -> None:
        if self.settings.dispatch_window == 1:
            # The child holds nothing, so it is blocked reading its pipe: the write completes
            # at once, and skipping a thread hand-off matters when every core is busy.
            self._transmit(child, item)
        else:
            # A busy child may not read for a while; a full pipe must not block the event loop.
            self._sender.put((child, item))

    def _transmit(self, child: ChildHandle, item: Job | bytes) -> None:
        if isinstance(item, Job):
            try:
                data = protocol.encode(RunJob(item.job_id, item.target, tuple(item.args), dict(item.kwargs)))
            except Exception as exc:
                self._events.put(("unsendable", child.child_id, item.job_id, _einfo(exc)))
                self._notify()
                return
        else:
            data = item
        try:
            child.conn.send_bytes(data)
        except (OSError, ValueError):
            pass  # the child is gone; its sentinel reports that and its jobs are requeued

    def _send_loop(self) -> None:
        while True:
            entry = self._sender.get()
            if entry is None:
                return
            self._transmit(*entry)

    def _on_accepted(self, child: ChildHandle, message: JobAccepted) -> None:
        job = self._jobs.get(message.job_id)
        if job is None:
            return
        job.pid, job.accepted_at = message.pid, message.started_at
        self.scheduler.accepted(job.job_id, self.clock.now())
        self.counters["started"] += 1
        child.state = ChildState.BUSY if child.state is ChildState.IDLE else child.state
        if child.busy_since is None:
            child.busy_since = self.clock.now()
        self._call(job.accept_callback, message.pid, message.started_at)
        elapsed = max(0.0, time.monotonic() - message.started_at)
        soft = job.soft_timeout or self.settings.soft_time_limit
        hard = job.hard_timeout or self.settings.hard_time_limit
        if soft:
            job.soft_timer = self._call_later(max(0.0, soft - elapsed), lambda: self._on_soft_limit(job, soft), "soft")
        if hard:
            job.hard_timer = self._call_later(max(0.0, hard - elapsed), lambda: self._on_hard_limit(job, hard), "hard")

    def _on_finished(self, child: ChildHandle, message: JobFinished) -> None:
        job = self._jobs.pop(message.job_id, None)
        if job is None:
            return
        self._cancel_job_timers(job)
        child.jobs.discard(job.job_id)
        child.tasks_done += 1
        now = self.clock.now()
        if not child.jobs:
            if child.busy_since is not None:
                child.busy_seconds += now - child.busy_since
                child.busy_since = None
            if child.state is ChildState.BUSY:
                child.state = ChildState.IDLE
        self.scheduler.finished(job.job_id, now, message.runtime)
        if not job.reported:
            job.reported = True
            self.hooks.on_job_done(job, message.runtime)
            if message.ok:
                ok = not (isinstance(message.value, tuple) and message.value and message.value[0] == 1)
                self.counters["succeeded" if ok else "failed"] += 1
                self._call(job.callback, message.value)
            else:
                self.counters["failed"] += 1
                self._call(job.error_callback, message.value)
        self._maybe_stop_drained(child)

    def _on_unsendable(self, child_id: int, job_id: int, einfo: Any) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        child = self._children.get(child_id)
        if child is not None:
            child.jobs.discard(job_id)
            if not child.jobs and child.state is ChildState.BUSY:
                child.state = ChildState.IDLE
        self.scheduler.finished(job_id, self.clock.now())
        job.reported = True
        self.counters["failed"] += 1
        self._call(job.error_callback, einfo)

    def _on_soft_limit(self, job: Job, soft: float) -> None:
        if job.reported or job.job_id not in self._jobs or job.pid is None:
            return
        self.counters["soft_timeouts"] += 1
        self._call(job.timeout_callback, True, soft)
        self._kill(job.pid, signal.SIGUSR1)

    def _on_hard_limit(self, job: Job, hard: float) -> None:
        if job.reported or job.job_id not in self._jobs or job.pid is None:
            return
        from celery.exceptions import TimeLimitExceeded

        job.reported = True
        self.counters["hard_timeouts"] += 1
        self.hooks.on_job_done(job, None)
        # prefork's order: the failure first, then the timeout callback, then the kill.
        self._call(job.error_callback, _einfo(TimeLimitExceeded(hard)))
        self._call(job.timeout_callback, False, hard)
        pid = job.pid
        self._kill(pid, signal.SIGTERM)
        self._call_later(KILL_GRACE, lambda: self._kill_if_alive(pid), "hard-kill")

    def _kill_if_alive(self, pid: int) -> None:
        if pid in self._by_pid:
            self._kill(pid, signal.SIGKILL)

    def _cancel_job_timers(self, job: Job) -> None:
        for timer in (job.soft_timer, job.hard_timer):
            if timer is not None:
                timer.cancel()
        job.soft_timer = job.hard_timer = None

    def _call(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            logger.exception("Pool callback %r raised", callback)

    def _kill(self, pid: int, signum: int) -> None:
        # Only our own children: the pid must be one we started and have not reaped.
        if pid not in self._by_pid:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- timers and events -------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None], label: str) -> Deadline:
        """Run ``callback`` on the event-loop thread after ``delay`` seconds."""
        entry, earliest = self._deadlines.add(self.clock.now() + delay, callback, label)
        if earliest:
            self._wake_io()
        return entry

    _call_later = call_later

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "unsendable":
            self._on_unsendable(event[1], event[2], event[3])
            return
        if kind == "timers":
            return
        child = self._children.get(event[1])
        if child is None:
            return
        if kind == "exit":
            self._on_child_exit(child)
        elif kind == "garbage":
            logger.error("Child pid=%s sent an invalid message (%s); replacing it", child.pid, event[2])
            self._kill(child.pid, signal.SIGKILL)
        elif kind == "msg":
            message = event[2]
            if isinstance(message, JobAccepted):
                self._on_accepted(child, message)
            elif isinstance(message, JobFinished):
                self._on_finished(child, message)
            elif isinstance(message, ChildReady):
                self._on_child_ready(child, message)
            elif isinstance(message, ChildExiting):
                self._on_child_exiting(child, message)

    def process_events(self) -> None:
        """Handle everything the I/O thread reported, fire due timers, dispatch. On L."""
        with self._lock:
            self._process_pending()

    def _process_pending(self) -> None:
        with self._lock:
            for _ in range(100_000):
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
                self._handle(event)
            for deadline in self._deadlines.pop_due(self.clock.now()):
                try:
                    deadline.callback()
                except Exception:
                    logger.exception("Pool timer %s raised", deadline.label)
            self._dispatch()

    def _wait_and_process(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            event = None
        with self._lock:
            if event is not None:
                self._handle(event)
            self._process_pending()

    def _on_notify(self) -> None:
        try:
            while os.read(self._notify_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.process_events()

    def _notify(self) -> None:
        """Tell whoever processes events that there is something to do."""
        if self._threaded:
            self.process_events()
            return
        try:
            os.write(self._notify_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def _wake_io(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _io_loop(self) -> None:
        posted_due: float | None = None  # the due deadline already handed to L
        while not self._io_stop.is_set():
            with self._watch_lock:
                conns = dict(self._watched_conns)
                sentinels = dict(self._watched_sentinels)
            next_due = self._deadlines.next_due()
            if next_due is not None and next_due == posted_due:
                # L has been told and will pop it; spinning with a zero timeout until it does
                # was most of an idle worker's CPU. Look again shortly.
                timeout = TIMER_RECHECK_S
            else:
                timeout = 1.0 if next_due is None else min(1.0, max(0.0, next_due - self.clock.now()))
            try:
                ready = wait_for([*conns, *sentinels, self._wake_r], timeout)
            except (OSError, ValueError):
                ready = []  # a connection closed under us; rebuild the list
                time.sleep(0.01)
            posted = False
            exited: list[int] = []
            for obj in ready:
                if obj == self._wake_r and not hasattr(obj, "recv_bytes"):
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif obj in conns:
                    posted |= self._read_one(obj, conns[obj])
                elif obj in sentinels:
                    exited.append(sentinels[obj])
            for child_id in exited:
                conn = next((c for c, cid in conns.items() if cid == child_id), None)
                if conn is not None:
                    self._read_remaining(conn, child_id)
                with self._watch_lock:
                    self._watched_sentinels = {s: c for s, c in self._watched_sentinels.items() if c != child_id}
                    self._watched_conns = {s: c for s, c in self._watched_conns.items() if c != child_id}
                self._events.put(("exit", child_id))
                posted = True
            next_due = self._deadlines.next_due()
            if next_due is not None and next_due <= self.clock.now() and next_due != posted_due:
                self._events.put(("timers",))
                posted_due = next_due
                posted = True
            if posted:
                self._notify()

    def _read_one(self, conn: Any, child_id: int) -> bool:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            # The child closed its end: stop watching the pipe; the sentinel reports the exit.
            with self._watch_lock:
                self._watched_conns.pop(conn, None)
            return False
        try:
            message = protocol.decode(data)
        except ProtocolError as exc:
            self._events.put(("garbage", child_id, str(exc)))
            return True
        self._events.put(("msg", child_id, message))
        return True

    def _read_remaining(self, conn: Any, child_id: int) -> None:
        """A child exited: take what it wrote before dying, so results precede the death."""
        for _ in range(10_000):
            try:
                if not conn.poll(0):
                    return
            except (EOFError, OSError):
                return
            if not self._read_one(conn, child_id):
                return

    # -- stopping ------------------------------------------------------------------------
    def _stop_children(self) -> None:
        with self._lock:
            for child in list(self._children.values()):
                if child.state is not ChildState.DEAD and not child.stop_sent:
                    child.stop_sent = True
                    child.state = ChildState.DRAINING
                    self._send(child, protocol.encode(StopChild("shutdown")))
        deadline = time.monotonic() + CHILD_EXIT_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                if not self._children:
                    break
            self._wait_and_process(0.05)
        with self._lock:
            leftovers = list(self._children.values())
        for child in leftovers:
            logger.warning("Child pid=%s did not exit in time; killing it", child.pid)
            self._kill(child.pid, signal.SIGKILL)
            try:
                child.process.join(2.0)
            except Exception:
                pass
        self._process_pending()

    def _shutdown_threads(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            hub = self._hub
        self._io_stop.set()
        self._wake_io()
        self._sender.put(None)
        current = threading.current_thread()
        for thread in (self._io_thread, self._sender_thread):
            if thread is not None and thread is not current:
                thread.join(2.0)
        if hub is not None:
            try:
                hub.remove_reader(self._notify_r)
            except Exception:
                pass
        self._deadlines.clear()
        for fd in (self._wake_r, self._wake_w, self._notify_r, self._notify_w):
            try:
                os.close(fd)
            except OSError:
                pass


def pids(children: Iterable[ChildHandle]) -> list[int]:
    return [c.pid for c in children if c.state is not ChildState.DEAD]
