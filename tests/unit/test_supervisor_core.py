"""The real supervisor on a fake clock, with fake children: spawn, crash, stall, time limits,
drain, exit, back-off. No process, no pipe, no thread: every step is a method call and
every wait is `FakeClock.advance`, so each test runs in milliseconds."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from celery_adaptive import protocol
from celery_adaptive.child import ChildSpec
from celery_adaptive.clock import FakeClock
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
from celery_adaptive.settings import build_settings
from celery_adaptive.supervisor import (
    Child,
    ChildState,
    ChildTable,
    IllegalTransition,
    Launched,
    Supervisor,
    SupervisorHooks,
)
from celery_adaptive.supervisor.channel import FrameDecoder, encode_frame
from celery_adaptive.supervisor.children import TRANSITIONS
from celery_adaptive.supervisor.core import CHILD_EXIT_TIMEOUT_S, KILL_GRACE_S
from celery_adaptive.supervisor.memory import MemoryControl

_fds = itertools.count(10_000)  # never real descriptors: nothing polls them in this tier


def _original(einfo: Any) -> BaseException:
    """The exception inside billiard's ExceptionInfo (newer billiard wraps it)."""
    return getattr(einfo.exception, "exc", einfo.exception)


def add(x: int, y: int) -> int:
    return x + y


class FakeChannel:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = next(_fds), next(_fds)
        self.incoming: list[bytes] = []
        self.sent: list[Any] = []
        self.eof = False
        self.closed = False

    def read_frames(self) -> list[bytes]:
        frames, self.incoming = self.incoming, []
        return frames

    def send(self, payload: bytes) -> bool:
        if self.closed:
            raise BrokenPipeError
        self.sent.append(protocol.decode(payload))
        return True

    def flush(self) -> bool:
        return True

    def fds(self) -> tuple[int, int]:
        return self.read_fd, self.write_fd

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProcess:
    pid: int
    sentinel: int = field(default_factory=lambda: next(_fds))
    exitcode: int | None = None

    def join(self, timeout: float | None = None) -> None:
        return None


class FakeLauncher:
    def __init__(self) -> None:
        self.pids = itertools.count(1000)
        self.launched: list[Launched] = []
        self.fail_next = False

    def launch(self, spec: ChildSpec, close_in_child: Iterable[int]) -> Launched:
        if self.fail_next:
            self.fail_next = False
            raise OSError("fork failed")
        pid = next(self.pids)
        launched = Launched(pid, FakeProcess(pid), FakeChannel(), None)
        self.launched.append(launched)
        return launched


class RecordingTable(ChildTable):
    taken: set[tuple[ChildState, ChildState]] = set()

    def transition(self, child: Child, new: ChildState, why: str = "") -> bool:
        old = child.state
        changed = super().transition(child, new, why)
        if changed:
            RecordingTable.taken.add((old, new))
        return changed


