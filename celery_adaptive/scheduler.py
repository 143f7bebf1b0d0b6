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
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

JobId = int
ChildId = int
#: How many recently run keys a child remembers when choosing what to steal.
RECENT_KEYS = 64
#: How many keys the balanced key table remembers (least recently used go first).
KEY_TABLE_SIZE = 65536


class JobState(Enum):
    QUEUED = "queued"  # in a local queue (or unassigned while no child accepts work)
    SENT = "sent"  # handed to a child, not yet started
    STARTED = "started"  # the child accepted it


@dataclass
class _Job:
    job_id: JobId
    task_name: str
    key: str | None
    submitted_at: float
    state: JobState = JobState.QUEUED
    child: ChildId | None = None
    started_at: float | None = None


@dataclass
class _Child:
    child_id: ChildId
    accepting: bool = True
    queue: deque[JobId] = field(default_factory=deque)
    window: set[JobId] = field(default_factory=set)
    short_only: bool = False  # a short-task lane: never runs a long task, owns no keys
    steals: int = 0
    # Keys this child ran lately (its caches are likely warm for them), most recent last.
    recent_keys: OrderedDict[str, None] = field(default_factory=OrderedDict)  # tasks this child took from another child's queue


@dataclass(frozen=True)
class Dispatch:
    """Hand ``job_id`` to ``child_id`` now."""

    job_id: JobId
    child_id: ChildId
    stolen: bool
    from_child: ChildId | None


@dataclass(frozen=True)
class ChildRemoval:
    """What became of a removed child's tasks."""

    requeued: tuple[JobId, ...]  # never started: queued again elsewhere
    lost: tuple[JobId, ...]  # started on the child: the caller reports them lost


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


