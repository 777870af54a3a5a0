"""Money as integer micro-units: never a float.

One unit of currency (USD) is ``1_000_000`` micro-units. Amounts travel as decimal
strings with six places (``"12.500000"``); inside the services they are ``int``.

:func:`parse_amount` is the one strict entry point for amounts that come from
outside (request bodies, event payloads). It accepts a decimal string, a
:class:`~decimal.Decimal` (JSON numbers parsed with ``parse_float=Decimal``, see
:func:`loads`) or an ``int``, and refuses everything else with a
:class:`MoneyError` whose message names the field: floats, booleans, NaN,
infinities, exponents, negatives (and zero unless allowed), more than six
decimals, and absurdly large values.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

__all__ = [
    "CURRENCY",
    "MAX_MICRO",
    "MICRO",
    "MoneyError",
    "amount_from_data",
    "format_micro",
    "loads",
    "micro_to_decimal",
    "parse_amount",
]

MICRO = 1_000_000
CURRENCY = "USD"
# One billion units: far below the 64-bit column limit (about 9.2e12 units).
MAX_MICRO = 1_000_000_000 * MICRO

_DECIMAL_TEXT = re.compile(r"^-?(\d+)(?:\.(\d+))?$")


class MoneyError(ValueError):
    """An amount that is not acceptable; the message is fit for a 400 answer."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes) -> Any:
    """``json.loads`` with exact numbers: floats become ``Decimal``, NaN/Infinity fail."""
    return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)


def parse_amount(value: Any, *, field: str = "amount", allow_zero: bool = False) -> int:
    """A non-negative amount from outside, as micro-units, or :class:`MoneyError`."""
    if isinstance(value, bool) or value is None:
        raise MoneyError(f"'{field}' must be a decimal string such as \"10.00\"")
    if isinstance(value, float):
        raise MoneyError(
            f"'{field}' must be a decimal string such as \"10.00\", not a binary float"
        )
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise MoneyError(f"'{field}' must be a finite number")
        text = format(value, "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise MoneyError(f"'{field}' must be a decimal string such as \"10.00\"")
    match = _DECIMAL_TEXT.match(text)
    if not match:
        raise MoneyError(f"'{field}' must be a decimal string such as \"10.00\", got {value!r}")
    if text.startswith("-"):
        raise MoneyError(f"'{field}' cannot be negative")
    whole, frac = match.group(1), match.group(2) or ""
    if len(frac) > 6:
        raise MoneyError(f"'{field}' has more than 6 decimal places")
    if len(whole) > 13:
        raise MoneyError(f"'{field}' is too large")
    micro = int(whole) * MICRO + int(frac.ljust(6, "0"))
    if micro > MAX_MICRO:
        raise MoneyError(f"'{field}' is too large (at most {MAX_MICRO // MICRO} {CURRENCY})")
    if micro == 0 and not allow_zero:
        raise MoneyError(f"'{field}' must be greater than zero")
    return micro


def amount_from_data(data: dict[str, Any], field: str = "cost") -> int:
    """A money field of an event's data: ``<field>`` as a decimal string (``"0.001250"``)
    or ``<field>_micro`` as integer micro-units. A bare number in ``<field>`` is refused
    as ambiguous (units or micro-units?). Zero is allowed."""
    micro_field = f"{field}_micro"
    if field in data:
        value = data[field]
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise MoneyError(
                f"'{field}' must be a decimal string such as \"0.001250\" "
                f"(or send integer micro-units as '{micro_field}'), got the number {value!r}"
            )
        return parse_amount(value, field=field, allow_zero=True)
    if micro_field in data:
        value = data[micro_field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MoneyError(f"'{micro_field}' must be a non-negative integer")
        if value > MAX_MICRO:
            raise MoneyError(f"'{micro_field}' is too large")
        return value
    raise MoneyError(f"'{field}' is missing")


def format_micro(micro: int) -> str:
    """``12_500_000`` -> ``"12.500000"``; negative amounts keep their sign."""
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"micro-units must be an int, got {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def micro_to_decimal(micro: int) -> Decimal:
    """Exact ``Decimal`` for micro-units (for display or arithmetic by callers)."""
    return Decimal(micro).scaleb(-6)
