"""The indexed scheduler against the obvious one, and against a model of where each job is.

A hypothesis state machine (and a few long seeded walks) drive
``celery_adaptive.scheduler.Scheduler`` and ``tests.unit.scheduler_reference.ReferenceScheduler``
with the same operations and require the same answer to every call and query: the same
dispatches in the same order, the same removals, flushes, counts, queue contents and
predictions. Beside them a small model records each job's status and holder, and checks:

- each live job is in exactly one place (one queue, or one child's window);
- the counts match the model;
- each queue is oldest first, and a child taking from its own queue takes its oldest task, or
  its oldest short task while the oldest is a long one the reserve holds back;
- a steal takes from a queue whose owner has no room;
- no job is handed over twice, except after its child died before starting it;
- remove_child requeues what had not started and reports what had started as lost;
- each job's payload is the object it was submitted with, given back when it leaves.

Times and run times are binary fractions, so every sum the scheduler makes is exact whatever
the order of its terms, and the predictions can be compared for equality.
"""

from __future__ import annotations

import random
from collections import Counter
from enum import Enum
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from celery_adaptive.scheduler import _STALE_SLACK, ChildId, Scheduler, ServiceTimes
from tests.unit.scheduler_reference import ReferenceScheduler

THRESHOLD = 0.1
RUNTIMES = {"fast": 1 / 256, "tiny": 1 / 256, "slow": 0.5, "huge": 0.5}
NAMES = sorted(RUNTIMES)
KEYS = ("k0", "k1", "k2", "k3", "k4", "k5", "k6")
TICKS = (0.0, 1 / 1024, 1 / 128, 1 / 16, 0.5, 2.0, 16.0)


class Status(Enum):
    QUEUED = "queued"
    SENT = "sent"
    STARTED = "started"