class Scheduler:
    """Local queues per child, affinity by consistent hashing, stealing, a short-task reserve."""

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
        #: After `dispatch`: when a keyed task held back for its owner becomes stealable.
        self.next_steal_at: float | None = None
        self._ring = HashRing(vnodes)
        self._children: dict[ChildId, _Child] = {}
        self._jobs: dict[JobId, _Job] = {}
        self._unassigned: deque[JobId] = deque()
        self._last_short_seen: float | None = None
        self._last_long_seen: float | None = None
        self._overdue: set[str] = set()
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
        self._rehome(self._drain_unassigned())

    def drain_child(self, child_id: ChildId) -> bool:
        """Stop giving work to a child; its queued tasks move. True if it is already idle."""
        child = self._children[child_id]
        if child.accepting:
            child.accepting = False
            self._rebuild_ring()
            moved = list(child.queue)
            child.queue.clear()
            self._rehome(moved)
        return not child.window

    def remove_child(self, child_id: ChildId) -> ChildRemoval:
        """A child is gone (exited or died). Unstarted tasks are queued again; started ones are lost."""
        child = self._children.pop(child_id)
        self._owned.pop(child_id, None)
        self._rebuild_ring()
        requeue: list[JobId] = list(child.queue)
        lost: list[JobId] = []
        for job_id in sorted(child.window, key=lambda j: self._jobs[j].submitted_at):
            job = self._jobs[job_id]
            if job.state is JobState.STARTED:
                lost.append(job_id)
                del self._jobs[job_id]
            else:
                requeue.append(job_id)
        for job_id in requeue:
            job = self._jobs[job_id]
            job.state, job.child = JobState.QUEUED, None
        self._requeued += len(requeue)
        self._rehome(requeue)
        return ChildRemoval(tuple(requeue), tuple(lost))

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
        general = [c.child_id for c in self._children.values() if c.accepting and not c.short_only]
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
        general = [c.child_id for c in self._children.values() if c.accepting and not c.short_only]
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
    def submit(self, job_id: JobId, task_name: str, key: str | None, now: float) -> None:
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} submitted twice")
        self._jobs[job_id] = _Job(job_id, task_name, key, now)
        self._submitted += 1
        if key is not None:
            self._keyed += 1
        if not self._is_long(task_name):
            self._last_short_seen = now
        else:
            self._last_long_seen = now
        self._place(job_id)

    def dispatch(self, now: float) -> list[Dispatch]:
        """Tasks to hand over now: each child with room takes its own work, else steals."""
        out: list[Dispatch] = []
        self.next_steal_at = None
        if self.learn_from_running:
            self._note_overdue(now)
        accepting = [c for c in self._children.values() if c.accepting]
        progress = True
        while progress:  # bounded: every pass dispatches at least one task or stops
            progress = False
            for child in accepting:
                if len(child.window) >= self.window:
                    continue
                picked = self._pick_local(child, now)
                stolen_from: ChildId | None = None
                if picked is None:
                    picked, stolen_from = self._pick_steal(child, now)
                if picked is None:
                    continue
                job = self._jobs[picked]
                job.state, job.child = JobState.SENT, child.child_id
                child.window.add(picked)
                if job.key is not None:
                    child.recent_keys[job.key] = None
                    child.recent_keys.move_to_end(job.key)
                    if len(child.recent_keys) > RECENT_KEYS:
                        child.recent_keys.popitem(last=False)
                self._dispatched += 1
                if stolen_from is None:
                    self._local_hits += 1
                else:
                    self._steals += 1
                    child.steals += 1
                out.append(Dispatch(picked, child.child_id, stolen_from is not None, stolen_from))
                progress = True
        return out

    def accepted(self, job_id: JobId, now: float) -> None:
        job = self._jobs[job_id]
        if job.state is not JobState.SENT:
            raise ValueError(f"job {job_id!r} accepted while {job.state.value}")
        job.state, job.started_at = JobState.STARTED, now

    def finished(self, job_id: JobId, now: float, runtime: float | None = None) -> None:
        """A handed-over task is done (or was abandoned before it started, e.g. revoked)."""
        job = self._jobs.pop(job_id)
        if job.state is JobState.QUEUED:
            # Requeued after its child died, then reported done by a late event (e.g. the
            # sender found it unsendable): it must leave its new queue as well.
            self._remove_queued(job_id)
        if job.child is not None and job.child in self._children:
            self._children[job.child].window.discard(job_id)
        if runtime is not None:
            self.service_times.observe(job.task_name, runtime)

    def cancel(self, job_id: JobId) -> bool:
        """Remove a task that has not been handed over. False if it was already sent/started."""
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return False
        self._remove_queued(job_id)
        del self._jobs[job_id]
        return True

    def flush(self) -> list[JobId]:
        """Drop every task not yet handed to a child, oldest first."""
        dropped = sorted(
            (j for j in self._jobs.values() if j.state is JobState.QUEUED), key=lambda j: j.submitted_at
        )
        for child in self._children.values():
            child.queue.clear()
        self._unassigned.clear()
        for job in dropped:
            del self._jobs[job.job_id]
        return [job.job_id for job in dropped]

    # -- queries -------------------------------------------------------------------------
    def state_of(self, job_id: JobId) -> JobState | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.state

    def child_of(self, job_id: JobId) -> ChildId | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.child

    def queued_count(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is JobState.QUEUED)

    def oldest_queued_at(self) -> float | None:
        """Submit time of the task that has waited longest for a child, None if none waits."""
        return min((j.submitted_at for j in self._jobs.values() if j.state is JobState.QUEUED), default=None)

    def in_flight_count(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is not JobState.QUEUED)

    def queue_depths(self) -> dict[ChildId, int]:
        return {c.child_id: len(c.queue) for c in self._children.values()}

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
        child = self._children[child_id]
        total = 0.0
        for job_id in child.window:
            job = self._jobs[job_id]
            estimate = self.service_times.estimate(job.task_name)
            if job.started_at is not None:
                estimate = max(0.0, estimate - (now - job.started_at))
            total += estimate
        total += sum(self.service_times.estimate(self._jobs[j].task_name) for j in child.queue)
        return now + total

    # -- internals -----------------------------------------------------------------------
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
        for child in self._children.values():
            for job_id in child.window:
                job = self._jobs[job_id]
                if (job.started_at is not None and now - job.started_at >= self.long_task_threshold
                        and self.service_times.get(job.task_name) is None):
                    self._overdue.add(job.task_name)
                    self._last_long_seen = now

    def _rebuild_ring(self) -> None:
        self._ring.rebuild(
            c.child_id for c in self._children.values() if c.accepting and not c.short_only
        )

    def _place(self, job_id: JobId) -> None:
        job = self._jobs[job_id]
        target: ChildId | None
        if job.key is not None:
            target = self._owner_for(job.key)
        else:
            target = self._soonest_free(job.submitted_at, self._is_long(job.task_name))
        if target is None:
            self._unassigned.append(job_id)
        else:
            self._children[target].queue.append(job_id)

    def _soonest_free(self, now: float, long: bool = False) -> ChildId | None:
        best: tuple[float, int, ChildId] | None = None
        for child in self._children.values():
            if not child.accepting or (long and child.short_only):
                continue
            rank = (self.predicted_free_at(child.child_id, now), len(child.queue) + len(child.window), child.child_id)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[2]

    def _rehome(self, job_ids: Iterable[JobId]) -> None:
        for job_id in sorted(job_ids, key=lambda j: self._jobs[j].submitted_at):
            self._place(job_id)

    def _drain_unassigned(self) -> list[JobId]:
        jobs = list(self._unassigned)
        self._unassigned.clear()
        return jobs

    def _take_queued_keyed_elsewhere(self, new_owner: ChildId) -> list[JobId]:
        moved: list[JobId] = []
        for child in self._children.values():
            if child.child_id == new_owner:
                continue
            keep: deque[JobId] = deque()
            for job_id in child.queue:
                key = self._jobs[job_id].key
                if key is not None and self._owner_for(key, record=False) == new_owner:
                    moved.append(job_id)
                else:
                    keep.append(job_id)
            child.queue = keep
        return moved

    def _remove_queued(self, job_id: JobId) -> None:
        for child in self._children.values():
            if job_id in child.queue:
                child.queue.remove(job_id)
                return
        if job_id in self._unassigned:
            self._unassigned.remove(job_id)

    def _long_slots_left(self, now: float) -> int:
        """How many more children may start a long task without eating the short-task reserve."""
        accepting = [c for c in self._children.values() if c.accepting and not c.short_only]
        running_long = sum(
            1 for c in accepting if any(self._is_long(self._jobs[j].task_name) for j in c.window)
        )
        shorts_around = self._last_short_seen is not None and (
            now - self._last_short_seen <= self.short_task_memory
        )
        if not shorts_around or self.short_task_reserve == 0:
            return len(accepting) - running_long
        allowed = max(1, len(accepting) - self.short_task_reserve)
        return allowed - running_long

    def _first_eligible(self, queue: Iterable[JobId], now: float, short_only: bool = False) -> JobId | None:
        long_ok: bool | None = None
        for job_id in queue:
            if not self._is_long(self._jobs[job_id].task_name):
                return job_id
            if short_only:
                continue
            if long_ok is None:
                long_ok = self._long_slots_left(now) > 0
            if long_ok:
                return job_id
        if long_ok is False:
            self._reservations += 1
        return None

    def _stealable(self, job_id: JobId, now: float) -> bool:
        job = self._jobs[job_id]
        if job.key is None or (self.keyed_steal_factor == 0 and self.keyed_steal_floor == 0):
            return True
        delay = max(self.keyed_steal_floor,
                    self.keyed_steal_factor * self.service_times.estimate(job.task_name))
        ready_at = job.submitted_at + delay
        if now >= ready_at:
            return True
        if self.next_steal_at is None or ready_at < self.next_steal_at:
            self.next_steal_at = ready_at
        return False

    def _pick_local(self, child: _Child, now: float) -> JobId | None:
        job_id = self._first_eligible(child.queue, now, child.short_only)
        if job_id is not None:
            child.queue.remove(job_id)
        return job_id

    def _pick_steal(self, thief: _Child, now: float) -> tuple[JobId | None, ChildId | None]:
        if self._unassigned:  # pragma: no cover - unassigned only exists while nobody accepts
            job_id = self._first_eligible(self._unassigned, now, thief.short_only)
            if job_id is not None:
                self._unassigned.remove(job_id)
                return job_id, None
        victims = sorted(
            (c for c in self._children.values() if c.queue and c.child_id != thief.child_id),
            key=lambda c: (-len(c.queue), c.child_id),
        )
        for victim in victims:
            # The owner takes its own work when it has room; steal only what it cannot start.
            if victim.accepting and len(victim.window) < self.window:
                continue
            # Keys the thief ran lately first (it is likely warm for them), then the rest.
            warm = [j for j in victim.queue if self._jobs[j].key in thief.recent_keys]
            rest = [j for j in victim.queue if self._jobs[j].key not in thief.recent_keys
                    and self._stealable(j, now)]
            candidates = warm + rest
            job_id = self._first_eligible(candidates, now, thief.short_only)
            if job_id is not None:
                victim.queue.remove(job_id)
                return job_id, victim.child_id
        return None, None
