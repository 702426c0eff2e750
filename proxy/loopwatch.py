"""Which task held the node's event loop, and for how long: a trio instrument for hunting stalls.

Why: a takeover's milliseconds (issue 12) are spent in one event loop shared by the byte pumps, the
decision task, status and the standby; when the first client after a takeover is answered 10-20 ms late,
the question is which task step ran that long, or whether no step did (the process was off the CPU).
Off by default (two clock reads per task step); ``PAIRPROXY_SLOW_STEP_MS=N`` in the node's environment
logs every task step that ran N ms or more, with the task's name. A step is the code between two checkpoints of one task: a long one is synchronous work (or the
process descheduled in the middle of it; the log line gives the CPU time the step used to tell them
apart).
"""

from __future__ import annotations

import logging
import os
import time

import trio

log = logging.getLogger("pairproxy.loopwatch")

ENV = "PAIRPROXY_SLOW_STEP_MS"


class SlowStepLog(trio.abc.Instrument):
    """Logs task steps of ``threshold_ms`` or more: wall time, CPU time, task name."""

    def __init__(self, threshold_ms: float):
        if threshold_ms <= 0:
            raise ValueError(f"{ENV}: the threshold must be positive, not {threshold_ms:g} ms")
        self.threshold = threshold_ms / 1000
        self._started: tuple[float, float] | None = None
        self.slow_steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        wall = time.perf_counter() - self._started[0]
        if wall >= self.threshold:
            cpu = time.thread_time() - self._started[1]
            self.slow_steps += 1
            log.warning("slow task step: %s ran %.1f ms (%.1f ms of CPU)", task.name, wall * 1000, cpu * 1000)
        self._started = None


def from_environment() -> list[trio.abc.Instrument]:
    """The instruments ``PAIRPROXY_SLOW_STEP_MS`` asks for (none if unset); ValueError names a bad value."""
    raw = os.environ.get(ENV)
    if not raw:
        return []
    try:
        threshold = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}: {raw!r} is not a number of milliseconds") from None
    return [SlowStepLog(threshold)]
