"""The work-stealing scheduler: which child runs which task, and when.

Pure and deterministic: no processes, no I/O, no clock reads (``now`` is passed in).

Data flow::

    submit(job) ──> owner's local queue ─┐ (affinity key: consistent-hash owner;
                                         │  no key: the child predicted free soonest)
    dispatch(now) ──> for each child with a free slot in its in-flight window:
                        1. its own queue (a local hit), else
                        2. steal the oldest task from the most loaded queue
                      subject to the short-task reserve.
    accepted(job) / finished(job) / remove_child / drain_child keep the books.

A task is handed to a child only when that child has room in its in-flight window, so a task
is in exactly one place at a time: a local queue, or one child's window. A stolen task has
never been sent anywhere, which is why stealing can never run a task twice.

The scheduler is the one book of jobs: each carries an opaque ``payload`` (the supervisor's
``Job``) from ``submit`` until ``finished``, ``cancel``, ``flush`` or ``remove_child`` lets it go.

Each queue is oldest first (submit time, then submission order): a task moved to another
queue (its child drained or died, its key went to a new child) takes its place there by age.

Cost. The pool puts every prefetched message in here, so nothing may cost in proportion to
the tasks held. A queue keeps its tasks in oldest-first lines (``_Fifo``: a sorted deque, and a
heap for the few tasks that arrive older than its back): one line per task name for unkeyed
tasks, one per task name for keyed tasks, and one per (key, task name). Every choice the policy
makes reads only the fronts of lines: the oldest task is the oldest front, the oldest short
task the oldest front among short task names, the oldest stealable keyed task the front of its
name's keyed line once that front has waited long enough (younger ones have waited less), and
the warm keys of a thief are at most ``RECENT_KEYS`` lookups in the per-key lines. Removal is
lazy: a task leaving a queue changes its ``token``, so its entries go stale and are dropped
when they reach the front, or when stale entries outnumber live ones. Hence submit, dispatch
per task, accepted, finished and cancel cost O(1) amortised (O(log n) for a task moved between
queues), plus terms in the number of children, task names and recent keys; drain_child,
remove_child and add_child O(log n) per task they move (add_child also reads each queued key
once); the counts O(1); the oldest queued O(children x task names); flush O(n log n) for the
n tasks it drops.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from heapq import heapify, heappop, heappush
from typing import Any, Generic, TypeVar, overload

JobId = int
ChildId = int
#: The type of the opaque object each job carries (the supervisor's ``Job``).
P = TypeVar("P")
#: How many recently run keys a child remembers when choosing what to steal.
RECENT_KEYS = 64
#: How many keys the balanced key table remembers (least recently used go first).
KEY_TABLE_SIZE = 65536
#: A line is rebuilt without its stale entries once they outnumber its live ones by this much.
_STALE_SLACK = 32


class JobState(Enum):
    QUEUED = "queued"  # in a local queue (or unassigned while no child accepts work)
    SENT = "sent"  # handed to a child, not yet started
    STARTED = "started"  # the child accepted it


class _Job(Generic[P]):
    __slots__ = (
        "job_id", "task_name", "key", "submitted_at", "order", "payload", "state", "child",
        "started_at", "queue", "token",
    )

    def __init__(
        self, job_id: JobId, task_name: str, key: str | None, submitted_at: float, order: int,
        payload: P,
    ) -> None:
        self.job_id = job_id
        self.task_name = task_name
        self.key = key
        self.submitted_at = submitted_at
        self.order = order  # submission order: breaks ties between equal submit times
        self.payload = payload
        self.state = JobState.QUEUED
        self.child: ChildId | None = None
        self.started_at: float | None = None
        self.queue: _Queue | None = None  # where it waits while QUEUED
        # Changes whenever the job enters or leaves a queue: entries made under an older
        # token are stale.
        self.token = 0


#: (submitted_at, order, token, job): ``order`` is unique, so comparisons stop before the job.
_Entry = tuple[float, int, int, _Job[Any]]


def _age(job: _Job[Any]) -> tuple[float, int]:
    return (job.submitted_at, job.order)


class _Fifo:
    """Jobs of one kind in one queue, oldest first; ``live`` counts the entries not stale.

    Tasks mostly arrive in age order, so most entries go to the back of ``run`` (sorted, O(1)
    at both ends); one older than the back (a task moved here from another queue) goes to the
    ``late`` heap instead. The oldest is at the front of one or the other.
    """

    __slots__ = ("run", "late", "live")

    def __init__(self) -> None:
        self.run: deque[_Entry] = deque()
        self.late: list[_Entry] = []
        self.live = 0

    def push(self, job: _Job[Any]) -> None:
        entry = (job.submitted_at, job.order, job.token, job)
        run = self.run
        if not run or run[-1] < entry:
            run.append(entry)
        else:
            heappush(self.late, entry)
        self.live += 1

    def head(self) -> _Entry | None:
        """The oldest live entry (None only when empty)."""
        run, late = self.run, self.late
        while run and run[0][2] != run[0][3].token:
            run.popleft()
        while late and late[0][2] != late[0][3].token:
            heappop(late)
        if not late:
            return run[0] if run else None
        if run and run[0] < late[0]:
            return run[0]
        return late[0]

    def size(self) -> int:
        """Entries held, stale ones included."""
        return len(self.run) + len(self.late)

    def jobs(self) -> list[_Job[Any]]:
        return [entry[3] for part in (self.run, self.late) for entry in part
                if entry[2] == entry[3].token]

    def forget(self, job: _Job[Any]) -> None:
        """``job`` (whose token already changed) left: trim what is cheap to trim."""
        self.live -= 1
        run, late = self.run, self.late
        if run and run[0][3] is job:
            run.popleft()
        elif late and late[0][3] is job:
            heappop(late)
        elif len(run) + len(late) > 2 * self.live + _STALE_SLACK:
            self.run = deque(entry for entry in run if entry[2] == entry[3].token)
            late[:] = [entry for entry in late if entry[2] == entry[3].token]
            heapify(late)


def _forget(fifos: dict[str, _Fifo], name: str, job: _Job[Any]) -> None:
    fifo = fifos[name]
    if fifo.live == 1:
        del fifos[name]  # its stale entries go with it
    else:
        fifo.forget(job)


class _Queue:
    """One child's local queue (or the unassigned one), indexed so no choice scans it."""

    __slots__ = ("unkeyed", "keyed", "by_key", "count")

    def __init__(self) -> None:
        self.unkeyed: dict[str, _Fifo] = {}  # task name -> its unkeyed jobs
        self.keyed: dict[str, _Fifo] = {}  # task name -> its keyed jobs
        self.by_key: dict[str, dict[str, _Fifo]] = {}  # key -> task name -> its jobs
        self.count = 0

    def add(self, job: _Job[Any]) -> None:
        job.token += 1
        job.queue = self
        name, key = job.task_name, job.key
        if key is None:
            fifos = self.unkeyed
        else:
            fifos = self.keyed
            names = self.by_key.get(key)
            if names is None:
                names = self.by_key[key] = {}
            fifo = names.get(name)
            if fifo is None:
                fifo = names[name] = _Fifo()
            fifo.push(job)
        fifo = fifos.get(name)
        if fifo is None:
            fifo = fifos[name] = _Fifo()
        fifo.push(job)
        self.count += 1

    def remove(self, job: _Job[Any]) -> None:
        job.token += 1
        job.queue = None
        self.count -= 1
        name, key = job.task_name, job.key
        if key is None:
            _forget(self.unkeyed, name, job)
        else:
            _forget(self.keyed, name, job)
            names = self.by_key[key]
            _forget(names, name, job)
            if not names:
                del self.by_key[key]

    def jobs(self) -> list[_Job[Any]]:
        """Every job waiting here, oldest first (a full pass: for moves and introspection)."""
        found = [job for fifos in (self.unkeyed, self.keyed) for fifo in fifos.values()
                 for job in fifo.jobs()]
        found.sort(key=_age)
        return found

    def take_all(self) -> list[_Job[Any]]:
        """Empty the queue; its jobs, oldest first."""
        found = self.jobs()
        for job in found:
            job.token += 1
            job.queue = None
        self.unkeyed, self.keyed, self.by_key, self.count = {}, {}, {}, 0
        return found

    def take_key(self, key: str) -> list[_Job[Any]]:
        """Remove and return the jobs with ``key``."""
        found = [job for fifo in self.by_key.get(key, {}).values() for job in fifo.jobs()]
        for job in found:
            self.remove(job)
        return found

    def oldest(self) -> _Entry | None:
        best: _Entry | None = None
        for fifos in (self.unkeyed, self.keyed):
            for fifo in fifos.values():
                entry = fifo.head()
                if entry is not None and (best is None or entry < best):
                    best = entry
        return best

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[JobId]:
        return iter([job.job_id for job in self.jobs()])