class Harness:
    def __init__(self, children: int = 2, memory: MemoryControl | None = None, lanes: int = 0,
                 **conf: Any) -> None:
        options = {"limit": children, "soft_timeout": conf.pop("soft", None), "timeout": conf.pop("hard", None)}
        self.settings = build_settings(conf, options)
        self.clock = FakeClock(100.0)
        self.launcher = FakeLauncher()
        self.signals: list[tuple[int, int]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sup = Supervisor(
            self.settings, lambda slot: ChildSpec(slot, None, (), None, None, "fork", ()),
            self.launcher, Scheduler(window=conf.pop("window", 1)),
            hooks=SupervisorHooks(on_memory_event=lambda kind, fields: self.events.append((kind, fields))),
            clock=self.clock, send_signal=lambda pid, sig: self.signals.append((pid, sig)),
            memory=memory, short_lanes=lanes,
        )
        self.sup.children_table = RecordingTable()
        self.outcomes: list[tuple[str, Any]] = []
        with self.sup._lock:
            for _ in range(self.sup.target):
                self.sup._spawn_child()

    # -- the children's side ----------------------------------------------------------
    def child(self, index: int) -> Child:
        pid = self.launcher.launched[index].pid
        child = self.sup.children_table.by_pid(pid)
        assert child is not None, f"child {index} (pid {pid}) is not in the table"
        return child

    def deliver(self, child: Child, *messages: Any) -> None:
        channel: FakeChannel = child.channel
        channel.incoming.extend(protocol.encode(m) for m in messages)
        self.sup.on_readable(child.child_id)

    def ready(self, *children: Child) -> None:
        for child in children:
            self.deliver(child, ChildReady(child.pid, None))

    def ready_all(self) -> None:
        self.ready(*[c for c in self.sup.children() if c.state is ChildState.STARTING])

    def exit(self, child: Child, code: int) -> None:
        child.process.exitcode = code
        child.channel.eof = True  # its end of the pipe closed with it
        self.sup.on_sentinel(child.child_id)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sup.run_due()

    def sent(self, child: Child, kind: type) -> list[Any]:
        return [m for m in child.channel.sent if isinstance(m, kind)]

    # -- Celery's side ----------------------------------------------------------------
    def submit(self, name: str = "t", key: str | None = None, soft: float | None = None,
               hard: float | None = None, revoked: bool = False) -> Job:
        outcomes = self.outcomes

        class Request:
            def revoked(self) -> bool:
                return revoked

            def on_success(self, value: Any) -> None:
                outcomes.append(("ok", value))

        request = Request()
        job = Job(
            self.sup.new_job_id(), add, (1, 2), {},
            callback=request.on_success,
            error_callback=lambda einfo: outcomes.append(("error", _original(einfo))),
            accept_callback=lambda pid, at: outcomes.append(("accepted", pid)),
            timeout_callback=lambda soft, limit: outcomes.append(("timeout", (soft, limit))),
            soft_timeout=soft, hard_timeout=hard, correlation_id="id", task_name=name,
            affinity_key=key, submitted_at=self.clock.now(),
        )
        self.sup.submit(job)
        return job

    def holder(self, job: Job) -> Child:
        for child in self.sup.children():
            if any(isinstance(m, RunJob) and m.job_id == job.job_id for m in child.channel.sent):
                return child
        raise AssertionError(f"job {job.job_id} was sent to no child")

    def run(self, job: Job, runtime: float = 0.01, value: Any = 3) -> Child:
        child = self.holder(job)
        self.deliver(child, JobAccepted(job.job_id, child.pid, self.clock.now()))
        self.clock.advance(runtime)
        self.deliver(child, JobFinished(job.job_id, True, value, runtime))
        return child


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness


# ------------------------------------------------------------------ the transition table
@pytest.mark.parametrize("old", list(ChildState))
@pytest.mark.parametrize("new", list(ChildState))
def test_the_table_allows_exactly_what_it_declares(old: ChildState, new: ChildState) -> None:
    table = ChildTable()
    child = Child(1, 0, None, 4242, None, FakeChannel(), 0.0, state=old)
    if old is new:
        assert table.transition(child, new) is False
    elif new in TRANSITIONS[old]:
        assert table.transition(child, new) is True
        assert child.state is new
    else:
        with pytest.raises(IllegalTransition):
            table.transition(child, new)
        assert child.state is old


# ------------------------------------------------------------------ life of a child
def test_a_job_runs_and_its_child_returns_to_idle(h: Harness) -> None:
    h.ready_all()
    assert all(c.state is ChildState.IDLE for c in h.sup.children())
    job = h.submit()
    child = h.holder(job)
    assert child.state is ChildState.BUSY
    h.run(job)
    assert h.outcomes == [("accepted", child.pid), ("ok", 3)]
    assert child.state is ChildState.IDLE and child.tasks_done == 1
    assert h.sup.counters["succeeded"] == 1


def test_work_waits_for_a_ready_child(h: Harness) -> None:
    job = h.submit()
    assert all(not c.channel.sent for c in h.sup.children())
    h.ready(h.child(0))
    assert h.holder(job) is h.child(0)


def test_a_crash_mid_task_reports_worker_lost_and_replaces_the_child(h: Harness) -> None:
    from celery.exceptions import WorkerLostError

    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.exit(child, -signal.SIGKILL)
    assert child.state is ChildState.DEAD
    assert isinstance(h.outcomes[-1][1], WorkerLostError)
    assert "signal 9 (SIGKILL)" in str(h.outcomes[-1][1])
    assert len(h.sup.live_children()) == 2 and len(h.launcher.launched) == 3


def test_an_unstarted_job_of_a_dead_child_runs_elsewhere(h: Harness) -> None:
    h.ready_all()
    job = h.submit()
    first = h.holder(job)
    h.exit(first, 1)  # died before it accepted the job
    second = h.holder_after = [c for c in h.sup.children() if any(
        isinstance(m, RunJob) and m.job_id == job.job_id for m in c.channel.sent)]
    assert second and second[0] is not first
    assert not [o for o in h.outcomes if o[0] == "error"]


def test_a_child_idle_crash_is_replaced_without_any_report(h: Harness) -> None:
    h.ready_all()
    h.exit(h.child(0), 1)
    assert h.outcomes == [] and len(h.launcher.launched) == 3


def test_start_timeout_kills_a_child_that_never_reports_ready() -> None:
    h = Harness(children=1, adaptive_child_start_timeout=4)
    child = h.child(0)
    h.advance(3.9)
    assert child.state is ChildState.STARTING and not h.signals
    h.advance(0.2)
    assert child.state is ChildState.KILLED
    assert h.signals == [(child.pid, signal.SIGKILL)]
    h.exit(child, -signal.SIGKILL)
    assert child.state is ChildState.DEAD


def test_children_dying_at_start_are_respawned_with_back_off() -> None:
    h = Harness(children=1)
    delays = []
    for attempt in range(5):
        h.exit(h.child(attempt), 3)
        before = len(h.launcher.launched)
        waited = 0.0
        while len(h.launcher.launched) == before:
            h.advance(0.05)
            waited += 0.05
            assert waited < 20
        delays.append(round(waited, 2))
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0], delays


