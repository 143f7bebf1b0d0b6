"""The pool's settings: one validated, frozen object built once at start.

Celery-style lowercase names live in ``app.conf`` (``adaptive_*``); Celery's own worker options
(concurrency, limits, max tasks/memory per child, start method, lost wait) arrive as pool
constructor options, and the few worker settings prefork reads from ``app.conf`` itself
(``worker_proc_alive_timeout``) are read here too, so the rest of the pool reads one object (the start method
from ``app.conf`` where Celery does not pass it: see `celery_adaptive.compat`).

`NOT_HONOURED` is the one list of Celery settings that prefork honours and this pool does not;
`unhonoured_settings` names each one an app sets to a non-default value, for a startup warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_adaptive.errors import SettingsError
from celery_adaptive.memory.sizes import MemoryAmount, parse_amount

DEFAULTS: dict[str, Any] = {
    "adaptive_cpu_placement": "spread",
    "adaptive_dispatch_window": 1,
    "adaptive_affinity_header": "affinity",
    "adaptive_task_affinity": {},
    "adaptive_affinity_steal_factor": 3.0,
    "adaptive_long_task_threshold": 0.1,
    "adaptive_short_task_reserve": 0,
    "adaptive_min_children": None,
    "adaptive_max_children": None,
    "adaptive_autoscale": False,
    "adaptive_target_wait": 0.2,
    "adaptive_max_utilization": 0.5,
    "adaptive_control_interval": 1.0,
    "adaptive_stabilization_window": 3.0,
    # None: Celery's worker_proc_alive_timeout (4 s by default), as prefork.
    "adaptive_child_start_timeout": None,
    "adaptive_max_message_bytes": 256 * 1024 * 1024,
    "adaptive_metrics_enabled": True,
    "adaptive_metrics_interval": 2.0,
    "adaptive_metrics_redis_url": None,
    "adaptive_metrics_key_prefix": "celery-adaptive",
    "adaptive_metrics_ttl": 30.0,
    "adaptive_metrics_stream_length": 1000,
    "adaptive_metrics_stream_max_age": 900.0,
    "adaptive_metrics_prometheus_port": None,
    "adaptive_metrics_prometheus_address": "127.0.0.1",
    # None: <tmp>/celery-adaptive-health/<hostname>.json; "" writes no file.
    "adaptive_health_file": None,
    "adaptive_health_port": None,
    "adaptive_health_address": "127.0.0.1",
    "adaptive_health_interval": 1.0,
    "adaptive_health_timeout": 10.0,
    "adaptive_memory_interval": 0.25,
    "adaptive_memory_soft_limit": None,
    "adaptive_memory_hard_limit": None,
    "adaptive_memory_admission_threshold": None,
    "adaptive_memory_heavy_task": "64MiB",
    "adaptive_memory_cgroup": None,
    "adaptive_task_memory": {},
}

DESCRIPTIONS: dict[str, str] = {
    "adaptive_cpu_placement": "spread | compact | none | a CPU list such as '0,2-3'",
    "adaptive_dispatch_window": "tasks handed to one child before it reports a result (>= 1)",
    "adaptive_affinity_header": "message header whose value is a task's affinity key",
    "adaptive_task_affinity": "{task name: affinity key} applied when a message has no header",
    "adaptive_affinity_steal_factor": "a keyed task waits this many times its run time for its owner before an idle child may steal it",
    "adaptive_long_task_threshold": "seconds above which a task name counts as long",
    "adaptive_short_task_reserve": "extra short-task-only children kept while long tasks are around (beyond -c; 0, the default, turns them off)",
    "adaptive_min_children": "autoscaler minimum (default: --autoscale min, else -c)",
    "adaptive_max_children": "autoscaler maximum (default: --autoscale max, else -c)",
    "adaptive_autoscale": "let the predictive autoscaler size the pool",
    "adaptive_target_wait": "seconds of queue wait the autoscaler aims to stay under",
    "adaptive_max_utilization": "busiest share of its time the forecast may give each child, in (0, 1]",
    "adaptive_control_interval": "seconds between autoscaler decisions",
    "adaptive_stabilization_window": "seconds of lower demand before the pool shrinks",
    "adaptive_child_start_timeout": "seconds a new child may take to report ready (default: worker_proc_alive_timeout)",
    "adaptive_max_message_bytes": "largest message a child may send (a task's pickled result); a child over it is replaced",
    "adaptive_metrics_enabled": "publish metrics (events, Redis)",
    "adaptive_metrics_interval": "seconds between metric snapshots",
    "adaptive_metrics_redis_url": "Redis for metrics (default: the broker, when it is Redis; every key is bounded in size and time)",
    "adaptive_metrics_key_prefix": "prefix of the metrics keys in Redis",
    "adaptive_metrics_ttl": "seconds a worker's snapshot key lives without refresh",
    "adaptive_metrics_stream_length": "at most this many entries in each worker's history stream",
    "adaptive_metrics_stream_max_age": "history stream entries older than this many seconds (Redis server time) are trimmed",
    "adaptive_metrics_prometheus_port": "serve Prometheus metrics on this port (off when unset; needs prometheus-client)",
    "adaptive_metrics_prometheus_address": "address the Prometheus endpoint listens on (no authentication: loopback unless you decide otherwise)",
    "adaptive_health_file": "status file `celery adaptive health` reads (default <tmp>/celery-adaptive-health/<hostname>.json; '' for none)",
    "adaptive_health_port": "serve /healthz and /readyz on this port (off when unset)",
    "adaptive_health_address": "address the health endpoint listens on",
    "adaptive_health_interval": "seconds between health checks of the event loop (and status file writes)",
    "adaptive_health_timeout": "seconds without an event-loop turn after which the worker is not alive",
    "adaptive_memory_interval": "seconds between readings of the children's memory (0: no watcher, no limits)",
    "adaptive_memory_soft_limit": "RSS per child ('512MiB', '1.5GB', '40%', or KiB) above which it finishes its task and is replaced",
    "adaptive_memory_hard_limit": "RSS per child above which its task fails with MemoryLimitExceeded (a WorkerLostError) and it is killed",
    "adaptive_memory_admission_threshold": "memory in use of the container (or host), '90%' or a size, above which no task starts",
    "adaptive_memory_heavy_task": "learnt peak growth from which a task name is heavy: it starts only when it fits",
    "adaptive_memory_cgroup": "cgroup directory whose memory counts (default: this process's own with a limit, else the host; 'host')",
    "adaptive_task_memory": "{task name: expected peak growth} used until the pool has measured one",
}


@dataclass(frozen=True)
class PoolSettings:
    """Everything the pool needs to know, validated."""

    concurrency: int
    min_children: int
    max_children: int
    autoscale: bool
    max_tasks_per_child: int | None
    max_memory_per_child_kib: int | None
    soft_time_limit: float | None
    hard_time_limit: float | None
    start_method: str
    cpu_placement: Any
    dispatch_window: int
    affinity_header: str
    task_affinity: Mapping[str, str]
    affinity_steal_factor: float
    long_task_threshold: float
    short_task_reserve: int
    target_wait: float
    control_interval: float
    stabilization_window: float
    child_start_timeout: float
    metrics_enabled: bool
    metrics_interval: float
    metrics_redis_url: str | None
    metrics_key_prefix: str
    metrics_ttl: float
    metrics_stream_length: int
    metrics_prometheus_port: int | None = None
    max_utilization: float = 0.5
    metrics_prometheus_address: str = "127.0.0.1"
    metrics_stream_max_age: float = 900.0
    #: None: the default path for the worker's hostname; "": no status file.
    health_file: str | None = None
    health_port: int | None = None
    health_address: str = "127.0.0.1"
    health_interval: float = 1.0
    health_timeout: float = 10.0
    max_message_bytes: int = 256 * 1024 * 1024
    #: Celery's ``worker_lost_wait``: how long a dead child's pipe may still deliver results
    #: before its accepted, unfinished jobs fail with WorkerLostError.
    lost_wait: float = 10.0
    #: The memory guard (celery_adaptive.memory); limits are resolved to bytes at the start.
    memory_interval: float = 0.25
    memory_soft_limit: MemoryAmount | None = None
    memory_hard_limit: MemoryAmount | None = None
    memory_admission_threshold: MemoryAmount | None = None
    memory_heavy_task: MemoryAmount = MemoryAmount("64MiB", size=64 * 1024 * 1024)
    memory_cgroup: str | None = None
    task_memory: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise SettingsError(name, value, "expected an integer")
    if value < minimum:
        raise SettingsError(name, value, f"must be >= {minimum}")
    return int(value)


def _float(name: str, value: Any, positive: bool = True, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise SettingsError(name, value, "expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(name, value, "expected a number of seconds") from None
    if math.isnan(number) or math.isinf(number):
        raise SettingsError(name, value, "must be finite")
    if positive and number <= 0:
        raise SettingsError(name, value, "must be > 0")
    if number < 0:
        raise SettingsError(name, value, "must be >= 0")
    return number


def _utilization(name: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number <= 1:  # also rejects NaN
        raise SettingsError(name, value, "must be a fraction in (0, 1]")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise SettingsError(name, value, "expected true or false")


def _redis_url(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(name, value, "expected a redis://, rediss:// or unix:// URL")
    from urllib.parse import urlparse

    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise SettingsError(name, value, f"malformed URL ({exc})") from None
    return value


def _address(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise SettingsError(name, value, "expected an IP address or host name to listen on")
    return value


def _health_file(value: Any) -> str | None:
    if value is None or value is False:
        return "" if value is False else None
    if not isinstance(value, str):
        raise SettingsError("adaptive_health_file", value, "expected a path, or '' for no status file")
    return value


def _conf(conf: Mapping[str, Any] | Any, name: str) -> Any:
    getter = getattr(conf, "get", None)
    value = getter(name, None) if getter is not None else None
    return DEFAULTS[name] if value is None else value


def _limit(name: str, value: Any) -> float | None:
    limit = _float(name, value, positive=False, allow_none=True)
    return limit or None  # Celery treats 0 as "no limit"


#: Celery's defaults for the worker settings read here (the same values as celery.app.defaults,
#: so a plain mapping without them, as in unit tests, behaves like an unconfigured app).
CELERY_PROC_ALIVE_TIMEOUT = 4.0
CELERY_LOST_WAIT = 10.0


def _celery_conf(conf: Mapping[str, Any] | Any, name: str, default: Any) -> Any:
    getter = getattr(conf, "get", None)
    value = getter(name, None) if getter is not None else None
    return default if value is None else value


def _child_start_timeout(conf: Mapping[str, Any] | Any) -> float:
    """``adaptive_child_start_timeout`` when the app sets it, else ``worker_proc_alive_timeout``.

    prefork kills a child that has not reported ready (its initializer, including every
    ``worker_process_init`` receiver, done) within ``worker_proc_alive_timeout``; so does this
    pool, unless the pool's own setting says otherwise (kept for apps that set it before
    the pool honoured Celery's).
    """
    own = getattr(conf, "get", lambda *_: None)("adaptive_child_start_timeout", None)
    if own is not None:
        return _float("adaptive_child_start_timeout", own) or CELERY_PROC_ALIVE_TIMEOUT
    value = _celery_conf(conf, "worker_proc_alive_timeout", CELERY_PROC_ALIVE_TIMEOUT)
    return _float("worker_proc_alive_timeout", value) or CELERY_PROC_ALIVE_TIMEOUT


def _lost_wait(conf: Mapping[str, Any] | Any, options: Mapping[str, Any]) -> float:
    # The worker passes worker_lost_wait as the pool option lost_worker_timeout; billiard
    # treats an unset or zero value as its default (10 s), and so does this pool.
    value = options.get("lost_worker_timeout")
    if value is None:
        value = _celery_conf(conf, "worker_lost_wait", CELERY_LOST_WAIT)
    return _float("worker_lost_wait", value, positive=False) or CELERY_LOST_WAIT


def _optional_amount(conf: Mapping[str, Any] | Any, name: str) -> MemoryAmount | None:
    value = _conf(conf, name)
    if value is None or value == "" or value == 0:
        return None
    return parse_amount(name, value)


def _memory(conf: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The memory guard's settings, checked against each other."""
    interval = _float("adaptive_memory_interval", _conf(conf, "adaptive_memory_interval"), positive=False)
    soft = _optional_amount(conf, "adaptive_memory_soft_limit")
    hard = _optional_amount(conf, "adaptive_memory_hard_limit")
    admission = _optional_amount(conf, "adaptive_memory_admission_threshold")
    heavy = parse_amount("adaptive_memory_heavy_task", _conf(conf, "adaptive_memory_heavy_task"))
    if not interval and (soft or hard or admission):
        raise SettingsError("adaptive_memory_interval", interval,
                            "must be > 0 while a memory limit or admission threshold is set")
    if soft is not None and hard is not None:
        sizes_crossed = soft.size is not None and hard.size is not None and soft.size >= hard.size
        shares_crossed = soft.share is not None and hard.share is not None and soft.share >= hard.share
        if sizes_crossed or shares_crossed:
            raise SettingsError("adaptive_memory_soft_limit", soft.text,
                                f"must be below adaptive_memory_hard_limit={hard.text!r}")
    cgroup = _conf(conf, "adaptive_memory_cgroup")
    if cgroup is not None and (not isinstance(cgroup, str) or not cgroup):
        raise SettingsError("adaptive_memory_cgroup", cgroup, "expected a directory path or 'host'")
    declared = _conf(conf, "adaptive_task_memory")
    if not isinstance(declared, Mapping) or not all(isinstance(k, str) for k in declared):
        raise SettingsError("adaptive_task_memory", declared, "expected {task name: size}")
    task_memory = {}
    for task_name, value in declared.items():
        amount = parse_amount(f"adaptive_task_memory[{task_name!r}]", value, allow_share=False)
        assert amount.size is not None
        task_memory[task_name] = amount.size
    return {
        "memory_interval": interval or 0.0,
        "memory_soft_limit": soft,
        "memory_hard_limit": hard,
        "memory_admission_threshold": admission,
        "memory_heavy_task": heavy,
        "memory_cgroup": cgroup,
        "task_memory": task_memory,
    }


