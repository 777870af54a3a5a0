"""Unit tests for gateway.balancer: round robin, exclusion, ejection, panic mode."""

from __future__ import annotations

from collections import Counter
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime

import pytest

from gateway.balancer import Balancer, EjectionConfig
from gateway.clock import ManualClock

A, B, C, D = "http://a:1", "http://b:1", "http://c:1", "http://d:1"
ABC = [A, B, C]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0, wall=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
def lb(clock: ManualClock) -> Balancer:
    return Balancer(EjectionConfig(failures=3, cooldown=10.0), clock)


def picks(lb: Balancer, instances: list[str], n: int, exclude: tuple[str, ...] = ()) -> list:
    return [lb.pick(instances, exclude) for _ in range(n)]


def eject(lb: Balancer, instance: str) -> None:
    for _ in range(lb.config.failures):
        lb.report(instance, False)
    assert lb.is_ejected(instance)


# -- config --------------------------------------------------------------------------


def test_config_defaults_and_frozen() -> None:
    c = EjectionConfig()
    assert (c.failures, c.cooldown) == (3, 10.0)
    with pytest.raises(FrozenInstanceError):
        c.failures = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures": 0},
        {"failures": 1.5},
        {"failures": True},
        {"cooldown": -1.0},
        {"cooldown": float("nan")},
        {"cooldown": float("inf")},
        {"cooldown": "10"},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EjectionConfig(**kwargs)  # type: ignore[arg-type]


# -- round robin ---------------------------------------------------------------------


def test_round_robin_order(lb: Balancer) -> None:
    assert picks(lb, ABC, 7) == [A, B, C, A, B, C, A]


def test_round_robin_fair_over_many(lb: Balancer) -> None:
    counts = Counter(picks(lb, ABC, 3000))
    assert counts == {A: 1000, B: 1000, C: 1000}


def test_empty_list(lb: Balancer) -> None:
    assert lb.pick([]) is None


def test_single_instance(lb: Balancer) -> None:
    assert picks(lb, [A], 3) == [A, A, A]


def test_exclude_skips_tried(lb: Balancer) -> None:
    assert lb.pick(ABC) == A
    assert lb.pick(ABC, exclude={A}) == B
    assert lb.pick(ABC, exclude={A, B}) == C
    assert lb.pick(ABC, exclude={A, B, C}) is None
    assert lb.pick(ABC) == A  # next request continues the rotation after C


def test_exclude_accepts_any_collection(lb: Balancer) -> None:
    assert lb.pick(ABC, exclude=[A, B]) == C
    assert lb.pick(ABC, exclude=(C,)) == A


def test_skipping_does_not_double_up_on_the_next_one(lb: Balancer) -> None:
    eject(lb, B)
    counts = Counter(picks(lb, ABC, 1000))
    assert counts == {A: 500, C: 500}


def test_list_grows(lb: Balancer) -> None:
    assert picks(lb, ABC, 3) == [A, B, C]
    got = picks(lb, [A, B, C, D], 8)
    assert Counter(got) == {A: 2, B: 2, C: 2, D: 2}


def test_list_shrinks(lb: Balancer) -> None:
    assert picks(lb, [A, B, C, D], 3) == [A, B, C]
    got = picks(lb, [A, B], 6)
    assert Counter(got) == {A: 3, B: 3}
    assert got[0] in (A, B)


def test_list_changes_every_time_still_returns_member(lb: Balancer) -> None:
    lists = [[A], [A, B], [B, C, D], [D], [C, A]]
    for i in range(50):
        current = lists[i % len(lists)]
        assert lb.pick(current) in current


def test_duplicate_entries_are_just_entries(lb: Balancer) -> None:
    assert Counter(picks(lb, [A, A, B], 6)) == {A: 4, B: 2}


# -- ejection ------------------------------------------------------------------------


def test_ejected_after_consecutive_failures(lb: Balancer) -> None:
    lb.report(B, False)
    lb.report(B, False)
    assert not lb.is_ejected(B)
    lb.report(B, False)
    assert lb.is_ejected(B)
    assert set(picks(lb, ABC, 10)) == {A, C}


def test_success_resets_failure_count(lb: Balancer) -> None:
    lb.report(B, False)
    lb.report(B, False)
    lb.report(B, True)
    lb.report(B, False)
    lb.report(B, False)
    assert not lb.is_ejected(B)
    assert lb.snapshot()[B]["consecutive_failures"] == 2


