"""Unit tests for gateway.breaker: every state, transition and stale-permit case."""

from __future__ import annotations

import asyncio
import time
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta

import pytest

from gateway.breaker import (
    HALF_OPEN_RETRY_AFTER,
    BreakerConfig,
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
    Permit,
)
from gateway.clock import ManualClock, SystemClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
WALL0 = datetime(2026, 1, 1, tzinfo=UTC)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, BreakerState, BreakerState]] = []

    def __call__(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.calls.append((name, old, new))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0, wall=WALL0)


@pytest.fixture
def hook() -> Recorder:
    return Recorder()


def make(clock: ManualClock, hook: Recorder | None = None, **cfg: object) -> CircuitBreaker:
    defaults: dict[str, object] = {"failures": 3, "reset_after": 10.0}
    defaults.update(cfg)
    return CircuitBreaker("billing", BreakerConfig(**defaults), clock, hook)  # type: ignore[arg-type]


def fail(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        b.acquire().failure()


def open_breaker(b: CircuitBreaker) -> None:
    fail(b, b.config.failures)
    assert b.state is OPEN


def to_half_open(b: CircuitBreaker, clock: ManualClock) -> None:
    open_breaker(b)
    clock.advance(b.config.reset_after)
    assert b.state is HALF_OPEN


# -- config ----------------------------------------------------------------------


def test_config_defaults() -> None:
    c = BreakerConfig()
    assert (c.failures, c.reset_after, c.half_open_probes, c.successes_to_close) == (5, 30.0, 1, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures": 0},
        {"failures": -1},
        {"failures": 1.5},
        {"failures": True},
        {"reset_after": 0},
        {"reset_after": -1.0},
        {"reset_after": float("inf")},
        {"reset_after": float("nan")},
        {"reset_after": "30"},
        {"half_open_probes": 0},
        {"successes_to_close": 0},
    ],
)
def test_config_rejects_non_positive(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        BreakerConfig().failures = 2  # type: ignore[misc]


def test_state_enum_values_are_strings() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert BreakerState.HALF_OPEN == "half_open"


# -- error -------------------------------------------------------------------------


def test_open_error_message_and_fields() -> None:
    e = BreakerOpenError("x", 2.5)
    assert str(e) == "circuit breaker for service 'x' is open"
    assert e.service == "x" and e.retry_after == 2.5


def test_open_error_retry_after_never_negative() -> None:
    assert BreakerOpenError("x", -3).retry_after == 0.0


# -- closed ------------------------------------------------------------------------


def test_starts_closed_and_permits(clock: ManualClock) -> None:
    b = make(clock)
    assert b.state is CLOSED
    p = b.acquire()
    assert isinstance(p, Permit) and not p.probe
    p.success()
    assert b.failures == 0 and b.state is CLOSED


def test_opens_at_threshold_not_before(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook, failures=3)
    fail(b, 2)
    assert b.state is CLOSED and b.failures == 2
    fail(b, 1)
    assert b.state is OPEN
    assert b.opened_at == 1000.0
    assert hook.calls == [("billing", CLOSED, OPEN)]


def test_four_failures_of_five_then_success_resets(clock: ManualClock) -> None:
    b = make(clock, failures=5)
    fail(b, 4)
    assert b.failures == 4
    b.acquire().success()
    assert b.state is CLOSED and b.failures == 0
    fail(b, 4)
    assert b.state is CLOSED  # count restarted: 4 more are not enough
    fail(b, 1)
    assert b.state is OPEN


def test_release_is_neutral_in_closed(clock: ManualClock) -> None:
    b = make(clock, failures=2)
    fail(b, 1)
    b.acquire().release()
    assert b.failures == 1 and b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN


def test_concurrent_closed_permits_settle_in_any_order(clock: ManualClock) -> None:
    b = make(clock, failures=3)
    permits = [b.acquire() for _ in range(5)]
    permits[4].failure()
    permits[0].failure()
    permits[2].success()
    permits[1].failure()
    assert b.failures == 1 and b.state is CLOSED


# -- open --------------------------------------------------------------------------


def test_open_refuses_with_time_left(clock: ManualClock) -> None:
    b = make(clock, reset_after=10.0)
    open_breaker(b)
    clock.advance(4.0)
    with pytest.raises(BreakerOpenError) as ei:
        b.acquire()
    assert ei.value.service == "billing"
    assert ei.value.retry_after == pytest.approx(6.0)
    assert str(ei.value) == "circuit breaker for service 'billing' is open"


def test_open_just_before_reset_after_still_refuses(clock: ManualClock) -> None:
    b = make(clock, reset_after=10.0)
    open_breaker(b)
    clock.advance(9.999)
    assert b.state is OPEN
    with pytest.raises(BreakerOpenError) as ei:
        b.acquire()
    assert 0 < ei.value.retry_after <= 0.0011


def test_state_reports_half_open_once_due_and_fires_once(
    clock: ManualClock, hook: Recorder
) -> None:
    b = make(clock, hook, reset_after=10.0)
    open_breaker(b)
    clock.advance(10.0)
    assert b.state is HALF_OPEN
    assert b.state is HALF_OPEN
    b.snapshot()
    assert hook.calls == [("billing", CLOSED, OPEN), ("billing", OPEN, HALF_OPEN)]
    assert b.transitions == 2


def test_acquire_applies_lazy_half_open(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook, reset_after=10.0)
    open_breaker(b)
    clock.advance(25.0)
    p = b.acquire()  # no state read before: acquire itself moves to half-open
    assert p.probe
    assert hook.calls[-1] == ("billing", OPEN, HALF_OPEN)


def test_snapshot_applies_lazy_half_open(clock: ManualClock) -> None:
    b = make(clock, reset_after=10.0)
    open_breaker(b)
    clock.advance(10.0)
    assert b.snapshot()["state"] == "half_open"


# -- half-open ---------------------------------------------------------------------


def test_half_open_allows_one_probe_by_default(clock: ManualClock) -> None:
    b = make(clock)
    to_half_open(b, clock)
    p = b.acquire()
    assert p.probe and b.half_open_in_flight == 1
    with pytest.raises(BreakerOpenError) as ei:
        b.acquire()
    assert ei.value.retry_after == HALF_OPEN_RETRY_AFTER == 1.0


async def _race(b: CircuitBreaker, n: int, verdict: str) -> tuple[int, int]:
    """n tasks try to acquire at once; winners hold their permit until released."""
    gate = asyncio.Event()
    granted = refused = 0

    async def caller() -> None:
        nonlocal granted, refused
        await asyncio.sleep(0)
        try:
            permit = b.acquire()
        except BreakerOpenError:
            refused += 1
            return
        granted += 1
        await gate.wait()  # the probe is "in flight" while others arrive
        getattr(permit, verdict)()

    tasks = [asyncio.create_task(caller()) for _ in range(n)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert granted + refused == n
    gate.set()
    await asyncio.gather(*tasks)
    return granted, refused


async def test_twenty_concurrent_acquirers_one_probe(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=1)
    to_half_open(b, clock)
    granted, refused = await _race(b, 20, "release")
    assert (granted, refused) == (1, 19)
    assert b.state is HALF_OPEN and b.half_open_in_flight == 0


async def test_twenty_concurrent_acquirers_three_probes(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=3)
    to_half_open(b, clock)
    granted, refused = await _race(b, 20, "release")
    assert (granted, refused) == (3, 17)


async def test_concurrent_probe_success_closes(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=1)
    to_half_open(b, clock)
    granted, _ = await _race(b, 20, "success")
    assert granted == 1 and b.state is CLOSED


def test_probe_success_closes(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook)
    to_half_open(b, clock)
    b.acquire().success()
    assert b.state is CLOSED and b.failures == 0
    assert hook.calls[-1] == ("billing", HALF_OPEN, CLOSED)
    assert not b.acquire().probe


def test_probe_failure_reopens_with_fresh_opened_at(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook, reset_after=10.0)
    to_half_open(b, clock)
    first_opened = b.opened_at
    clock.advance(2.0)
    b.acquire().failure()
    assert b.state is OPEN
    assert b.opened_at == first_opened + 12.0
    assert hook.calls[-1] == ("billing", HALF_OPEN, OPEN)
    with pytest.raises(BreakerOpenError) as ei:
        b.acquire()
    assert ei.value.retry_after == pytest.approx(10.0)
    clock.advance(10.0)
    assert b.state is HALF_OPEN


def test_probe_release_frees_the_slot_without_verdict(clock: ManualClock) -> None:
    b = make(clock)
    to_half_open(b, clock)
    b.acquire().release()
    assert b.state is HALF_OPEN and b.half_open_in_flight == 0
    b.acquire().success()
    assert b.state is CLOSED


def test_successes_to_close(clock: ManualClock) -> None:
    b = make(clock, successes_to_close=3, half_open_probes=1)
    to_half_open(b, clock)
    b.acquire().success()
    b.acquire().success()
    assert b.state is HALF_OPEN
    b.acquire().success()
    assert b.state is CLOSED


def test_successes_to_close_then_one_failure_reopens(clock: ManualClock) -> None:
    b = make(clock, successes_to_close=2, half_open_probes=2)
    to_half_open(b, clock)
    p1, p2 = b.acquire(), b.acquire()
    p1.success()
    assert b.state is HALF_OPEN
    p2.failure()
    assert b.state is OPEN


def test_successes_reset_when_half_open_starts_again(clock: ManualClock) -> None:
    b = make(clock, successes_to_close=2)
    to_half_open(b, clock)
    b.acquire().success()  # 1 of 2
    b.acquire().failure()  # back to OPEN
    clock.advance(b.config.reset_after)
    b.acquire().success()  # 1 of 2 again, not 2
    assert b.state is HALF_OPEN


def test_failure_count_survives_open_and_clears_on_close(clock: ManualClock) -> None:
    b = make(clock, failures=3)
    open_breaker(b)
    assert b.failures == 3
    clock.advance(b.config.reset_after)
    b.acquire().failure()
    assert b.failures == 4
    clock.advance(b.config.reset_after)
    b.acquire().success()
    assert b.failures == 0


# -- stale permits (generations) -----------------------------------------------------


def test_stale_failure_while_open_is_ignored(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook, failures=2)
    slow = b.acquire()
    open_breaker(b)
    opened = b.opened_at
    clock.advance(3.0)
    slow.failure()
    assert b.state is OPEN and b.opened_at == opened and b.failures == 2
    assert len(hook.calls) == 1


def test_stale_success_while_open_is_ignored(clock: ManualClock) -> None:
    b = make(clock, failures=2)
    slow = b.acquire()
    open_breaker(b)
    slow.success()
    assert b.state is OPEN and b.failures == 2


def test_stale_results_do_not_decide_half_open(clock: ManualClock) -> None:
    b = make(clock, failures=2)
    slow_ok, slow_bad = b.acquire(), b.acquire()
    to_half_open(b, clock)
    probe = b.acquire()
    slow_ok.success()
    assert b.state is HALF_OPEN
    slow_bad.failure()
    assert b.state is HALF_OPEN
    assert b.half_open_in_flight == 1  # the stale permits did not free the probe slot
    with pytest.raises(BreakerOpenError):
        b.acquire()
    probe.success()
    assert b.state is CLOSED


def test_stale_probe_from_previous_half_open_is_ignored(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=2)
    to_half_open(b, clock)
    old_probe = b.acquire()
    b.acquire().failure()  # re-opens: old_probe is now stale
    clock.advance(b.config.reset_after)
    assert b.state is HALF_OPEN
    new_probe = b.acquire()
    old_probe.success()
    assert b.state is HALF_OPEN and b.half_open_in_flight == 1
    new_probe.success()
    assert b.state is CLOSED


def test_stale_closed_permit_after_reclose_is_ignored(clock: ManualClock) -> None:
    b = make(clock, failures=2)
    slow = b.acquire()
    to_half_open(b, clock)
    b.acquire().success()
    assert b.state is CLOSED
    fail(b, 1)
    slow.failure()  # from the old CLOSED generation: must not be the 2nd failure
    assert b.state is CLOSED and b.failures == 1


# -- permits -----------------------------------------------------------------------


@pytest.mark.parametrize("first", ["success", "failure", "release"])
@pytest.mark.parametrize("second", ["success", "failure", "release"])
def test_permit_settles_only_once(clock: ManualClock, first: str, second: str) -> None:
    b = make(clock, failures=1)
    p = b.acquire()
    getattr(p, first)()
    assert p.settled
    state_after_first = b.state
    getattr(p, second)()
    getattr(p, second)()
    assert b.state is state_after_first
    assert b.state is (OPEN if first == "failure" else CLOSED)


def test_double_failure_counts_once(clock: ManualClock) -> None:
    b = make(clock, failures=2)
    p = b.acquire()
    p.failure()
    p.failure()
    assert b.failures == 1 and b.state is CLOSED


def test_probe_double_release_does_not_free_two_slots(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=2)
    to_half_open(b, clock)
    p1 = b.acquire()
    b.acquire()
    p1.release()
    p1.release()
    assert b.half_open_in_flight == 1
    b.acquire()
    with pytest.raises(BreakerOpenError):
        b.acquire()


def test_permit_context_manager_releases_unsettled(clock: ManualClock) -> None:
    b = make(clock)
    to_half_open(b, clock)
    with pytest.raises(RuntimeError), b.acquire() as p:
        assert b.half_open_in_flight == 1
        raise RuntimeError("client went away")
    assert p.settled and b.half_open_in_flight == 0 and b.state is HALF_OPEN


def test_permit_context_manager_keeps_explicit_verdict(clock: ManualClock) -> None:
    b = make(clock)
    to_half_open(b, clock)
    with b.acquire() as p:
        p.failure()
    assert b.state is OPEN


# -- manual control ------------------------------------------------------------------


def test_force_open_never_half_opens(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook, reset_after=10.0)
    b.force_open()
    assert b.state is OPEN and b.forced
    assert hook.calls == [("billing", CLOSED, OPEN)]
    for _ in range(5):
        clock.advance(1000.0)
        assert b.state is OPEN
        with pytest.raises(BreakerOpenError) as ei:
            b.acquire()
        assert ei.value.retry_after == 10.0


def test_force_open_on_open_breaker_pins_it(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, reset_after=10.0)
    open_breaker(b)
    b.force_open()
    clock.advance(100.0)
    assert b.state is OPEN and b.forced


def test_force_open_from_half_open_makes_probes_stale(clock: ManualClock) -> None:
    b = make(clock)
    to_half_open(b, clock)
    probe = b.acquire()
    b.force_open()
    probe.success()
    assert b.state is OPEN and b.forced


def test_force_close_closes_and_clears(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook)
    b.force_open()
    clock.advance(5.0)
    b.force_close()
    assert b.state is CLOSED and not b.forced and b.failures == 0
    assert hook.calls[-1] == ("billing", OPEN, CLOSED)
    assert b.opened_at == 1000.0  # history kept
    assert b.transitions == 2
    assert not b.acquire().probe


def test_force_close_when_closed_clears_count_without_transition(
    clock: ManualClock, hook: Recorder
) -> None:
    b = make(clock, hook, failures=3)
    slow = b.acquire()
    fail(b, 2)
    b.force_close()
    assert b.failures == 0 and hook.calls == []
    slow.failure()  # from before the manual close: ignored
    assert b.failures == 0


def test_reset_also_forgets_history(clock: ManualClock, hook: Recorder) -> None:
    b = make(clock, hook)
    to_half_open(b, clock)
    b.reset()
    assert b.state is CLOSED and b.failures == 0 and not b.forced
    assert b.opened_at is None and b.transitions == 0
    assert hook.calls[-1] == ("billing", HALF_OPEN, CLOSED)
    snap = b.snapshot()
    assert snap["opened_at"] is None and snap["transitions"] == 0


def test_reset_clears_forced(clock: ManualClock) -> None:
    b = make(clock)
    b.force_open()
    b.reset()
    assert not b.forced and b.state is CLOSED
    open_breaker(b)
    clock.advance(b.config.reset_after)
    assert b.state is HALF_OPEN


def test_breaker_works_without_hook(clock: ManualClock) -> None:
    b = make(clock, None)
    to_half_open(b, clock)
    b.acquire().success()
    assert b.state is CLOSED


# -- snapshot ------------------------------------------------------------------------


def test_snapshot_closed(clock: ManualClock) -> None:
    b = make(clock, failures=3)
    fail(b, 1)
    assert b.snapshot() == {
        "service": "billing",
        "state": "closed",
        "failures": 1,
        "failure_threshold": 3,
        "opened_at": None,
        "next_try_at": None,
        "next_try_in": None,
        "half_open_in_flight": 0,
        "forced": False,
        "transitions": 0,
    }


def test_snapshot_open(clock: ManualClock) -> None:
    b = make(clock, failures=3, reset_after=10.0)
    clock.advance(60.0)
    open_breaker(b)
    clock.advance(4.0)
    snap = b.snapshot()
    assert snap["state"] == "open"
    assert snap["failures"] == 3
    assert snap["opened_at"] == "2026-01-01T00:01:00.000Z"
    assert snap["next_try_at"] == "2026-01-01T00:01:10.000Z"
    assert snap["next_try_in"] == pytest.approx(6.0)
    assert snap["forced"] is False and snap["transitions"] == 1


def test_snapshot_half_open_in_flight(clock: ManualClock) -> None:
    b = make(clock, half_open_probes=3)
    to_half_open(b, clock)
    b.acquire()
    b.acquire()
    snap = b.snapshot()
    assert snap["state"] == "half_open"
    assert snap["half_open_in_flight"] == 2
    assert snap["next_try_at"] is None and snap["next_try_in"] is None
    assert snap["opened_at"] == "2026-01-01T00:00:00.000Z"


def test_snapshot_forced(clock: ManualClock) -> None:
    b = make(clock)
    b.force_open()
    snap = b.snapshot()
    assert snap["state"] == "open" and snap["forced"] is True
    assert snap["next_try_at"] is None and snap["next_try_in"] is None
    assert snap["opened_at"] == "2026-01-01T00:00:00.000Z"


def test_snapshot_is_json_ready(clock: ManualClock) -> None:
    import json

    b = make(clock)
    open_breaker(b)
    assert json.loads(json.dumps(b.snapshot())) == b.snapshot()


@pytest.fixture
def new_york_tz(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    assert time.localtime(0).tm_hour != time.gmtime(0).tm_hour  # the TZ really applies
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("new_york_tz")
def test_snapshot_times_are_utc_whatever_tz_manual_clock(clock: ManualClock) -> None:
    b = make(clock, reset_after=10.0)
    open_breaker(b)
    snap = b.snapshot()
    assert snap["opened_at"] == "2026-01-01T00:00:00.000Z"
    assert snap["next_try_at"] == "2026-01-01T00:00:10.000Z"


@pytest.mark.usefixtures("new_york_tz")
def test_snapshot_times_are_utc_whatever_tz_system_clock() -> None:
    b = CircuitBreaker("x", BreakerConfig(failures=1, reset_after=30.0), SystemClock())
    before = datetime.now(UTC)
    b.acquire().failure()
    after = datetime.now(UTC)
    snap = b.snapshot()
    opened = datetime.fromisoformat(snap["opened_at"])
    assert snap["opened_at"].endswith("Z")
    assert opened.utcoffset() == timedelta(0)
    slack = timedelta(milliseconds=5)
    assert before - slack <= opened <= after + slack
    next_try = datetime.fromisoformat(snap["next_try_at"])
    assert next_try - opened == pytest.approx(timedelta(seconds=30), abs=timedelta(milliseconds=5))
