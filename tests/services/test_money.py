"""Money is integer micro-units; anything inexact or ambiguous is refused."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.common.money import (
    MAX_MICRO,
    MoneyError,
    amount_from_data,
    format_micro,
    loads,
    parse_amount,
)


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("10.00", 10_000_000),
        ("10", 10_000_000),
        ("0.000001", 1),
        ("12.5", 12_500_000),
        (" 3.25 ", 3_250_000),
        (Decimal("0.1"), 100_000),
        (Decimal("1E+2"), 100_000_000),
        (7, 7_000_000),
        ("1000000000", MAX_MICRO),
    ],
)
def test_parse_amount_accepts_exact_values(value, micro):
    assert parse_amount(value) == micro


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.1, "not a binary float"),
        ("0.1234567", "more than 6 decimal places"),
        (Decimal("0.1234567"), "more than 6 decimal places"),
        ("-5", "cannot be negative"),
        ("-0.00", "cannot be negative"),
        ("abc", "decimal string"),
        ("1e3", "decimal string"),
        ("NaN", "decimal string"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        ("", "decimal string"),
        (".5", "decimal string"),
        ("5.", "decimal string"),
        ("1,000", "decimal string"),
        (True, "decimal string"),
        (None, "decimal string"),
        ([1], "decimal string"),
        ("0", "greater than zero"),
        ("0.000000", "greater than zero"),
        ("1000000000.000001", "too large"),
        ("99999999999999", "too large"),
    ],
)
def test_parse_amount_refuses(value, message):
    with pytest.raises(MoneyError, match=message):
        parse_amount(value, field="amount")


def test_zero_only_when_allowed():
    assert parse_amount("0", allow_zero=True) == 0
    with pytest.raises(MoneyError, match="'cost' must be greater than zero"):
        parse_amount("0.0", field="cost")


@pytest.mark.parametrize(
    ("micro", "text"),
    [(0, "0.000000"), (1, "0.000001"), (12_500_000, "12.500000"), (-1_000_000, "-1.000000"),
     (-5, "-0.000005"), (MAX_MICRO, "1000000000.000000")],
)
def test_format_micro(micro, text):
    assert format_micro(micro) == text
    if micro >= 0:
        assert parse_amount(text, allow_zero=True) == micro


def test_format_micro_refuses_non_ints():
    with pytest.raises(TypeError):
        format_micro(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        format_micro(True)


def test_loads_keeps_numbers_exact_and_refuses_nan():
    assert loads('{"a": 0.1}') == {"a": Decimal("0.1")}
    with pytest.raises(ValueError):
        loads('{"a": NaN}')
    with pytest.raises(ValueError):
        loads('{"a": -Infinity}')


def test_amount_from_event_data():
    assert amount_from_data({"cost": "0.001250"}) == 1250
    assert amount_from_data({"cost": "0"}) == 0
    assert amount_from_data({"cost_micro": 1250}) == 1250
    with pytest.raises(MoneyError, match="cost_micro"):
        amount_from_data({"cost": 1250})
    with pytest.raises(MoneyError, match="decimal string"):
        amount_from_data({"cost": 0.5})
    with pytest.raises(MoneyError, match="non-negative integer"):
        amount_from_data({"cost_micro": -1})
    with pytest.raises(MoneyError, match="non-negative integer"):
        amount_from_data({"cost_micro": "12"})
    with pytest.raises(MoneyError, match="missing"):
        amount_from_data({})
