"""The supervisor: owns the children, the jobs handed to them, and their deadlines.

It does no I/O of its own and reads no clock but the injected one: the `Reactor` calls it when
a child's pipe is readable or writable, when a child's sentinel fires and when a deadline is
due; it answers by sending frames through each child's `ChildChannel`, signalling children by
pid (only its own, only while they are alive in the `ChildTable`), and calling Celery's
callbacks. A unit test drives it with a fake clock, a fake launcher and fake channels.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from celery_adaptive import protocol
from celery_adaptive.child import ChildSpec
from celery_adaptive.clock import Clock, MonotonicClock
from celery_adaptive.errors import MemoryLimitExceeded, ProtocolError
from celery_adaptive.jobs import Job
from celery_adaptive.memory.sample import MemorySample
from celery_adaptive.memory.sizes import format_bytes
from celery_adaptive.protocol import (
    ChildExiting,
    ChildReady,
    JobAccepted,
    JobFinished,
    RunJob,
    StopChild,
)
from celery_adaptive.scheduler import JobState, Scheduler
from celery_adaptive.settings import PoolSettings
from celery_adaptive.supervisor.children import Child, ChildState, ChildTable
from celery_adaptive.supervisor.deadlines import Deadline, DeadlineHeap
from celery_adaptive.supervisor.launcher import Launcher
from celery_adaptive.supervisor.memory import MemoryControl, OverHardLimit, Recycle
from celery_adaptive.supervisor.reactor import Reactor

logger = logging.getLogger("celery_adaptive.supervisor")

#: Between SIGTERM and SIGKILL for a child past its hard time limit (prefork: 0.1 s).
KILL_GRACE_S = 0.1
#: How long a child told to stop may take to exit before it is killed.
CHILD_EXIT_TIMEOUT_S = 10.0
#: After a child's sentinel fires, how often and how long to poll for its exit status.
REAP_POLL_S = 0.01
REAP_KILL_AFTER_S = 1.0
#: Warm shutdown waits for running tasks (Celery's promise); this bounds the loop's turns
#: (at 0.1 s each, about 11 days) so that no loop is unbounded.
MAX_JOIN_TURNS = 10_000_000
#: Head-of-line children stay this long (at least) after the head of line is clear again.
LANE_GRACE_S = 1.0
#: Dispatch rounds per call (a revoked task frees its slot for the next one).
MAX_DISPATCH_ROUNDS = 1000


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


def _readable(fd: int | None) -> bool:
    """Is ``fd`` readable right now (a zero-timeout poll)? None (no descriptor) counts as yes."""
    if fd is None:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


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
    on_child_started: Callable[[Child], None] = lambda child: None
    on_child_gone: Callable[[Child, int | None], None] = lambda child, code: None
    on_job_done: Callable[[Job, float | None], None] = lambda job, runtime: None
    #: A memory limit hit or an admission pause/resume: (kind, plain fields, never arguments).
    on_memory_event: Callable[[str, dict[str, Any]], None] = lambda kind, fields: None


class Supervisor:
    def __init__(
        self,
        settings: PoolSettings,
        spec_for_slot: Callable[[int], ChildSpec],
        launcher: Launcher,
        scheduler: Scheduler[Job],
        hooks: SupervisorHooks | None = None,
        clock: Clock | None = None,
        short_lanes: int = 0,
        send_signal: Callable[[int, int], None] = os.kill,
        memory: MemoryControl | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.hooks = hooks or SupervisorHooks()
        self.clock: Clock = clock or MonotonicClock()
        # Extra children that only run short tasks, kept while long tasks are around: with
        # every general child busy on long work, the OS still time-slices a short task in.
        self.short_lanes = short_lanes
        self.target = settings.concurrency
        self.children_table = ChildTable()
        self._spec_for_slot = spec_for_slot
        self._launcher = launcher
        self._send_signal = send_signal
        self._lock = threading.RLock()
        self.reactor = Reactor(self, self.clock, self._lock)
        # The book of jobs is the scheduler's: each job it holds carries its `Job` as payload
        # (jobs held back for memory wait in the memory guard until they are submitted).
        # An index of that book: the job each child is running (one at a time), so metrics
        # and the autoscaler do not scan every held job.
        self._running: dict[int, Job] = {}
        self._next_job_id = 0
        self._deadlines = DeadlineHeap()
        self._closing = False
        self._stopped = False
        self._start_failures = 0
        self._respawn_timer: Deadline | None = None
        self._steal_timer: Deadline | None = None
        self._spawn_pending = False
        self._head_of_line_clear_since: float | None = None
        self._lane_timer: Deadline | None = None
        # The memory guard's books (None: no memory watcher); fed by on_memory_sample.
        self.memory = memory
        self.counters: Counter[str] = Counter(
            received=0, started=0, succeeded=0, failed=0, lost=0, revoked_before_start=0,
            children_started=0, children_exited=0, children_crashed=0, hard_timeouts=0,
            soft_timeouts=0, bad_messages=0, memory_soft_limit=0, memory_hard_limit=0,
            memory_stopped_tasks=0, admission_pauses=0,
        )

    # ================================================================== lifecycle
    def start(self) -> None:
        """Start the first children, then the I/O thread (forking before threads exist)."""
        with self._lock:
            for _ in range(self.target):
                self._spawn_child()
            self.call_later(1.0, self._periodic, "periodic")
        self.reactor.start_thread()

    def attach_hub(self, hub: Any) -> None:
        """Run on Celery's event loop from now on. Called on every consumer (re)start."""
        self.reactor.attach_hub(hub)

    def did_start_ok(self) -> bool:
        return any(c.alive for c in self.children_table.snapshot())

    def close(self) -> None:
        """Stop dispatching and respawning (the first step of any shutdown)."""
        self._closing = True

    def flush(self) -> list[Job]:
        """Drop every job no child has received; the broker redelivers their messages."""
        with self._lock:
            dropped = [job for _, job in self.scheduler.flush_payloads()]
            if self.memory is not None:
                for job in dropped:
                    self.memory.ended(job)
                held = self.memory.flush()
                if held:
                    dropped = sorted(dropped + held, key=lambda job: job.submitted_at)
        if dropped:
            logger.info("Dropped %d unstarted task(s); the broker will redeliver them", len(dropped))
        return dropped

    def join(self, run_ready_callbacks: Callable[[], None] | None = None) -> None:
        """Warm stop: wait for every job handed to a child, then let the children exit.

        The hub no longer polls when Celery calls this, so it drives the I/O itself and runs
        the ack/reject callbacks Celery queued (``run_ready_callbacks``) so late acks are sent
        before the connection closes."""
        self.close()
        if self._interrupted_myself():
            return
        self.reactor.go_standalone()
        for _ in range(MAX_JOIN_TURNS):
            with self._lock:
                busy = self.scheduler.in_flight_count()
                alive = any(c.alive for c in self.children_table)
            if busy == 0 or not alive:
                break
            self.reactor.poll_once(0.1)
            if run_ready_callbacks is not None:
                run_ready_callbacks()
        self._stop_children(CHILD_EXIT_TIMEOUT_S)
        if run_ready_callbacks is not None:
            run_ready_callbacks()
        self._shutdown()

    def terminate(self) -> None:
        """Cold stop: kill every child now, report what they held, never wait unboundedly.
        Idempotent, and safe in a signal handler: the kills take no lock."""
        self._closing = True
        for child in self.children_table.snapshot():
            if child.alive:
                self._signal(child, signal.SIGKILL)
        if self._interrupted_myself():
            return
        if not self._lock.acquire(timeout=2.0):
            logger.warning("Pool busy in another thread at cold shutdown; children were killed")
            return
        try:
            if self._stopped:
                return
            self.reactor.go_standalone()
            self._wait_for_exits(2.0)
        finally:
            self._lock.release()
        self._shutdown()

    def _interrupted_myself(self) -> bool:
        """Called from a signal handler that interrupted this thread inside the supervisor?
        Then its books are mid-change: the caller only marks and kills (done above) and leaves
        the bookkeeping to Celery's next, ordinary call (it calls terminate() once the signal
        handler has returned and the event loop ends)."""
        owned = getattr(self._lock, "_is_owned", None)
        if owned is not None and owned():
            logger.debug("Pool stop requested from inside the pool (a signal handler); deferring")
            return True
        return False

    def _stop_children(self, timeout: float) -> None:
        with self._lock:
            for child in self.children_table:
                if child.state in (ChildState.STARTING, ChildState.IDLE, ChildState.BUSY,
                                   ChildState.DRAINING):
                    self._send_stop(child, "shutdown")
        self._wait_for_exits(timeout)

    def _wait_for_exits(self, timeout: float) -> None:
        """Drive the I/O until every child is reaped, at most ``timeout``; then kill the rest."""
        deadline = self.clock.now() + timeout
        while self.clock.now() < deadline and len(self.children_table):
            self.reactor.poll_once(0.05)
        leftovers = self.children_table.snapshot()
        for child in leftovers:
            logger.warning("Child pid=%s did not exit in time; killing it", child.pid)
            self._signal(child, signal.SIGKILL)
        kill_deadline = self.clock.now() + 2.0
        while self.clock.now() < kill_deadline and len(self.children_table):
            self.reactor.poll_once(0.05)
        with self._lock:
            for child in self.children_table:  # never reported exit: reap and book it now
                self._reap(child, self._exitcode(child, wait=0.5))

    def _shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._deadlines.clear()
        self.reactor.close()

    # ================================================================== jobs
    def new_job_id(self) -> int:
        with self._lock:
            self._next_job_id += 1
            return self._next_job_id

    def submit(self, job: Job) -> None:
        with self._lock:
            self.counters["received"] += 1
            # A task name known to need a lot of memory waits for it outside the scheduler.
            if self.memory is None or not self.memory.holds(job):
                self.scheduler.submit(job.job_id, job.task_name, job.affinity_key, job.submitted_at, job)
            if self.short_lanes:
                self._maintain_lanes()
            self._dispatch()

    def terminate_job(self, pid: int, signum: int) -> None:
        """Kill the child running a job (revoke with terminate). Takes no lock: it marks the
        job and sends the signal; the death is handled when the child's sentinel fires."""
        child = self.children_table.by_pid(pid)
        if child is None or not child.alive:
            return
        job = self._running.get(child.child_id)
        if job is not None:
            job.terminate_signal = signum
        self._signal(child, signum)

    # ================================================================== sizing
    def live_children(self) -> list[Child]:
        """General children that will take new work (the pool's size; lanes are extra)."""
        return self.children_table.serving(lane=False)

    def live_lanes(self) -> list[Child]:
        return self.children_table.serving(lane=True)

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

    # ================================================================== introspection
    def children(self) -> list[Child]:
        """Every child not yet reaped (safe from any thread: a snapshot)."""
        return self.children_table.snapshot()

    def jobs_in_flight(self) -> int:
        with self._lock:
            return self.scheduler.in_flight_count()

    def jobs_queued(self) -> int:
        """Tasks in the pool that no child has yet (heavy ones held for memory included)."""
        with self._lock:
            held = self.memory.held_count() if self.memory is not None else 0
            return self.scheduler.queued_count() + held

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting queued task has waited so far (0 when none waits)."""
        with self._lock:
            oldest = self.scheduler.oldest_queued_at()
            if self.memory is not None:
                held = self.memory.oldest_held_at()
                if held is not None and (oldest is None or held < oldest):
                    oldest = held
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def running_jobs(self) -> dict[int, Job]:
        """The job each busy child is running (child id -> job), for metrics."""
        with self._lock:
            return dict(self._running)

    def running_ages(self, now: float) -> dict[str, float]:
        """Longest time any running job of each task name has run so far."""
        ages: dict[str, float] = {}
        for job in self.running_jobs().values():
            assert job.accepted_at is not None
            age = max(0.0, now - job.accepted_at)
            if age > ages.get(job.task_name, -1.0):
                ages[job.task_name] = age
        return ages

    # ================================================================== timers
    def call_later(self, delay: float, callback: Callable[[], None], label: str) -> Deadline:
        """Run ``callback`` where the supervisor runs, after ``delay`` seconds. From any thread."""
        entry = self._deadlines.make(self.clock.now() + delay, callback, label)
        if self.reactor.mode == "hub" and not self.reactor.on_owner_thread():
            self.reactor.post(lambda: self._push_deadline(entry))
        else:
            with self._lock:
                self._push_deadline(entry)
        return entry

    def _push_deadline(self, entry: Deadline) -> None:
        if self._stopped:
            return
        if self._deadlines.push(entry):
            self.reactor.wake_at(entry.due)

    def next_due(self) -> float | None:
        return self._deadlines.next_due()

    def run_due(self) -> None:
        """Reactor: run the deadlines that are due, then re-arm for the next one."""
        with self._lock:
            for deadline in self._deadlines.pop_due(self.clock.now()):
                try:
                    deadline.callback()
                except Exception:
                    logger.exception("Pool timer %s raised", deadline.label)
            self._dispatch()
            due = self._deadlines.next_due()
            if due is not None:
                self.reactor.wake_at(due)

    # ================================================================== child I/O (reactor)
    def on_readable(self, child_id: int) -> None:
        with self._lock:
            child = self.children_table.get(child_id)
            if child is None:
                return
            self._read_child(child)
            self._dispatch()  # a child that became ready or finished a job takes the next one

    def _read_child(self, child: Child) -> None:
        try:
            frames = child.channel.read_frames()
        except ProtocolError as exc:
            self._bad_message(child, str(exc))
            return
        for frame in frames:
            if child.state in (ChildState.KILLED, ChildState.DEAD):
                return
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                self._bad_message(child, str(exc))
                return
            self._handle(child, message)
        if child.channel.eof:
            # The child closed its end: nothing more will come; its sentinel reports the exit.
            self.reactor.remove_reader(child.channel.read_fd)

    def on_writable(self, child_id: int) -> None:
        with self._lock:
            child = self.children_table.get(child_id)
            if child is None:
                return
            try:
                done = child.channel.flush()
            except OSError:
                done = True  # gone: the sentinel reports it
            if done:
                self.reactor.remove_writer(child.channel.write_fd)

    def on_sentinel(self, child_id: int) -> None:
        with self._lock:
            child = self.children_table.get(child_id)
            if child is None:
                return
            if not _readable(getattr(child.process, "sentinel", None)):
                # A stale event: the hub polled a batch in which another child's descriptor
                # was closed and its number reused for this child's sentinel.
                return
            if child.state is not ChildState.KILLED and child.alive:
                self._read_child(child)  # results written before the exit come first
            if child.alive:
                self._watch_exit(child, self.clock.now())

    def _watch_exit(self, child: Child, since: float) -> None:
        """The sentinel fired: reap the child, polling its status (never blocking the loop)."""
        sentinel = getattr(child.process, "sentinel", None)
        if sentinel is not None:
            self.reactor.remove_reader(sentinel)
        exitcode = self._exitcode(child)
        if exitcode is not None:
            if self._results_may_follow(child, since):
                # Something else still holds its result pipe open (a process the task forked):
                # a result may yet arrive, for up to worker_lost_wait (as prefork waits).
                self._read_child(child)
                child.timers.append(self._timer(REAP_POLL_S, lambda: self._watch_exit(child, since), "lost-wait"))
                return
            self._reap(child, exitcode)
            return
        # Its fds are closed but it has not exited (it closed them itself): give it a moment,
        # then kill it.
        if self.clock.now() - since > REAP_KILL_AFTER_S:
            self._signal(child, signal.SIGKILL)
        timer = self._timer(REAP_POLL_S, lambda: self._watch_exit(child, since), "reap")
        child.timers.append(timer)

    def _results_may_follow(self, child: Child, since: float) -> bool:
        if child.channel.eof or child.state is ChildState.KILLED or self._closing:
            return False
        if self.clock.now() - since >= self.settings.lost_wait:
            return False
        job = self._running.get(child.child_id)
        return job is not None and not job.reported

    @staticmethod
    def _exitcode(child: Child, wait: float = 0.0) -> int | None:
        try:
            if wait:
                child.process.join(wait)
            code = child.process.exitcode
        except Exception:
            return None
        return None if code is None else int(code)

    def _handle(self, child: Child, message: Any) -> None:
        if isinstance(message, JobAccepted):
            self._on_accepted(child, message)
        elif isinstance(message, JobFinished):
            self._on_finished(child, message)
        elif isinstance(message, ChildReady):
            self._on_ready(child, message)
        elif isinstance(message, ChildExiting):
            self._on_exiting(child, message)
        else:
            self._bad_message(child, f"unexpected {type(message).__name__} from a child")

    def _bad_message(self, child: Child, problem: str) -> None:
        self.counters["bad_messages"] += 1
        logger.error("Child pid=%s sent an invalid message (%s); replacing it", child.pid, problem)
        self._kill(child, "invalid message", signal.SIGKILL)

    # ================================================================== children
    def _spawn_children(self, count: int, lane: bool = False) -> None:
        """Start ``count`` children. On Celery's event loop, one per loop turn: a fork holds
        the loop ~5-10 ms, and a child already ready should take a task before the next fork."""
        if count <= 0:
            return
        if self.reactor.mode == "hub" and count > 1:
            self._spawn_child(lane)
            if not self._spawn_pending:
                self._spawn_pending = True
                self._timer(0.0, self._continue_spawning, "spawn")
            return
        for _ in range(count):
            self._spawn_child(lane)

    def _continue_spawning(self) -> None:
        self._spawn_pending = False
        self._dispatch()
        self._maintain()

    def _parent_fds(self) -> list[int]:
        fds: list[int] = []
        for child in self.children_table:
            fds.extend(child.channel.fds())
            sentinel = getattr(child.process, "sentinel", None)
            if sentinel is not None:
                fds.append(sentinel)
        return fds

    def _spawn_child(self, lane: bool = False) -> Child | None:
        slot = self.children_table.free_slot()
        spec = self._spec_for_slot(slot)
        self.hooks.before_create_process()
        try:
            launched = self._launcher.launch(spec, self._parent_fds())
        except Exception:
            logger.exception("Could not start a pool child")
            self._start_failures += 1
            self._schedule_respawn()
            return None
        child = Child(
            child_id=self.children_table.new_id(), slot=slot, cpu=spec.cpu, pid=launched.pid,
            process=launched.process, channel=launched.channel, created_at=self.clock.now(), lane=lane,
        )
        self.children_table.add(child)
        cid = child.child_id
        self.reactor.add_reader(child.channel.read_fd, lambda: self.on_readable(cid))
        if launched.sentinel is not None:
            self.reactor.add_reader(launched.sentinel, lambda: self.on_sentinel(cid))
        child.timers.append(
            self._timer(self.settings.child_start_timeout, lambda: self._on_start_timeout(child), "start-timeout")
        )
        self.counters["children_started"] += 1
        logger.debug("Started child pid=%s slot=%s cpu=%s", child.pid, slot, spec.cpu)
        return child

    def _on_start_timeout(self, child: Child) -> None:
        if child.state is ChildState.STARTING:
            logger.error("Child pid=%s did not report ready in %gs; killing it",
                         child.pid, self.settings.child_start_timeout)
            self._kill(child, "start timeout", signal.SIGKILL)

    def _on_ready(self, child: Child, message: ChildReady) -> None:
        child.ready_at = self.clock.now()
        child.cpu = message.cpu
        self._start_failures = 0
        logger.debug("Child pid=%s ready %.0f ms after it was started", child.pid,
                     (child.ready_at - child.created_at) * 1000)
        if child.state is not ChildState.STARTING:
            return  # told to stop before it was ready: the StopChild is already on its way
        self.children_table.transition(child, ChildState.IDLE, "ready")
        self.scheduler.add_child(child.child_id, short_only=child.lane)
        self.hooks.on_child_started(child)

    def _on_exiting(self, child: Child, message: ChildExiting) -> None:
        """A planned exit (max tasks, max memory, stop): out of rotation, replacement early."""
        child.exit_reason = message.reason
        logger.info("Child pid=%s is leaving: %s %s", child.pid, message.reason, message.detail)
        self._leave_scheduler(child)
        if child.state in (ChildState.STARTING, ChildState.IDLE, ChildState.BUSY, ChildState.DRAINING):
            self.children_table.transition(child, ChildState.STOPPING, message.reason)
            self._arm_exit_timeout(child)
        self._maintain()

    def _leave_scheduler(self, child: Child) -> None:
        if child.ready_at is not None and child.state in (ChildState.IDLE, ChildState.BUSY):
            self.scheduler.drain_child(child.child_id)

    def _drain(self, child: Child, reason: str) -> None:
        """Take no new work; stop once what it holds is done (never kills a busy child)."""
        if not child.serving:
            return
        if child.state is ChildState.STARTING:
            self._send_stop(child, reason)
            return
        self._leave_scheduler(child)
        self.children_table.transition(child, ChildState.DRAINING, reason)
        logger.info("Draining child pid=%s (%s)", child.pid, reason)
        self._maybe_stop_drained(child, reason)

    def _maybe_stop_drained(self, child: Child, reason: str = "drained") -> None:
        if child.state is ChildState.DRAINING and self.scheduler.is_idle(child.child_id):
            self._send_stop(child, reason)

    def _send_stop(self, child: Child, reason: str) -> None:
        if child.state in (ChildState.STOPPING, ChildState.KILLED, ChildState.DEAD):
            return
        if child.state in (ChildState.IDLE, ChildState.BUSY):
            self._leave_scheduler(child)
        child.exit_reason = child.exit_reason or reason
        self.children_table.transition(child, ChildState.STOPPING, reason)
        self._send(child, protocol.encode(StopChild(reason)))
        self._arm_exit_timeout(child)

    def _arm_exit_timeout(self, child: Child) -> None:
        def overdue() -> None:
            if child.state is ChildState.STOPPING:
                logger.warning("Child pid=%s did not exit %.0fs after it was told to; killing it",
                               child.pid, CHILD_EXIT_TIMEOUT_S)
                self._kill(child, "exit timeout", signal.SIGKILL)

        child.timers.append(self._timer(CHILD_EXIT_TIMEOUT_S, overdue, "exit-timeout"))

    def _kill(self, child: Child, why: str, signum: int) -> None:
        """Doom a child: it takes no more work, its queued tasks move, then the signal."""
        if not child.alive or child.state is ChildState.KILLED:
            return
        if child.state in (ChildState.IDLE, ChildState.BUSY):
            self._leave_scheduler(child)
        self.children_table.transition(child, ChildState.KILLED, why)
        self._signal(child, signum)
        if signum != signal.SIGKILL:
            def escalate() -> None:
                if child.alive:  # the same child object: never another one that reused the pid
                    self._signal(child, signal.SIGKILL)

            child.timers.append(self._timer(KILL_GRACE_S, escalate, "kill"))

    def _signal(self, child: Child, signum: int) -> None:
        # Only our own, unreaped children: a reaped pid may belong to someone else by now.
        if not child.alive:
            return
        try:
            self._send_signal(child.pid, signum)
        except ProcessLookupError:
            pass

    def _reap(self, child: Child, exitcode: int | None) -> None:
        """A child is gone: book it, report what it was running, replace it if needed."""
        if not child.alive:
            return
        planned = child.exit_reason is not None and exitcode == 0
        was_ready = child.ready_at is not None
        in_scheduler = was_ready and child.child_id in self.scheduler.children()
        child.exitcode = exitcode
        self.children_table.transition(child, ChildState.DEAD, describe_exitcode(exitcode))
        for timer in child.timers:
            timer.cancel()
        child.timers.clear()
        self.reactor.remove_reader(child.channel.read_fd)
        self.reactor.remove_writer(child.channel.write_fd)
        sentinel = getattr(child.process, "sentinel", None)
        if sentinel is not None:
            self.reactor.remove_reader(sentinel)
        child.channel.close()
        if child.busy_since is not None:
            child.busy_seconds += self.clock.now() - child.busy_since
            child.busy_since = None
        self.counters["children_exited"] += 1
        self._running.pop(child.child_id, None)
        lost: tuple[Job, ...] = ()
        if in_scheduler:
            lost = self.scheduler.remove_child(child.child_id).lost_payloads
        for job in lost:
            self._report_lost(job, exitcode)
        if self.memory is not None:
            self.memory.child_gone(child.child_id)
        if planned:
            logger.debug("Child pid=%s exited (%s)", child.pid, child.exit_reason)
        else:
            self.counters["children_crashed"] += 1
            if not self._closing and child.exit_reason is None:
                logger.error("Process pid=%s exited with %s", child.pid, describe_exitcode(exitcode))
            if not was_ready:
                self._start_failures += 1
        self.hooks.on_child_gone(child, exitcode)
        self._maintain()
        self._dispatch()

    def _maintain(self) -> None:
        """Bring the number of serving children to the target: spawn, or drain the surplus."""
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
            self._schedule_respawn()
            return
        self._spawn_children(missing)

    def _schedule_respawn(self) -> None:
        """A child that dies before it is ready (or cannot be forked) will likely fail again (a
        broken import, a bad initializer, no memory): back off instead of a tight loop."""
        if self._respawn_timer is not None and not self._respawn_timer.cancelled:
            return
        delay = min(0.1 * 2 ** (self._start_failures - 1), 10.0)
        if self._start_failures in (1, 3, 10) or self._start_failures % 50 == 0:
            logger.error("Pool child failed to start %d time(s) in a row; retrying in %.1fs",
                         self._start_failures, delay)
        self._respawn_timer = self._timer(delay, self._respawn_now, "respawn")

    def _respawn_now(self) -> None:
        self._respawn_timer = None
        if self._closing or self._stopped:
            return
        if len(self.live_children()) < self.target:
            self._spawn_child()
        self._maintain()

    def _maintain_lanes(self) -> None:
        """Head-of-line protection, without prediction: while every general child has been
        running its current task for longer than the long-task threshold and work waits, add
        up to ``short_lanes`` extra children (lanes); once a general child is free again, or
        nothing waits, retire them (idle ones at once, busy ones after their task).

        Triggered by what runs now, not by task names, so it also protects short calls that
        share a name with long ones. The scheduler still uses per-name run times as a hint: a
        lane does not take a task whose name is known to be long."""
        if not self.short_lanes:
            return
        lanes = self.live_lanes()
        now = self.clock.now()
        if self._all_stuck_on_long_work() and self.scheduler.queued_count() > 0:
            wanted = self.short_lanes
            self._head_of_line_clear_since = None
        else:
            if self._head_of_line_clear_since is None:
                self._head_of_line_clear_since = now
            # Keep the lanes a little while: long work tends to come in runs, and a fork per
            # long task would cost more than an idle child for a second.
            grace = max(LANE_GRACE_S, 10 * self.scheduler.long_task_threshold)
            if now - self._head_of_line_clear_since < grace:
                pending = self._lane_timer
                if lanes and (pending is None or pending.cancelled):
                    self._lane_timer = self._timer(grace, self._on_lane_timer, "head-of-line grace")
                return
            wanted = 0
        if len(lanes) > wanted:
            idle = [c for c in lanes if c.state in (ChildState.STARTING, ChildState.IDLE)]
            busy_lanes = len(lanes) - len(idle)
            for child in idle[: len(lanes) - max(wanted, 0)]:
                self._drain(child, "head of line clear")
            if wanted == 0 and busy_lanes and not self.scheduler.queued_count():
                for child in lanes:
                    if child.state is ChildState.BUSY:
                        self._drain(child, "head of line clear")
        elif len(lanes) < wanted and not self._start_failures and self._admitting():
            logger.info("Every child has run a long task for over %gs and %d task(s) wait: "
                        "starting %d head-of-line child(ren)", self.scheduler.long_task_threshold,
                        self.scheduler.queued_count(), wanted - len(lanes))
            self._spawn_children(wanted - len(lanes), lane=True)

    def _on_lane_timer(self) -> None:
        self._lane_timer = None
        self._maintain_lanes()

    def _all_stuck_on_long_work(self) -> bool:
        general = self.live_children()
        if not general:
            return False
        now = self.clock.now()
        threshold = self.scheduler.long_task_threshold
        for child in general:
            job = self._running.get(child.child_id)
            if job is None or job.accepted_at is None or now - job.accepted_at < threshold:
                return False
        return True

    def _periodic(self) -> None:
        """Housekeeping once a second (lanes come and go with long tasks)."""
        if self._closing or self._stopped:
            return
        self._maintain()
        self._timer(1.0, self._periodic, "periodic")

    def _drain_candidates(self, live: list[Child]) -> list[Child]:
        """Starting children first, then idle ones, then those predicted to finish soonest."""
        now = self.clock.now()

        def rank(child: Child) -> tuple[int, float, int]:
            if child.state is ChildState.STARTING:
                return (0, 0.0, -child.child_id)
            if child.state is ChildState.IDLE:
                return (1, 0.0, -child.child_id)
            return (2, self.scheduler.predicted_free_at(child.child_id, now), -child.child_id)

        return sorted(live, key=rank)

    # ================================================================== jobs on children
    def _admitting(self) -> bool:
        """May tasks start (and the pool grow)? Not while memory is over the threshold."""
        return self.memory is None or self.memory.admission.open

    def _dispatch(self) -> None:
        if self._closing or self._stopped:
            return
        memory = self.memory
        if memory is not None:
            if not memory.admission.open:
                return  # tasks wait in the pool until memory falls (on_memory_sample)
            for job in memory.release():
                self.scheduler.submit(job.job_id, job.task_name, job.affinity_key, job.submitted_at, job)
        now = self.clock.now()
        for _round in range(MAX_DISPATCH_ROUNDS):
            dispatches = self.scheduler.dispatch(now)
            if not dispatches:
                break
            skipped = False
            for d in dispatches:
                job = self.scheduler.payload(d.job_id)
                child = self.children_table.get(d.child_id)
                if child is None or not child.accepting:  # pragma: no cover - books disagree
                    logger.error("Scheduler chose child %s, which takes no work", d.child_id)
                    continue
                if job.is_revoked():
                    # Celery acked it and recorded REVOKED (or expired): forget it.
                    self.scheduler.finished(d.job_id, now)
                    if memory is not None:
                        memory.ended(job)
                    self.counters["revoked_before_start"] += 1
                    skipped = True
                    continue
                self._hand_over(child, job)
            if not skipped:
                break
        self._arm_steal_timer(now)

    def _hand_over(self, child: Child, job: Job) -> None:
        try:
            soft = job.soft_timeout or self.settings.soft_time_limit
            data = protocol.encode(RunJob(job.job_id, job.target, tuple(job.args), dict(job.kwargs), soft))
        except Exception as exc:
            # Arguments that cannot be pickled: the task fails, the child is untouched.
            self.scheduler.finished(job.job_id, self.clock.now())
            if self.memory is not None:
                self.memory.ended(job)
            job.reported = True
            self.counters["failed"] += 1
            self._call(job.error_callback, _einfo(exc))
            return
        job.child_id = child.child_id
        if child.state is ChildState.IDLE:
            self.children_table.transition(child, ChildState.BUSY, "job")
            child.busy_since = self.clock.now()
        self._send(child, data)

    def _send(self, child: Child, data: bytes) -> None:
        try:
            if not child.channel.send(data):
                cid = child.child_id
                self.reactor.add_writer(child.channel.write_fd, lambda: self.on_writable(cid))
        except OSError:
            pass  # the child is gone: its sentinel reports it and its jobs are requeued

    def _arm_steal_timer(self, now: float) -> None:
        """Dispatch again when a keyed task held for its busy owner may be stolen."""
        at = self.scheduler.next_steal_at
        if at is None:
            return
        pending = self._steal_timer
        if pending is not None and not pending.cancelled and pending.due <= at:
            return
        self._steal_timer = self._timer(max(0.0, at - now), self._on_steal_timer, "steal")

    def _on_steal_timer(self) -> None:
        self._steal_timer = None
        self._dispatch()

    def _on_accepted(self, child: Child, message: JobAccepted) -> None:
        job = self.scheduler.payload_or_none(message.job_id)
        if job is None or self.scheduler.state_of(job.job_id) is not JobState.SENT:
            return
        job.pid, job.accepted_at = message.pid, message.started_at
        self._running[child.child_id] = job
        self.scheduler.accepted(job.job_id, self.clock.now())
        if self.memory is not None:
            self.memory.started(job, child.child_id)
        self.counters["started"] += 1
        self._call(job.accept_callback, message.pid, message.started_at)
        # Limits count from the child's own start stamp (same monotonic clock), so a parent
        # that read the message late does not extend them.
        elapsed = max(0.0, self.clock.now() - message.started_at)
        soft = job.soft_timeout or self.settings.soft_time_limit
        hard = job.hard_timeout or self.settings.hard_time_limit
        job_id, cid = job.job_id, child.child_id
        if self.short_lanes and not child.lane:
            # The moment this task becomes "long": the head of line may be blocked then.
            self._timer(max(0.0, self.scheduler.long_task_threshold - elapsed) + 1e-3,
                        self._maintain_lanes, "head-of-line")
        if soft:
            job.soft_timer = self._timer(max(0.0, soft - elapsed),
                                         lambda: self._on_soft_limit(job_id, cid, soft), "soft")
        if hard:
            job.hard_timer = self._timer(max(0.0, hard - elapsed),
                                         lambda: self._on_hard_limit(job_id, cid, hard), "hard")

    def _running_on(self, job_id: int, child_id: int) -> tuple[Job, Child] | None:
        """The job, if it is still running on that very child (not finished, not reported)."""
        job = self.scheduler.payload_or_none(job_id)
        child = self.children_table.get(child_id)
        if job is None or child is None or job.reported or job.child_id != child_id:
            return None
        if self.scheduler.state_of(job_id) is not JobState.STARTED:
            return None
        return job, child

    def _on_soft_limit(self, job_id: int, child_id: int, soft: float) -> None:
        found = self._running_on(job_id, child_id)
        if found is None:
            return
        job, child = found
        self.counters["soft_timeouts"] += 1
        self._call(job.timeout_callback, True, soft)
        # The child raises only if its current job has run for the soft limit (a late signal
        # cannot hit the next task), and keeps one that arrives before the task code starts.
        self._signal(child, signal.SIGUSR1)

    def _on_hard_limit(self, job_id: int, child_id: int, hard: float) -> None:
        found = self._running_on(job_id, child_id)
        if found is None:
            return
        job, child = found
        from celery.exceptions import TimeLimitExceeded

        job.reported = True
        self.counters["hard_timeouts"] += 1
        self.hooks.on_job_done(job, None)
        # prefork's order: the failure first, then the timeout callback, then the kill.
        self._call(job.error_callback, _einfo(TimeLimitExceeded(hard)))
        self._call(job.timeout_callback, False, hard)
        # KILLED takes the child out of rotation first, so the SIGKILL that follows the
        # SIGTERM can only ever hit this child and this task.
        self._kill(child, f"hard time limit ({hard}s) exceeded", signal.SIGTERM)

    def _on_finished(self, child: Child, message: JobFinished) -> None:
        job = self.scheduler.payload_or_none(message.job_id)
        if job is None:
            return
        if self._running.get(child.child_id) is job:
            del self._running[child.child_id]
        self._cancel_job_timers(job)
        if self.memory is not None:
            self.memory.ended(job)
        child.tasks_done += 1
        now = self.clock.now()
        self.scheduler.finished(job.job_id, now, message.runtime)
        if self.scheduler.is_idle(child.child_id):
            if child.state is ChildState.BUSY:
                self.children_table.transition(child, ChildState.IDLE, "job done")
            if child.busy_since is not None:
                child.busy_seconds += now - child.busy_since
                child.busy_since = None
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
        if self.short_lanes:
            self._maintain_lanes()

    def _report_lost(self, job: Job, exitcode: int | None) -> None:
        self._cancel_job_timers(job)
        if self.memory is not None:
            self.memory.ended(job)
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
        error = WorkerLostError(f"Worker exited prematurely: {describe_exitcode(exitcode)} Job: {job.job_id}.")
        self._call(job.error_callback, _einfo(error))

    # ================================================================== memory
    def on_memory_sample(self, sample: MemorySample) -> None:
        """A reading of the memory watcher (posted to this thread): stop a child over the hard
        limit, drain one over the soft limit, pause or resume admission, learn task peaks."""
        with self._lock:
            memory = self.memory
            if memory is None or self._stopped:
                return
            actions, change = memory.assess(sample, self.children_table.get)
            for action in actions:
                if isinstance(action, OverHardLimit):
                    self._over_hard_memory_limit(action, sample.at)
                elif isinstance(action, Recycle):
                    self._recycle_for_memory(action)
            if change is not None:
                self._admission_changed(change)
            if actions:
                self._maintain()  # the replacements start now, not when the children exit
            self._dispatch()

    def memory_pressure(self) -> str | None:
        """Why no task starts now (memory over the admission threshold), or None."""
        return None if self.memory is None else self.memory.pressure()

    def _over_hard_memory_limit(self, action: OverHardLimit, read_at: float) -> None:
        child, reading = action.child, action.reading
        # What it already wrote comes first: a result (the reading was of a finished task) or
        # an acceptance (a task that started after the reading is not the one to blame).
        self._read_child(child)
        assert self.memory is not None
        if not child.alive or child.state is ChildState.KILLED or not self.memory.current(child, reading, read_at):
            return
        if child.ready_at is not None and child.child_id in self.scheduler.children() and any(
            self.scheduler.state_of(job_id) is JobState.SENT
            for job_id in self.scheduler.window_of(child.child_id)
        ):
            # A task handed over and not yet acknowledged may be starting this very moment:
            # killing now could run it twice (it would be requeued as never started). The next
            # reading, within the interval, finds it started or not taken.
            return
        self.counters["memory_hard_limit"] += 1
        limit_text = self.memory.config.hard_text or format_bytes(action.limit)
        detail = (f"RSS {format_bytes(reading.rss)} ({reading.rss} bytes) is over "
                  f"adaptive_memory_hard_limit={limit_text} ({action.limit} bytes)")
        job = action.job
        fields: dict[str, Any] = {"child_pid": child.pid, "rss_bytes": reading.rss, "limit_bytes": action.limit}
        if job is not None and self._running_on(job.job_id, child.child_id) is not None:
            self.counters["memory_stopped_tasks"] += 1
            job.reported = True
            self.hooks.on_job_done(job, None)
            message = f"Task {job.task_name}[{job.correlation_id}] stopped: its pool child pid={child.pid} {detail}"
            logger.error("%s; killing the child", message)
            self._call(job.error_callback, _einfo(MemoryLimitExceeded(message, reading.rss, action.limit)))
            fields.update(task=job.task_name, task_id=job.correlation_id)
        else:
            logger.error("Child pid=%s %s; killing it", child.pid, detail)
        child.exit_reason = "memory hard limit"
        # SIGKILL at once: the memory is what is running out, not the time for a clean exit.
        self._kill(child, "memory hard limit", signal.SIGKILL)
        self.hooks.on_memory_event("hard-limit", fields)

    def _recycle_for_memory(self, action: Recycle) -> None:
        child, reading = action.child, action.reading
        if child.state not in (ChildState.IDLE, ChildState.BUSY):
            return
        assert self.memory is not None
        self.counters["memory_soft_limit"] += 1
        limit_text = self.memory.config.soft_text or format_bytes(action.limit)
        logger.warning("Child pid=%s RSS %s is over adaptive_memory_soft_limit=%s: it finishes its "
                       "task and is replaced", child.pid, format_bytes(reading.rss), limit_text)
        self._drain(child, "memory soft limit")
        self.hooks.on_memory_event("soft-limit", {"child_pid": child.pid, "rss_bytes": reading.rss,
                                                  "limit_bytes": action.limit})

    def _admission_changed(self, change: str) -> None:
        assert self.memory is not None
        system = self.memory.system
        fields: dict[str, Any] = {}
        if system is not None:
            fields = {"used_bytes": system.used, "limit_bytes": system.limit, "source": system.source}
            threshold = self.memory.admission.threshold_bytes(system)
            if threshold is not None:
                fields["threshold_bytes"] = threshold
        if change == "paused":
            self.counters["admission_pauses"] += 1
            logger.warning("No task starts until memory falls: %s", self.memory.admission.reason)
            self.hooks.on_memory_event("admission-paused", fields)
        else:
            used = format_bytes(system.used) if system is not None else "unknown"
            logger.info("Memory in use is down to %s: tasks start again", used)
            self.hooks.on_memory_event("admission-resumed", fields)

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
            # Never the callback's repr: a Celery request's carries the task's arguments.
            logger.exception("Pool callback %s raised", getattr(callback, "__qualname__", "?"))

    def _timer(self, delay: float, callback: Callable[[], None], label: str) -> Deadline:
        """A deadline from the owner thread (no hand-off needed)."""
        entry = self._deadlines.make(self.clock.now() + delay, callback, label)
        self._push_deadline(entry)
        return entry


def pids(children: Iterable[Child]) -> list[int]:
    """Pids of the children that serve the pool (what prefork's ``processes`` lists)."""
    return [c.pid for c in children if c.serving and not c.lane]
