"""Named pool configurations, turned into ``celery worker`` arguments.

``adaptive``, ``prefork``, ``prefork-autoscale``, ``threads`` and ``solo`` are built in; any
``module:Class`` is passed as ``-P module:Class``. Stock Celery rejects that unless a plugin (like
celery_adaptive's) extends the ``-P`` choices, so ``with_custom_fallback`` gives the equivalent
``-P custom`` + ``CELERY_CUSTOM_WORKER_POOL`` form that the runner retries with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

ADAPTIVE_CLASS = "celery_adaptive:Pool"
CUSTOM_POOL_ENV = "CELERY_CUSTOM_WORKER_POOL"
#: The memory workload's per-child limit: prefork recycles a child over it after its task
#: (``--max-memory-per-child``, KiB); adaptive-memory drains one over it while it runs.
MEMORY_CHILD_LIMIT_KIB = 200 * 1024
#: adaptive-memory's memory guard: the per-child soft limit as prefork's, a hard limit and an
#: admission threshold as shares of the budget (the worker's cgroup), heavy tasks held until
#: they fit (the default 64 MiB threshold).
ADAPTIVE_MEMORY_CONF = {
    "adaptive_memory_soft_limit": MEMORY_CHILD_LIMIT_KIB,
    "adaptive_memory_hard_limit": "90%",
    "adaptive_memory_admission_threshold": "85%",
}


@dataclass(frozen=True)
class PoolConfig:
    name: str  # label in results and plots
    args: tuple[str, ...]  # worker CLI arguments for the pool and its size
    env: dict[str, str] = field(default_factory=dict)
    pool_class: str | None = None  # set for module:Class pools, enables the -P custom fallback

    @property
    def slug(self) -> str:
        """File-name safe label."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)

    def with_custom_fallback(self) -> PoolConfig | None:
        if self.pool_class is None or self.args[:2] == ("-P", "custom"):
            return None
        rest = self.args[2:]
        return replace(self, args=("-P", "custom", *rest),
                       env={**self.env, CUSTOM_POOL_ENV: self.pool_class})


def resolve(name: str, concurrency: int) -> PoolConfig:
    """The configuration for a ``--pools`` entry."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    c = str(concurrency)
    if name == "adaptive":
        return PoolConfig(name, ("-P", ADAPTIVE_CLASS, "-c", c), pool_class=ADAPTIVE_CLASS)
    if name == "prefork":
        return PoolConfig(name, ("-P", "prefork", "-c", c))
    if name == "adaptive-nometrics":
        return PoolConfig(name, ("-P", ADAPTIVE_CLASS, "-c", c), env={"BENCH_ADAPTIVE_METRICS": "0"},
                          pool_class=ADAPTIVE_CLASS)
    if name == "adaptive-memory":
        return PoolConfig(name, ("-P", ADAPTIVE_CLASS, "-c", c),
                          env={"BENCH_POOL_CONF": json.dumps(ADAPTIVE_MEMORY_CONF)},
                          pool_class=ADAPTIVE_CLASS)
    if name == "adaptive-nomemory":
        return PoolConfig(name, ("-P", ADAPTIVE_CLASS, "-c", c),
                          env={"BENCH_POOL_CONF": json.dumps({"adaptive_memory_interval": 0})},
                          pool_class=ADAPTIVE_CLASS)
    if name == "prefork-maxmem":
        return PoolConfig(name, ("-P", "prefork", "-c", c, "--max-memory-per-child",
                                 str(MEMORY_CHILD_LIMIT_KIB)))
    if name == "adaptive-autoscale":
        return PoolConfig(name, ("-P", ADAPTIVE_CLASS, "--autoscale", f"{c},1"), pool_class=ADAPTIVE_CLASS)
    if name == "prefork-autoscale":
        # -c is ignored with --autoscale; the minimum of 1 lets it shrink when idle.
        return PoolConfig(name, ("-P", "prefork", "--autoscale", f"{c},1"))
    if name in ("threads", "solo"):
        return PoolConfig(name, ("-P", name, "-c", c))
    if ":" in name and all(name.split(":", 1)):
        return PoolConfig(name, ("-P", name, "-c", c), pool_class=name)
    raise ValueError(
        f"unknown pool {name!r}; use adaptive, adaptive-nometrics, adaptive-nomemory, adaptive-autoscale,"
        " adaptive-memory,"
        " prefork, prefork-autoscale, prefork-maxmem, threads, solo"
        " or module:Class"
    )
