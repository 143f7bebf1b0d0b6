"""The memory guard in the real supervisor, on a fake clock with fake children: limits while a
task runs, admission by memory, heavy tasks held until they fit. Readings are handed to the
supervisor as the watcher's thread would post them (`Supervisor.on_memory_sample`)."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from celery.exceptions import WorkerLostError

from celery_adaptive import protocol
from celery_adaptive.errors import MemoryLimitExceeded
from celery_adaptive.jobs import Job
from celery_adaptive.memory.cgroup import SystemMemory
from celery_adaptive.memory.policy import MemoryConfig
from celery_adaptive.memory.sample import ChildMemory, MemorySample
from celery_adaptive.memory.sizes import parse_amount
from celery_adaptive.protocol import JobAccepted, JobFinished, RunJob, StopChild
from celery_adaptive.supervisor import Child, ChildState
from celery_adaptive.supervisor.memory import MemoryControl
from tests.unit.test_supervisor_core import Harness

MiB = 1024 * 1024


def make(children: int = 2, soft: int | None = None, hard: int | None = None,
         admission: str | None = None, heavy: int = 64 * MiB,
         declared: dict[str, int] | None = None) -> Harness:
    config = MemoryConfig(
        interval=0.25, soft_limit=soft, hard_limit=hard,
        soft_text=f"{soft // MiB}MiB" if soft else "", hard_text=f"{hard // MiB}MiB" if hard else "",
        admission=parse_amount("adaptive_memory_admission_threshold", admission) if admission else None,
        heavy_task=heavy, task_memory=declared or {},
    )
    h = Harness(children=children, memory=MemoryControl(config))
    h.ready_all()
    return h


def memory(h: Harness) -> MemoryControl:
    assert h.sup.memory is not None
    return h.sup.memory


def read(h: Harness, *children: tuple[Child, int], system: tuple[int, int] | None = None,
         at: float | None = None, tasks_done: int | None = None) -> None:
    """One reading: (child, RSS bytes) pairs and (used, limit) of the container."""
    sample = MemorySample(
        h.clock.now() if at is None else at,
        tuple(ChildMemory(c.child_id, c.pid, c.tasks_done if tasks_done is None else tasks_done, rss)
              for c, rss in children),
        SystemMemory(system[0], system[1], "cgroup v2 /fake") if system is not None else None,
    )
    h.sup.on_memory_sample(sample)


def start(h: Harness, job: Job) -> Child:
    child = h.holder(job)
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    return child


def finish(h: Harness, job: Job, child: Child, value: Any = 3) -> None:
    h.deliver(child, JobFinished(job.job_id, True, value, 0.01))


def errors(h: Harness) -> list[Any]:
    return [o[1] for o in h.outcomes if o[0] == "error"]


def sent_jobs(h: Harness) -> set[int]:
    return {m.job_id for c in h.sup.children() for m in h.sent(c, RunJob)}


# ------------------------------------------------------------------ the hard limit
def test_over_the_hard_limit_the_task_fails_with_the_memory_error_and_only_its_child_dies() -> None:
    h = make(hard=512 * MiB)
    job = h.submit("grow")
    bystander = h.submit("add")
    child, other = start(h, job), start(h, bystander)
    read(h, (child, 100 * MiB), (other, 90 * MiB))
    h.advance(0.25)
    read(h, (child, 600 * MiB), (other, 90 * MiB))

    (error,) = errors(h)
    assert isinstance(error, MemoryLimitExceeded) and isinstance(error, WorkerLostError)
    text = str(error)
    assert "adaptive_memory_hard_limit=512MiB" in text and "RSS 600.0 MiB" in text
    assert f"pid={child.pid}" in text and "grow[id]" in text
    assert error.rss == 600 * MiB and error.limit == 512 * MiB
    assert h.signals == [(child.pid, signal.SIGKILL)]
    assert child.state is ChildState.KILLED and other.state is ChildState.BUSY
    # The replacement starts at once, not when the killed child is reaped.
    assert len(h.launcher.launched) == 3
    h.exit(child, -signal.SIGKILL)
    assert len(errors(h)) == 1  # not reported a second time as lost
    finish(h, bystander, other)
    assert ("ok", 3) in h.outcomes
    counters = h.sup.counters
    assert (counters["memory_hard_limit"], counters["memory_stopped_tasks"], counters["lost"]) == (1, 1, 0)
    assert h.events == [("hard-limit", {"child_pid": child.pid, "rss_bytes": 600 * MiB,
                                        "limit_bytes": 512 * MiB, "task": "grow", "task_id": "id"})]
    # What the killed task took is learnt: it grew by at least 500 MiB.
    estimate = memory(h).tasks.estimate("grow")
    assert estimate is not None and estimate >= 500 * MiB


def test_an_idle_child_over_the_hard_limit_is_replaced_without_blaming_anything() -> None:
    h = make(hard=512 * MiB)
    child = h.child(0)
    read(h, (child, 700 * MiB))
    assert h.signals == [(child.pid, signal.SIGKILL)] and h.outcomes == []
    assert h.sup.counters["memory_stopped_tasks"] == 0


def test_a_reading_from_before_the_task_ended_is_not_acted_on() -> None:
    h = make(hard=512 * MiB)
    job = h.submit()
    child = start(h, job)
    stale_count = child.tasks_done
    finish(h, job, child)
    read(h, (child, 900 * MiB), tasks_done=stale_count)
    assert h.signals == [] and h.outcomes[-1] == ("ok", 3)


def test_a_reading_from_before_the_task_started_is_not_blamed_on_it() -> None:
    h = make(hard=512 * MiB)
    taken = h.clock.now()
    h.clock.advance(0.1)
    job = h.submit()
    child = start(h, job)
    read(h, (child, 900 * MiB), at=taken)
    assert h.signals == [] and errors(h) == []


def test_a_result_already_in_the_pipe_wins_over_the_kill() -> None:
    h = make(hard=512 * MiB)
    job = h.submit()
    child = start(h, job)
    child.channel.incoming.append(protocol.encode(JobFinished(job.job_id, True, 7, 0.3)))
    read(h, (child, 900 * MiB))
    assert ("ok", 7) in h.outcomes and errors(h) == [] and h.signals == []


def test_a_task_handed_over_but_not_yet_started_is_not_killed_with_its_child() -> None:
    # Killing now could run it twice: it would be requeued as never started while the child
    # may be starting it this very moment. The next reading decides.
    h = make(hard=512 * MiB)
    job = h.submit()
    child = h.holder(job)
    read(h, (child, 700 * MiB))
    assert h.signals == [] and errors(h) == []
    h.deliver(child, JobAccepted(job.job_id, child.pid, h.clock.now()))
    h.clock.advance(0.25)
    read(h, (child, 700 * MiB))
    assert h.signals == [(child.pid, signal.SIGKILL)]
    assert isinstance(errors(h)[0], MemoryLimitExceeded)


def test_readings_of_a_reaped_or_reused_pid_are_ignored() -> None:
    h = make(hard=512 * MiB)
    child = h.child(0)
    h.exit(child, 1)
    read(h, (child, 900 * MiB))
    newcomer = h.child(2)
    h.ready(newcomer)
    imposter = ChildMemory(newcomer.child_id, newcomer.pid + 1, newcomer.tasks_done, 900 * MiB)
    h.sup.on_memory_sample(MemorySample(h.clock.now(), (imposter,)))
    assert h.signals == []


# ------------------------------------------------------------------ the soft limit
def test_over_the_soft_limit_the_child_finishes_its_task_then_is_replaced() -> None:
    h = make(soft=300 * MiB, hard=512 * MiB)
    job = h.submit()
    child = start(h, job)
    read(h, (child, 400 * MiB))
    assert child.state is ChildState.DRAINING and h.signals == []
    assert len(h.launcher.launched) == 3  # the replacement is already starting
    nxt = h.submit()
    assert h.holder(nxt) is not child
    finish(h, job, child)
    assert ("ok", 3) in h.outcomes
    assert child.state is ChildState.STOPPING and h.sent(child, StopChild)
    assert h.sup.counters["memory_soft_limit"] == 1
    assert h.events[0][0] == "soft-limit"
    # Draining already: further readings over the soft limit change nothing.
    read(h, (child, 450 * MiB))
    assert h.sup.counters["memory_soft_limit"] == 1


def test_an_idle_child_over_the_soft_limit_stops_now() -> None:
    h = make(soft=300 * MiB)
    child = h.child(1)
    read(h, (child, 400 * MiB))
    assert child.state is ChildState.STOPPING and h.sent(child, StopChild)


# ------------------------------------------------------------------ admission
def test_admission_pauses_over_the_threshold_and_resumes_below_it() -> None:
    h = make(admission="80%")
    read(h, system=(850 * MiB, 1000 * MiB))
    assert h.sup.counters["admission_pauses"] == 1
    pressure = h.sup.memory_pressure()
    assert pressure is not None and "adaptive_memory_admission_threshold 80%" in pressure
    job = h.submit()
    assert job.job_id not in sent_jobs(h) and h.sup.jobs_queued() == 1
    h.advance(5.0)
    # Within the hysteresis (2% of the limit below the threshold): still paused.
    read(h, system=(790 * MiB, 1000 * MiB))
    assert job.job_id not in sent_jobs(h)
    h.advance(1.0)
    read(h, system=(700 * MiB, 1000 * MiB))
    assert job.job_id in sent_jobs(h) and h.sup.memory_pressure() is None
    view = memory(h).describe(h.clock.now())
    assert view["admission"] == "open" and view["pauses"] == 1 and view["paused_s"] == pytest.approx(6.0)
    assert [kind for kind, _ in h.events] == ["admission-paused", "admission-resumed"]


def test_pressure_alone_never_kills_and_running_tasks_finish() -> None:
    h = make(admission="80%", hard=512 * MiB)
    job = h.submit()
    child = start(h, job)
    read(h, (child, 200 * MiB), system=(990 * MiB, 1000 * MiB))
    assert h.signals == []
    finish(h, job, child)
    assert ("ok", 3) in h.outcomes


def test_no_head_of_line_child_starts_while_paused() -> None:
    h = make(admission="80%")
    h.sup.short_lanes = 1
    for job in [h.submit("long"), h.submit("long")]:
        start(h, job)
    h.submit("waits")
    read(h, system=(900 * MiB, 1000 * MiB))
    before = len(h.launcher.launched)
    h.advance(0.5)  # both children stuck on long work, one task waiting: a lane is due...
    h.sup.maintain()
    assert len(h.launcher.launched) == before  # ...but not while memory is short


# ------------------------------------------------------------------ heavy tasks
def learn(h: Harness, name: str, growth: int) -> None:
    """Run one task of ``name`` that grows its child by ``growth``."""
    read(h, *[(c, 50 * MiB) for c in h.sup.children()])
    job = h.submit(name)
    holder = start(h, job)
    h.clock.advance(0.1)
    read(h, (holder, 50 * MiB + growth))
    finish(h, job, holder)
    assert memory(h).tasks.estimate(name) == growth


def test_two_heavy_tasks_that_would_not_fit_run_one_after_the_other() -> None:
    h = make(children=3)
    learn(h, "big", 200 * MiB)
    read(h, system=(700 * MiB, 1000 * MiB))
    first, second = h.submit("big"), h.submit("big")
    light = h.submit("small")
    assert first.job_id in sent_jobs(h) and second.job_id not in sent_jobs(h)
    assert light.job_id in sent_jobs(h)  # light work is not held behind a heavy task
    assert h.sup.jobs_queued() == 1 and memory(h).describe(h.clock.now())["held"] == 1
    child = start(h, first)
    h.clock.advance(1.0)
    finish(h, first, child)
    assert second.job_id in sent_jobs(h)


def test_two_heavy_tasks_that_fit_start_together() -> None:
    h = make(children=3)
    learn(h, "big", 200 * MiB)
    read(h, system=(300 * MiB, 1000 * MiB))
    first, second = h.submit("big"), h.submit("big")
    assert {first.job_id, second.job_id} <= sent_jobs(h)


def test_what_a_running_heavy_task_already_took_is_not_counted_twice() -> None:
    h = make(children=3)
    learn(h, "big", 200 * MiB)
    read(h, *[(c, 50 * MiB) for c in h.sup.children()], system=(500 * MiB, 1000 * MiB))
    first = h.submit("big")
    child = start(h, first)
    second = h.submit("big")  # 500 in use + 200 still to come + 200 <= 1000
    assert second.job_id in sent_jobs(h)
    third = h.submit("big")
    assert third.job_id not in sent_jobs(h)  # 500 + 400 to come + 200 > 1000
    # The first one has taken its 200 MiB: it is in "used" now, no longer to come.
    read(h, (child, 250 * MiB), system=(700 * MiB, 1000 * MiB))
    assert third.job_id not in sent_jobs(h)  # 700 + 200 (second) + 200 > 1000
    read(h, (child, 250 * MiB), system=(550 * MiB, 1000 * MiB))
    assert third.job_id in sent_jobs(h)  # 550 + 200 + 200 <= 1000


def test_the_admission_threshold_is_the_ceiling_heavy_tasks_must_fit_under() -> None:
    h = make(children=3, admission="90%")
    learn(h, "big", 200 * MiB)
    read(h, system=(550 * MiB, 1000 * MiB))
    first, second = h.submit("big"), h.submit("big")
    assert second.job_id not in sent_jobs(h)  # 550 + 200 + 200 > 900 (not > 1000)
    assert first.job_id in sent_jobs(h)


def test_a_declared_task_is_held_before_it_ever_ran_and_flush_returns_held_jobs() -> None:
    h = make(children=3, declared={"big": 300 * MiB})
    read(h, system=(600 * MiB, 1000 * MiB))
    first, second = h.submit("big"), h.submit("big")
    assert second.job_id not in sent_jobs(h)
    dropped = h.sup.flush()
    assert dropped == [second]
    assert h.sup.jobs_queued() == 0 and memory(h).held_count() == 0
    child = start(h, first)
    finish(h, first, child)
    assert ("ok", 3) in h.outcomes


def test_a_heavy_task_waits_while_admission_is_paused() -> None:
    h = make(children=2, admission="80%", declared={"big": 100 * MiB})
    read(h, system=(900 * MiB, 1000 * MiB))
    job = h.submit("big")
    assert job.job_id not in sent_jobs(h)
    read(h, system=(100 * MiB, 1000 * MiB))
    assert job.job_id in sent_jobs(h)


def test_a_learnt_peak_decays_slowly_and_a_new_peak_replaces_it() -> None:
    from celery_adaptive.memory.policy import TaskMemory

    tasks = TaskMemory(max_names=2)
    tasks.observe("a", 100)
    tasks.observe("a", 0)
    assert tasks.estimate("a") == 80
    tasks.observe("a", 500)
    assert tasks.estimate("a") == 500
    tasks.observe("b", 1)
    tasks.observe("c", 1)
    assert tasks.estimate("a") is None  # bounded: the least recently seen name went
    assert tasks.learnt(1) == {"b": 1} or tasks.learnt(1) == {"c": 1}