def test_a_failed_fork_is_retried_later() -> None:
    h = Harness(children=1)
    h.ready_all()
    h.launcher.fail_next = True
    h.exit(h.child(0), 1)
    assert len(h.sup.live_children()) == 0
    h.advance(0.5)
    assert len(h.sup.live_children()) == 1


def test_a_bad_message_gets_the_child_killed_and_replaced(h: Harness) -> None:
    h.ready_all()
    child = h.child(0)
    child.channel.incoming.append(b"garbage")
    h.sup.on_readable(child.child_id)
    assert child.state is ChildState.KILLED and h.signals == [(child.pid, signal.SIGKILL)]
    h.exit(child, -signal.SIGKILL)
    assert len(h.sup.live_children()) == 2
    assert h.sup.counters["bad_messages"] == 1


def test_a_result_may_follow_a_dead_child_for_worker_lost_wait() -> None:
    h = Harness(children=1, worker_lost_wait=2)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    child.process.exitcode = 0  # exited, but a process it forked still holds the pipe open
    h.sup.on_sentinel(child.child_id)
    assert child.state is ChildState.BUSY and not [o for o in h.outcomes if o[0] == "error"]
    h.advance(0.5)
    h.deliver(child, JobFinished(job.job_id, True, 7, 0.5))
    h.advance(0.02)
    assert ("ok", 7) in h.outcomes
    h.advance(2.0)
    assert child.state is ChildState.DEAD and h.sup.counters["lost"] == 0


def test_a_dead_childs_job_is_lost_after_worker_lost_wait() -> None:
    from celery.exceptions import WorkerLostError

    h = Harness(children=1, worker_lost_wait=2)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    child.process.exitcode = 0
    h.sup.on_sentinel(child.child_id)
    h.advance(1.0)
    assert child.state is ChildState.BUSY
    h.advance(1.1)
    assert child.state is ChildState.DEAD
    assert isinstance(h.outcomes[-1][1], WorkerLostError)


# ------------------------------------------------------------------ time limits
def test_hard_limit_fails_the_task_and_kills_only_its_child() -> None:
    from celery.exceptions import TimeLimitExceeded

    h = Harness(children=2, hard=3)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.advance(2.9)
    assert not h.signals
    h.advance(0.2)
    assert isinstance(h.outcomes[1][1], TimeLimitExceeded)
    assert h.outcomes[2] == ("timeout", (False, 3.0))
    assert h.signals == [(child.pid, signal.SIGTERM)]
    assert child.state is ChildState.KILLED
    # The child is out of rotation at once: the next task never lands on it.
    nxt = h.submit()
    assert h.holder(nxt) is not child
    h.advance(KILL_GRACE_S + 0.01)
    assert h.signals[-1] == (child.pid, signal.SIGKILL)
    # A result it wrote before it died is not reported twice.
    h.deliver(child, JobFinished(job.job_id, True, 3, 3.0))
    assert [o for o in h.outcomes if o[0] == "ok"] == []
    h.exit(child, -signal.SIGKILL)
    assert h.sup.counters["hard_timeouts"] == 1 and h.sup.counters["lost"] == 0


