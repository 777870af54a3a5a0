"""Time as a dependency, so policy code can be tested with a hand-driven clock.

Policy modules take a :class:`Clock` instead of calling :mod:`time` directly:
``monotonic()`` drives every timer, ``now()`` is only for showing times to people
(always timezone-aware UTC).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def now(self) -> datetime:
        """The wall-clock time, timezone-aware UTC."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 1000.0, wall: datetime | None = None) -> None:
        self._mono = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)


def wall_at(clock: Clock, monotonic_instant: float) -> datetime:
    """The UTC wall time that corresponds to a past or future monotonic instant."""
    return clock.now() + timedelta(seconds=monotonic_instant - clock.monotonic())
