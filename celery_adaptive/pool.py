"""The Celery adapter: a thin `BasePool` subclass with no policy in it.

It translates Celery's calls (see docs/celery-pool-contract.md) into the supervisor's,
and the supervisor's results back into Celery's callbacks. Scheduling lives in
`scheduler`, sizing in `controller`, process management in `supervisor`.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

from celery import bootsteps, signals
from celery.concurrency.base import BasePool

from celery_adaptive import cpuquota, placement
from celery_adaptive.autoscaler import AdaptiveAutoscaler, BacklogProbe, CeleryAutoscalerBridge
from celery_adaptive.child import ChildSpec, ForkedChildProcess, child_main, warm_up_parent
from celery_adaptive.djangofork import ForkHygiene
from celery_adaptive.errors import SettingsError
from celery_adaptive.health import HealthMonitor, default_status_file
from celery_adaptive.health.http import HealthServer
from celery_adaptive.jobs import Job
from celery_adaptive.memory.cgroup import SystemMemorySource
from celery_adaptive.memory.policy import MemoryConfig
from celery_adaptive.memory.sizes import MemoryAmount, format_bytes
from celery_adaptive.memory.watcher import MemoryWatcher
from celery_adaptive.metrics import start_for_pool as start_metrics
from celery_adaptive.metrics.events import send_memory_event
from celery_adaptive.metrics.service import MetricsService
from celery_adaptive.prefetch import PrefetchLink
from celery_adaptive.publish_time import publish_wait
from celery_adaptive.scheduler import Scheduler
from celery_adaptive.settings import PoolSettings, build_settings, unhonoured_settings
from celery_adaptive.supervisor import (
    ChildState,
    ProcessLauncher,
    Supervisor,
    SupervisorHooks,
    pids,
)
from celery_adaptive.supervisor.memory import MemoryControl

logger = logging.getLogger("celery_adaptive")


class _ConsumerLink(bootsteps.StartStopStep):
    """Gives the pool a reference to the consumer, to move prefetch with capacity
    (docs/celery-pool-contract.md, section 5). Celery has no public way to reach the consumer from the pool."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)

    def start(self, c: Any) -> None:
        pool = getattr(c, "pool", None)
        if isinstance(pool, Pool):
            pool.on_consumer_start(c)

    def stop(self, c: Any) -> None:
        """The consumer stops: a lost connection (Celery restarts its steps), or shutdown."""
        pool = getattr(c, "pool", None)
        if isinstance(pool, Pool) and pool.health is not None:
            pool.health.consumer_stopped()

    def info(self, c: Any) -> dict[str, Any] | None:
        """The autoscaler's ``inspect stats`` entry (Flower's "Autoscaler options" table) when
        it runs without ``--autoscale``: Celery adds that entry only from its Autoscaler step,
        which ``adaptive_autoscale = True`` alone does not enable. With the step, its entry is
        the same object's."""
        bridge = getattr(getattr(c, "controller", None), "autoscaler", None)
        if isinstance(getattr(c, "pool", None), Pool) and isinstance(bridge, CeleryAutoscalerBridge):
            return {"autoscaler": bridge.info()}
        return None


def _run_ready_ack_callbacks(hub: Any) -> None:
    """Run only the ack/reject promises Celery queued on the hub (prefork does the same while
    it joins at warm shutdown; the transport's own reader is put back for ``hub.close``)."""
    from kombu.message import Message

    pop_ready = getattr(hub, "_pop_ready", None)
    if pop_ready is None:
        return
    ready = pop_ready()
    while ready:
        callback = ready.pop()
        fun = getattr(callback, "fun", None)
        is_ack = isinstance(getattr(fun, "__self__", None), Message) and getattr(
            fun, "__name__", None
        ) in ("ack_log_error", "reject_log_error")
        if not is_ack:
            hub.call_soon(callback)
            continue
        try:
            callback()
        except Exception as exc:
            hub.on_callback_error(callback, exc)


def _is_this_pool(pool_cls: Any) -> bool:
    if isinstance(pool_cls, str):
        return pool_cls.replace(".pool:", ":") == "celery_adaptive:Pool"
    return isinstance(pool_cls, type) and issubclass(pool_cls, Pool)