def test_hard_limit_escalation_skips_a_child_that_already_died() -> None:
    h = Harness(children=1, hard=1)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.advance(1.01)
    h.exit(child, -signal.SIGTERM)
    h.advance(KILL_GRACE_S * 2)
    assert h.signals == [(child.pid, signal.SIGTERM)]  # no SIGKILL to a reaped pid


def test_a_job_that_finishes_in_time_sets_off_no_limit() -> None:
    h = Harness(children=1, soft=1, hard=2)
    h.ready_all()
    h.run(h.submit(), runtime=0.5)
    h.advance(5)
    assert not h.signals and h.sup.counters["soft_timeouts"] == 0


def test_soft_limit_signals_the_child_and_tells_celery() -> None:
    h = Harness(children=1)
    h.ready_all()
    job = h.submit(soft=0.5)
    child = h.holder(job)
    run = h.sent(child, RunJob)[0]
    assert run.soft_limit == 0.5  # the child can tell a timely signal from a late one
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.advance(0.6)
    assert h.signals == [(child.pid, signal.SIGUSR1)]
    assert ("timeout", (True, 0.5)) in h.outcomes


def test_limits_count_from_the_childs_start_stamp() -> None:
    h = Harness(children=1, hard=1)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    started = h.clock.now()
    h.clock.advance(0.8)  # the parent reads the acceptance late
    h.deliver(child, JobAccepted(job.job_id, child.pid, started))
    h.advance(0.25)
    assert h.signals == [(child.pid, signal.SIGTERM)]


# ------------------------------------------------------------------ sizing and draining
def test_shrinking_drains_a_busy_child_without_killing_it(h: Harness) -> None:
    h.ready_all()
    job = h.submit()
    busy = h.holder(job)
    idle = next(c for c in h.sup.children() if c is not busy)
    h.sup.set_target(1)
    assert idle.state is ChildState.STOPPING  # the idle one goes first
    assert h.sent(idle, StopChild)
    h.sup.set_target(1)
    h.deliver(idle, ChildExiting(idle.pid, "stop", "shrink"))
    h.exit(idle, 0)
    h.sup.shrink(0) if False else None
    assert busy.state is ChildState.BUSY
    assert len(h.launcher.launched) == 2  # no replacement


def test_a_draining_child_stops_after_its_job() -> None:
    h = Harness(children=2)
    h.ready_all()
    a, b = h.submit(), h.submit()
    ca, cb = h.holder(a), h.holder(b)
    h.sup.set_target(1)
    draining = [c for c in (ca, cb) if c.state is ChildState.DRAINING]
    assert len(draining) == 1
    child = draining[0]
    job = a if child is ca else b
    h.run(job)
    assert child.state is ChildState.STOPPING and h.sent(child, StopChild)
    h.exit(child, 0)
    assert h.sup.counters["children_crashed"] == 0
    assert len(h.sup.live_children()) == 1


def test_a_child_that_ignores_stop_is_killed_after_the_exit_timeout() -> None:
    h = Harness(children=2)
    h.ready_all()
    h.sup.set_target(1)
    stopping = [c for c in h.sup.children() if c.state is ChildState.STOPPING][0]
    h.advance(CHILD_EXIT_TIMEOUT_S + 0.1)
    assert stopping.state is ChildState.KILLED
    assert h.signals == [(stopping.pid, signal.SIGKILL)]


def test_draining_a_starting_child_stops_it_once_ready() -> None:
    h = Harness(children=2)
    h.ready(h.child(0))
    h.sup.set_target(1)
    starting = h.child(1)
    assert starting.state is ChildState.STOPPING and h.sent(starting, StopChild)
    h.ready(starting)
    assert starting.state is ChildState.STOPPING
    assert not h.sup.scheduler.children().count(starting.child_id)