class _Child(Generic[P]):
    __slots__ = ("child_id", "accepting", "queue", "window", "short_only", "steals", "recent_keys")

    def __init__(self, child_id: ChildId, short_only: bool = False) -> None:
        self.child_id = child_id
        self.accepting = True
        self.queue = _Queue()
        self.window: dict[JobId, _Job[P]] = {}  # handed over, in hand-over order
        self.short_only = short_only  # a short-task lane: never runs a long task, owns no keys
        self.steals = 0  # tasks this child took from another child's queue
        # Keys this child ran lately (its caches are likely warm for them), most recent last.
        self.recent_keys: OrderedDict[str, None] = OrderedDict()


@dataclass(frozen=True)
class Dispatch:
    """Hand ``job_id`` to ``child_id`` now (its payload: ``Scheduler.payload(job_id)``)."""

    job_id: JobId
    child_id: ChildId
    stolen: bool
    from_child: ChildId | None


@dataclass(frozen=True)
class ChildRemoval(Generic[P]):
    """What became of a removed child's tasks."""

    requeued: tuple[JobId, ...]  # never started: queued again elsewhere (still in the book)
    lost: tuple[JobId, ...]  # started on the child: the caller reports them lost
    lost_payloads: tuple[P, ...] = ()  # the payloads of ``lost``, in the same order