def test_failures_are_per_instance(lb: Balancer) -> None:
    lb.report(A, False)
    lb.report(B, False)
    lb.report(A, False)
    lb.report(B, False)
    assert not lb.is_ejected(A) and not lb.is_ejected(B)


def test_returns_after_cooldown_with_clean_count(lb: Balancer, clock: ManualClock) -> None:
    eject(lb, B)
    clock.advance(9.999)
    assert lb.is_ejected(B)
    assert B not in picks(lb, ABC, 6)
    clock.advance(0.001)
    assert not lb.is_ejected(B)
    assert B in picks(lb, ABC, 3)
    assert lb.snapshot()[B] == {
        "consecutive_failures": 0,
        "ejected": False,
        "ejected_until": None,
    }
    # a clean count: one failure after return does not re-eject
    lb.report(B, False)
    assert not lb.is_ejected(B)
    lb.report(B, False)
    lb.report(B, False)
    assert lb.is_ejected(B)


def test_reports_while_ejected_are_ignored(lb: Balancer, clock: ManualClock) -> None:
    eject(lb, B)
    clock.advance(5.0)
    lb.report(B, True)  # e.g. a slow request that was already in flight
    assert lb.is_ejected(B)
    lb.report(B, False)
    clock.advance(5.0)  # original ejection end, not extended
    assert not lb.is_ejected(B)


def test_report_after_cooldown_starts_fresh(lb: Balancer, clock: ManualClock) -> None:
    eject(lb, B)
    clock.advance(10.0)
    lb.report(B, False)  # first report after return: count restarts at 1
    assert lb.snapshot()[B]["consecutive_failures"] == 1
    assert not lb.is_ejected(B)


def test_zero_cooldown_never_keeps_instance_out(clock: ManualClock) -> None:
    lb = Balancer(EjectionConfig(failures=1, cooldown=0.0), clock)
    lb.report(A, False)
    assert not lb.is_ejected(A)
    assert lb.pick([A, B]) == A


# -- panic mode ----------------------------------------------------------------------


def test_panic_picks_the_one_returning_first(lb: Balancer, clock: ManualClock) -> None:
    eject(lb, B)
    clock.advance(1.0)
    eject(lb, A)
    clock.advance(1.0)
    eject(lb, C)
    assert lb.pick(ABC) == B
    assert lb.pick(ABC) == B  # still the soonest back
    assert lb.pick(ABC, exclude={B}) == A
    assert lb.pick(ABC, exclude={A, B}) == C
    assert lb.pick(ABC, exclude={A, B, C}) is None


def test_panic_only_among_non_excluded(lb: Balancer) -> None:
    eject(lb, B)
    eject(lb, C)
    assert lb.pick(ABC, exclude={A}) in (B, C)
    assert lb.pick(ABC) == A  # a healthy one is always preferred


def test_panic_single_ejected_instance_still_tried(lb: Balancer) -> None:
    eject(lb, A)
    assert lb.pick([A]) == A


def test_panic_ends_when_one_returns(lb: Balancer, clock: ManualClock) -> None:
    eject(lb, A)
    eject(lb, B)
    clock.advance(10.0)
    assert Counter(picks(lb, [A, B], 4)) == {A: 2, B: 2}


# -- forget / snapshot -----------------------------------------------------------------


def test_forget_drops_vanished(lb: Balancer) -> None:
    eject(lb, A)
    lb.report(B, False)
    lb.forget([B, C])
    assert not lb.is_ejected(A)
    assert set(lb.snapshot()) == {B}
    lb.forget(frozenset())
    assert lb.snapshot() == {}


def test_snapshot(lb: Balancer, clock: ManualClock) -> None:
    clock.advance(60.0)
    eject(lb, A)
    lb.report(B, False)
    snap = lb.snapshot([A, B, C])
    assert snap == {
        A: {
            "consecutive_failures": 3,
            "ejected": True,
            "ejected_until": "2026-01-01T00:01:10.000Z",
        },
        B: {"consecutive_failures": 1, "ejected": False, "ejected_until": None},
        C: {"consecutive_failures": 0, "ejected": False, "ejected_until": None},
    }


def test_snapshot_only_known_by_default(lb: Balancer) -> None:
    assert lb.snapshot() == {}
    lb.report(A, True)  # a success on an unknown instance adds no state
    assert lb.snapshot() == {}
    lb.report(A, False)
    assert set(lb.snapshot()) == {A}