def build_settings(conf: Mapping[str, Any] | Any, options: Mapping[str, Any]) -> PoolSettings:
    """Validate ``app.conf`` plus the pool's constructor options into a `PoolSettings`.

    Raises `SettingsError` naming the first bad setting.
    """
    from celery_adaptive.compat import pool_start_method
    from celery_adaptive.placement import parse_policy

    concurrency = _int("worker_concurrency", options.get("limit") or 1, 1)
    assert concurrency is not None
    autoscale_bounds = options.get("autoscale_bounds")  # (max, min) from --autoscale, if given
    min_default, max_default = concurrency, concurrency
    autoscale = _bool("adaptive_autoscale", _conf(conf, "adaptive_autoscale"))
    if autoscale_bounds:
        max_default, min_default = int(autoscale_bounds[0]), max(1, int(autoscale_bounds[1]))
        autoscale = True
    min_children = _int("adaptive_min_children", _conf(conf, "adaptive_min_children") or min_default, 1)
    max_children = _int("adaptive_max_children", _conf(conf, "adaptive_max_children") or max_default, 1)
    assert min_children is not None and max_children is not None
    if min_children > max_children:
        raise SettingsError(
            "adaptive_min_children", min_children, f"greater than adaptive_max_children={max_children}"
        )
    placement_value = _conf(conf, "adaptive_cpu_placement")
    try:
        placement = parse_policy(placement_value)
    except SettingsError:
        raise
    except ValueError as exc:
        raise SettingsError("adaptive_cpu_placement", placement_value, str(exc)) from None
    header = _conf(conf, "adaptive_affinity_header")
    if not isinstance(header, str) or not header:
        raise SettingsError("adaptive_affinity_header", header, "expected a non-empty string")
    task_affinity = _conf(conf, "adaptive_task_affinity")
    if not isinstance(task_affinity, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in task_affinity.items()
    ):
        raise SettingsError("adaptive_task_affinity", task_affinity, "expected {task name: key}")
    prefix = _conf(conf, "adaptive_metrics_key_prefix")
    if not isinstance(prefix, str) or not prefix:
        raise SettingsError("adaptive_metrics_key_prefix", prefix, "expected a non-empty string")
    start_method = pool_start_method(conf, options.get("forking_enable", True))
    max_tasks = options.get("maxtasksperchild")
    max_memory = options.get("max_memory_per_child")
    return PoolSettings(
        concurrency=concurrency,
        min_children=min_children,
        max_children=max_children,
        autoscale=autoscale,
        max_tasks_per_child=_int("worker_max_tasks_per_child", max_tasks, 1) if max_tasks else None,
        max_memory_per_child_kib=(
            _int("worker_max_memory_per_child", max_memory, 1) if max_memory else None
        ),
        soft_time_limit=_limit("task_soft_time_limit", options.get("soft_timeout")),
        hard_time_limit=_limit("task_time_limit", options.get("timeout")),
        start_method=start_method,
        cpu_placement=placement,
        dispatch_window=_int("adaptive_dispatch_window", _conf(conf, "adaptive_dispatch_window"), 1) or 1,
        affinity_header=header,
        task_affinity=dict(task_affinity),
        affinity_steal_factor=_float(
            "adaptive_affinity_steal_factor", _conf(conf, "adaptive_affinity_steal_factor"), positive=False
        ) or 0.0,
        long_task_threshold=_float("adaptive_long_task_threshold", _conf(conf, "adaptive_long_task_threshold")) or 0.1,
        short_task_reserve=_int("adaptive_short_task_reserve", _conf(conf, "adaptive_short_task_reserve"), 0) or 0,
        target_wait=_float("adaptive_target_wait", _conf(conf, "adaptive_target_wait")) or 0.2,
        max_utilization=_utilization("adaptive_max_utilization", _conf(conf, "adaptive_max_utilization")),
        control_interval=_float("adaptive_control_interval", _conf(conf, "adaptive_control_interval")) or 1.0,
        stabilization_window=_float(
            "adaptive_stabilization_window", _conf(conf, "adaptive_stabilization_window"), positive=False
        ) or 0.0,
        child_start_timeout=_child_start_timeout(conf),
        lost_wait=_lost_wait(conf, options),
        metrics_enabled=_bool("adaptive_metrics_enabled", _conf(conf, "adaptive_metrics_enabled")),
        metrics_interval=_float("adaptive_metrics_interval", _conf(conf, "adaptive_metrics_interval")) or 2.0,
        metrics_redis_url=_redis_url("adaptive_metrics_redis_url", _conf(conf, "adaptive_metrics_redis_url")),
        metrics_key_prefix=prefix,
        metrics_ttl=_float("adaptive_metrics_ttl", _conf(conf, "adaptive_metrics_ttl")) or 30.0,
        metrics_stream_length=_int("adaptive_metrics_stream_length", _conf(conf, "adaptive_metrics_stream_length"), 1) or 1000,
        metrics_stream_max_age=_float(
            "adaptive_metrics_stream_max_age", _conf(conf, "adaptive_metrics_stream_max_age")
        ) or 900.0,
        metrics_prometheus_port=_int(
            "adaptive_metrics_prometheus_port", _conf(conf, "adaptive_metrics_prometheus_port"), 1, allow_none=True
        ),
        metrics_prometheus_address=_address(
            "adaptive_metrics_prometheus_address", _conf(conf, "adaptive_metrics_prometheus_address")
        ),
        health_file=_health_file(getattr(conf, "get", lambda *_: None)("adaptive_health_file", None)),
        health_port=_int("adaptive_health_port", _conf(conf, "adaptive_health_port"), 1, allow_none=True),
        health_address=_address("adaptive_health_address", _conf(conf, "adaptive_health_address")),
        health_interval=_float("adaptive_health_interval", _conf(conf, "adaptive_health_interval")) or 1.0,
        health_timeout=_float("adaptive_health_timeout", _conf(conf, "adaptive_health_timeout")) or 10.0,
        max_message_bytes=_int(
            "adaptive_max_message_bytes", _conf(conf, "adaptive_max_message_bytes"), 1024
        ) or DEFAULTS["adaptive_max_message_bytes"],
        **_memory(conf),
    )


