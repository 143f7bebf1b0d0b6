"""The scheduler's policy stated the slow, obvious way: the reference the fast one must match.

Plain lists scanned in full, like the scheduler before it was indexed (every choice here is
O(n)): a queue is a list kept oldest first (submit time, then submission order), each choice
walks it. ``tests/unit/test_scheduler_properties.py`` drives this and
``celery_adaptive.scheduler.Scheduler`` with the same random operations and requires the same
answer to every call.

What it shares with the real one: ``HashRing`` and ``ServiceTimes`` (small, pure, tested on
their own) and the key-ownership rules, copied (they were not part of the speed-up).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celery_adaptive.scheduler import (
    KEY_TABLE_SIZE,
    RECENT_KEYS,
    ChildId,
    ChildRemoval,
    Dispatch,
    HashRing,
    JobId,
    JobState,
    SchedulerCounters,
    ServiceTimes,
)


@dataclass
class RefJob:
    job_id: JobId
    task_name: str
    key: str | None
    submitted_at: float
    order: int
    payload: Any
    state: JobState = JobState.QUEUED
    child: ChildId | None = None
    started_at: float | None = None

    @property
    def age(self) -> tuple[float, int]:
        return (self.submitted_at, self.order)


@dataclass
class RefChild:
    child_id: ChildId
    short_only: bool
    accepting: bool = True
    queue: list[JobId] = field(default_factory=list)  # oldest first
    window: list[JobId] = field(default_factory=list)  # hand-over order
    steals: int = 0
    recent_keys: OrderedDict[str, None] = field(default_factory=OrderedDict)


class ReferenceScheduler:
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
        self.window = window
        self.long_task_threshold = long_task_threshold
        self.short_task_reserve = short_task_reserve
        self.short_task_memory = short_task_memory
        self.service_times = service_times or ServiceTimes()
        self.keyed_steal_factor = keyed_steal_factor
        self.keyed_steal_floor = keyed_steal_floor
        self.learn_from_running = learn_from_running
        self.balanced_keys = balanced_keys
        self.next_steal_at: float | None = None
        self.ring = HashRing(vnodes)
        self.children: dict[ChildId, RefChild] = {}
        self.jobs: dict[JobId, RefJob] = {}
        self.unassigned: list[JobId] = []
        self.order = 0
        self.last_short: float | None = None
        self.last_long: float | None = None
        self.overdue: set[str] = set()
        self.key_owner: OrderedDict[str, ChildId] = OrderedDict()
        self.owned: dict[ChildId, int] = {}
        self.submitted = self.dispatched = self.local_hits = self.steals = 0
        self.reservations = self.keyed = self.requeued = 0

    # -- children -------------------------------------------------------------------------
    def add_child(self, child_id: ChildId, short_only: bool = False) -> None:
        self.children[child_id] = RefChild(child_id, short_only)
        self.rebuild_ring()
        if not short_only:
            self.owned.setdefault(child_id, 0)
            self.rebalance_keys_to(child_id)
        moved = []
        for child in self.children.values():
            if child.child_id == child_id:
                continue
            for job_id in list(child.queue):
                key = self.jobs[job_id].key
                if key is not None and self.owner_for(key, record=False) == child_id:
                    child.queue.remove(job_id)
                    moved.append(job_id)
        self.rehome(moved)
        moved, self.unassigned = self.unassigned, []
        self.rehome(moved)

    def drain_child(self, child_id: ChildId) -> bool:
        child = self.children[child_id]
        if child.accepting:
            child.accepting = False
            self.rebuild_ring()
            moved, child.queue = child.queue, []
            self.rehome(moved)
        return not child.window

    def remove_child(self, child_id: ChildId) -> ChildRemoval[Any]:
        child = self.children.pop(child_id)
        self.owned.pop(child_id, None)
        self.rebuild_ring()
        requeue = list(child.queue)
        lost = []
        for job_id in sorted(child.window, key=lambda j: self.jobs[j].age):
            if self.jobs[job_id].state is JobState.STARTED:
                lost.append(self.jobs.pop(job_id))
            else:
                requeue.append(job_id)
        for job_id in requeue:
            self.jobs[job_id].state, self.jobs[job_id].child = JobState.QUEUED, None
        self.requeued += len(requeue)
        self.rehome(requeue)
        return ChildRemoval(
            tuple(requeue), tuple(j.job_id for j in lost), tuple(j.payload for j in lost)
        )

    def owner_of(self, key: str) -> ChildId | None:
        return self.owner_for(key, record=False)

    def general(self) -> list[ChildId]:
        return [c.child_id for c in self.children.values() if c.accepting and not c.short_only]

    def owner_for(self, key: str, record: bool = True) -> ChildId | None:
        if not self.balanced_keys:
            return self.ring.owner(key)
        owner = self.key_owner.get(key)
        general = self.general()
        if owner is not None and owner in general:
            if record:
                self.key_owner.move_to_end(key)
            return owner
        if not general:
            return None
        fewest = min(self.owned.get(c, 0) for c in general)
        candidates = [c for c in general if self.owned.get(c, 0) == fewest]
        ring_pick = self.ring.owner(key)
        chosen = ring_pick if ring_pick in candidates else min(candidates)
        if record:
            if owner is not None and owner in self.owned:
                self.owned[owner] -= 1
            self.key_owner[key] = chosen
            self.key_owner.move_to_end(key)
            self.owned[chosen] = self.owned.get(chosen, 0) + 1
            if len(self.key_owner) > KEY_TABLE_SIZE:
                old_key, old_owner = self.key_owner.popitem(last=False)
                if old_owner in self.owned:
                    self.owned[old_owner] -= 1
        return chosen

    def rebalance_keys_to(self, new_child: ChildId) -> None:
        general = self.general()
        if not self.balanced_keys or len(general) < 2:
            return
        live = {c: self.owned.get(c, 0) for c in general}
        share = sum(live.values()) // len(general)
        for key, owner in list(self.key_owner.items()):
            if self.owned.get(new_child, 0) >= share:
                break
            if owner not in live or owner == new_child or self.owned[owner] <= share:
                continue
            self.owned[owner] -= 1
            self.key_owner[key] = new_child
            self.owned[new_child] = self.owned.get(new_child, 0) + 1

    def rebuild_ring(self) -> None:
        self.ring.rebuild(self.general())

    # -- jobs -----------------------------------------------------------------------------
    def submit(
        self, job_id: JobId, task_name: str, key: str | None, now: float, payload: Any = None
    ) -> None:
        self.jobs[job_id] = RefJob(job_id, task_name, key, now, self.order, payload)
        self.order += 1
        self.submitted += 1
        self.keyed += key is not None
        if self.is_long(task_name):
            self.last_long = now
        else:
            self.last_short = now
        self.place(job_id)

    def dispatch(self, now: float) -> list[Dispatch]:
        out = []
        self.next_steal_at = None
        if self.learn_from_running:
            for child in self.children.values():
                for job_id in child.window:
                    job = self.jobs[job_id]
                    if (job.started_at is not None
                            and now - job.started_at >= self.long_task_threshold
                            and self.service_times.get(job.task_name) is None):
                        self.overdue.add(job.task_name)
                        self.last_long = now
        accepting = [c for c in self.children.values() if c.accepting]
        progress = True
        while progress:
            progress = False
            for child in accepting:
                if len(child.window) >= self.window:
                    continue
                picked = self.first_eligible(child.queue, now, child.short_only)
                stolen_from = None
                if picked is not None:
                    child.queue.remove(picked)
                else:
                    picked, stolen_from = self.steal(child, now)
                if picked is None:
                    continue
                job = self.jobs[picked]
                job.state, job.child = JobState.SENT, child.child_id
                child.window.append(picked)
                if job.key is not None:
                    child.recent_keys[job.key] = None
                    child.recent_keys.move_to_end(job.key)
                    if len(child.recent_keys) > RECENT_KEYS:
                        child.recent_keys.popitem(last=False)
                self.dispatched += 1
                if stolen_from is None:
                    self.local_hits += 1
                else:
                    self.steals += 1
                    child.steals += 1
                out.append(Dispatch(picked, child.child_id, stolen_from is not None, stolen_from))
                progress = True
        return out

    def accepted(self, job_id: JobId, now: float) -> None:
        job = self.jobs[job_id]
        if job.state is not JobState.SENT:
            raise ValueError(f"job {job_id!r} accepted while {job.state.value}")
        job.state, job.started_at = JobState.STARTED, now

    def finished(self, job_id: JobId, now: float, runtime: float | None = None) -> Any:
        job = self.jobs.pop(job_id)
        if job.state is JobState.QUEUED:
            for queue in [c.queue for c in self.children.values()] + [self.unassigned]:
                if job_id in queue:
                    queue.remove(job_id)
        elif job.child in self.children:
            self.children[job.child].window.remove(job_id)
        if runtime is not None:
            self.service_times.observe(job.task_name, runtime)
        return job.payload

    def cancel(self, job_id: JobId) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return False
        self.finished(job_id, 0.0)
        return True

    def flush_payloads(self) -> list[tuple[JobId, Any]]:
        dropped = sorted(
            (j for j in self.jobs.values() if j.state is JobState.QUEUED), key=lambda j: j.age
        )
        for child in self.children.values():
            child.queue.clear()
        self.unassigned.clear()
        for job in dropped:
            del self.jobs[job.job_id]
        return [(job.job_id, job.payload) for job in dropped]

    # -- queries --------------------------------------------------------------------------
    def queued_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state is JobState.QUEUED)

    def in_flight_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state is not JobState.QUEUED)

    def oldest_queued_at(self) -> float | None:
        return min(
            (j.submitted_at for j in self.jobs.values() if j.state is JobState.QUEUED),
            default=None,
        )

    def counters(self) -> SchedulerCounters:
        return SchedulerCounters(
            self.submitted, self.dispatched, self.local_hits, self.steals,
            self.reservations, self.keyed, self.requeued,
        )

    def predicted_free_at(self, child_id: ChildId, now: float) -> float:
        child = self.children[child_id]
        total = 0.0
        for job_id in child.window:
            job = self.jobs[job_id]
            estimate = self.service_times.estimate(job.task_name)
            if job.started_at is not None:
                estimate = max(0.0, estimate - (now - job.started_at))
            total += estimate
        total += sum(self.service_times.estimate(self.jobs[j].task_name) for j in child.queue)
        return now + total

    def short_tasks_recently(self, now: float) -> bool:
        return self.last_short is not None and now - self.last_short <= self.short_task_memory

    def long_tasks_recently(self, now: float) -> bool:
        return self.last_long is not None and now - self.last_long <= self.short_task_memory

    # -- the policy -----------------------------------------------------------------------
    def is_long(self, task_name: str) -> bool:
        estimate = self.service_times.get(task_name)
        if estimate is None:
            return task_name in self.overdue
        return estimate >= self.long_task_threshold

    def place(self, job_id: JobId) -> None:
        job = self.jobs[job_id]
        if job.key is not None:
            target = self.owner_for(job.key)
        else:
            long = self.is_long(job.task_name)
            ranks = [
                (self.predicted_free_at(c.child_id, job.submitted_at),
                 len(c.queue) + len(c.window), c.child_id)
                for c in self.children.values()
                if c.accepting and not (long and c.short_only)
            ]
            target = min(ranks)[2] if ranks else None
        queue = self.unassigned if target is None else self.children[target].queue
        bisect.insort(queue, job_id, key=lambda j: self.jobs[j].age)

    def rehome(self, job_ids: list[JobId]) -> None:
        for job_id in sorted(job_ids, key=lambda j: self.jobs[j].age):
            self.place(job_id)

    def long_slots_left(self, now: float) -> int:
        accepting = [c for c in self.children.values() if c.accepting and not c.short_only]
        running_long = sum(
            1 for c in accepting if any(self.is_long(self.jobs[j].task_name) for j in c.window)
        )
        if not self.short_tasks_recently(now) or self.short_task_reserve == 0:
            return len(accepting) - running_long
        return max(1, len(accepting) - self.short_task_reserve) - running_long

    def first_eligible(self, candidates: list[JobId], now: float, short_only: bool) -> JobId | None:
        """The first short candidate; a long one only while a long task may start."""
        long_ok: bool | None = None
        for job_id in candidates:
            if not self.is_long(self.jobs[job_id].task_name):
                return job_id
            if short_only:
                continue
            if long_ok is None:
                long_ok = self.long_slots_left(now) > 0
            if long_ok:
                return job_id
        if long_ok is False:
            self.reservations += 1
        return None

    def ready_at(self, job: RefJob) -> float:
        delay = max(self.keyed_steal_floor,
                    self.keyed_steal_factor * self.service_times.estimate(job.task_name))
        return job.submitted_at + delay

    def steal(self, thief: RefChild, now: float) -> tuple[JobId | None, ChildId | None]:
        if self.unassigned:
            job_id = self.first_eligible(self.unassigned, now, thief.short_only)
            if job_id is not None:
                self.unassigned.remove(job_id)
                return job_id, None
        delay = bool(self.keyed_steal_factor or self.keyed_steal_floor)
        victims = sorted(
            (c for c in self.children.values() if c.queue and c is not thief),
            key=lambda c: (-len(c.queue), c.child_id),
        )
        for victim in victims:
            if victim.accepting and len(victim.window) < self.window:
                continue
            jobs = [self.jobs[j] for j in victim.queue]
            if delay:
                # A wake-up for the oldest keyed task of each name that is not stealable yet.
                oldest: dict[str, RefJob] = {}
                for job in jobs:
                    if job.key is not None and job.task_name not in oldest:
                        oldest[job.task_name] = job
                for job in oldest.values():
                    at = self.ready_at(job)
                    if now < at and (self.next_steal_at is None or at < self.next_steal_at):
                        self.next_steal_at = at
            warm = [j.job_id for j in jobs if j.key in thief.recent_keys]
            rest = [j.job_id for j in jobs if j.key not in thief.recent_keys
                    and (j.key is None or not delay or now >= self.ready_at(j))]
            job_id = self.first_eligible(warm + rest, now, thief.short_only)
            if job_id is not None:
                victim.queue.remove(job_id)
                return job_id, victim.child_id
        return None, None