@signals.worker_init.connect(dispatch_uid="celery_adaptive.pool.size_auto_concurrency")
def size_auto_concurrency(sender: Any = None, **_: Any) -> None:
    """``worker_concurrency = 'auto'`` (``-c auto``, Celery 5.7): size this pool as prefork.

    Celery resolves 'auto' right after ``worker_init`` and caps it by the cgroup CPU quota only
    for prefork (``WorkController._resolve_auto_concurrency``); every other pool gets the
    allowed CPUs. This pool's children are CPU-bound processes like prefork's, so it resolves
    'auto' here first with prefork's rule. The receiver is connected when this module is
    imported, which the ``celery worker`` command does while it parses ``-P`` or
    ``worker_pool``, before the worker exists.
    """
    concurrency = getattr(sender, "concurrency", None)
    if not (isinstance(concurrency, str) and concurrency.strip().lower() == "auto"):
        return
    if not _is_this_pool(getattr(sender, "pool_cls", None)):
        return
    budget = cpuquota.cpu_budget(cpuquota.available_cpus(), cpuquota.read_cpu_quota())
    sender.concurrency = budget.count
    quota = "no cgroup cpu quota found" if budget.quota is None else f"cgroup cpu quota={budget.quota:.2f}"
    # Logged when the pool starts: logging is not set up yet at worker_init.
    _pending_logs.append(
        f"worker_concurrency='auto' resolved to {budget.count} "
        f"(pool=celery_adaptive:Pool, {quota}, available cpus={budget.available})"
    )


_pending_logs: list[str] = []


def _task_modules(app: Any) -> tuple[str, ...]:
    modules = {getattr(task, "__module__", "") for task in app.tasks.values()}
    return tuple(sorted(m for m in modules if m and not m.startswith("celery.")))