def test_a_planned_exit_is_replaced_at_once_and_requeues_unstarted_work() -> None:
    h = Harness(children=1, window=2)
    h.ready_all()
    first, second = h.submit(), h.submit()
    child = h.holder(first)
    assert h.holder(second) is child  # window 2: both on the only child
    h.run(first)
    assert child.state is ChildState.BUSY
    h.deliver(child, ChildExiting(child.pid, "max-tasks", "1 tasks"))
    assert child.state is ChildState.STOPPING
    assert len(h.launcher.launched) == 2  # the replacement starts before the exit
    h.exit(child, 0)
    h.ready_all()
    assert h.holder(second) is h.child(1)
    assert not [o for o in h.outcomes if o[0] == "error"]


def test_a_crash_while_draining_reports_the_running_job_lost() -> None:
    from celery.exceptions import WorkerLostError

    h = Harness(children=2)
    h.ready_all()
    jobs = [h.submit(), h.submit()]
    for job in jobs:
        child = h.holder(job)
        h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.sup.set_target(1)
    draining = next(c for c in h.sup.children() if c.state is ChildState.DRAINING)
    h.exit(draining, -signal.SIGSEGV)
    assert any(isinstance(o[1], WorkerLostError) for o in h.outcomes)


def test_a_hard_limit_on_a_draining_child() -> None:
    h = Harness(children=2, hard=1)
    h.ready_all()
    jobs = [h.submit(), h.submit()]
    for job in jobs:
        child = h.holder(job)
        h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.sup.set_target(1)
    h.advance(1.1)
    assert sum(1 for c in h.sup.children() if c.state is ChildState.KILLED) == 2


def test_busy_then_stopping_at_shutdown() -> None:
    h = Harness(children=1)
    h.ready_all()
    job = h.submit()
    child = h.holder(job)
    with h.sup._lock:
        h.sup._send_stop(child, "shutdown")
    assert child.state is ChildState.STOPPING


def test_killing_an_idle_child_and_a_stopping_one() -> None:
    h = Harness(children=1)
    h.ready_all()
    child = h.child(0)
    child.channel.incoming.append(b"garbage")
    h.sup.on_readable(child.child_id)  # IDLE -> KILLED
    h.exit(child, -9)
    h.ready_all()
    second = h.child(1)
    with h.sup._lock:
        h.sup._send_stop(second, "shutdown")  # IDLE -> STOPPING
    h.exit(second, 0)  # STOPPING -> DEAD


# ------------------------------------------------------------------ head-of-line protection
def _start_all(h: Harness, jobs: list[Job]) -> None:
    for job in jobs:
        child = h.holder(job)
        h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))


def _lanes(h: Harness) -> list[Child]:
    return [c for c in h.sup.children() if c.lane and c.serving]


def test_a_head_of_line_child_starts_when_every_child_is_stuck_and_work_waits() -> None:
    h = Harness(children=2, lanes=1)
    h.ready_all()
    # Short calls of "process" taught the scheduler it is a short name...
    for _ in range(4):
        h.run(h.submit("process"), runtime=0.005)
    # ...then two long calls of the same name hold both children, and a short one waits.
    longs = [h.submit("process"), h.submit("process")]
    _start_all(h, longs)
    waiting = h.submit("process")
    assert not _lanes(h)
    h.advance(0.05)
    assert not _lanes(h)  # not long yet
    h.advance(0.06)
    (lane,) = _lanes(h)
    h.ready(lane)
    assert h.holder(waiting) is lane  # no prediction needed: it is what runs now that counts


def test_no_head_of_line_child_while_a_child_is_free_or_nothing_waits() -> None:
    h = Harness(children=2, lanes=1)
    h.ready_all()
    (one,) = [h.submit("long")]
    _start_all(h, [one])
    h.advance(1.0)
    assert not _lanes(h)  # the other child is free
    two = h.submit("long")
    _start_all(h, [two])
    h.advance(1.0)
    assert not _lanes(h)  # both stuck, but nothing waits


def test_head_of_line_children_retire_once_the_line_is_clear() -> None:
    h = Harness(children=2, lanes=1)
    h.ready_all()
    longs = [h.submit("a"), h.submit("b")]
    _start_all(h, longs)
    queued = h.submit("c")
    h.advance(0.2)
    (lane,) = _lanes(h)
    h.ready(lane)
    h.run(queued)
    for job in longs:
        child = h.holder(job)
        h.deliver(child, JobFinished(job.job_id, True, 1, 0.3))
    assert lane.state is ChildState.IDLE  # kept a moment: long work comes in runs
    h.advance(2.0)
    assert lane.state is ChildState.STOPPING and h.sent(lane, StopChild)
    assert len(h.sup.live_children()) == 2