class Payload:
    """An opaque object: only its identity matters."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Payload({self.job_id})"


def trained(pretrained: bool) -> ServiceTimes:
    times = ServiceTimes()
    if pretrained:  # "tiny" and "huge" are only ever learnt from finished runs
        times.observe("fast", RUNTIMES["fast"])
        times.observe("slow", RUNTIMES["slow"])
    return times


class Pair:
    """The scheduler under test, the reference, and the model, moved in step."""

    def __init__(
        self, *, window: int, reserve: int, memory: float, delay: bool, balanced: bool,
        learn: bool, pretrained: bool,
    ) -> None:
        options: dict[str, Any] = dict(
            window=window, long_task_threshold=THRESHOLD, short_task_reserve=reserve,
            short_task_memory=memory, vnodes=8, keyed_steal_factor=3.0 if delay else 0.0,
            keyed_steal_floor=1 / 256 if delay else 0.0, learn_from_running=learn,
            balanced_keys=balanced,
        )
        self.s: Scheduler[Payload] = Scheduler(service_times=trained(pretrained), **options)
        self.ref = ReferenceScheduler(service_times=trained(pretrained), **options)
        self.now = 0.0
        self.next_job = 0
        self.next_child = 0
        self.payloads: dict[int, Payload] = {}  # every job ever submitted
        self.status: dict[int, Status] = {}  # live jobs only
        self.holder: dict[int, ChildId] = {}  # sent or started jobs: their child
        self.dispatches: Counter[int] = Counter()
        self.requeues: Counter[int] = Counter()
        self.children: dict[ChildId, bool] = {}  # live child -> accepting

    # -- views ----------------------------------------------------------------------------
    def with_status(self, *statuses: Status) -> list[int]:
        return [j for j, status in self.status.items() if status in statuses]

    def is_long(self, name: str) -> bool:
        return self.ref.is_long(name)

    # -- actions --------------------------------------------------------------------------
    def tick(self, dt: float) -> None:
        self.now += dt

    def wake_for_steal(self) -> None:
        """As the supervisor's steal timer does: dispatch again when ``next_steal_at`` comes."""
        at = self.s.next_steal_at
        assert at is not None and at > self.now
        self.now = at
        self.dispatch()

    def submit(self, name: str, key: str | None) -> None:
        job_id = self.next_job
        self.next_job += 1
        payload = self.payloads[job_id] = Payload(job_id)
        self.s.submit(job_id, name, key, self.now, payload)
        self.ref.submit(job_id, name, key, self.now, payload)
        self.status[job_id] = Status.QUEUED

    def dispatch(self) -> None:
        queues, _ = self.layout()
        windows = {c: len(self.s.window_of(c)) for c in self.children}
        out = self.s.dispatch(self.now)
        assert out == self.ref.dispatch(self.now)
        assert self.s.next_steal_at == self.ref.next_steal_at
        for d in out:
            assert self.status.get(d.job_id) is Status.QUEUED, d
            assert self.children.get(d.child_id) is True, d
            assert windows[d.child_id] < self.s.window
            windows[d.child_id] += 1
            if d.stolen:
                assert d.from_child is not None and d.from_child != d.child_id
                victim = d.from_child
                # The owner takes its own work when it has room.
                assert not (self.children[victim] and windows[victim] < self.s.window), d
            else:
                victim = d.child_id
                queue = queues[victim]
                if d.job_id in queue:  # else it came from the unassigned queue
                    self.check_oldest_eligible(queue, d.job_id)
            if d.job_id in queues.get(victim, []):
                queues[victim].remove(d.job_id)
            self.status[d.job_id] = Status.SENT
            self.holder[d.job_id] = d.child_id
            self.dispatches[d.job_id] += 1
            assert self.dispatches[d.job_id] <= 1 + self.requeues[d.job_id], d

    def check_oldest_eligible(self, queue: list[int], job_id: int) -> None:
        """A local pick is the oldest task, or the oldest short one behind a held-back long one."""
        oldest = queue[0]
        if job_id == oldest:
            return
        assert self.is_long(self.s_name(oldest)), (queue, job_id)
        shorts = [j for j in queue if not self.is_long(self.s_name(j))]
        assert shorts and shorts[0] == job_id, (queue, job_id)

    def s_name(self, job_id: int) -> str:
        return self.ref.jobs[job_id].task_name

    def accept(self, job_id: int) -> None:
        self.s.accepted(job_id, self.now)
        self.ref.accepted(job_id, self.now)
        self.status[job_id] = Status.STARTED

    def finish(self, job_id: int, runtime: float | None) -> None:
        got = self.s.finished(job_id, self.now, runtime)
        assert got is self.payloads[job_id]
        assert self.ref.finished(job_id, self.now, runtime) is got
        del self.status[job_id]
        self.holder.pop(job_id, None)

    def revoke(self, job_id: int) -> None:
        """As the supervisor does: take it back while queued, else drop it before it starts."""
        if self.status[job_id] is Status.QUEUED:
            assert self.s.payload(job_id) is self.payloads[job_id]
            assert self.s.cancel(job_id) is True
            assert self.ref.cancel(job_id) is True
            del self.status[job_id]
            assert self.s.payload_or_none(job_id) is None
        else:
            assert self.s.cancel(job_id) is False
            assert self.ref.cancel(job_id) is False
            self.finish(job_id, None)

    def add_child(self, short_only: bool) -> None:
        child = self.next_child
        self.next_child += 1
        self.s.add_child(child, short_only=short_only)
        self.ref.add_child(child, short_only=short_only)
        self.children[child] = True

    def drain_child(self, child: ChildId) -> None:
        idle = self.s.drain_child(child)
        assert idle is self.ref.drain_child(child)
        assert idle is not any(c == child for c in self.holder.values())
        self.children[child] = False

    def remove_child(self, child: ChildId) -> None:
        held = {j for j, c in self.holder.items() if c == child}
        queues, _ = self.layout()
        removal = self.s.remove_child(child)
        expected = self.ref.remove_child(child)
        assert (removal.requeued, removal.lost) == (expected.requeued, expected.lost)
        assert removal.lost_payloads == tuple(self.payloads[j] for j in removal.lost)
        started = {j for j in held if self.status[j] is Status.STARTED}
        assert set(removal.lost) == started
        assert set(removal.requeued) == (held - started) | set(queues[child])
        assert len(set(removal.requeued)) == len(removal.requeued)
        del self.children[child]
        for job_id in removal.lost:
            del self.status[job_id], self.holder[job_id]
        for job_id in removal.requeued:
            if self.status[job_id] is not Status.QUEUED:
                self.requeues[job_id] += 1
            self.status[job_id] = Status.QUEUED
            self.holder.pop(job_id, None)

    def flush(self, with_payloads: bool) -> None:
        expected = self.ref.flush_payloads()
        if with_payloads:
            got = self.s.flush_payloads()
            assert [j for j, _ in got] == [j for j, _ in expected]
            assert all(p is self.payloads[j] for j, p in got)
        else:
            assert self.s.flush() == [j for j, _ in expected]
        queued = sorted(self.with_status(Status.QUEUED))  # submission order: times only grow
        assert [j for j, _ in expected] == queued
        for job_id in queued:
            del self.status[job_id]

    # -- checks ---------------------------------------------------------------------------
    def layout(self) -> tuple[dict[ChildId, list[int]], list[int]]:
        """Where the scheduler under test keeps queued jobs (read from its internals)."""
        return (
            {cid: list(child.queue) for cid, child in self.s._children.items()},
            list(self.s._unassigned),
        )

    def check(self) -> None:
        s, ref, now = self.s, self.ref, self.now
        queues, unassigned = self.layout()
        # The same state as the reference, query by query.
        assert queues == {c: child.queue for c, child in ref.children.items()}
        assert unassigned == ref.unassigned
        assert s.children() == list(ref.children)
        assert s.accepting_children() == [c for c, ch in ref.children.items() if ch.accepting]
        for child in ref.children:
            assert s.window_of(child) == frozenset(ref.children[child].window)
            assert s.predicted_free_at(child, now) == ref.predicted_free_at(child, now)
            assert s.is_idle(child) is (not ref.children[child].window)
        assert s.queue_depths() == {c: len(ch.queue) for c, ch in ref.children.items()}
        assert s.steals_by_child() == {c: ch.steals for c, ch in ref.children.items()}
        assert s.counters() == ref.counters()
        assert s.queued_count() == ref.queued_count()
        assert s.in_flight_count() == ref.in_flight_count()
        assert s.oldest_queued_at() == ref.oldest_queued_at()
        assert [s.owner_of(k) for k in KEYS] == [ref.owner_of(k) for k in KEYS]
        assert s.short_tasks_recently(now) is ref.short_tasks_recently(now)
        assert s.long_tasks_recently(now) is ref.long_tasks_recently(now)
        # Against the model: each live job in exactly one place, with its payload.
        places: Counter[int] = Counter(unassigned)
        for queue in queues.values():
            places.update(queue)
            assert queue == sorted(queue), queue  # oldest first
        assert sorted(unassigned) == unassigned
        for child in self.children:
            places.update(s.window_of(child))
        assert set(places) == set(self.status) and all(n == 1 for n in places.values()), places
        queued = set(self.with_status(Status.QUEUED))
        assert set(unassigned).union(*queues.values()) == queued
        assert s.queued_count() == len(queued)
        assert s.in_flight_count() == len(self.status) - len(queued)
        for job_id, status in self.status.items():
            assert s.state_of(job_id).value == status.value  # type: ignore[union-attr]
            assert s.child_of(job_id) == self.holder.get(job_id)
            assert s.payload(job_id) is self.payloads[job_id]
        for job_id in self.payloads.keys() - self.status.keys():
            assert s.state_of(job_id) is None and s.payload_or_none(job_id) is None
        if unassigned:  # only while no general child takes work
            assert not any(a and not s._children[c].short_only for c, a in self.children.items())
        self.check_lines_stay_small()

    def check_lines_stay_small(self) -> None:
        """Removal is lazy, but stale entries never outnumber live ones by much."""
        queues = [child.queue for child in self.s._children.values()] + [self.s._unassigned]
        for queue in queues:
            fifos = [*queue.unkeyed.values(), *queue.keyed.values()]
            fifos += [f for names in queue.by_key.values() for f in names.values()]
            for fifo in fifos:
                assert 0 < fifo.live <= fifo.size() <= 2 * fifo.live + _STALE_SLACK
            assert queue.count == sum(f.live for f in (*queue.unkeyed.values(), *queue.keyed.values()))


