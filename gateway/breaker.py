"""A small circuit breaker per upstream service.

We keep our own instead of aiobreaker (1.2.0 lets every concurrent caller through
in half-open and reports wrong times outside UTC). It is pure: time comes from an
injected :class:`~gateway.clock.Clock`, and it is meant for one event loop (no locks;
every method runs to completion without awaiting).

States and their semantics:

* ``CLOSED``: every call gets a permit. Consecutive failures reaching
  ``config.failures`` open the breaker; a success resets the count.
* ``OPEN``: calls are refused with :class:`BreakerOpenError`. Once ``reset_after``
  seconds have passed since it opened, the breaker *is* ``HALF_OPEN``: the move is
  applied lazily by whichever comes first of :attr:`CircuitBreaker.state`,
  :meth:`~CircuitBreaker.acquire` and :meth:`~CircuitBreaker.snapshot`, so every
  observer sees the same state and ``on_transition`` fires once for it. A forced-open
  breaker never moves to half-open by itself.
* ``HALF_OPEN``: at most ``half_open_probes`` permits (probes) are in flight at once;
  other callers are refused with ``retry_after = HALF_OPEN_RETRY_AFTER`` (1 s: a
  probe is usually quick, and Retry-After is whole seconds anyway). A probe success
  counts towards ``successes_to_close``; a probe failure re-opens with a fresh
  ``opened_at``.

Generations: every state change (and every manual control) starts a new
generation. A permit's verdict counts only if it was issued in the current
generation; otherwise it is stale and ignored (a slow request admitted while
CLOSED that fails after the breaker opened, or succeeds while it is OPEN or
HALF_OPEN, says nothing about the upstream *now*; only probes decide half-open).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any

from gateway.clock import Clock, wall_at

#: Seconds a caller refused in HALF_OPEN (all probe slots busy) is told to wait.
HALF_OPEN_RETRY_AFTER = 1.0

TransitionHook = Callable[[str, "BreakerState", "BreakerState"], None]


class BreakerState(StrEnum):
    """A str enum (``str, Enum`` via StrEnum), so values go straight into JSON and labels."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Thresholds of one breaker; validated so a bad routes.yaml fails at load time."""

    failures: int = 5
    reset_after: float = 30.0
    half_open_probes: int = 1
    successes_to_close: int = 1
    #: which outcomes count as failures, named like a retry's ``on:`` tokens. A service
    #: whose 503 means "my own dependency is down" can leave 503 out, so its callers'
    #: breaker does not open on it.
    count: frozenset[str] = frozenset({"connect-error", "timeout", "reset", "5xx"})

    def __post_init__(self) -> None:
        for field in ("failures", "half_open_probes", "successes_to_close"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"breaker {field} must be a positive integer, got {value!r}")
        ra = self.reset_after
        if (
            isinstance(ra, bool)
            or not isinstance(ra, int | float)
            or not math.isfinite(ra)
            or ra <= 0
        ):
            raise ValueError(f"breaker reset_after must be a positive number, got {ra!r}")


class BreakerOpenError(Exception):
    """The call was refused without reaching the upstream; maps to 503 + Retry-After."""

    def __init__(self, service: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker for service {service!r} is open")
        self.service = service
        self.retry_after = max(0.0, float(retry_after))


class Permit:
    """The right to make one call; settle it exactly once (later settlements are no-ops).

    ``success()`` for any response the upstream produced correctly (a 4xx is a
    success), ``failure()`` for what the breaker should count against the upstream,
    ``release()`` when the call ended without a verdict (e.g. cancelled). Used as a
    context manager, an unsettled permit is released on exit, so a probe slot can
    never leak.
    """

    __slots__ = ("_breaker", "_settled", "generation", "probe")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._settled = False
        self.generation = generation
        self.probe = probe

    @property
    def settled(self) -> bool:
        return self._settled

    def success(self) -> None:
        self._settle(True)

    def failure(self) -> None:
        self._settle(False)

    def release(self) -> None:
        self._settle(None)

    def _settle(self, verdict: bool | None) -> None:
        if self._settled:
            return
        self._settled = True
        self._breaker._settle(self, verdict)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"<Permit {self._breaker.name} gen={self.generation} probe={self.probe} "
            f"settled={self._settled}>"
        )


