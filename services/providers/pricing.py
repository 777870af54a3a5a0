"""Cost in integer micro-units, and the token estimator.

Prices are USD per million tokens (``Decimal``). Since one USD is 1,000,000
micro-units, ``tokens x price-per-million`` *is* the cost in micro-units:

    cost_micro = round_half_up(prompt_tokens x input_price + completion_tokens x output_price)

computed exactly in ``Decimal`` and rounded **once, on the total, half up to the
micro-unit** (never per part). Example: 1,234 prompt tokens at ``"0.15"`` and 56
completion tokens at ``"0.60"`` = 185.1 + 33.6 = 218.7 -> 219 micro-units
(``"0.000219"``).

The estimator is used only when a provider does not report usage (a stream cut
before its final usage chunk, or a server that never sends one): **one token per
4 characters of text, rounded up** (``ceil(len(text) / 4)``, Unicode code points),
and for a prompt ``3 + sum(4 + tokens(content) + tokens(name))`` over the messages
(the per-message overhead of OpenAI's chat format). Non-text content parts (images,
audio) count 85 tokens each. It is deterministic, cheap and clearly an estimate:
usage computed with it is marked ``estimated: true``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal
from typing import Any

__all__ = [
    "CHARS_PER_TOKEN",
    "cost_micro",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "message_text",
    "reserve_micro",
]

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
PROMPT_OVERHEAD = 3
NON_TEXT_PART_TOKENS = 85

# Wide enough for any token count times any price the schema accepts, exactly.
_CTX = Context(prec=60)


def _exact(prompt_tokens: int, completion_tokens: int, input_price: Decimal,
           output_price: Decimal) -> Decimal:
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name, price in (("input_price", input_price), ("output_price", output_price)):
        if not isinstance(price, Decimal) or not price.is_finite() or price < 0:
            raise ValueError(f"{name} must be a non-negative finite Decimal, got {price!r}")
    return _CTX.add(
        _CTX.multiply(Decimal(prompt_tokens), input_price),
        _CTX.multiply(Decimal(completion_tokens), output_price),
    )


def cost_micro(prompt_tokens: int, completion_tokens: int, input_price: Decimal,
               output_price: Decimal) -> int:
    """The cost of a request in micro-units, rounded half up once on the total."""
    exact = _exact(prompt_tokens, completion_tokens, input_price, output_price)
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP, context=_CTX))


def reserve_micro(prompt_tokens: int, completion_tokens: int, input_price: Decimal,
                  output_price: Decimal) -> int:
    """A worst-case amount to hold: the same sum rounded *up* (never below the cost)."""
    exact = _exact(prompt_tokens, completion_tokens, input_price, output_price)
    return int(exact.quantize(Decimal(1), rounding=ROUND_CEILING, context=_CTX))


def estimate_tokens(text: str | None) -> int:
    """``ceil(len(text) / 4)``; 0 for empty text."""
    if not text:
        return 0
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_text(content: Any) -> tuple[str, int]:
    """(text, number of non-text parts) of a message's ``content`` (string or parts)."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    other = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text") or ""))
            else:
                other += 1
    return "".join(texts), other


def estimate_prompt_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """The prompt estimate: 3 + sum over messages of (4 + content + name + tool calls)."""
    total = PROMPT_OVERHEAD
    for message in messages:
        text, other = message_text(message.get("content"))
        total += MESSAGE_OVERHEAD + estimate_tokens(text) + other * NON_TEXT_PART_TOKENS
        name = message.get("name")
        if isinstance(name, str):
            total += estimate_tokens(name)
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                total += estimate_tokens(str(function.get("name") or ""))
                total += estimate_tokens(str(function.get("arguments") or ""))
    return total
