"""Unit tests for gateway.retry: retryability, attempt chains, deadlines and Retry-After."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.retry import (
    IDEMPOTENT_METHODS,
    Attempt,
    Outcome,
    RetryPolicy,
    parse_retry_after,
)

NOW = 1000.0


def zero() -> float:
    return 0.0


def half() -> float:
    return 0.5


def almost_one() -> float:
    return 0.999


# -- Outcome -----------------------------------------------------------------------


def test_outcome_helpers() -> None:
    assert Outcome.connect_error() == Outcome("connect-error")
    assert Outcome.timeout() == Outcome("timeout")
    assert Outcome.reset() == Outcome("reset")
    assert Outcome.response(503, retry_after=2.0) == Outcome("status", 503, 2.0)
    assert Outcome.response(200).retry_after is None


def test_only_connect_error_is_never_sent() -> None:
    assert Outcome.connect_error().never_sent
    assert not Outcome.timeout().never_sent
    assert not Outcome.reset().never_sent
    assert not Outcome.response(502).never_sent


def test_outcome_tokens() -> None:
    assert Outcome.connect_error().token == "connect-error"
    assert Outcome.timeout().token == "timeout"
    assert Outcome.reset().token == "reset"
    assert Outcome.response(504).token == "504"


@pytest.mark.parametrize(
    "args",
    [
        ("nope",),
        ("status",),  # status missing
        ("timeout", 503),  # status on a non-status kind
        ("status", 99),
        ("status", 600),
        ("status", 503, -1.0),
        ("status", 503, float("inf")),
        ("status", 503, float("nan")),
    ],
)
def test_outcome_validation(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        Outcome(*args)  # type: ignore[arg-type]


def test_outcome_is_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        Outcome.timeout().kind = "reset"  # type: ignore[misc]


# -- RetryPolicy construction ----------------------------------------------------------


def test_policy_defaults() -> None:
    p = RetryPolicy()
    assert p.attempts == 3
    assert p.backoff_initial == 0.05 and p.backoff_max == 1.0
    assert p.on == frozenset({"connect-error", "502", "503", "504"})
    assert p.methods == IDEMPOTENT_METHODS
    assert IDEMPOTENT_METHODS == frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def test_policy_is_frozen_and_hashable() -> None:
    p = RetryPolicy()
    with pytest.raises(FrozenInstanceError):
        p.attempts = 5  # type: ignore[misc]
    assert hash(p) == hash(RetryPolicy())
    assert p == RetryPolicy()


def test_policy_normalizes_lists_case_and_ints() -> None:
    p = RetryPolicy(on=["Connect-Error", 503, "5XX"], methods=["get", "Post"])  # type: ignore[arg-type]
    assert p.on == frozenset({"connect-error", "503", "5xx"})
    assert p.methods == frozenset({"GET", "POST"})
    assert isinstance(p.on, frozenset) and isinstance(p.methods, frozenset)
    hash(p)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": -2},
        {"attempts": 2.5},
        {"attempts": True},
        {"backoff_initial": -0.1},
        {"backoff_max": float("inf")},
        {"backoff_initial": 2.0, "backoff_max": 1.0},
        {"on": frozenset({"502", "teapot"})},
        {"on": frozenset({"600"})},
        {"on": frozenset({"6xx"})},
        {"on": frozenset({"50"})},
        {"on": "503"},
        {"methods": "GET"},
    ],
)
def test_policy_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# -- is_retryable ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "get", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_methods_retry_status(method: str) -> None:
    assert RetryPolicy().is_retryable(method, Outcome.response(503))


@pytest.mark.parametrize("method", ["POST", "PATCH", "post"])
def test_non_idempotent_not_retried_on_status(method: str) -> None:
    assert not RetryPolicy().is_retryable(method, Outcome.response(503))


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "CONNECT"])
def test_connect_error_retried_for_any_method(method: str) -> None:
    assert RetryPolicy().is_retryable(method, Outcome.connect_error())


def test_connect_error_not_retried_when_not_listed() -> None:
    assert not RetryPolicy(on=frozenset({"503"})).is_retryable("GET", Outcome.connect_error())


def test_timeout_and_reset_only_when_listed() -> None:
    default = RetryPolicy()
    assert not default.is_retryable("GET", Outcome.timeout())
    assert not default.is_retryable("GET", Outcome.reset())
    p = RetryPolicy(on=frozenset({"timeout", "reset"}))
    assert p.is_retryable("GET", Outcome.timeout())
    assert p.is_retryable("GET", Outcome.reset())
    # may have been processed: POST still not retried
    assert not p.is_retryable("POST", Outcome.timeout())
    assert not p.is_retryable("POST", Outcome.reset())


def test_post_opt_in() -> None:
    p = RetryPolicy(methods=IDEMPOTENT_METHODS | {"POST"})
    assert p.is_retryable("POST", Outcome.response(503))
    assert p.is_retryable("post", Outcome.response(502))


@pytest.mark.parametrize("status", [200, 201, 301, 400, 404, 429, 500, 501])
def test_unlisted_statuses_not_retried(status: int) -> None:
    assert not RetryPolicy().is_retryable("GET", Outcome.response(status))


def test_5xx_class_token() -> None:
    p = RetryPolicy(on=frozenset({"5xx"}))
    for status in (500, 501, 503, 599):
        assert p.is_retryable("GET", Outcome.response(status))
    for status in (200, 404, 499):
        assert not p.is_retryable("GET", Outcome.response(status))
    assert not p.is_retryable("GET", Outcome.connect_error())


def test_4xx_class_and_single_429() -> None:
    assert RetryPolicy(on=frozenset({"4xx"})).is_retryable("GET", Outcome.response(429))
    p = RetryPolicy(on=frozenset({"429"}))
    assert p.is_retryable("GET", Outcome.response(429))
    assert not p.is_retryable("GET", Outcome.response(428))


# -- backoff -------------------------------------------------------------------------


def test_backoff_full_jitter_bounds() -> None:
    p = RetryPolicy(backoff_initial=0.05, backoff_max=1.0)
    assert p.backoff(1, zero) == 0.0
    assert p.backoff(1, half) == pytest.approx(0.025)
    assert p.backoff(1, almost_one) == pytest.approx(0.04995)
    assert p.backoff(2, half) == pytest.approx(0.05)
    assert p.backoff(3, half) == pytest.approx(0.1)
    assert p.backoff(5, almost_one) == pytest.approx(0.999 * 0.8)
    assert p.backoff(6, almost_one) == pytest.approx(0.999)  # capped at backoff_max
    assert p.backoff(50, almost_one) == pytest.approx(0.999)
    assert p.backoff(10_000, half) == pytest.approx(0.5)  # no overflow


def test_backoff_rejects_number_below_one() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().backoff(0, zero)


def test_backoff_defaults_to_real_random_within_cap() -> None:
    p = RetryPolicy(backoff_initial=0.2, backoff_max=0.2)
    for _ in range(200):
        assert 0.0 <= p.backoff(3) <= 0.2


# -- Attempt ---------------------------------------------------------------------------


def test_start() -> None:
    a = RetryPolicy().start("get", NOW, 15.0)
    assert a == Attempt(RetryPolicy(), "GET", 1, NOW + 15.0, 0.0)
    assert a.number == 1 and a.delay == 0.0 and a.deadline == 1015.0


@pytest.mark.parametrize("total", [0.0, -1.0, float("nan")])
def test_start_rejects_bad_total(total: float) -> None:
    with pytest.raises(ValueError):
        RetryPolicy().start("GET", NOW, total)


def test_start_accepts_infinite_total() -> None:
    a = RetryPolicy().start("GET", NOW, float("inf"))
    assert a.budget(NOW, 5.0) == 5.0
    assert a.budget(NOW, None) == float("inf")
    assert a.next(Outcome.response(503), NOW + 1e9, half) is not None


def test_get_503_503_200_retries_twice() -> None:
    p = RetryPolicy(attempts=3, backoff_initial=0.05)
    now = NOW
    a = p.start("GET", now, 15.0)
    results = [Outcome.response(503), Outcome.response(503), Outcome.response(200)]
    tries = 0
    attempt: Attempt | None = a
    while attempt is not None:
        now += attempt.delay
        outcome = results[tries]
        tries += 1
        now += 0.01
        attempt = attempt.next(outcome, now, half)
    assert tries == 3


def test_attempt_chain_numbers_and_delays() -> None:
    p = RetryPolicy(attempts=3, backoff_initial=0.05, backoff_max=1.0)
    a1 = p.start("GET", NOW, 15.0)
    a2 = a1.next(Outcome.response(503), NOW + 0.1, half)
    assert a2 is not None
    assert a2.number == 2 and a2.delay == pytest.approx(0.025)
    assert a2.deadline == a1.deadline and a2.method == "GET" and a2.policy is p
    a3 = a2.next(Outcome.response(503), NOW + 0.2, half)
    assert a3 is not None and a3.number == 3 and a3.delay == pytest.approx(0.05)
    assert a3.next(Outcome.response(503), NOW + 0.3, half) is None  # 3 attempts used
    # the old values are untouched (immutable)
    assert (a1.number, a2.number) == (1, 2)


def test_success_is_not_retried() -> None:
    a = RetryPolicy().start("GET", NOW, 15.0)
    assert a.next(Outcome.response(200), NOW, half) is None


def test_post_503_not_retried() -> None:
    a = RetryPolicy().start("POST", NOW, 15.0)
    assert a.next(Outcome.response(503), NOW, half) is None


def test_post_connect_error_retried() -> None:
    a = RetryPolicy().start("POST", NOW, 15.0)
    b = a.next(Outcome.connect_error(), NOW, half)
    assert b is not None and b.number == 2 and b.method == "POST"


def test_post_timeout_not_retried_even_if_listed() -> None:
    a = RetryPolicy(on=frozenset({"timeout"})).start("POST", NOW, 15.0)
    assert a.next(Outcome.timeout(), NOW, half) is None


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_attempts_cap(attempts: int) -> None:
    a: Attempt | None = RetryPolicy(attempts=attempts).start("GET", NOW, 1e6)
    tries = 0
    while a is not None:
        tries += 1
        a = a.next(Outcome.connect_error(), NOW, zero)
    assert tries == attempts


def test_deadline_cap_by_backoff() -> None:
    p = RetryPolicy(attempts=10, backoff_initial=1.0, backoff_max=1.0)
    a = p.start("GET", NOW, 2.0)
    assert a.next(Outcome.response(503), NOW + 0.9, half) is not None  # ends at 1.4 < 2
    assert a.next(Outcome.response(503), NOW + 1.5, half) is None  # would end at 2.0
    assert a.next(Outcome.response(503), NOW + 1.6, almost_one) is None


def test_no_retry_after_deadline_even_with_zero_delay() -> None:
    a = RetryPolicy().start("GET", NOW, 2.0)
    assert a.next(Outcome.connect_error(), NOW + 2.0, zero) is None
    assert a.next(Outcome.connect_error(), NOW + 3.0, zero) is None
    assert a.next(Outcome.connect_error(), NOW + 1.99, zero) is not None


def test_retry_after_honoured_when_longer_than_backoff() -> None:
    a = RetryPolicy().start("GET", NOW, 15.0)
    b = a.next(Outcome.response(503, retry_after=3.0), NOW, half)
    assert b is not None and b.delay == 3.0


def test_backoff_wins_when_longer_than_retry_after() -> None:
    p = RetryPolicy(backoff_initial=1.0, backoff_max=1.0)
    b = p.start("GET", NOW, 15.0).next(Outcome.response(503, retry_after=0.1), NOW, half)
    assert b is not None and b.delay == 0.5


def test_retry_after_beyond_deadline_gives_up() -> None:
    a = RetryPolicy().start("GET", NOW, 5.0)
    assert a.next(Outcome.response(503, retry_after=5.0), NOW, zero) is None
    assert a.next(Outcome.response(503, retry_after=60.0), NOW, zero) is None
    assert a.next(Outcome.response(503, retry_after=4.0), NOW + 1.0, zero) is None
    assert a.next(Outcome.response(503, retry_after=3.9), NOW + 1.0, zero) is not None


def test_retry_after_on_unretryable_outcome_changes_nothing() -> None:
    a = RetryPolicy().start("POST", NOW, 15.0)
    assert a.next(Outcome.response(503, retry_after=0.0), NOW, zero) is None


def test_budget() -> None:
    a = RetryPolicy().start("GET", NOW, 10.0)
    assert a.budget(NOW, 3.0) == 3.0
    assert a.budget(NOW + 8.0, 3.0) == 2.0
    assert a.budget(NOW + 8.0, None) == 2.0
    assert a.budget(NOW + 10.0, 3.0) == 0.0
    assert a.budget(NOW + 12.0, 3.0) == 0.0
    assert a.budget(NOW + 12.0) == 0.0


def test_expired() -> None:
    a = RetryPolicy().start("GET", NOW, 10.0)
    assert not a.expired(NOW)
    assert not a.expired(NOW + 9.999)
    assert a.expired(NOW + 10.0)
    assert a.expired(NOW + 11.0)


def test_attempt_is_frozen() -> None:
    a = RetryPolicy().start("GET", NOW, 10.0)
    with pytest.raises(FrozenInstanceError):
        a.number = 2  # type: ignore[misc]


def test_next_uses_real_random_by_default() -> None:
    p = RetryPolicy(backoff_initial=0.5, backoff_max=0.5)
    b = p.start("GET", NOW, 10.0).next(Outcome.response(503), NOW)
    assert b is not None and 0.0 <= b.delay <= 0.5


# -- parse_retry_after -------------------------------------------------------------------

WALL = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  7 ", 7.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("-0.5", 0.0),
    ],
)
def test_parse_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, WALL) == expected


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "1e3", "1_000", "inf", "nan", "0x10", "12abc", "9" * 400, "1.", ".5"],
)
def test_parse_garbage(value: str | None) -> None:
    assert parse_retry_after(value, WALL) is None


def test_parse_http_date_future() -> None:
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", WALL) == 30.0


def test_parse_http_date_past_is_zero() -> None:
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", WALL) == 0.0


def test_parse_http_date_with_offset_and_naive_now() -> None:
    # 13:01 at +01:00 is 12:01 UTC; a naive now is taken as UTC
    value = "Thu, 01 Jan 2026 13:01:00 +0100"
    assert parse_retry_after(value, datetime(2026, 1, 1, 12, 0)) == 60.0


def test_parse_http_date_with_non_utc_now() -> None:
    now = WALL.astimezone(timezone(timedelta(hours=-5)))
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now) == 10.0


def test_parse_http_date_without_now_uses_system_time() -> None:
    from email.utils import format_datetime

    future = datetime.now(UTC) + timedelta(seconds=100)
    got = parse_retry_after(format_datetime(future, usegmt=True))
    assert got is not None and 95.0 <= got <= 100.0


@pytest.mark.parametrize("value", ["Thu, 99 Jan 2026 12:00:00 GMT", "Mon, 01 Foo 2026 00:00 GMT"])
def test_parse_bad_date(value: str) -> None:
    assert parse_retry_after(value, WALL) is None