def describe_settings() -> list[str]:
    width = max(len(name) for name in DEFAULTS)
    return [f"{name:<{width}}  default={DEFAULTS[name]!r}  {DESCRIPTIONS[name]}" for name in DEFAULTS]


@dataclass(frozen=True)
class NotHonoured:
    """A Celery setting prefork honours and this pool does not, and what the pool does instead."""

    name: str
    default: Any  # Celery's default: any other value in app.conf gets the startup warning
    instead: str


NOT_HONOURED: tuple[NotHonoured, ...] = (
    NotHonoured(
        "worker_autoscaler",
        "celery.worker.autoscale:Autoscaler",
        "with --autoscale this pool's predictive autoscaler sizes the pool and the class's "
        "maybe_scale is never called (the autoscale remote command still sets the bounds)",
    ),
)

#: Worker ``optimization`` values (the pool option ``sched_strategy``; the CLI's ``-O`` accepts
#: only default and fair, both prefork's fair scheduling) that prefork gives a meaning this pool
#: has not: write each task to a child even while it is busy.
_PREFORK_ONLY_STRATEGIES = ("fast", "fcfs")


def unhonoured_settings(conf: Mapping[str, Any] | Any, options: Mapping[str, Any]) -> list[str]:
    """One warning for each setting in `NOT_HONOURED` that ``conf`` sets to a non-default
    value, and for a worker ``optimization`` prefork's scheduler has and this pool's has not."""
    warnings = []
    for item in NOT_HONOURED:
        value = _celery_conf(conf, item.name, item.default)
        if value != item.default:
            warnings.append(f"{item.name}={value!r} is not used by celery_adaptive:Pool: {item.instead}")
    strategy = options.get("sched_strategy")
    if isinstance(strategy, str) and strategy.lower() in _PREFORK_ONLY_STRATEGIES:
        warnings.append(
            f"optimization={strategy!r} is not used by celery_adaptive:Pool: its scheduler hands a task to a "
            "child that can start it; adaptive_dispatch_window sets how many tasks a child may hold"
        )
    return warnings
