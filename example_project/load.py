"""The example project's mixed load: what a busy day looks like, as a list of task calls.

A `TaskCall` is plain data (a task name, its arguments, its headers), so the load generator,
the burst producer and the ``celery-adaptive demo`` command all send the same mix with any
Celery app connected to the broker, without importing the tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

RESIZE = "example_project.tasks.resize_image"
HASH = "example_project.tasks.hash_password"
FETCH = "example_project.tasks.fetch_url"
TENANT = "example_project.tasks.tenant_report"

TENANTS = tuple(str(n) for n in range(1, 9))


@dataclass(frozen=True)
class TaskCall:
    name: str
    args: tuple[Any, ...]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def make_call(rng: random.Random) -> TaskCall:
    """One call drawn from the mix: mostly CPU-bound, some slow I/O, some per tenant."""
    roll = rng.random()
    if roll < 0.45:
        width = rng.choice((640, 960, 1280))
        return TaskCall(RESIZE, (width, width * 3 // 4, 4, rng.randrange(1 << 30)))
    if roll < 0.60:
        return TaskCall(HASH, (f"user-{rng.randrange(10_000)}", 100_000))
    if roll < 0.85:
        return TaskCall(FETCH, (f"https://api.example.com/items/{rng.randrange(1000)}",
                                round(rng.uniform(0.1, 0.5), 3)))
    tenant = rng.choice(TENANTS)
    return TaskCall(TENANT, (tenant, rng.choice((5000, 10_000, 20_000))),
                    {"affinity": f"tenant-{tenant}"})


def mixed_batch(rng: random.Random, size: int) -> list[TaskCall]:
    return [make_call(rng) for _ in range(size)]


def send_call(app: Any, call: TaskCall, **options: Any) -> Any:
    """Send one call by name through ``app`` (any Celery app on the same broker)."""
    headers = {**call.headers, **(options.pop("headers", None) or {})}
    return app.send_task(call.name, args=call.args, headers=headers or None, **options)