# ---------------------------------------------------------------------------------------------
# The hypothesis state machine


class DifferentialMachine(RuleBasedStateMachine):
    p: Pair

    @initialize(
        window=st.integers(1, 3),
        reserve=st.integers(0, 2),
        memory=st.sampled_from([1 / 16, 1.0, 8.0]),
        delay=st.booleans(),
        balanced=st.booleans(),
        learn=st.booleans(),
        pretrained=st.booleans(),
        children=st.lists(st.booleans(), max_size=4),  # short-only?
    )
    def setup(
        self, window: int, reserve: int, memory: float, delay: bool, balanced: bool,
        learn: bool, pretrained: bool, children: list[bool],
    ) -> None:
        self.p = Pair(window=window, reserve=reserve, memory=memory, delay=delay,
                      balanced=balanced, learn=learn, pretrained=pretrained)
        for short_only in children:
            self.p.add_child(short_only)

    def _then(self, then_dispatch: bool) -> None:
        if then_dispatch:
            self.p.dispatch()

    def _has(self, *statuses: Status) -> bool:
        return any(status in statuses for status in self.p.status.values())

    @rule(dt=st.sampled_from(TICKS))
    def tick(self, dt: float) -> None:
        self.p.tick(dt)

    @precondition(lambda self: self.p.s.next_steal_at is not None)
    @rule()
    def wake_for_steal(self) -> None:
        self.p.wake_for_steal()

    @rule(
        burst=st.lists(
            st.tuples(st.sampled_from(NAMES), st.none() | st.sampled_from(KEYS)),
            min_size=1, max_size=8,
        ),
        then_dispatch=st.booleans(),
    )
    def submit(self, burst: list[tuple[str, str | None]], then_dispatch: bool) -> None:
        for name, key in burst:
            self.p.submit(name, key)
        self._then(then_dispatch)

    @rule()
    def dispatch(self) -> None:
        self.p.dispatch()

    @precondition(lambda self: self._has(Status.SENT))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def accept(self, data: st.DataObject, then_dispatch: bool) -> None:
        for job_id in data.draw(st.lists(st.sampled_from(self.p.with_status(Status.SENT)),
                                         min_size=1, unique=True)):
            self.p.accept(job_id)
        self._then(then_dispatch)

    @precondition(lambda self: self._has(Status.STARTED))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def finish(self, data: st.DataObject, then_dispatch: bool) -> None:
        started = st.sampled_from(self.p.with_status(Status.STARTED))
        for job_id in data.draw(st.lists(started, min_size=1, unique=True)):
            self.p.finish(job_id, RUNTIMES[self.p.s_name(job_id)])
        self._then(then_dispatch)

    @precondition(lambda self: self._has(Status.QUEUED, Status.SENT))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def revoke(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.p.revoke(data.draw(st.sampled_from(self.p.with_status(Status.QUEUED, Status.SENT))))
        self._then(then_dispatch)

    @precondition(lambda self: any(self.p.requeues[j] for j in self.p.with_status(Status.QUEUED)))
    @rule(data=st.data())
    def drop_requeued(self, data: st.DataObject) -> None:
        """A late report on a job its dead child never started, after it was queued again."""
        requeued = [j for j in self.p.with_status(Status.QUEUED) if self.p.requeues[j]]
        self.p.finish(data.draw(st.sampled_from(requeued)), None)

    @rule(short_only=st.booleans(), then_dispatch=st.booleans())
    def add_child(self, short_only: bool, then_dispatch: bool) -> None:
        self.p.add_child(short_only)
        self._then(then_dispatch)

    @precondition(lambda self: bool(self.p.children))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def drain_child(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.p.drain_child(data.draw(st.sampled_from(sorted(self.p.children))))
        self._then(then_dispatch)

    @precondition(lambda self: bool(self.p.children))
    @rule(data=st.data(), then_dispatch=st.booleans())
    def remove_child(self, data: st.DataObject, then_dispatch: bool) -> None:
        self.p.remove_child(data.draw(st.sampled_from(sorted(self.p.children))))
        self._then(then_dispatch)

    @precondition(lambda self: len(self.p.with_status(Status.QUEUED)) >= 4)
    @rule(with_payloads=st.booleans())
    def flush(self, with_payloads: bool) -> None:
        self.p.flush(with_payloads)

    @invariant()
    def same_answers_and_invariants(self) -> None:
        self.p.check()


DifferentialMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDifferentialMachine = DifferentialMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Seeded walks: longer and busier than hypothesis's runs, with deeper queues


def walk(seed: int, steps: int) -> Pair:
    rng = random.Random(seed)
    p = Pair(
        window=rng.randint(1, 3), reserve=rng.randint(0, 2), memory=rng.choice([1 / 16, 1.0, 8.0]),
        delay=rng.random() < 0.5, balanced=rng.random() < 0.5, learn=rng.random() < 0.5,
        pretrained=rng.random() < 0.7,
    )
    for _ in range(rng.randint(1, 4)):
        p.add_child(rng.random() < 0.2)
    weights = {"submit": 16, "dispatch": 10, "accept": 20, "finish": 20, "revoke": 3,
               "tick": 10, "add_child": 3, "drain_child": 1, "remove_child": 2, "flush": 1}
    actions, counts = zip(*weights.items(), strict=True)
    for _ in range(steps):
        action = rng.choices(actions, counts)[0]
        sent, started = p.with_status(Status.SENT), p.with_status(Status.STARTED)
        if action == "submit":
            for _ in range(rng.randint(1, 4)):
                p.submit(rng.choice(NAMES), rng.choice([None, None, *KEYS]))
        elif action == "dispatch":
            p.dispatch()
        elif action == "accept" and sent:
            for job_id in rng.sample(sent, rng.randint(1, len(sent))):
                p.accept(job_id)
        elif action == "finish" and started:
            for job_id in rng.sample(started, rng.randint(1, len(started))):
                p.finish(job_id, RUNTIMES[p.s_name(job_id)])
        elif action == "revoke" and (pending := p.with_status(Status.QUEUED, Status.SENT)):
            p.revoke(rng.choice(pending))
        elif action == "tick":
            if p.s.next_steal_at is not None and rng.random() < 0.5:
                p.wake_for_steal()
            else:
                p.tick(rng.choice(TICKS))
        elif action == "add_child" and len(p.children) < 6:
            p.add_child(rng.random() < 0.2)
        elif action == "drain_child" and sum(p.children.values()) > 1:
            p.drain_child(rng.choice([c for c, accepting in p.children.items() if accepting]))
        elif action == "remove_child" and len(p.children) > 1:
            p.remove_child(rng.choice(sorted(p.children)))
        elif action == "flush" and rng.random() < 0.3:
            p.flush(rng.random() < 0.5)
        if not any(p.children.values()):  # as the supervisor does: replace the last one
            p.add_child(False)
        if action != "dispatch" and rng.random() < 0.6:  # as the supervisor mostly does
            p.dispatch()
        p.check()
    return p


def test_seeded_walks_match_the_reference() -> None:
    totals: Counter[str] = Counter()
    for seed in range(12):
        try:
            p = walk(seed, steps=400)
        except AssertionError as exc:
            exc.add_note(f"walk seed={seed}")
            raise
        c = p.s.counters()
        totals.update(steals=c.steals, reservations=c.reservations, requeued=c.requeued,
                      local_hits=c.local_hits)
    # The walks are not vacuous: every path the comparison guards was taken.
    assert all(totals[name] > 0 for name in ("steals", "reservations", "requeued", "local_hits"))


def test_stale_entries_are_dropped_when_they_outnumber_live_ones() -> None:
    """Cancelling most of a long queue behind a head that never moves keeps its lines small,
    both the part that arrived in age order and the part moved in from a drained child."""
    s: Scheduler[None] = Scheduler(window=1)
    s.add_child(0)
    s.add_child(1)
    mine = next(k for k in (f"k{i}" for i in range(100)) if s.owner_of(k) == 0)
    theirs = next(k for k in (f"k{i}" for i in range(100)) if s.owner_of(k) == 1)
    for i in range(1500):
        s.submit(i, "t", (None, mine, theirs)[i % 3], float(i))
    s.drain_child(1)  # its tasks join child 0's queue, older than its newest
    queue = s._children[0].queue
    assert any(fifo.late for fifo in queue.keyed.values())
    kept = [i for i in range(1500) if i % 5 == 0]  # the oldest (0) among them: the head stays
    for i in range(1500):
        if i % 5:
            assert s.cancel(i)
    fifos = [*queue.unkeyed.values(), *queue.keyed.values()]
    fifos += [fifo for names in queue.by_key.values() for fifo in names.values()]
    for fifo in fifos:
        assert fifo.size() <= 2 * fifo.live + _STALE_SLACK
    assert list(queue) == kept
    assert s.queued_count() == len(kept)
