"""services.common.logthrottle: a recurring failure is a line per interval, not per request."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from services.common.logthrottle import ThrottledLog

log = logging.getLogger("test.logthrottle")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _stood_for(records: list[logging.LogRecord]) -> int:
    """How many occurrences the lines stand for: each is 1 + its "and N more"."""
    total = 0
    for record in records:
        more = re.search(r"\(and (\d+) more like this", record.getMessage())
        total += 1 + (int(more.group(1)) if more else 0)
    return total


def test_a_burst_is_one_line_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    throttled = ThrottledLog(log, every=5.0, clock=clock)
    assert throttled.log(logging.ERROR, "billing", "billing unavailable for %s", "r0")
    for i in range(1, 100):
        clock.now += 0.01
        assert not throttled.log(logging.ERROR, "billing", "billing unavailable for %s", f"r{i}")
    assert [r.getMessage() for r in caplog.records] == ["billing unavailable for r0"]
    clock.now = 106.0
    assert throttled.log(logging.ERROR, "billing", "billing unavailable for %s", "r100")
    assert caplog.records[-1].getMessage() == (
        "billing unavailable for r100 (and 99 more like this in the last 6s)"
    )
    assert caplog.records[-1].levelno == logging.ERROR
    assert _stood_for(caplog.records) == 101


def test_keys_are_throttled_apart_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    throttled = ThrottledLog(log, every=5.0, max_keys=2, clock=clock)
    assert throttled.log(logging.WARNING, "a", "a")
    assert throttled.log(logging.WARNING, "b", "b")
    assert not throttled.log(logging.WARNING, "a", "a")
    assert throttled.log(logging.WARNING, "c", "c")  # "a" is forgotten: at most 2 keys
    assert throttled.log(logging.WARNING, "a", "a")
    assert [r.getMessage() for r in caplog.records] == ["a", "b", "c", "a"]


async def test_the_tail_of_a_burst_is_written_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a loop the held occurrences do not wait for the condition to come back."""
    caplog.set_level(logging.INFO, logger=log.name)
    throttled = ThrottledLog(log, every=0.05)
    for i in range(11):
        throttled.log(logging.ERROR, "k", "down for %s", f"r{i}")
    assert len(caplog.records) == 1
    await asyncio.sleep(0.15)
    assert [r.getMessage() for r in caplog.records] == [
        "down for r0",
        "down for r10 (and 9 more like this in the last 0s)",
    ]
    assert _stood_for(caplog.records) == 11
    await asyncio.sleep(0.1)
    assert len(caplog.records) == 2  # nothing held: no further line