# ------------------------------------------------------------------ Celery's view
def test_a_revoked_job_is_never_sent(h: Harness) -> None:
    h.ready_all()
    h.submit(revoked=True)
    assert all(not h.sent(c, RunJob) for c in h.sup.children())
    assert h.sup.counters["revoked_before_start"] == 1


def test_flush_drops_only_unsent_work() -> None:
    h = Harness(children=1)
    h.ready_all()
    running, waiting = h.submit(), h.submit()
    dropped = h.sup.flush()
    assert dropped == [waiting]
    h.run(running)
    assert ("ok", 3) in h.outcomes


def test_unpicklable_arguments_fail_the_task_not_the_child(h: Harness) -> None:
    h.ready_all()
    job = h.submit()
    h.run(job)
    bad = Job(h.sup.new_job_id(), add, (lambda: None,), {}, callback=None,
              error_callback=lambda einfo: h.outcomes.append(("error", _original(einfo))),
              accept_callback=None, timeout_callback=None, soft_timeout=None, hard_timeout=None,
              correlation_id="x", task_name="t", affinity_key=None, submitted_at=h.clock.now())
    h.sup.submit(bad)
    assert h.outcomes[-1][0] == "error"
    assert all(c.state is ChildState.IDLE for c in h.sup.children())


def test_processes_lists_only_serving_general_children(h: Harness) -> None:
    from celery_adaptive.supervisor import pids

    h.ready_all()
    assert sorted(pids(h.sup.children())) == sorted(c.pid for c in h.sup.children())
    h.sup.set_target(1)
    assert len(pids(h.sup.children())) == 1


# ------------------------------------------------------------------ coverage of the table
def test_every_allowed_transition_is_taken_by_the_scenarios_above() -> None:
    # Runs last in this module (pytest keeps file order): the scenarios recorded what they took.
    allowed = {(old, new) for old, news in TRANSITIONS.items() for new in news}
    missing = allowed - RecordingTable.taken
    assert not missing, sorted((a.value, b.value) for a, b in missing)


# ------------------------------------------------------------------ framing
def test_frames_split_and_joined_anywhere_come_out_whole() -> None:
    payloads = [b"a", b"", b"x" * 70000, protocol.encode(StopChild("r"))]
    stream = b"".join(encode_frame(p) for p in payloads)
    for cut in (1, 3, 4, 5, 1000, 65536, len(stream) - 1):
        decoder = FrameDecoder(1 << 20)
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert out == payloads and decoder.pending == 0


def test_a_partial_frame_waits_for_the_rest() -> None:
    decoder = FrameDecoder(1024)
    frame = encode_frame(b"hello")
    assert decoder.feed(frame[:6]) == [] and decoder.pending == 6
    assert decoder.feed(frame[6:]) == [b"hello"]


@pytest.mark.parametrize("header", [b"\xff\xff\xff\xff", b"\x00\x10\x00\x01"])
def test_a_length_out_of_bounds_is_a_protocol_error(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="adaptive_max_message_bytes"):
        FrameDecoder(1024).feed(header + b"....")


# ------------------------------------------------------------------ task arguments in logs
def test_a_failing_callback_is_logged_without_the_requests_repr(caplog: pytest.LogCaptureFixture) -> None:
    """Celery's callbacks are bound methods of its Request, whose repr carries the task's
    arguments: the log line names the callback's function, never the object."""
    import logging

    secret = "s3cr3t-argument-0xC0FFEE"

    class Request:
        def __repr__(self) -> str:
            return f"<Request: proj.charge('{secret}')>"

        def on_success(self, value: Any) -> None:
            raise RuntimeError("the result backend is down")

    caplog.set_level(logging.DEBUG, logger="celery_adaptive")
    h = Harness()
    h.ready_all()
    job = h.submit()
    job.callback = Request().on_success
    h.run(job)
    logged = [r for r in caplog.records if r.name.startswith("celery_adaptive")]
    assert any(r.getMessage().endswith("Request.on_success raised") for r in logged)
    assert all(secret not in r.getMessage() and secret not in (r.exc_text or "") for r in logged)
    assert secret not in caplog.text
