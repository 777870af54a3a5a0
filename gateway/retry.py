"""Retry policy as an immutable value (in the style of urllib3's ``Retry``).

The key distinction is *never sent* versus *may have been processed*:

* ``connect-error`` (refused, DNS failure, connect timeout): the upstream never saw
  the request, so it is safe to retry for any method, POST included;
* ``timeout``, ``reset`` and any ``status``: the upstream may have acted on it, so
  only methods in ``RetryPolicy.methods`` (idempotent ones by default) are retried.

Each try is an :class:`Attempt` value; ``attempt.next(outcome, now)`` returns the
following attempt (with the delay to sleep first) or ``None``. All instants are
monotonic seconds supplied by the caller; randomness is an injected callable.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

CONNECT_ERROR = "connect-error"
TIMEOUT = "timeout"
RESET = "reset"
STATUS = "status"
_KINDS = frozenset({CONNECT_ERROR, TIMEOUT, RESET, STATUS})
_TOKEN_RE = re.compile(r"^(?:[1-5][0-9][0-9]|[1-5]xx)$")
_SECONDS_RE = re.compile(r"^-?[0-9]+(?:\.[0-9]+)?$")
_MAX_EXPONENT = 62  # 2**62 seconds is already "forever"; avoids float overflow


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one try ended, as far as retrying is concerned."""

    kind: str
    status: int | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown outcome kind {self.kind!r}")
        if (self.kind == STATUS) != (self.status is not None):
            raise ValueError("status is required for, and only for, kind 'status'")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status out of range: {self.status}")
        if self.retry_after is not None and not (
            math.isfinite(self.retry_after) and self.retry_after >= 0
        ):
            raise ValueError(f"retry_after must be a finite number >= 0: {self.retry_after}")

    @classmethod
    def connect_error(cls) -> Outcome:
        return cls(CONNECT_ERROR)

    @classmethod
    def timeout(cls) -> Outcome:
        return cls(TIMEOUT)

    @classmethod
    def reset(cls) -> Outcome:
        return cls(RESET)

    @classmethod
    def response(cls, status: int, retry_after: float | None = None) -> Outcome:
        return cls(STATUS, status, retry_after)

    @property
    def never_sent(self) -> bool:
        """True when the upstream cannot have processed the request."""
        return self.kind == CONNECT_ERROR

    @property
    def token(self) -> str:
        """The name of this outcome in ``RetryPolicy.on`` ("503", "timeout", ...)."""
        return str(self.status) if self.kind == STATUS else self.kind

    def matches(self, tokens: frozenset[str]) -> bool:
        """Whether a set of tokens (``on:`` of a retry, ``count:`` of a breaker) names this
        outcome, by its own token or its status class (``5xx``)."""
        if self.token in tokens:
            return True
        return self.status is not None and f"{self.status // 100}xx" in tokens


def _normalize_tokens(on: Iterable[str | int]) -> frozenset[str]:
    tokens = set()
    for raw in on:
        token = str(raw).strip().lower()
        if token not in (CONNECT_ERROR, TIMEOUT, RESET) and not _TOKEN_RE.match(token):
            raise ValueError(
                f"unknown retry condition {raw!r}: expected connect-error, timeout, reset, "
                "a status code (e.g. 503) or a class (e.g. 5xx)"
            )
        tokens.add(token)
    return frozenset(tokens)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often to retry; one value per route, shared by all requests."""

    attempts: int = 3
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    on: frozenset[str] = frozenset({CONNECT_ERROR, "502", "503", "504"})
    methods: frozenset[str] = IDEMPOTENT_METHODS

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"retry attempts must be an integer, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        for field in ("backoff_initial", "backoff_max"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"retry {field} must be a finite number >= 0, got {value!r}")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("retry backoff_max must be >= backoff_initial")
        if isinstance(self.on, str) or isinstance(self.methods, str):
            raise ValueError("retry 'on' and 'methods' must be collections, not a string")
        # Accept any iterable (e.g. lists from YAML) but store hashable, normalized sets.
        object.__setattr__(self, "on", _normalize_tokens(self.on))
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))

    def is_retryable(self, method: str, outcome: Outcome) -> bool:
        """Whether this kind of outcome may be retried for this method (ignores counts)."""
        if not outcome.matches(self.on):
            return False
        return outcome.never_sent or method.upper() in self.methods

    def start(self, method: str, now: float, total: float) -> Attempt:
        """The first attempt of a request that may take ``total`` seconds in all."""
        if not total > 0:
            raise ValueError(f"total timeout must be > 0, got {total!r}")
        return Attempt(self, method.upper(), 1, now + total, 0.0)

    def backoff(self, number: int, rand: Callable[[], float] = random.random) -> float:
        """Full-jitter delay before retry ``number`` (1 = the first retry)."""
        if number < 1:
            raise ValueError(f"retry number must be >= 1, got {number}")
        cap = min(self.backoff_max, self.backoff_initial * 2.0 ** min(number - 1, _MAX_EXPONENT))
        return rand() * cap


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a request: its number, the request-wide deadline and the delay before it."""

    policy: RetryPolicy
    method: str
    number: int
    deadline: float
    delay: float = 0.0

    def budget(self, now: float, per_try: float | None = None) -> float:
        """Seconds this try may take: the per-try timeout, cut to the deadline; >= 0."""
        left = self.deadline - now
        if per_try is not None:
            left = min(per_try, left)
        return max(0.0, left)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def next(
        self, outcome: Outcome, now: float, rand: Callable[[], float] = random.random
    ) -> Attempt | None:
        """The retry after ``outcome``, or None when the caller should give up.

        None when the outcome/method is not retryable, the attempts are used up, the
        upstream's Retry-After reaches past the deadline (the caller then returns the
        upstream's own response), or the delay would end at or after the deadline.
        """
        policy = self.policy
        if self.number >= policy.attempts or not policy.is_retryable(self.method, outcome):
            return None
        delay = policy.backoff(self.number, rand)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        # Also covers a Retry-After that reaches past the deadline, since delay >= it.
        if now + delay >= self.deadline:
            return None
        return replace(self, number=self.number + 1, delay=delay)


def parse_retry_after(value: str | None, now_wall: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date form).

    Garbage gives None; a past date or a negative number gives 0. ``now_wall`` is the
    current UTC time for the date form (read from the system clock only if omitted).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS_RE.match(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # older Pythons return None instead of raising
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now_wall is None:
        now_wall = datetime.now(UTC)
    elif now_wall.tzinfo is None:
        now_wall = now_wall.replace(tzinfo=UTC)
    return max(0.0, (when - now_wall).total_seconds())