class Pool(BasePool):
    """celery-adaptive: CPU-pinned child processes fed by work-stealing queues."""

    uses_semaphore = False  # the pool queues prefetched tasks itself (the scheduler needs them)
    is_green = False
    task_join_will_block = True
    body_can_be_buffer = False
    signal_safe = True

    def __init__(
        self,
        limit: int | None = None,
        putlocks: bool = True,
        forking_enable: bool = True,
        callbacks_propagate: tuple[Any, ...] = (),
        app: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(limit, putlocks, forking_enable, callbacks_propagate, app, **options)
        self.app: Any = self.app
        if self.app is None:
            from celery import current_app

            self.app = current_app
        self.consumer: Any = None
        self.settings: PoolSettings = build_settings(
            self.app.conf,
            {
                "limit": limit,
                "forking_enable": forking_enable,
                "maxtasksperchild": options.get("maxtasksperchild"),
                "max_memory_per_child": options.get("max_memory_per_child"),
                "soft_timeout": options.get("soft_timeout"),
                "timeout": options.get("timeout"),
                "lost_worker_timeout": options.get("lost_worker_timeout"),
            },
        )
        for warning in unhonoured_settings(self.app.conf, options):
            logger.warning("%s", warning)
        self._initargs: tuple[Any, ...] = tuple(options.get("initargs") or (self.app, None))
        self.supervisor: Supervisor | None = None
        self.autoscaler: AdaptiveAutoscaler | None = None
        self.metrics: MetricsService | None = None  # celery_adaptive.metrics, made in on_start
        self.memory_watcher: MemoryWatcher | None = None  # celery_adaptive.memory, in on_start
        self._memory_source: SystemMemorySource | None = None
        self.health: HealthMonitor | None = None  # celery_adaptive.health, made in on_start
        self._health_server: HealthServer | None = None
        self._tick_timer: Any = None  # the autoscaler's next scheduled decision (a Deadline)
        self._early_timer: Any = None  # an arrival's decision, deferred to the end of the gap
        self._tick_at = 0.0
        self.prefetch = PrefetchLink()  # the consumer's prefetch, sized for capacity
        self._install_consumer_link()

    # ------------------------------------------------------------------ setup
    def _install_consumer_link(self) -> None:
        steps = self.app.steps["consumer"]
        if not any(getattr(s, "__name__", "") == "_ConsumerLink" for s in steps):
            steps.add(_ConsumerLink)

    def _build_supervisor(self) -> Supervisor:
        import billiard

        settings = self.settings
        ctx = billiard.get_context(settings.start_method)
        allowed = placement.allowed_cpus()
        topology = placement.read_topology()
        policy = settings.cpu_placement
        # A container's CPU quota: children are placed on at most that many CPUs, rounded up.
        quota = cpuquota.read_cpu_quota()
        max_cpus = cpuquota.quota_cpus(quota)
        order = placement.plan_order(policy, topology, allowed, max_cpus)  # validates a list now
        if max_cpus is not None and policy.kind == "explicit" and len(set(order)) > max_cpus:
            logger.warning(
                "adaptive_cpu_placement=%r pins children to %d CPUs but the cgroup CPU quota is "
                "%.2f CPUs; they will be throttled", policy.describe(), len(set(order)), quota,
            )
        task_modules = _task_modules(self.app) if settings.start_method != "fork" else ()

        def spec_for_slot(slot: int) -> ChildSpec:
            return ChildSpec(
                slot=slot,
                cpu=placement.plan_cpu(policy, topology, allowed, slot, max_cpus),
                initializer_args=self._initargs,
                max_tasks=settings.max_tasks_per_child,
                max_memory_kib=settings.max_memory_per_child_kib,
                start_method=settings.start_method,
                task_modules=task_modules,
            )

        fork_hygiene = ForkHygiene(self.app)

        def before_create_process() -> None:
            if settings.start_method == "fork":
                fork_hygiene.before_fork()
            signals.worker_before_create_process.send(sender=self)

        hooks = SupervisorHooks(
            before_create_process=before_create_process,
            on_job_done=self._on_job_done,
            on_memory_event=self._on_memory_event,
        )
        scheduler: Scheduler[Job] = Scheduler(
            window=settings.dispatch_window,
            long_task_threshold=settings.long_task_threshold,
            # The reserve is made of extra short-task lanes (below), not of general children.
            short_task_reserve=0,
            keyed_steal_factor=settings.affinity_steal_factor,
            keyed_steal_floor=0.005 if settings.affinity_steal_factor else 0.0,
            learn_from_running=True,
            # More points per child even out how many keys each child owns.
            vnodes=160,
            balanced_keys=True,
        )
        # Forked children must not touch the parent's broker connections (see child.py).
        process_cls = ForkedChildProcess if settings.start_method == "fork" else ctx.Process
        launcher = ProcessLauncher(ctx, child_main, settings.max_message_bytes, process_cls)
        return Supervisor(
            settings, spec_for_slot, launcher, scheduler, hooks, short_lanes=settings.short_task_reserve,
            memory=self._build_memory(),
        )

    def _build_memory(self) -> MemoryControl | None:
        """The memory guard's books, with every limit resolved to bytes now (a share of the
        container's memory limit, or of the host's memory without one)."""
        settings = self.settings
        if not settings.memory_interval:
            return None
        source = SystemMemorySource.from_setting(settings.memory_cgroup)
        total = source.total()

        def resolve(name: str, amount: MemoryAmount | None) -> int | None:
            if amount is None:
                return None
            value = amount.resolve(total)
            if value is None:
                raise SettingsError(name, amount.text, "a share needs the memory limit, which could not be read")
            return value

        soft = resolve("adaptive_memory_soft_limit", settings.memory_soft_limit)
        hard = resolve("adaptive_memory_hard_limit", settings.memory_hard_limit)
        if soft is not None and hard is not None and soft >= hard:
            raise SettingsError("adaptive_memory_soft_limit", settings.memory_soft_limit.text if
                                settings.memory_soft_limit else soft,
                                f"resolves to {format_bytes(soft)}, not below adaptive_memory_hard_limit "
                                f"({format_bytes(hard)})")
        heavy = resolve("adaptive_memory_heavy_task", settings.memory_heavy_task) or 1
        config = MemoryConfig(
            interval=settings.memory_interval,
            soft_limit=soft,
            hard_limit=hard,
            soft_text=settings.memory_soft_limit.text if settings.memory_soft_limit else "",
            hard_text=settings.memory_hard_limit.text if settings.memory_hard_limit else "",
            admission=settings.memory_admission_threshold,
            heavy_task=heavy,
            task_memory=settings.task_memory,
        )
        self._memory_source = source
        where = f"{source.describe()}, {format_bytes(total)}"
        if config.enforces:
            logger.info("Memory guard: %s (memory of %s)", config.describe(total), where)
        if hard is not None and total is not None and hard >= total:
            logger.warning("adaptive_memory_hard_limit=%s is not below the memory there is (%s): the "
                           "kernel's OOM killer may act first", config.hard_text, where)
        return MemoryControl(config)

    def _start_memory_watcher(self) -> None:
        sup = self.supervisor
        if sup is None or sup.memory is None:
            return
        memory = sup.memory

        def deliver(sample: Any) -> None:  # on the watcher's thread: hand over, nothing else
            sup.reactor.post(lambda: sup.on_memory_sample(sample))

        self.memory_watcher = MemoryWatcher(
            sup.children, deliver, self._memory_source, memory.config.interval, sup.clock,
            hurry=lambda: memory.waiting,
        )
        memory.poke = self.memory_watcher.poke
        self.memory_watcher.start()

    def _stop_memory_watcher(self) -> None:
        if self.memory_watcher is not None:
            self.memory_watcher.stop()

    def _on_memory_event(self, kind: str, fields: dict[str, Any]) -> None:
        """A memory limit hit or an admission change (on the event loop): a Celery event."""
        try:
            send_memory_event(self.consumer, kind, fields)
        except Exception as exc:  # the event connection is Celery's; it reconnects
            logger.debug("Could not send the memory event %s (%s)", kind, exc)

    def _on_job_done(self, job: Job, runtime: float | None) -> None:
        """Every job's end (runtime None when it did not finish by itself). On the event loop."""
        if self.autoscaler is not None and runtime is not None and self.supervisor is not None:
            self.autoscaler.record_completion(self.supervisor.clock.now(), job.task_name, runtime)
        if self.metrics is not None:
            self.metrics.on_job_done(job, runtime)

    # ------------------------------------------------------------------ consumer and sizing
    def on_consumer_start(self, consumer: Any) -> None:
        """The consumer (re)started: keep a reference, set up autoscaling once, and size the
        fresh QoS for the pool before the event loop starts consuming."""
        self.consumer = consumer
        if self.health is not None:
            self.health.consumer_started(event_loop=getattr(consumer, "hub", None) is not None)
        if self.supervisor is None:
            return
        worker = getattr(consumer, "controller", None)
        celery_autoscaler = getattr(worker, "autoscaler", None)
        if self.autoscaler is None and (self.settings.autoscale or celery_autoscaler is not None):
            self._start_autoscaler(consumer, worker, celery_autoscaler)
        # The consumer was built with --autoscale's MAX (or -c) x multiplier, and a reconnect
        # recomputes it from num_processes: both are corrected here, before consuming.
        self.prefetch.on_consumer_start(consumer, self.supervisor.target, self._prefetch_ceiling())

    def _prefetch_ceiling(self) -> int:
        """The most children the pool may run: what a prefetch fixed at consume time (RabbitMQ
        per-consumer QoS) is sized for."""
        assert self.supervisor is not None
        if self.autoscaler is not None:
            return max(self.autoscaler.bounds[1], self.supervisor.target)
        return self.supervisor.target

    def _follow_capacity(self) -> None:
        """Move the prefetch with capacity (relative to Celery's ETA part; see prefetch.py)."""
        if self.supervisor is not None:
            self.prefetch.follow(self.supervisor.target, self._prefetch_ceiling())

    def _start_autoscaler(self, consumer: Any, worker: Any, celery_autoscaler: Any) -> None:
        assert self.supervisor is not None
        sup = self.supervisor
        self.autoscaler = AdaptiveAutoscaler(
            self.settings, self.resize_to, lambda: sup.target, sup.jobs_queued, sup.running_ages,
            sup.oldest_wait, memory_pressure=sup.memory_pressure,
        )
        explicit = self.app.conf.get("adaptive_min_children") or self.app.conf.get("adaptive_max_children")
        if celery_autoscaler is not None and not explicit:
            # --autoscale MAX,MIN given on the command line: those are the bounds.
            low = max(1, int(celery_autoscaler.min_concurrency or 1))
            high = max(low, int(celery_autoscaler.max_concurrency))
            self.autoscaler.controller.set_bounds(low, high)
            if not isinstance(celery_autoscaler, CeleryAutoscalerBridge):
                # Its reactive rule would fight the forecast; keep it as a control surface only.
                celery_autoscaler.maybe_scale = lambda req=None: None
        if worker is not None:
            worker.autoscaler = CeleryAutoscalerBridge(
                self, self.autoscaler, worker, sup.clock.now, on_bounds=self._follow_capacity
            )
        queues = [q.name for q in getattr(getattr(consumer, "task_consumer", None), "queues", []) or []]
        self.autoscaler.probe = BacklogProbe(
            self.app, queues, min(self.settings.control_interval, 0.25),
            busy=lambda: sup.jobs_in_flight() or sup.jobs_queued(),
            # Idle, the consumer takes every message itself (the prefetch is empty) and each
            # arrival pokes the probe, so a slow idle read only keeps the metric fresh.
            idle_interval=10.0,
            saturated=lambda: sup.jobs_queued() > 0,
            # From the probe's thread: decide on the event loop, as for an arrival.
            on_backlog=lambda value: sup.call_later(0.0, self._decide_early, "autoscale-early"),
        )
        self.autoscaler.probe.start()
        low, high = self.autoscaler.bounds
        target = min(max(sup.target, low), high)
        if target != sup.target:
            self.resize_to(target, f"autoscale bounds [{low}, {high}]")
        self._schedule_tick(self.settings.control_interval)
        logger.info("Predictive autoscaler on: %d..%d children, target wait %.0f ms",
                    low, high, self.settings.target_wait * 1000)

    def _autoscale_tick(self) -> None:
        now = self._decide_now()
        if now is not None:
            assert self.autoscaler is not None
            self._decide(now)
            self._schedule_tick(self.autoscaler.next_tick_in())

    def _decide_now(self) -> float | None:
        """The time to decide at, or None when there is no running autoscaler."""
        sup = self.supervisor
        if sup is None or self.autoscaler is None or self._state not in (None, self.RUN):
            return None
        return sup.clock.now()

    def _decide(self, now: float) -> None:
        assert self.autoscaler is not None
        try:
            self.autoscaler.tick(now)
        except Exception:
            logger.exception("Autoscaler decision failed; keeping the current size")

    def _schedule_tick(self, delay: float) -> None:
        assert self.supervisor is not None
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        self._tick_at = self.supervisor.clock.now() + delay
        self._tick_timer = self.supervisor.call_later(delay, self._autoscale_tick, "autoscale")

    def _decide_early(self) -> None:
        """An arrival, or a broker backlog, between ticks: decide now, or at the end of the
        short gap between early decisions when one was just made. On the event loop."""
        now = self._decide_now()
        if now is None:
            return
        assert self.autoscaler is not None and self.supervisor is not None
        due = self.autoscaler.early_decision_at(now)
        if due > now:
            if self._early_timer is None:
                self._early_timer = self.supervisor.call_later(
                    due - now, self._deferred_decision, "autoscale-early"
                )
            return
        self._decide(now)
        # Work arrived while the ticks were spaced out for idleness: tick at the normal pace
        # again, or the scale-down after this burst would wait for the idle tick.
        interval = self.autoscaler.next_tick_in()
        if self._tick_at - now > interval:
            self._schedule_tick(interval)

    def _deferred_decision(self) -> None:
        self._early_timer = None
        self._decide_early()

    def resize_to(self, target: int, reason: str) -> None:
        """Set the number of children and move the consumer's prefetch with it (on L)."""
        assert self.supervisor is not None
        target = max(1, target)
        if target == self.supervisor.target:
            return
        self.supervisor.set_target(target)
        self.limit = target
        self._follow_capacity()

    # ------------------------------------------------------------------ BasePool
    def on_start(self) -> None:
        while _pending_logs:
            logger.info("%s", _pending_logs.pop(0))
        if self.settings.start_method == "fork":
            warm_up_parent()  # children then start in ~15 ms, not ~100 ms
        self.supervisor = self._build_supervisor()
        self.supervisor.start()
        hostname = self._initargs[1] if len(self._initargs) > 1 else None
        self._start_memory_watcher()
        self.metrics = start_metrics(self, hostname)
        self._start_health(hostname)

    def _start_health(self, hostname: str | None) -> None:
        """The status file (on unless adaptive_health_file is '') and the HTTP endpoint (when
        adaptive_health_port is set); see celery_adaptive.health."""
        settings = self.settings
        if settings.health_file == "" and settings.health_port is None:
            return
        name = hostname or f"celery@{socket.gethostname()}"
        path = None
        if settings.health_file != "":
            path = Path(settings.health_file) if settings.health_file else default_status_file(name)
        self.health = HealthMonitor(name, interval=settings.health_interval, timeout=settings.health_timeout,
                                    status_file=path, serving_count=self._serving_children)
        self.health.start()
        if settings.health_port is not None:
            server = HealthServer(self.health, settings.health_address, settings.health_port)
            if server.start():
                self._health_server = server

    def _serving_children(self) -> int:
        """Children that have started and serve (idle or busy). From any thread (a snapshot)."""
        if self.supervisor is None:
            return 0
        return sum(1 for c in self.supervisor.children() if c.state in (ChildState.IDLE, ChildState.BUSY))

    def did_start_ok(self) -> bool:
        return self.supervisor is not None and self.supervisor.did_start_ok()

    def register_with_event_loop(self, hub: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.attach_hub(hub)
        if self.health is not None:
            self.health.attach(hub)

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        error_callback: Any = None,
        timeout_callback: Any = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        waitforslot: bool | None = None,
        callbacks_propagate: tuple[Any, ...] = (),
        **_ignored: Any,
    ) -> Job:
        assert self.supervisor is not None, "the pool was not started"
        args = tuple(args or ())
        task_name, key = self._task_identity(target, args)
        job = Job(
            self.supervisor.new_job_id(), target, args, dict(kwargs or {}),
            callback=callback, error_callback=error_callback, accept_callback=accept_callback,
            timeout_callback=timeout_callback, soft_timeout=soft_timeout, hard_timeout=timeout,
            correlation_id=correlation_id, task_name=task_name, affinity_key=key,
            submitted_at=self.supervisor.clock.now(),
        )
        if self.metrics is not None and len(args) > 2 and isinstance(args[2], dict):
            request = args[2]
            delivery = request.get("delivery_info")
            routing = delivery.get("routing_key") if isinstance(delivery, dict) else None
            job.queue = routing if isinstance(routing, str) else None
            job.publish_wait = publish_wait(request, time.time())
        self.supervisor.submit(job)
        if self.autoscaler is not None:
            self.autoscaler.record_arrival(job.submitted_at, task_name)
            if self.autoscaler.probe is not None:
                self.autoscaler.probe.poke()
            # Decide on arrivals too, not only at the tick: a burst is seen in its first
            # arrivals, and the children it needs start before the tasks queue up rather than
            # up to a control interval later.
            self._decide_early()
        return job

    def _task_identity(self, target: Any, args: tuple[Any, ...]) -> tuple[str, str | None]:
        """The task name and affinity key of a trace call (name, id, request, body, ...)."""
        name = args[0] if args and isinstance(args[0], str) else getattr(target, "__name__", "?")
        key: Any = None
        if len(args) > 2 and isinstance(args[2], dict):
            key = args[2].get(self.settings.affinity_header)
        if key is None:
            task = self.app.tasks.get(name) if isinstance(name, str) else None
            key = getattr(task, "affinity_key", None) or self.settings.task_affinity.get(name)
        return name, (None if key is None else str(key))

    def terminate_job(self, pid: int, signal_: int | None = None) -> None:
        if self.supervisor is not None:
            self.supervisor.terminate_job(pid, signal_ or signal.SIGTERM)

    # ``pool_grow``/``pool_shrink`` call these, then ``Consumer._update_prefetch_count(±n)``,
    # which moves the prefetch itself (relative, like `PrefetchLink.follow`): moving it here too
    # would count the change twice. A prefetch fixed at consume time still needs the consumer
    # re-established after Celery's move.
    def grow(self, n: int = 1) -> None:
        assert self.supervisor is not None
        self.supervisor.grow(n)
        self.limit = self.supervisor.target
        self.prefetch.after_celery_move()

    def shrink(self, n: int = 1) -> None:
        assert self.supervisor is not None
        self.supervisor.shrink(n)
        self.limit = self.supervisor.target
        self.prefetch.after_celery_move()

    # Celery's autoscaler calls these names on the pool.
    def shrink_pool(self, n: int = 1) -> None:
        self.shrink(n)

    def maintain_pool(self, *args: Any, **kwargs: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.maintain()

    def restart(self) -> None:
        if self.supervisor is not None:
            self.supervisor.restart()

    def flush(self) -> None:
        if self.supervisor is not None:
            self.supervisor.flush()

    def on_close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()

    def _stop_autoscaler(self) -> None:
        if self.autoscaler is not None and self.autoscaler.probe is not None:
            self.autoscaler.probe.stop()

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()

    def _stop_health(self) -> None:
        """Last: during a warm shutdown the worker is alive (not ready) until its tasks end."""
        if self._health_server is not None:
            self._health_server.stop()
            self._health_server = None
        if self.health is not None:
            self.health.stop()

    def on_stop(self) -> None:
        self._stop_autoscaler()
        self._stop_metrics()
        if self.supervisor is None:
            self._stop_memory_watcher()
            self._stop_health()
            return
        from kombu.asynchronous import get_event_loop

        hub = get_event_loop()

        def run_ready() -> None:
            if hub is not None:
                try:
                    hub.fire_timers(propagate=())
                except Exception:
                    logger.debug("timer error during pool stop", exc_info=True)
                _run_ready_ack_callbacks(hub)

        # The watcher keeps reading while running tasks finish: their limits still hold.
        try:
            self.supervisor.join(run_ready)
        finally:
            self._stop_memory_watcher()
            self._stop_health()

    def on_terminate(self) -> None:
        self._stop_autoscaler()
        self._stop_metrics()
        self._stop_memory_watcher()
        if self.supervisor is not None:
            self.supervisor.terminate()
        self._stop_health()

    @property
    def num_processes(self) -> int:
        # Capacity, not the busy count (docs/celery-pool-contract.md, section 2).
        return self.supervisor.target if self.supervisor is not None else int(self.limit or 0)

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        # The public path users select (the class lives in celery_adaptive.pool).
        info["implementation"] = "celery_adaptive:Pool"
        settings = self.settings
        sup = self.supervisor
        children = sup.children() if sup is not None else []
        readings = sup.memory.readings if sup is not None and sup.memory is not None else {}
        info.update(
            {
                "max-concurrency": sup.target if sup is not None else self.limit,
                "processes": pids(children),
                "max-tasks-per-child": settings.max_tasks_per_child or "N/A",
                "put-guarded-by-semaphore": False,
                "timeouts": (settings.soft_time_limit or 0, settings.hard_time_limit or 0),
                "writes": {"total": sum(c.tasks_done for c in children)},
                "start-method": settings.start_method,
                "placement": settings.cpu_placement.describe(),
                "target": sup.target if sup is not None else self.limit,
                "min-children": self.autoscaler.bounds[0] if self.autoscaler else settings.min_children,
                "max-children": self.autoscaler.bounds[1] if self.autoscaler else settings.max_children,
                "autoscale": self.autoscaler is not None,
                "queued": sup.jobs_queued() if sup is not None else 0,
                "prefetch": self.prefetch.describe(),
                "in-flight": sup.jobs_in_flight() if sup is not None else 0,
                "children": [
                    {
                        "pid": c.pid,
                        "cpu": c.cpu,
                        "slot": c.slot,
                        "state": c.state.value,
                        "tasks": c.tasks_done,
                        "lane": c.lane,
                        **({"rss": readings[c.child_id].rss} if c.child_id in readings else {}),
                    }
                    for c in children
                    if c.state is not ChildState.DEAD
                ],
            }
        )
        if self.autoscaler is not None:
            info["autoscaler"] = self.autoscaler.state()
        if self.metrics is not None:
            info["metrics"] = self.metrics.summary()
        if sup is not None and sup.memory is not None:
            info["memory"] = sup.memory.describe(sup.clock.now())
        if sup is not None:
            info["counters"] = dict(sup.counters)
            counters = sup.scheduler.counters()
            info["scheduler"] = {
                "local-hits": counters.local_hits,
                "steals": counters.steals,
                "reservations": counters.reservations,
                "keyed": counters.keyed,
                "requeued": counters.requeued,
            }
        return info


__all__ = ["Pool"]