@dataclass(frozen=True)
class SchedulerCounters:
    submitted: int
    dispatched: int
    local_hits: int
    steals: int
    reservations: int
    keyed: int
    requeued: int


class ServiceTimes:
    """Per-task-name moving average of run time, learnt from finished tasks."""

    def __init__(self, alpha: float = 0.3, default: float = 0.0) -> None:
        self.alpha = alpha
        self.default = default
        self._mean: dict[str, float] = {}

    def observe(self, task_name: str, runtime: float) -> None:
        old = self._mean.get(task_name)
        self._mean[task_name] = runtime if old is None else old + self.alpha * (runtime - old)

    def get(self, task_name: str) -> float | None:
        return self._mean.get(task_name)

    def estimate(self, task_name: str) -> float:
        return self._mean.get(task_name, self.default)

    def as_dict(self) -> dict[str, float]:
        return dict(self._mean)


class HashRing:
    """Consistent hashing of affinity keys onto children.

    Each child owns ``vnodes`` points on the ring, so adding or removing a child moves only the
    keys that child gains or loses. A stable hash (not Python's salted ``hash``) keeps the
    mapping identical across processes and runs.
    """

    def __init__(self, vnodes: int = 64) -> None:
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[ChildId] = []

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def rebuild(self, children: Iterable[ChildId]) -> None:
        pairs = sorted(
            (self._hash(f"child-{child}-{i}"), child) for child in children for i in range(self.vnodes)
        )
        self._points = [point for point, _ in pairs]
        self._owners = [owner for _, owner in pairs]

    def owner(self, key: str) -> ChildId | None:
        if not self._points:
            return None
        index = bisect.bisect(self._points, self._hash(key)) % len(self._points)
        return self._owners[index]


