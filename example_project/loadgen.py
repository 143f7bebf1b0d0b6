"""A load generator: rounds of mixed tasks with pauses between them.

    python -m example_project.loadgen

Each round sends a burst of the project's mixed load, waits (bounded) for every result and logs
one line; then it pauses. It runs until stopped (SIGTERM, SIGINT) unless LOADGEN_ROUNDS is set.
Settings, all from the environment:

    CELERY_BROKER_URL   the broker (results go to CELERY_RESULT_BACKEND, default the broker)
    LOADGEN_ROUNDS      rounds to run, 0 = until stopped (default 0)
    LOADGEN_BATCH       tasks in a round (default 60)
    LOADGEN_PAUSE       seconds between rounds (default 15)
    LOADGEN_TIMEOUT     seconds to wait for a round's results (default 120)
    LOADGEN_SEED        seed of the task mix (default: random)

The exit status is 0 when every task of every round succeeded.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

logger = logging.getLogger("example_project.loadgen")


@dataclass(frozen=True)
class LoadgenSettings:
    rounds: int
    batch: int
    pause: float
    timeout: float
    seed: int | None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LoadgenSettings:
        env = dict(os.environ if env is None else env)

        def number(name: str, default: float, minimum: float) -> float:
            raw = env.get(name, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise SystemExit(f"{name}={raw!r}: expected a number") from None
            if value < minimum:
                raise SystemExit(f"{name}={raw!r}: must be >= {minimum:g}")
            return value

        seed = env.get("LOADGEN_SEED")
        return cls(
            rounds=int(number("LOADGEN_ROUNDS", 0, 0)),
            batch=int(number("LOADGEN_BATCH", 60, 1)),
            pause=number("LOADGEN_PAUSE", 15.0, 0),
            timeout=number("LOADGEN_TIMEOUT", 120.0, 1),
            seed=int(seed) if seed else None,
        )


@dataclass(frozen=True)
class RoundResult:
    sent: int
    succeeded: int
    failed: int
    unfinished: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.unfinished == 0


def run_round(app: Any, rng: random.Random, size: int, timeout: float,
              stop: threading.Event) -> RoundResult:
    from example_project.load import mixed_batch, send_call

    started = time.monotonic()
    pending = [send_call(app, call) for call in mixed_batch(rng, size)]
    succeeded = failed = 0
    deadline = started + timeout
    while pending and time.monotonic() < deadline and not stop.is_set():
        still = []
        for result in pending:
            if not result.ready():
                still.append(result)
            elif result.successful():
                succeeded += 1
            else:
                failed += 1
        pending = still
        if pending:
            stop.wait(0.2)
    return RoundResult(size, succeeded, failed, len(pending), time.monotonic() - started)


def main() -> int:
    from example_project.celery import app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s loadgen %(message)s")
    settings = LoadgenSettings.from_env()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rng = random.Random(settings.seed)
    logger.info("broker %s, %s rounds of %d tasks, pause %.0fs",
                app.conf.broker_url.split("@")[-1], settings.rounds or "unlimited",
                settings.batch, settings.pause)
    ok = True
    done = 0
    try:
        while not stop.is_set() and (settings.rounds == 0 or done < settings.rounds):
            result = run_round(app, rng, settings.batch, settings.timeout, stop)
            done += 1
            ok = ok and result.ok
            logger.info("round %d: sent %d completed %d failed %d unfinished %d in %.1fs",
                        done, result.sent, result.succeeded, result.failed, result.unfinished,
                        result.seconds)
            if settings.rounds and done >= settings.rounds:
                break
            stop.wait(settings.pause)
    finally:
        app.close()
    logger.info("stopped after %d rounds: %s", done, "all tasks completed" if ok else "some tasks failed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
