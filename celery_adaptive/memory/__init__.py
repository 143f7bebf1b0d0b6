"""The memory guard: limits enforced while a task runs, admission by the container's memory.

Data flow::

    adaptive-memory thread (watcher)                 the supervisor's thread (Celery's hub)
    ────────────────────────────────                 ──────────────────────────────────────
    every adaptive_memory_interval (slower when idle):
      children() snapshot: pid, tasks done
      psutil: RSS (USS/PSS every few seconds)
      cgroup memory.current/max, or the host  ─ MemorySample ─> Reactor.post ─>
                                                     Supervisor.on_memory_sample
                                                       MemoryControl.assess (pure policy):
                                                         over the hard limit: the task fails
                                                           with MemoryLimitExceeded (a
                                                           WorkerLostError), the child is
                                                           SIGKILLed, a replacement starts
                                                         over the soft limit: drained
                                                         memory in use over the threshold:
                                                           admission paused (nothing starts)
                                                         peaks per task name (learnt growth)
    Supervisor._dispatch: admission open? heavy tasks held until they fit

Modules: `sizes` (parsing "512MiB", "80%", KiB), `cgroup` (limit and usage, v1/v2, or the
host), `policy` (pure decisions), `sample` (the frozen readings), `watcher` (the thread). The
supervisor's side is `celery_adaptive.supervisor.memory`.
"""