class Scheduler(Generic[P]):
    """Local queues per child, affinity by consistent hashing, stealing, a short-task reserve.

    ``P`` is the type of the payload each job carries (``Scheduler[None]`` when there is none).
    """

    def __init__(
        self,
        *,
        window: int = 1,
        long_task_threshold: float = 0.1,
        short_task_reserve: int = 1,
        short_task_memory: float = 10.0,
        vnodes: int = 64,
        service_times: ServiceTimes | None = None,
        keyed_steal_factor: float = 0.0,
        keyed_steal_floor: float = 0.0,
        learn_from_running: bool = False,
        balanced_keys: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if long_task_threshold <= 0:
            raise ValueError("long_task_threshold must be > 0")
        if short_task_reserve < 0:
            raise ValueError("short_task_reserve must be >= 0")
        self.window = window
        self.long_task_threshold = long_task_threshold
        self.short_task_reserve = short_task_reserve
        # The reserve only makes sense while short tasks are around; remember the last one this
        # long so a long task does not grab the last free child a moment before a short arrives.
        self.short_task_memory = short_task_memory
        self.service_times = service_times or ServiceTimes()
        # A keyed task is worth more on its owner (warm caches) than on an idle thief, for a
        # while: it becomes stealable only after waiting factor x its expected run time (at
        # least the floor). 0 and 0 steal at once.
        if keyed_steal_factor < 0 or keyed_steal_floor < 0:
            raise ValueError("keyed_steal_factor and keyed_steal_floor must be >= 0")
        self.keyed_steal_factor = keyed_steal_factor
        self.keyed_steal_floor = keyed_steal_floor
        #: After `dispatch`: the earliest time the oldest keyed task of some task name, held
        #: back for its busy owner in a queue a thief looked at, becomes stealable.
        self.next_steal_at: float | None = None
        self._ring = HashRing(vnodes)
        self._children: dict[ChildId, _Child[P]] = {}
        self._general: list[ChildId] = []  # accepting children that are not short-only lanes
        self._jobs: dict[JobId, _Job[P]] = {}
        self._unassigned = _Queue()
        self._in_flight = 0  # jobs SENT or STARTED; every other job in _jobs is QUEUED
        self._order = 0
        self._last_short_seen: float | None = None
        self._last_long_seen: float | None = None
        self._overdue: set[str] = set()
        # Started jobs whose task name had no learnt run time when they started: the ones
        # _note_overdue watches (a name, once learnt, stays learnt).
        self._unlearnt: dict[JobId, _Job[P]] = {}
        self.learn_from_running = learn_from_running
        # balanced_keys: remember which child owns each key and give new keys to the child that
        # owns the fewest (the ring only breaks ties); off: plain consistent hashing.
        self.balanced_keys = balanced_keys
        self._key_owner: OrderedDict[str, ChildId] = OrderedDict()
        self._owned: dict[ChildId, int] = {}
        self._submitted = self._dispatched = self._local_hits = self._steals = 0
        self._reservations = self._keyed = self._requeued = 0

    # -- children ------------------------------------------------------------------------
    def add_child(self, child_id: ChildId, short_only: bool = False) -> None:
        if child_id in self._children:
            raise ValueError(f"child {child_id} already known")
        self._children[child_id] = _Child(child_id, short_only=short_only)
        self._rebuild_ring()
        if not short_only:
            self._owned.setdefault(child_id, 0)
            self._rebalance_keys_to(child_id)
        # Keys this child now owns move to it; unassigned work finds a home.
        self._rehome(self._take_queued_keyed_elsewhere(child_id))
        self._rehome(self._unassigned.take_all())

    def drain_child(self, child_id: ChildId) -> bool:
        """Stop giving work to a child; its queued tasks move. True if it is already idle."""
        child = self._children[child_id]
        if child.accepting:
            child.accepting = False
            self._rebuild_ring()
            self._rehome(child.queue.take_all())
        return not child.window

    def remove_child(self, child_id: ChildId) -> ChildRemoval[P]:
        """A child is gone (exited or died). Unstarted tasks are queued again; started ones are lost."""
        child = self._children.pop(child_id)
        self._owned.pop(child_id, None)
        self._rebuild_ring()
        requeue = child.queue.take_all()
        lost: list[_Job[P]] = []
        for job in sorted(child.window.values(), key=_age):
            self._in_flight -= 1
            self._unlearnt.pop(job.job_id, None)
            if job.state is JobState.STARTED:
                lost.append(job)
                del self._jobs[job.job_id]
            else:
                requeue.append(job)
        for job in requeue:
            job.state, job.child = JobState.QUEUED, None
        self._requeued += len(requeue)
        removal = ChildRemoval(
            tuple(job.job_id for job in requeue),
            tuple(job.job_id for job in lost),
            tuple(job.payload for job in lost),
        )
        self._rehome(requeue)
        return removal

    def is_idle(self, child_id: ChildId) -> bool:
        return not self._children[child_id].window

    def children(self) -> list[ChildId]:
        return list(self._children)

    def accepting_children(self) -> list[ChildId]:
        return [c.child_id for c in self._children.values() if c.accepting]

    def owner_of(self, key: str) -> ChildId | None:
        """The child a task with this key goes to now (a query: nothing is recorded)."""
        return self._owner_for(key, record=False)

    def _owner_for(self, key: str, record: bool = True) -> ChildId | None:
        if not self.balanced_keys:
            return self._ring.owner(key)
        owner = self._key_owner.get(key)
        general = self._general
        if owner is not None and owner in general:
            if record:
                self._key_owner.move_to_end(key)
            return owner
        if not general:
            return None
        # A new key (or one whose owner left) goes to the child owning the fewest keys; among
        # those, the ring's choice, so the pick is stable. Balance matters with few keys per
        # child: a 22/10 split of 32 tenants over 2 children is common with hashing alone.
        fewest = min(self._owned.get(c, 0) for c in general)
        candidates = [c for c in general if self._owned.get(c, 0) == fewest]
        ring_pick = self._ring.owner(key)
        chosen = ring_pick if ring_pick in candidates else min(candidates)
        if record:
            if owner is not None and owner in self._owned:
                self._owned[owner] -= 1
            self._key_owner[key] = chosen
            self._key_owner.move_to_end(key)
            self._owned[chosen] = self._owned.get(chosen, 0) + 1
            if len(self._key_owner) > KEY_TABLE_SIZE:
                old_key, old_owner = self._key_owner.popitem(last=False)
                if old_owner in self._owned:
                    self._owned[old_owner] -= 1
        return chosen

    def _rebalance_keys_to(self, new_child: ChildId) -> None:
        """Give a new child its share of the known keys, taken from the most loaded children."""
        general = self._general
        if not self.balanced_keys or len(general) < 2:
            return
        live = {c: self._owned.get(c, 0) for c in general}
        share = sum(live.values()) // len(general)
        for key, owner in list(self._key_owner.items()):  # oldest first: the coldest keys move
            if self._owned.get(new_child, 0) >= share:
                break
            if owner not in live or owner == new_child:
                continue
            if self._owned[owner] <= share:
                continue
            self._owned[owner] -= 1
            self._key_owner[key] = new_child
            self._owned[new_child] = self._owned.get(new_child, 0) + 1

    # -- jobs ----------------------------------------------------------------------------
    @overload
    def submit(
        self: Scheduler[None], job_id: JobId, task_name: str, key: str | None, now: float
    ) -> None: ...

    @overload
    def submit(
        self, job_id: JobId, task_name: str, key: str | None, now: float, payload: P
    ) -> None: ...

    def submit(
        self, job_id: JobId, task_name: str, key: str | None, now: float, payload: Any = None
    ) -> None:
        """Take a task; ``payload`` is kept with it (``payload(job_id)``) until it leaves."""
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} submitted twice")
        job: _Job[P] = _Job(job_id, task_name, key, now, self._order, payload)
        self._order += 1
        self._jobs[job_id] = job
        self._submitted += 1
        if key is not None:
            self._keyed += 1
        if not self._is_long(task_name):
            self._last_short_seen = now
        else:
            self._last_long_seen = now
        self._place(job)

    def dispatch(self, now: float) -> list[Dispatch]:
        """Tasks to hand over now: each child with room takes its own work, else steals."""
        out: list[Dispatch] = []
        self.next_steal_at = None
        if self.learn_from_running:
            self._note_overdue(now)
        accepting = [c for c in self._children.values() if c.accepting]
        window = self.window
        progress = True
        while progress:  # bounded: every pass dispatches at least one task or stops
            progress = False
            for child in accepting:
                if len(child.window) >= window:
                    continue
                picked = self._pick(child.queue, now, child.short_only)
                stolen_from: ChildId | None = None
                if picked is None:
                    picked, stolen_from = self._pick_steal(child, now)
                if picked is None:
                    continue
                assert picked.queue is not None
                picked.queue.remove(picked)
                picked.state, picked.child = JobState.SENT, child.child_id
                child.window[picked.job_id] = picked
                self._in_flight += 1
                key = picked.key
                if key is not None:
                    recent = child.recent_keys
                    recent[key] = None
                    recent.move_to_end(key)
                    if len(recent) > RECENT_KEYS:
                        recent.popitem(last=False)
                self._dispatched += 1
                if stolen_from is None:
                    self._local_hits += 1
                else:
                    self._steals += 1
                    child.steals += 1
                out.append(Dispatch(picked.job_id, child.child_id, stolen_from is not None, stolen_from))
                progress = True
        return out

    def accepted(self, job_id: JobId, now: float) -> None:
        job = self._jobs[job_id]
        if job.state is not JobState.SENT:
            raise ValueError(f"job {job_id!r} accepted while {job.state.value}")
        job.state, job.started_at = JobState.STARTED, now
        if self.service_times.get(job.task_name) is None:
            self._unlearnt[job_id] = job

    def finished(self, job_id: JobId, now: float, runtime: float | None = None) -> P:
        """A handed-over task is done (or was abandoned before it started, e.g. revoked).

        Returns its payload: the scheduler forgets the job.
        """
        job = self._jobs.pop(job_id)
        if job.state is JobState.QUEUED:
            # Requeued after its child died, then reported done by a late event (e.g. the
            # sender found it unsendable): it must leave its new queue as well.
            assert job.queue is not None
            job.queue.remove(job)
        else:
            self._in_flight -= 1
            self._unlearnt.pop(job_id, None)
            child = None if job.child is None else self._children.get(job.child)
            if child is not None:
                child.window.pop(job_id, None)
        if runtime is not None:
            self.service_times.observe(job.task_name, runtime)
        return job.payload

    def cancel(self, job_id: JobId) -> bool:
        """Remove a task that has not been handed over. False if it was already sent/started.

        Read its ``payload`` first if it is needed: a cancelled job is forgotten.
        """
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return False
        assert job.queue is not None
        job.queue.remove(job)
        del self._jobs[job_id]
        return True

    def flush(self) -> list[JobId]:
        """Drop every task not yet handed to a child, oldest first."""
        return [job_id for job_id, _ in self.flush_payloads()]

    def flush_payloads(self) -> list[tuple[JobId, P]]:
        """``flush``, with the payload of each dropped task."""
        queues = [child.queue for child in self._children.values()]
        queues.append(self._unassigned)
        dropped = [job for queue in queues if queue.count for job in queue.take_all()]
        dropped.sort(key=_age)
        for job in dropped:
            del self._jobs[job.job_id]
        return [(job.job_id, job.payload) for job in dropped]

    # -- queries -------------------------------------------------------------------------
    def payload(self, job_id: JobId) -> P:
        """What ``submit`` was given with this job (KeyError once the job has left)."""
        return self._jobs[job_id].payload

    def payload_or_none(self, job_id: JobId) -> P | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.payload

    def state_of(self, job_id: JobId) -> JobState | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.state

    def child_of(self, job_id: JobId) -> ChildId | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.child

    def queued_count(self) -> int:
        return len(self._jobs) - self._in_flight

    def oldest_queued_at(self) -> float | None:
        """Submit time of the task that has waited longest for a child, None if none waits."""
        heads = [q.oldest() for q in self._queues() if q.count]
        return min((entry[0] for entry in heads if entry is not None), default=None)

    def in_flight_count(self) -> int:
        return self._in_flight

    def queue_depths(self) -> dict[ChildId, int]:
        return {c.child_id: c.queue.count for c in self._children.values()}

    def steals_by_child(self) -> dict[ChildId, int]:
        return {c.child_id: c.steals for c in self._children.values()}

    def window_of(self, child_id: ChildId) -> frozenset[JobId]:
        return frozenset(self._children[child_id].window)

    def counters(self) -> SchedulerCounters:
        return SchedulerCounters(
            self._submitted, self._dispatched, self._local_hits, self._steals,
            self._reservations, self._keyed, self._requeued,
        )

    def predicted_free_at(self, child_id: ChildId, now: float) -> float:
        """When the child is predicted to have finished everything it holds (queue and window)."""
        return self._free_at(self._children[child_id], now)

    # -- internals -----------------------------------------------------------------------
    def _free_at(self, child: _Child[P], now: float) -> float:
        estimate = self.service_times.estimate
        total = 0.0
        for job in child.window.values():
            left = estimate(job.task_name)
            if job.started_at is not None:
                left = max(0.0, left - (now - job.started_at))
            total += left
        queue = child.queue
        for fifos in (queue.unkeyed, queue.keyed):
            for name, fifo in fifos.items():
                total += fifo.live * estimate(name)
        return now + total

    def _queues(self) -> Iterator[_Queue]:
        for child in self._children.values():
            yield child.queue
        yield self._unassigned

    def _is_long(self, task_name: str) -> bool:
        estimate = self.service_times.get(task_name)
        if estimate is None:
            # Never finished yet: long if one is already running past the threshold.
            return task_name in self._overdue
        return estimate >= self.long_task_threshold

    def short_tasks_recently(self, now: float) -> bool:
        return self._last_short_seen is not None and now - self._last_short_seen <= self.short_task_memory

    def long_tasks_recently(self, now: float) -> bool:
        """Has a long task arrived (or run past the threshold) within ``short_task_memory``?"""
        return self._last_long_seen is not None and now - self._last_long_seen <= self.short_task_memory

    def _note_overdue(self, now: float) -> None:
        """Learn that a task name is long from a running instance, before any has finished."""
        for job in list(self._unlearnt.values()):
            assert job.started_at is not None
            if self.service_times.get(job.task_name) is not None:
                del self._unlearnt[job.job_id]  # learnt since it started
            elif now - job.started_at >= self.long_task_threshold:
                self._overdue.add(job.task_name)
                self._last_long_seen = now

    def _rebuild_ring(self) -> None:
        self._general = [
            c.child_id for c in self._children.values() if c.accepting and not c.short_only
        ]
        self._ring.rebuild(self._general)

    def _place(self, job: _Job[P]) -> None:
        target: ChildId | None
        if job.key is not None:
            target = self._owner_for(job.key)
        else:
            target = self._soonest_free(job.submitted_at, self._is_long(job.task_name))
        if target is None:
            self._unassigned.add(job)
        else:
            self._children[target].queue.add(job)

    def _soonest_free(self, now: float, long: bool = False) -> ChildId | None:
        best: tuple[float, int, ChildId] | None = None
        for child in self._children.values():
            if not child.accepting or (long and child.short_only):
                continue
            rank = (self._free_at(child, now), child.queue.count + len(child.window), child.child_id)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[2]

    def _rehome(self, jobs: list[_Job[P]]) -> None:
        for job in sorted(jobs, key=_age):
            self._place(job)

    def _take_queued_keyed_elsewhere(self, new_owner: ChildId) -> list[_Job[P]]:
        moved: list[_Job[P]] = []
        for child in self._children.values():
            if child.child_id == new_owner:
                continue
            queue = child.queue
            for key in [k for k in queue.by_key if self._owner_for(k, record=False) == new_owner]:
                moved.extend(queue.take_key(key))
        return moved

    def _long_slots_left(self, now: float) -> int:
        """How many more children may start a long task without eating the short-task reserve."""
        accepting = [c for c in self._children.values() if c.accepting and not c.short_only]
        running_long = sum(
            1 for c in accepting if any(self._is_long(j.task_name) for j in c.window.values())
        )
        shorts_around = self._last_short_seen is not None and (
            now - self._last_short_seen <= self.short_task_memory
        )
        if not shorts_around or self.short_task_reserve == 0:
            return len(accepting) - running_long
        allowed = max(1, len(accepting) - self.short_task_reserve)
        return allowed - running_long

    def _choose(
        self, first: _Entry | None, first_short: _Entry | None, now: float, short_only: bool
    ) -> _Job[P] | None:
        """The policy on a sequence of candidates, given its first task and its first short one.

        The first task goes, unless it is long and a long one may not start now (the reserve,
        or a short-only lane); then the first short task goes.
        """
        if short_only:
            return None if first_short is None else first_short[3]
        if first is None:
            return None
        if first is first_short or self._long_slots_left(now) > 0:
            return first[3]
        if first_short is not None:
            return first_short[3]
        self._reservations += 1
        return None

    def _pick(self, queue: _Queue, now: float, short_only: bool) -> _Job[P] | None:
        """The task a child with room takes from ``queue``, oldest first (it stays queued)."""
        if not queue.count:
            return None
        first = first_short = None
        for fifos in (queue.unkeyed, queue.keyed):
            for name, fifo in fifos.items():
                entry = fifo.head()
                if entry is None:  # pragma: no cover - a fifo with live entries has a head
                    continue
                if first is None or entry < first:
                    first = entry
                if (first_short is None or entry < first_short) and not self._is_long(name):
                    first_short = entry
        return self._choose(first, first_short, now, short_only)

    def _pick_steal(self, thief: _Child[P], now: float) -> tuple[_Job[P] | None, ChildId | None]:
        if self._unassigned.count:
            # Unassigned work exists while no general child accepts: keyed work, or long work
            # that only short-only lanes could take.
            job = self._pick(self._unassigned, now, thief.short_only)
            if job is not None:
                return job, None
        victims = sorted(
            (c for c in self._children.values() if c.queue.count and c is not thief),
            key=lambda c: (-c.queue.count, c.child_id),
        )
        for victim in victims:
            # The owner takes its own work when it has room; steal only what it cannot start.
            if victim.accepting and len(victim.window) < self.window:
                continue
            job = self._steal_from(victim.queue, thief, now)
            if job is not None:
                return job, victim.child_id
        return None, None

    def _steal_from(self, queue: _Queue, thief: _Child[P], now: float) -> _Job[P] | None:
        """What ``thief`` takes from ``queue``: keys it ran lately first (it is likely warm for
        them, and they may go at once), then the rest, a keyed task only once it has waited its
        steal delay."""
        is_long = self._is_long
        warm = warm_short = None
        recent, by_key = thief.recent_keys, queue.by_key
        if recent and by_key:
            if len(recent) <= len(by_key):
                groups = [by_key[k] for k in recent if k in by_key]
            else:
                groups = [names for k, names in by_key.items() if k in recent]
            for names in groups:
                for name, fifo in names.items():
                    entry = fifo.head()
                    if entry is None:  # pragma: no cover - a fifo with live entries has a head
                        continue
                    if warm is None or entry < warm:
                        warm = entry
                    if (warm_short is None or entry < warm_short) and not is_long(name):
                        warm_short = entry
        # The rest is only consulted where no warm task stands before it: when nothing is warm
        # (so no front is warm), and for a short name when no warm task is short (so no short
        # name's front is warm).
        rest = rest_short = None
        for name, fifo in queue.unkeyed.items():
            entry = fifo.head()
            if entry is None:  # pragma: no cover - a fifo with live entries has a head
                continue
            if rest is None or entry < rest:
                rest = entry
            if (rest_short is None or entry < rest_short) and not is_long(name):
                rest_short = entry
        factor, floor = self.keyed_steal_factor, self.keyed_steal_floor
        for name, fifo in queue.keyed.items():
            entry = fifo.head()
            if entry is None:  # pragma: no cover - a fifo with live entries has a head
                continue
            if factor or floor:
                # The oldest keyed task of a name is the first of them to become stealable.
                ready_at = entry[0] + max(floor, factor * self.service_times.estimate(name))
                if now < ready_at:
                    if self.next_steal_at is None or ready_at < self.next_steal_at:
                        self.next_steal_at = ready_at
                    continue
            if rest is None or entry < rest:
                rest = entry
            if (rest_short is None or entry < rest_short) and not is_long(name):
                rest_short = entry
        if warm is not None:
            return self._choose(warm, warm_short if warm_short is not None else rest_short,
                                now, thief.short_only)
        return self._choose(rest, rest_short, now, thief.short_only)
