"""The work-stealing scheduler, on its own: no processes, time passed in by hand.

``Model`` drives a ``Scheduler`` the way the supervisor does (submit, dispatch, accept, finish,
revoke, children coming, draining and dying, flush, time passing) beside a record of where every
job should be, and checks after each step that no job is lost, started twice, held by two
children, or handed to a child that does not take work. A hypothesis state machine explores
random interleavings (and shrinks failures); seeded random walks add long, busy runs. The
example tests below pin the policies: affinity, consistent hashing, stealing, the short-task
reserve, soonest-free placement, the in-flight window and flush.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from enum import Enum

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from celery_adaptive.scheduler import (
    ChildId,
    Dispatch,
    HashRing,
    JobState,
    Scheduler,
    ServiceTimes,
)

THRESHOLD = 0.1
SHORT, LONG = 0.005, 0.5
RUNTIMES = {"fast": SHORT, "tiny": SHORT, "slow": LONG, "huge": LONG}
KEYS = ("k0", "k1", "k2", "k3", "k4", "k5")


def keys_owned_by(s: Scheduler, child: ChildId, count: int) -> list[str]:
    """The first ``count`` keys of the form ``key-N`` that hash to ``child``."""
    found = [k for k in (f"key-{i}" for i in range(10_000)) if s.owner_of(k) == child]
    assert len(found) >= count
    return found[:count]


def trained(**kwargs: float) -> ServiceTimes:
    times = ServiceTimes()
    for name, runtime in kwargs.items():
        times.observe(name, runtime)
    return times


def queued_layout(s: Scheduler) -> tuple[dict[ChildId, list[object]], list[object]]:
    """Where queued jobs sit: each child's local queue, and the unassigned queue.

    Read from the scheduler's internals on purpose: the public API only tells a job's state,
    and "queued exactly once, in the right queue" is the invariant under test.
    """
    return (
        {cid: list(child.queue) for cid, child in s._children.items()},
        list(s._unassigned),
    )


# ---------------------------------------------------------------------------------------------
# The model: where every job should be, and the checks run after every step


class Status(Enum):
    QUEUED = "queued"
    SENT = "sent"
    STARTED = "started"
    FINISHED = "finished"
    CANCELLED = "cancelled"  # revoked while queued: cancel() took it back
    REVOKED = "revoked"  # revoked after dispatch: finished() without ever being accepted
    FLUSHED = "flushed"
    LOST = "lost"  # started on a child that died


LIVE = {Status.QUEUED, Status.SENT, Status.STARTED}
IN_FLIGHT = {Status.SENT, Status.STARTED}
EXPECTED_STATE = {
    Status.QUEUED: JobState.QUEUED,
    Status.SENT: JobState.SENT,
    Status.STARTED: JobState.STARTED,
}


@dataclass
class ModelJob:
    name: str
    key: str | None
    submitted_at: float
    status: Status = Status.QUEUED
    child: ChildId | None = None
    accepts: int = 0
    dispatches: int = 0


class Model:
    """A scheduler driven the way the supervisor drives it, beside a record of each job.

    Every action takes concrete arguments and checks what the scheduler answers; ``check``
    holds the invariants. Both the hypothesis machine and the seeded random walks use it.
    """

    def __init__(
        self, *, window: int, reserve: int, memory: float, n_children: int, pretrained: bool
    ) -> None:
        # Pretrained: "slow" and "fast" are known from the start, so the reserve is in play at
        # once; "huge" and "tiny" are only learnt from finished runs.
        self.s = Scheduler(
            window=window,
            long_task_threshold=THRESHOLD,
            short_task_reserve=reserve,
            short_task_memory=memory,
            vnodes=16,
            service_times=trained(slow=LONG, fast=SHORT) if pretrained else None,
        )
        self.now = 0.0
        self.jobs: dict[int, ModelJob] = {}  # job ids ascend in submission order
        self.children: dict[ChildId, bool] = {}  # live child -> accepting work
        self.next_child = 0
        self.dispatched = self.stolen = 0
        self.last_short: float | None = None
        for _ in range(n_children):
            self.add_child()

    # -- views ----------------------------------------------------------------------------
    def with_status(self, *statuses: Status) -> list[int]:
        return [j for j, job in self.jobs.items() if job.status in statuses]

    def accepting(self) -> list[ChildId]:
        return [c for c, accepting in self.children.items() if accepting]

    def is_long(self, name: str) -> bool:
        estimate = self.s.service_times.get(name)
        return estimate is not None and estimate >= THRESHOLD

    def long_allowed(self) -> int:
        """How many accepting children may hold a long task: the reserve, stated on its own."""
        accepting = len(self.accepting())
        shorts_around = (
            self.last_short is not None and self.now - self.last_short <= self.s.short_task_memory
        )
        if shorts_around and self.s.short_task_reserve > 0:
            return max(1, accepting - self.s.short_task_reserve)
        return accepting

    def children_running_long(self) -> set[ChildId]:
        return {
            job.child
            for job in self.jobs.values()
            if job.status in IN_FLIGHT
            and job.child is not None
            and self.children.get(job.child)
            and self.is_long(job.name)
        }

    # -- actions --------------------------------------------------------------------------
    def tick(self, dt: float) -> None:
        assert dt >= 0
        self.now += dt

    def submit(self, name: str, key: str | None) -> None:
        job_id = len(self.jobs)
        if not self.is_long(name):
            self.last_short = self.now
        self.s.submit(job_id, name, key, self.now)
        self.jobs[job_id] = ModelJob(name, key, self.now)

    def dispatch(self) -> None:
        running_long = self.children_running_long()
        allowed = self.long_allowed()
        owners = {key: self.s.owner_of(key) for key in KEYS}
        for d in self.s.dispatch(self.now):
            job = self.jobs[d.job_id]
            # Only queued jobs go out: never a cancelled, revoked, flushed, lost or sent one.
            assert job.status is Status.QUEUED, (d, job)
            # Only to a live child that takes work, and only into a free slot.
            assert self.children.get(d.child_id) is True, (d, self.children)
            assert len(self.s.window_of(d.child_id)) <= self.s.window
            if d.stolen:
                self.stolen += 1
                assert d.from_child is not None and d.from_child != d.child_id
                assert d.from_child in self.children
            else:
                assert d.from_child is None
                if job.key is not None:  # a local hit on a keyed job is at the key's owner
                    assert d.child_id == owners[job.key], (d, job)
            # The short-task reserve: a long task starts only while fewer than `allowed`
            # accepting children hold one.
            if self.is_long(job.name):
                assert len(running_long) < allowed, (d, running_long, allowed)
                running_long.add(d.child_id)
            job.status, job.child = Status.SENT, d.child_id
            job.dispatches += 1
            self.dispatched += 1
        # Work-conserving: a child with a free slot is left without work only when all that
        # waits is long work the reserve holds back.
        free = [c for c in self.accepting() if len(self.s.window_of(c)) < self.s.window]
        if free:
            for job_id in self.with_status(Status.QUEUED):
                job = self.jobs[job_id]
                assert self.is_long(job.name), (free, job_id, job)
                assert len(running_long) >= allowed, (free, job_id, running_long, allowed)

    def accept(self, job_id: int) -> None:
        self.s.accepted(job_id, self.now)
        job = self.jobs[job_id]
        job.status = Status.STARTED
        job.accepts += 1

    def finish(self, job_id: int) -> None:
        job = self.jobs[job_id]
        self.s.finished(job_id, self.now, RUNTIMES[job.name])
        job.status, job.child = Status.FINISHED, None

    def revoke(self, job_id: int) -> None:
        """As the supervisor does: take it back while queued, else drop it before it starts."""
        job = self.jobs[job_id]
        if job.status is Status.QUEUED:
            assert self.s.cancel(job_id) is True
            job.status = Status.CANCELLED
        else:
            assert job.status is Status.SENT
            assert self.s.cancel(job_id) is False  # already handed over
            self.s.finished(job_id, self.now)
            job.status, job.child = Status.REVOKED, None

    def drop_requeued(self, job_id: int) -> None:
        """A late report on a job its dead child never started, after it was queued again (the
        supervisor's sender found it unsendable): finished() on a queued job."""
        job = self.jobs[job_id]
        assert job.status is Status.QUEUED and job.dispatches > 0
        self.s.finished(job_id, self.now)
        job.status = Status.REVOKED

    def requeued(self) -> list[int]:
        return [j for j in self.with_status(Status.QUEUED) if self.jobs[j].dispatches]

    def add_child(self) -> None:
        child = self.next_child
        self.next_child += 1
        self.s.add_child(child)
        self.children[child] = True

    def drain_child(self, child: ChildId) -> None:
        idle = self.s.drain_child(child)
        holds = [j for j in self.with_status(*IN_FLIGHT) if self.jobs[j].child == child]
        assert idle is (not holds)
        assert self.s.is_idle(child) is (not holds)
        self.children[child] = False

    def remove_child(self, child: ChildId) -> None:
        on_child = {
            status: {j for j in self.with_status(status) if self.jobs[j].child == child}
            for status in IN_FLIGHT
        }
        removal = self.s.remove_child(child)
        del self.children[child]
        assert len(set(removal.lost)) == len(removal.lost)
        assert len(set(removal.requeued)) == len(removal.requeued)
        # Started jobs are reported lost; unstarted ones (sent, or queued there) come back.
        assert set(removal.lost) == on_child[Status.STARTED]
        assert on_child[Status.SENT] <= set(removal.requeued)
        assert set(removal.requeued) <= on_child[Status.SENT] | set(self.with_status(Status.QUEUED))
        for job_id in removal.lost:
            self.jobs[job_id].status, self.jobs[job_id].child = Status.LOST, None
        for job_id in removal.requeued:
            self.jobs[job_id].status, self.jobs[job_id].child = Status.QUEUED, None

    def flush(self) -> None:
        dropped = self.s.flush()
        assert dropped == self.with_status(Status.QUEUED)  # submission order == oldest first
        for job_id in dropped:
            self.jobs[job_id].status = Status.FLUSHED

    # -- invariants -----------------------------------------------------------------------
    def check(self) -> None:
        self.check_every_job_accounted_for()
        self.check_no_second_start_and_no_late_cancel()
        self.check_queued_jobs_sit_once_in_the_right_queue()
        self.check_windows()
        self.check_key_owners()
        self.check_counters()

    def check_every_job_accounted_for(self) -> None:
        """Each submitted job is in exactly one state, and the scheduler agrees on which."""
        for job_id, job in self.jobs.items():
            state = self.s.state_of(job_id)
            if job.status in LIVE:
                assert state is EXPECTED_STATE[job.status], (job_id, job, state)
            else:
                assert state is None, (job_id, job, state)
            if job.status in IN_FLIGHT:
                assert self.s.child_of(job_id) == job.child
            # Started at most once; cancelled, revoked and flushed jobs never started.
            assert job.accepts <= 1
            assert job.accepts == 0 or job.status in (Status.STARTED, Status.FINISHED, Status.LOST)
        # Nothing the model does not know about.
        assert self.s.queued_count() == len(self.with_status(Status.QUEUED))
        assert self.s.in_flight_count() == len(self.with_status(*IN_FLIGHT))

    def check_no_second_start_and_no_late_cancel(self) -> None:
        for job_id, job in self.jobs.items():
            if job.status is not Status.SENT:
                try:
                    self.s.accepted(job_id, self.now)
                except (ValueError, KeyError):
                    pass
                else:
                    raise AssertionError(f"job {job_id} accepted while {job.status.value}")
            if job.status is not Status.QUEUED:
                assert self.s.cancel(job_id) is False

    def check_queued_jobs_sit_once_in_the_right_queue(self) -> None:
        queues, unassigned = queued_layout(self.s)
        where = Counter(unassigned)
        for queue in queues.values():
            where.update(queue)
        assert set(where) == set(self.with_status(Status.QUEUED))
        assert all(n == 1 for n in where.values()), where
        if self.accepting():
            assert not unassigned  # work waits unassigned only while no child takes work
        for child, queue in queues.items():
            if not self.children[child]:
                assert not queue, (child, queue)  # a draining child's queue moved away
            for job_id in queue:
                key = self.jobs[job_id].key
                if key is not None:  # affinity: queued keyed work waits at the key's owner
                    assert self.s.owner_of(key) == child, (job_id, key, child)

    def check_windows(self) -> None:
        assert set(self.s.children()) == set(self.children)
        assert set(self.s.accepting_children()) == set(self.accepting())
        seen: set[int] = set()
        for child in self.children:
            window = self.s.window_of(child)
            assert len(window) <= self.s.window
            assert not window & seen  # a job is in at most one child's window
            seen |= window
            expected = {j for j in self.with_status(*IN_FLIGHT) if self.jobs[j].child == child}
            assert window == expected, (child, window, expected)
        assert seen == set(self.with_status(*IN_FLIGHT))

    def check_key_owners(self) -> None:
        accepting = set(self.accepting())
        for key in KEYS:
            owner = self.s.owner_of(key)
            if accepting:
                assert owner in accepting, (key, owner, accepting)
            else:
                assert owner is None

    def check_counters(self) -> None:
        c = self.s.counters()
        assert c.dispatched == c.local_hits + c.steals
        assert c.dispatched == self.dispatched
        assert c.steals == self.stolen
        assert c.submitted == len(self.jobs)
        assert c.keyed == sum(1 for job in self.jobs.values() if job.key is not None)
        assert c.reservations >= 0 and c.requeued >= 0
        # A job goes out again only after its child died before starting it.
        assert sum(job.dispatches for job in self.jobs.values()) == self.dispatched
        assert all(job.dispatches <= 1 + c.requeued for job in self.jobs.values())


# ---------------------------------------------------------------------------------------------
# The hypothesis state machine


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of everything the supervisor does, shrunk to a minimal failure.

    Most rules may dispatch afterwards (the supervisor dispatches after nearly every event),
    or leave the change to pile up, so both orders are explored.
    """

    m: Model

    @initialize(
        window=st.integers(1, 3),
        reserve=st.integers(0, 2),
        memory=st.sampled_from([0.05, 1.0, 10.0]),
        n_children=st.integers(0, 4),
        pretrained=st.booleans(),
    )
    def setup(
        self, window: int, reserve: int, memory: float, n_children: int, pretrained: bool
    ) -> None:
        self.m = Model(
            window=window,
            reserve=reserve,
            memory=memory,
            n_children=n_children,
            pretrained=pretrained,
        )

    def _then(self, then_dispatch: bool) -> None:
        if then_dispatch:
            self.m.dispatch()

    def _has(self, *statuses: Status) -> bool:
        return any(job.status in statuses for job in self.m.jobs.values())

    @rule(dt=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 2.0, 20.0]))
    def tick(self, dt: float) -> None:
        self.m.tick(dt)

    @rule(
        burst=st.lists(
            st.tuples(st.sampled_from(sorted(RUNTIMES)), st.none() | st.sampled_from(KEYS)),
            min_size=1,
            max_size=6,
        ),
        then_dispatch=st.booleans(),
    )
    def submit(self, burst: list[tuple[str, str | None]], then_dispatch: bool) -> None:
        """One task or several at the same instant (a prefetch batch)."""
        for name, key in burst:
            self.m.submit(name, key)
        self._then(then_dispatch)

    @rule()
    def dispatch(self) -> None:
        self.m.dispatch()

    @precondition(lambda self: self._has(Status.SENT))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def accept(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.m.accept(data.draw(st.sampled_from(self.m.with_status(Status.SENT))))
        self._then(then_dispatch)

    @precondition(lambda self: self._has(Status.SENT))
    @rule()
    def accept_all(self) -> None:
        for job_id in self.m.with_status(Status.SENT):
            self.m.accept(job_id)

    @precondition(lambda self: self._has(Status.STARTED))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def finish(self, data: st.DataObject, then_dispatch: bool) -> None:
        started = st.sampled_from(self.m.with_status(Status.STARTED))
        for job_id in data.draw(st.lists(started, min_size=1, unique=True)):
            self.m.finish(job_id)
        self._then(then_dispatch)

    @precondition(lambda self: self._has(Status.QUEUED, Status.SENT))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def revoke(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.m.revoke(data.draw(st.sampled_from(self.m.with_status(Status.QUEUED, Status.SENT))))
        self._then(then_dispatch)

    @precondition(lambda self: bool(self.m.requeued()))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def drop_requeued(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.m.drop_requeued(data.draw(st.sampled_from(self.m.requeued())))
        self._then(then_dispatch)

    @rule(then_dispatch=st.booleans())
    def add_child(self, then_dispatch: bool) -> None:
        self.m.add_child()
        self._then(then_dispatch)

    @precondition(lambda self: bool(self.m.children))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def drain_child(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.m.drain_child(data.draw(st.sampled_from(sorted(self.m.children))))
        self._then(then_dispatch)

    @precondition(lambda self: bool(self.m.children))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def remove_child(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.m.remove_child(data.draw(st.sampled_from(sorted(self.m.children))))
        self._then(then_dispatch)

    # Flush is rare in life (lost broker connection, shutdown) and empties every queue: only
    # when enough waits for it to matter, or the machine would spend its time in empty states.
    @precondition(lambda self: len(self.m.with_status(Status.QUEUED)) >= 4)
    @rule()
    def flush(self) -> None:
        self.m.flush()

    @invariant()
    def invariants_hold(self) -> None:
        self.m.check()


SchedulerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


# Hypothesis spends many examples on degenerate runs (one rule over and over); these seeded
# walks add long, busy runs with a realistic mix, and prove the model reaches every corner.
WALK_WEIGHTS = {
    "submit": 20,
    "burst": 6,
    "dispatch": 18,
    "accept": 14,
    "finish": 14,
    "revoke": 3,
    "drop_requeued": 1,
    "tick": 10,
    "add_child": 2,
    "drain_child": 1,
    "remove_child": 2,
    "flush": 1,
}


def walk(seed: int, steps: int) -> Model:
    rng = random.Random(seed)
    m = Model(
        window=rng.randint(1, 3),
        reserve=rng.randint(0, 2),
        memory=rng.choice([0.05, 1.0, 10.0]),
        n_children=rng.randint(1, 4),
        pretrained=rng.random() < 0.7,
    )
    actions, weights = zip(*WALK_WEIGHTS.items(), strict=True)
    for _ in range(steps):
        action = rng.choices(actions, weights)[0]
        sent, started = m.with_status(Status.SENT), m.with_status(Status.STARTED)
        pending = m.with_status(Status.QUEUED, Status.SENT)
        if action in ("submit", "burst"):
            for _ in range(1 if action == "submit" else rng.randint(2, 8)):
                m.submit(rng.choice(sorted(RUNTIMES)), rng.choice([None, None, *KEYS]))
        elif action == "dispatch":
            m.dispatch()
        elif action == "accept" and sent:
            m.accept(rng.choice(sent))
        elif action == "finish" and started:
            m.finish(rng.choice(started))
        elif action == "revoke" and pending:
            m.revoke(rng.choice(pending))
        elif action == "drop_requeued" and m.requeued():
            m.drop_requeued(rng.choice(m.requeued()))
        elif action == "tick":
            m.tick(rng.choice([0.0, 0.001, 0.01, 0.1, 0.5, 2.0, 20.0]))
        elif action == "add_child" and len(m.children) < 8:
            m.add_child()
        elif action == "drain_child" and len(m.accepting()) > 1:
            m.drain_child(rng.choice(m.accepting()))
        elif action == "remove_child" and m.children:
            m.remove_child(rng.choice(sorted(m.children)))
        elif action == "flush":
            m.flush()
        m.check()
    return m


def test_seeded_random_walks_keep_every_invariant() -> None:
    totals: Counter[str] = Counter()
    for seed in range(20):
        try:
            m = walk(seed, steps=250)
        except AssertionError as exc:
            exc.add_note(f"random walk seed={seed}")
            raise
        c = m.s.counters()
        totals.update(
            steals=c.steals,
            reservations=c.reservations,
            requeued=c.requeued,
            local_hits=c.local_hits,
            lost=sum(1 for job in m.jobs.values() if job.status is Status.LOST),
            revoked=sum(1 for job in m.jobs.values() if job.status is Status.REVOKED),
            cancelled=sum(1 for job in m.jobs.values() if job.status is Status.CANCELLED),
            flushed=sum(1 for job in m.jobs.values() if job.status is Status.FLUSHED),
        )
    # The walks are not vacuous: every path the invariants guard was taken.
    assert all(totals[name] > 0 for name in totals), totals
    assert len(totals) == 8


# ---------------------------------------------------------------------------------------------
# Affinity and consistent hashing


def run_one(s: Scheduler, job_id: int, name: str, key: str | None, now: float) -> Dispatch:
    """Submit one job, dispatch it, start it, finish it; return where it went."""
    s.submit(job_id, name, key, now)
    [d] = s.dispatch(now)
    assert d.job_id == job_id
    s.accepted(job_id, now)
    s.finished(job_id, now, RUNTIMES[name])
    return d


def test_keyed_tasks_stay_on_their_owner_then_move_to_one_other_child() -> None:
    s = Scheduler(window=1, vnodes=32)
    for child in range(4):
        s.add_child(child)
    owner = s.owner_of("user-42")
    assert owner is not None
    went = {run_one(s, i, "fast", "user-42", float(i)).child_id for i in range(10)}
    assert went == {owner}
    c = s.counters()
    assert (c.local_hits, c.steals, c.keyed) == (10, 0, 10)

    s.remove_child(owner)
    new_owner = s.owner_of("user-42")
    assert new_owner is not None and new_owner != owner
    went = {run_one(s, 100 + i, "fast", "user-42", 20.0 + i) for i in range(10)}
    assert {d.child_id for d in went} == {new_owner}
    assert not any(d.stolen for d in went)


def test_owner_with_room_takes_all_its_keyed_work() -> None:
    s = Scheduler(window=3)
    for child in range(3):
        s.add_child(child)
    owner = s.owner_of("k")
    for i in range(3):
        s.submit(i, "fast", "k", 0.0)
    out = s.dispatch(0.0)
    assert [(d.child_id, d.stolen) for d in out] == [(owner, False)] * 3


def test_adding_a_child_moves_a_fraction_of_keys_all_to_the_new_child() -> None:
    s = Scheduler()
    for child in range(4):
        s.add_child(child)
    keys = [f"tenant-{i}" for i in range(1000)]
    before = {k: s.owner_of(k) for k in keys}
    assert set(before.values()) == {0, 1, 2, 3}
    s.add_child(4)
    after = {k: s.owner_of(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert 0 < len(moved) <= 400
    assert {after[k] for k in moved} == {4}

    # Removing it again puts every key back where it was.
    s.remove_child(4)
    assert {k: s.owner_of(k) for k in keys} == before


def test_draining_a_child_moves_only_its_keys() -> None:
    s = Scheduler()
    for child in range(4):
        s.add_child(child)
    keys = [f"tenant-{i}" for i in range(500)]
    before = {k: s.owner_of(k) for k in keys}
    s.drain_child(2)
    after = {k: s.owner_of(k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != 2)
    assert all(after[k] in (0, 1, 3) for k in keys)


def test_queued_keyed_work_follows_its_key_to_a_new_child() -> None:
    s = Scheduler(window=1)
    for child in range(4):
        s.add_child(child)
    keys = [f"tenant-{i}" for i in range(200)]
    for i, key in enumerate(keys):
        s.submit(i, "fast", key, 0.0)  # nothing dispatched: all queued at the owners
    s.add_child(4)
    queues, _ = queued_layout(s)
    for child, queue in queues.items():
        for job_id in queue:
            assert s.owner_of(keys[job_id]) == child  # type: ignore[index]
    assert queues[4]  # the newcomer took over its share


def test_hash_ring_is_stable_across_instances() -> None:
    a, b = HashRing(vnodes=8), HashRing(vnodes=8)
    a.rebuild([3, 1, 2])
    b.rebuild([1, 2, 3])
    assert all(a.owner(f"k{i}") == b.owner(f"k{i}") for i in range(200))
    assert HashRing().owner("anything") is None


# ---------------------------------------------------------------------------------------------
# Stealing


def test_idle_child_steals_the_oldest_task_from_the_most_loaded_queue() -> None:
    s = Scheduler(window=1)
    for child in range(3):
        s.add_child(child)
    (k0,) = keys_owned_by(s, 0, 1)
    (k1,) = keys_owned_by(s, 1, 1)
    # Children 0 and 1 are busy with their own work; child 2 has nothing of its own.
    s.submit("busy0", "fast", k0, 0.0)
    s.submit("busy1", "fast", k1, 0.0)
    out = s.dispatch(0.0)
    assert {(d.job_id, d.child_id) for d in out} == {("busy0", 0), ("busy1", 1)}
    for d in out:
        s.accepted(d.job_id, 0.0)
    s.submit("a1", "fast", k1, 1.0)
    s.submit("b0", "fast", k0, 2.0)
    s.submit("c0", "fast", k0, 3.0)
    s.submit("d0", "fast", k0, 4.0)
    assert s.queue_depths() == {0: 3, 1: 1, 2: 0}

    out = s.dispatch(5.0)
    assert out == [Dispatch("b0", 2, stolen=True, from_child=0)]
    c = s.counters()
    assert (c.dispatched, c.local_hits, c.steals) == (3, 2, 1)
    assert s.queue_depths() == {0: 2, 1: 1, 2: 0}


def test_no_stealing_from_an_owner_that_has_room() -> None:
    s = Scheduler(window=1)
    s.add_child(0)
    s.add_child(1)
    (k0,) = keys_owned_by(s, 0, 1)
    s.submit("x", "fast", k0, 0.0)
    assert s.dispatch(0.0) == [Dispatch("x", 0, stolen=False, from_child=None)]


# ---------------------------------------------------------------------------------------------
# The short-task reserve


def test_long_task_never_takes_the_last_free_child_while_shorts_are_around() -> None:
    s = Scheduler(window=1, short_task_reserve=1, service_times=trained(slow=LONG, fast=SHORT))
    s.add_child(0)
    s.add_child(1)
    s.submit("short", "fast", None, 0.0)  # a short task was seen just now
    assert len(s.dispatch(0.0)) == 1
    s.accepted("short", 0.0)
    s.finished("short", 0.01, SHORT)

    s.submit("long1", "slow", None, 0.1)
    s.submit("long2", "slow", None, 0.1)
    out = s.dispatch(0.1)
    assert [d.job_id for d in out] == ["long1"]
    assert s.counters().reservations >= 1
    assert s.state_of("long2") is JobState.QUEUED
    free = [c for c in s.children() if s.is_idle(c)]
    assert len(free) == 1  # the reserve: kept free for short tasks

    # A short task arriving now starts at once on the reserved child (whichever queue it is
    # placed in: the idle child steals it if need be).
    s.submit("short2", "fast", None, 0.2)
    assert [(d.job_id, d.child_id) for d in s.dispatch(0.2)] == [("short2", free[0])]


def test_long_tasks_are_not_starved_when_the_reserve_is_satisfied() -> None:
    s = Scheduler(window=1, short_task_reserve=1, service_times=trained(slow=LONG, fast=SHORT))
    for child in range(3):
        s.add_child(child)
    s.submit("short", "fast", None, 0.0)
    s.dispatch(0.0)
    s.finished("short", 0.0, SHORT)
    for i in range(3):
        s.submit(f"long{i}", "slow", None, 0.1)
    out = s.dispatch(0.1)
    assert [d.job_id for d in out] == ["long0", "long1"]  # 3 children - 1 reserved
    for d in out:
        s.accepted(d.job_id, 0.1)
    assert s.dispatch(0.2) == []
    # When a long one finishes, the waiting long one gets that child.
    s.finished("long0", 0.6, LONG)
    out = s.dispatch(0.6)
    assert [d.job_id for d in out] == ["long2"]


def test_a_single_child_still_runs_long_tasks_while_shorts_are_around() -> None:
    s = Scheduler(window=1, short_task_reserve=1, service_times=trained(slow=LONG, fast=SHORT))
    s.add_child(0)
    s.submit("short", "fast", None, 0.0)
    s.submit("long", "slow", None, 0.0)
    assert [d.job_id for d in s.dispatch(0.0)] == ["short"]
    s.finished("short", 0.01, SHORT)
    assert [d.job_id for d in s.dispatch(0.01)] == ["long"]


def test_a_short_task_behind_a_held_back_long_one_is_not_blocked() -> None:
    s = Scheduler(window=1, short_task_reserve=1, service_times=trained(slow=LONG, fast=SHORT))
    s.add_child(0)
    s.add_child(1)
    s.submit("short0", "fast", None, 0.0)
    s.submit("long0", "slow", None, 0.0)
    s.submit("long1", "slow", None, 0.0)
    s.submit("short1", "fast", None, 0.0)
    out = s.dispatch(0.0)
    assert sorted(d.job_id for d in out) == ["long0", "short0"]
    s.finished("short0", 0.01, SHORT)
    # long1 is held back, so the free child takes short1 from behind it.
    assert [d.job_id for d in s.dispatch(0.01)] == ["short1"]


def test_without_short_tasks_long_tasks_use_every_child() -> None:
    s = Scheduler(window=1, short_task_reserve=1, service_times=trained(slow=LONG))
    for child in range(3):
        s.add_child(child)
    for i in range(3):
        s.submit(f"long{i}", "slow", None, 0.0)
    out = s.dispatch(0.0)
    assert sorted(d.child_id for d in out) == [0, 1, 2]
    assert s.counters().reservations == 0


def test_short_tasks_seen_long_ago_no_longer_hold_a_child_back() -> None:
    s = Scheduler(
        window=1,
        short_task_reserve=1,
        short_task_memory=10.0,
        service_times=trained(slow=LONG, fast=SHORT),
    )
    s.add_child(0)
    s.add_child(1)
    s.submit("short", "fast", None, 0.0)
    s.dispatch(0.0)
    s.finished("short", 0.01, SHORT)
    s.submit("long0", "slow", None, 20.0)
    s.submit("long1", "slow", None, 20.0)
    assert len(s.dispatch(20.0)) == 2


def test_reserve_of_zero_never_holds_back() -> None:
    s = Scheduler(window=1, short_task_reserve=0, service_times=trained(slow=LONG, fast=SHORT))
    s.add_child(0)
    s.add_child(1)
    s.submit("short", "fast", None, 0.0)
    s.dispatch(0.0)
    s.finished("short", 0.0, SHORT)
    s.submit("long0", "slow", None, 0.0)
    s.submit("long1", "slow", None, 0.0)
    assert len(s.dispatch(0.0)) == 2
    assert s.counters().reservations == 0


def test_a_task_counts_as_long_once_learnt() -> None:
    s = Scheduler(window=1, short_task_reserve=1)
    s.add_child(0)
    s.add_child(1)
    # Unknown task names count as short: both start.
    s.submit("a", "slow", None, 0.0)
    s.submit("b", "slow", None, 0.0)
    assert len(s.dispatch(0.0)) == 2
    s.finished("a", 0.5, LONG)
    s.finished("b", 0.5, LONG)
    assert s.service_times.get("slow") == pytest.approx(LONG)
    s.submit("short", "fast", None, 0.5)
    s.dispatch(0.5)
    s.finished("short", 0.5, SHORT)
    s.submit("c", "slow", None, 0.6)
    s.submit("d", "slow", None, 0.6)
    assert [d.job_id for d in s.dispatch(0.6)] == ["c"]


# ---------------------------------------------------------------------------------------------
# Placement of unkeyed work, the window, flush, cancel, drain


def run_start(s: Scheduler, job_id: str, name: str, now: float) -> ChildId:
    """Submit one unkeyed job, dispatch it and start it; return its child."""
    s.submit(job_id, name, None, now)
    [d] = s.dispatch(now)
    s.accepted(job_id, now)
    return d.child_id


def test_unkeyed_tasks_go_to_the_child_predicted_free_soonest() -> None:
    s = Scheduler(window=1, service_times=trained(slow=LONG, fast=SHORT))
    for child in range(3):
        s.add_child(child)
    # Child 0 runs a slow task from t=0, child 1 a slow one from t=0.3, child 2 a fast one.
    assert run_start(s, "s0", "slow", 0.0) == 0
    assert run_start(s, "s1", "slow", 0.3) == 1
    assert run_start(s, "f2", "fast", 0.3) == 2
    now = 0.3
    assert s.predicted_free_at(0, now) == pytest.approx(0.5)
    assert s.predicted_free_at(1, now) == pytest.approx(0.8)
    assert s.predicted_free_at(2, now) == pytest.approx(0.305)

    s.submit("q1", "fast", None, now)  # 2 is free at 0.305
    s.submit("q2", "slow", None, now)  # 2 is free at 0.31
    s.submit("q3", "slow", None, now)  # 0 is free at 0.5, 2 only at 0.81
    queues, _ = queued_layout(s)
    assert queues == {0: ["q3"], 1: [], 2: ["q1", "q2"]}


def test_window_hands_up_to_window_tasks_to_one_child() -> None:
    s = Scheduler(window=3)
    s.add_child(0)
    for i in range(5):
        s.submit(i, "fast", None, float(i))
    out = s.dispatch(5.0)
    assert [(d.job_id, d.child_id) for d in out] == [(0, 0), (1, 0), (2, 0)]
    assert s.window_of(0) == {0, 1, 2}
    assert s.dispatch(5.0) == []
    s.accepted(0, 5.0)
    s.finished(0, 6.0, SHORT)
    assert [d.job_id for d in s.dispatch(6.0)] == [3]
    assert s.window_of(0) == {1, 2, 3}


def test_window_spreads_over_children() -> None:
    s = Scheduler(window=2)
    s.add_child(0)
    s.add_child(1)
    for i in range(5):
        s.submit(i, "fast", None, 0.0)
    out = s.dispatch(0.0)
    assert len(out) == 4
    assert Counter(d.child_id for d in out) == {0: 2, 1: 2}
    assert s.queued_count() == 1 and s.in_flight_count() == 4


def test_flush_returns_only_never_dispatched_jobs_oldest_first() -> None:
    s = Scheduler(window=1)
    for child in range(3):
        s.add_child(child)
    owned = {child: keys_owned_by(s, child, 3) for child in range(3)}
    for child in range(3):  # every child busy
        s.submit(f"run{child}", "fast", owned[child][0], 0.0)
    assert len(s.dispatch(0.0)) == 3
    s.accepted("run0", 0.0)
    # Queued work interleaved across the children's queues, submitted in this order.
    order = []
    for i in range(1, 3):
        for child in (2, 0, 1):
            job_id = f"q{child}-{i}"
            s.submit(job_id, "fast", owned[child][i], float(len(order) + 1))
            order.append(job_id)
    assert s.flush() == order
    assert s.queued_count() == 0 and sum(s.queue_depths().values()) == 0
    assert s.flush() == []
    # Jobs already handed over are untouched.
    assert s.in_flight_count() == 3
    assert s.state_of("run0") is JobState.STARTED
    assert s.state_of("run1") is JobState.SENT
    assert s.dispatch(1.0) == []


def test_flush_includes_work_requeued_from_a_dead_child() -> None:
    s = Scheduler(window=1)
    s.add_child(0)
    s.submit("a", "fast", None, 0.0)
    s.submit("b", "fast", None, 1.0)
    s.dispatch(1.0)  # "a" sent, never started
    removal = s.remove_child(0)
    assert set(removal.requeued) == {"a", "b"}
    assert removal.lost == ()
    assert s.flush() == ["a", "b"]


def test_remove_child_reports_started_jobs_lost_and_requeues_the_rest() -> None:
    s = Scheduler(window=2)
    s.add_child(0)
    s.add_child(1)
    (k0,) = keys_owned_by(s, 0, 1)
    for job_id in ("started", "sent", "queued"):
        s.submit(job_id, "fast", k0, 0.0)
    s.drain_child(1)  # so nothing is stolen
    out = s.dispatch(0.0)
    assert [d.job_id for d in out] == ["started", "sent"]
    s.accepted("started", 0.0)
    s.add_child(2)
    removal = s.remove_child(0)
    assert removal.lost == ("started",)
    assert set(removal.requeued) == {"sent", "queued"}
    assert s.state_of("started") is None
    assert s.counters().requeued == 2
    out = s.dispatch(1.0)
    assert {d.job_id for d in out} <= {"sent", "queued"}
    assert all(d.child_id == 2 for d in out)


def test_cancel_only_takes_back_queued_jobs() -> None:
    s = Scheduler(window=1)
    s.add_child(0)
    s.submit("sent", "fast", None, 0.0)
    s.submit("queued", "fast", None, 0.0)
    s.dispatch(0.0)
    assert s.cancel("queued") is True
    assert s.cancel("queued") is False
    assert s.cancel("sent") is False
    assert s.cancel("unknown") is False
    s.finished("sent", 0.0)  # revoked after dispatch: dropped without starting
    assert s.dispatch(0.0) == []
    assert s.queued_count() == s.in_flight_count() == 0


def test_drained_child_gets_no_more_work_and_its_queue_moves() -> None:
    s = Scheduler(window=1)
    s.add_child(0)
    s.add_child(1)
    k0 = keys_owned_by(s, 0, 3)
    s.submit("first", "fast", k0[0], 0.0)
    assert s.dispatch(0.0) == [Dispatch("first", 0, stolen=False, from_child=None)]
    s.accepted("first", 0.0)
    s.submit("busy1", "fast", None, 0.0)
    assert s.dispatch(0.0) == [Dispatch("busy1", 1, stolen=False, from_child=None)]
    for i, key in enumerate(k0):  # both children busy: these wait in child 0's queue
        s.submit(i, "fast", key, 0.0)
    assert s.queue_depths() == {0: 3, 1: 0}
    assert s.drain_child(0) is False  # still holds a job
    assert s.queue_depths() == {0: 0, 1: 3}
    assert s.owner_of(k0[0]) == 1
    s.finished("first", 0.1, SHORT)
    s.finished("busy1", 0.1, SHORT)
    assert s.is_idle(0)
    assert s.drain_child(0) is True
    for _ in range(5):
        for d in s.dispatch(1.0):
            assert d.child_id == 1
            s.accepted(d.job_id, 1.0)
            s.finished(d.job_id, 1.0, SHORT)
    assert s.queued_count() == 0


def test_with_no_accepting_child_work_waits_then_goes_to_the_next_child() -> None:
    s = Scheduler()
    s.submit("a", "fast", "k", 0.0)
    s.submit("b", "fast", None, 0.0)
    assert s.owner_of("k") is None
    assert s.dispatch(0.0) == []
    s.add_child(7)
    assert [d.job_id for d in s.dispatch(0.0)] == ["a"]
    assert s.child_of("a") == 7


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        Scheduler(window=0)
    with pytest.raises(ValueError, match="long_task_threshold"):
        Scheduler(long_task_threshold=0)
    with pytest.raises(ValueError, match="short_task_reserve"):
        Scheduler(short_task_reserve=-1)
    s = Scheduler()
    s.add_child(0)
    with pytest.raises(ValueError):
        s.add_child(0)
    s.submit("a", "fast", None, 0.0)
    with pytest.raises(ValueError):
        s.submit("a", "fast", None, 0.0)


def test_finishing_a_job_requeued_after_its_child_died_forgets_it_everywhere() -> None:
    """The supervisor can call finished() on a job the scheduler has already requeued: the
    sender thread reports it unsendable after its child's death was handled. The job must
    leave its new queue too, or the next dispatch trips over a job it no longer knows."""
    s = Scheduler(window=1)
    s.add_child(0)
    s.add_child(1)
    s.submit("busy", "fast", None, 0.0)
    s.submit("a", "fast", None, 0.0)
    assert {d.job_id for d in s.dispatch(0.0)} == {"busy", "a"}
    s.accepted("busy", 0.0)
    doomed = s.child_of("a")
    assert doomed is not None and doomed != s.child_of("busy")
    assert s.remove_child(doomed).requeued == ("a",)
    assert s.state_of("a") is JobState.QUEUED  # the other child is busy: it waits
    s.finished("a", 0.1)
    assert s.state_of("a") is None
    assert s.queued_count() == 0 and sum(s.queue_depths().values()) == 0
    s.finished("busy", 0.2, SHORT)
    assert s.dispatch(0.2) == []
    assert s.flush() == []


def test_keyed_task_waits_for_its_busy_owner_before_it_can_be_stolen():
    s = Scheduler(window=1, keyed_steal_factor=3.0, keyed_steal_floor=0.005,
                  service_times=trained(tenant=0.01))
    s.add_child(1)
    s.add_child(2)
    key = next(k for k in (f"t{i}" for i in range(100)) if s.owner_of(k) == 1)
    s.submit(1, "tenant", key, 0.0)
    assert [(d.job_id, d.child_id) for d in s.dispatch(0.0)] == [(1, 1)]  # owner busy now
    s.submit(2, "tenant", key, 0.0)
    assert s.dispatch(0.001) == []  # child 2 is idle but the task waits for its owner
    assert s.next_steal_at == pytest.approx(0.03)
    stolen = s.dispatch(0.03)
    assert [(d.job_id, d.child_id, d.stolen) for d in stolen] == [(2, 2, True)]
    assert s.next_steal_at is None
    # Unkeyed work is never held back.
    s.finished(1, 0.03, 0.01)
    s.submit(3, "tenant", None, 0.03)
    assert [d.job_id for d in s.dispatch(0.03)] == [3]


def test_a_task_name_counts_as_long_once_an_instance_runs_past_the_threshold():
    s = Scheduler(window=1, long_task_threshold=0.1, short_task_reserve=1, learn_from_running=True)
    s.add_child(1)
    s.add_child(2)
    s.submit(1, "transcode", None, 0.0)
    s.submit(9, "thumb", None, 0.0)
    dispatched = {d.job_id: d.child_id for d in s.dispatch(0.0)}
    s.accepted(1, 0.0)
    s.accepted(9, 0.0)
    s.finished(9, 0.005, 0.005)  # thumb is short; transcode has not finished yet
    s.submit(2, "transcode", None, 0.2)
    # transcode has run 0.2 s > 0.1 s: it is long before any instance finished, so the second
    # one may not take the last free child while short work is around.
    assert s.dispatch(0.2) == []
    s.submit(3, "thumb", None, 0.21)
    assert [d.job_id for d in s.dispatch(0.21)] == [3]
    assert dispatched[1] != dispatched[9]


def test_a_short_only_lane_never_takes_long_work_or_keys():
    s = Scheduler(window=1, short_task_reserve=0, service_times=trained(slow=LONG, fast=SHORT))
    s.add_child(1)
    s.add_child(2, short_only=True)
    assert all(s.owner_of(f"k{i}") == 1 for i in range(50))  # lanes own no keys
    s.submit(1, "slow", None, 0.0)
    s.submit(2, "slow", None, 0.0)
    first = s.dispatch(0.0)
    assert [(d.job_id, d.child_id) for d in first] == [(1, 1)]  # the lane does not steal it
    s.submit(3, "fast", None, 0.01)
    assert [(d.job_id, d.child_id) for d in s.dispatch(0.01)] == [(3, 2)]
    assert s.long_tasks_recently(0.01)


def test_balanced_keys_split_evenly_and_a_new_child_takes_only_its_share():
    s = Scheduler(window=1, balanced_keys=True)
    s.add_child(1)
    s.add_child(2)
    keys = [f"tenant-{i}" for i in range(32)]
    for i, key in enumerate(keys):
        s.submit(i, "t", key, 0.0)
        s.cancel(i)
    owners = {k: s.owner_of(k) for k in keys}
    assert Counter(owners.values()) == {1: 16, 2: 16}  # plain hashing gave 22/10 here
    assert {k: s.owner_of(k) for k in keys} == owners  # stable
    s.add_child(3)
    after = {k: s.owner_of(k) for k in keys}
    moved = [k for k in keys if after[k] != owners[k]]
    assert {after[k] for k in moved} == {3} and len(moved) == 10  # 32 // 3
    s.remove_child(3)
    # Its keys go back to the others, evenly; nobody else's key moves.
    final = {k: s.owner_of(k) for k in keys}
    assert all(final[k] == after[k] for k in keys if after[k] != 3)
    assert set(final.values()) == {1, 2}