def _iso_utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CircuitBreaker:
    """The breaker for one service; see the module docstring for the semantics."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Clock,
        on_transition: TransitionHook | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._failures = 0  # consecutive counted failures since the last counted success
        self._successes = 0  # probe successes in the current HALF_OPEN
        self._in_flight = 0  # probes in flight in the current HALF_OPEN
        self._opened_at: float | None = None  # monotonic; last time it opened
        self._forced = False
        self._transitions = 0

    # -- observation -------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state, after applying a due OPEN -> HALF_OPEN move."""
        self._refresh()
        return self._state

    @property
    def forced(self) -> bool:
        return self._forced

    @property
    def failures(self) -> int:
        """Consecutive counted failures (kept while open, cleared by a success or close)."""
        return self._failures

    @property
    def opened_at(self) -> float | None:
        """Monotonic instant the breaker last opened (until :meth:`reset`)."""
        return self._opened_at

    @property
    def half_open_in_flight(self) -> int:
        return self._in_flight

    @property
    def transitions(self) -> int:
        return self._transitions

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for the admin API; times are ISO-8601 UTC ('Z')."""
        self._refresh()
        now = self._clock.monotonic()
        opened_at = None
        if self._opened_at is not None:
            opened_at = _iso_utc(wall_at(self._clock, self._opened_at))
        next_try_at: str | None = None
        next_try_in: float | None = None
        if self._state is BreakerState.OPEN and not self._forced and self._opened_at is not None:
            due = self._opened_at + self.config.reset_after
            next_try_at = _iso_utc(wall_at(self._clock, due))
            next_try_in = max(0.0, due - now)
        return {
            "service": self.name,
            "state": self._state.value,
            "failures": self._failures,
            "failure_threshold": self.config.failures,
            "opened_at": opened_at,
            "next_try_at": next_try_at,
            "next_try_in": next_try_in,
            "half_open_in_flight": self._in_flight,
            "forced": self._forced,
            "transitions": self._transitions,
        }

    # -- calls ---------------------------------------------------------------------

    def acquire(self) -> Permit:
        """A permit for one call, or :class:`BreakerOpenError` if the call must not go."""
        self._refresh()
        state = self._state
        if state is BreakerState.CLOSED:
            return Permit(self, self._generation, probe=False)
        if state is BreakerState.HALF_OPEN:
            if self._in_flight < self.config.half_open_probes:
                self._in_flight += 1
                return Permit(self, self._generation, probe=True)
            raise BreakerOpenError(self.name, HALF_OPEN_RETRY_AFTER)
        if self._forced or self._opened_at is None:
            raise BreakerOpenError(self.name, self.config.reset_after)
        remaining = self._opened_at + self.config.reset_after - self._clock.monotonic()
        raise BreakerOpenError(self.name, remaining)

    # -- manual control (admin API) ----------------------------------------------

    def force_open(self) -> None:
        """Open and stay open (no automatic half-open) until force_close() or reset()."""
        self._forced = True
        if self._state is BreakerState.OPEN:
            self._generation += 1
        else:
            self._transition(BreakerState.OPEN)

    def force_close(self) -> None:
        """Close now and clear the counts; keeps history (opened_at, transitions)."""
        self._forced = False
        if self._state is BreakerState.CLOSED:
            self._generation += 1
        else:
            self._transition(BreakerState.CLOSED)
        self._failures = 0

    def reset(self) -> None:
        """As force_close(), and also forget history: opened_at and transitions."""
        self.force_close()
        self._opened_at = None
        self._transitions = 0

    # -- internals -----------------------------------------------------------------

    def _refresh(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and not self._forced
            and self._opened_at is not None
            and self._clock.monotonic() >= self._opened_at + self.config.reset_after
        ):
            self._transition(BreakerState.HALF_OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._successes = 0
        self._in_flight = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock.monotonic()
        self._transitions += 1
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)

    def _settle(self, permit: Permit, verdict: bool | None) -> None:
        if permit.generation != self._generation:
            return  # stale: issued before the last state change
        state = self._state
        if state is BreakerState.CLOSED:
            if verdict is True:
                self._failures = 0
            elif verdict is False:
                self._failures += 1
                if self._failures >= self.config.failures:
                    self._transition(BreakerState.OPEN)
        elif state is BreakerState.HALF_OPEN:
            self._in_flight -= 1
            if verdict is True:
                self._failures = 0
                self._successes += 1
                if self._successes >= self.config.successes_to_close:
                    self._transition(BreakerState.CLOSED)
            elif verdict is False:
                self._failures += 1
                self._transition(BreakerState.OPEN)
        # OPEN issues no permits, so a current-generation permit cannot settle there.

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self._state.value} forced={self._forced}>"
