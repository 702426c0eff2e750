"""proxy.loopwatch: a task step that holds the loop is logged with its task's name; short ones are not."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from proxy import loopwatch


def test_a_step_over_the_threshold_is_logged_by_task_name(caplog):
    watch = loopwatch.SlowStepLog(5.0)

    async def hog():
        time.sleep(0.012)  # synchronous: holds the loop for one step

    async def polite():
        for _ in range(5):
            await trio.sleep(0)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, name="the-hog")
            nursery.start_soon(polite, name="the-polite-one")

    with caplog.at_level(logging.WARNING, logger="pairproxy.loopwatch"):
        trio.run(main, instruments=[watch])
    slow = [r.getMessage() for r in caplog.records]
    hog_lines = [m for m in slow if "the-hog ran" in m]
    assert len(hog_lines) == 1
    assert float(hog_lines[0].split(" ran ")[1].split(" ms")[0]) >= 12.0  # the whole step, measured
    # the polite task's six steps are short (on a loaded machine one may be descheduled past 5 ms)
    assert sum("the-polite-one" in m for m in slow) <= 1 and watch.slow_steps == len(slow)


def test_the_environment_names_a_bad_threshold(monkeypatch):
    monkeypatch.setenv(loopwatch.ENV, "fast")
    with pytest.raises(ValueError, match="PAIRPROXY_SLOW_STEP_MS: 'fast' is not a number"):
        loopwatch.from_environment()
    monkeypatch.setenv(loopwatch.ENV, "0")
    with pytest.raises(ValueError, match="must be positive"):
        loopwatch.from_environment()
    monkeypatch.delenv(loopwatch.ENV)
    assert loopwatch.from_environment() == []
