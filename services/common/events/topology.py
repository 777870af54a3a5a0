"""Names and shape of the event topology; the same for RabbitMQ and the in-process bus.

::

    publisher ──(routing key = event type)──> exchange aiagg.events (topic, durable)
        ├── usage.recorded ──> queue billing.usage ──> billing's handler
        └── #              ──> queue analytics.events ──> analytics' handler

    a handler fails (attempt n < max):
        consumer ──(default exchange)──> <queue>.retry.<delay ms>   (x-message-ttl = delay,
                                            │                        dead-letter → "" / <queue>)
                                            └── after the TTL, RabbitMQ dead-letters it back
                                                into <queue> only (not to the other queues)
    the last attempt fails, or the body is not an event:
        consumer ──(default exchange)──> <queue>.dlq   (headers x-death-reason, x-error)

One retry queue per distinct delay: a queue-wide TTL never leaves a short-delay
message stuck behind a long-delay one (per-message TTLs only expire at the head).
Every name is prefixed by ``EVENTS_NAMESPACE`` + ``.`` when that is set (tests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

EXCHANGE = "aiagg.events"
BILLING_USAGE = "billing.usage"
ANALYTICS_EVENTS = "analytics.events"

#: headers our consumers put on retried and dead-lettered messages
H_ATTEMPT = "x-attempt"  # the number of the attempt the delivery is for (1 = first)
H_DEATH_REASON = "x-death-reason"  # "poison" | "max-attempts"
H_ERROR = "x-error"  # the exception text of the last failure
H_ORIGINAL_QUEUE = "x-original-queue"
H_REPLAYED = "x-replayed"  # how many times the message was replayed from a DLQ

REASON_POISON = "poison"
REASON_MAX_ATTEMPTS = "max-attempts"


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue and the routing-key patterns it binds on the events exchange."""

    name: str
    bindings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for pattern in self.bindings:
            check_pattern(pattern)


_WORD = re.compile(r"^[A-Za-z0-9_-]+$")


def check_pattern(pattern: str) -> None:
    """A binding pattern: dot-separated words, ``*`` (one word) or ``#`` (zero or more)."""
    words = pattern.split(".")
    if not pattern or any(not (w in ("*", "#") or _WORD.match(w)) for w in words):
        raise ValueError(f"invalid binding pattern {pattern!r}")


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: Sequence[str], words: Sequence[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


#: the queues of the contract; every bus declares them at start so nothing published
#: before a consumer first starts is lost
STANDARD_QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(BILLING_USAGE, ("usage.recorded",)),
    QueueSpec(ANALYTICS_EVENTS, ("#",)),
)


@dataclass(frozen=True)
class Topology:
    """Physical names for one namespace ("" → the exact contract names)."""

    namespace: str = ""

    def name(self, logical: str) -> str:
        return f"{self.namespace}.{logical}" if self.namespace else logical

    @property
    def exchange(self) -> str:
        return self.name(EXCHANGE)

    def queue(self, queue: str) -> str:
        return self.name(queue)

    def dlq(self, queue: str) -> str:
        return self.name(f"{queue}.dlq")

    def retry_queue(self, queue: str, delay: float) -> str:
        return self.name(f"{queue}.retry.{delay_ms(delay)}")

    def logical(self, physical: str) -> str:
        prefix = f"{self.namespace}." if self.namespace else ""
        return physical[len(prefix) :] if prefix and physical.startswith(prefix) else physical


def delay_ms(delay: float) -> int:
    return max(0, round(delay * 1000))


__all__ = [
    "ANALYTICS_EVENTS",
    "BILLING_USAGE",
    "EXCHANGE",
    "H_ATTEMPT",
    "H_DEATH_REASON",
    "H_ERROR",
    "H_ORIGINAL_QUEUE",
    "H_REPLAYED",
    "REASON_MAX_ATTEMPTS",
    "REASON_POISON",
    "STANDARD_QUEUES",
    "QueueSpec",
    "Topology",
    "check_pattern",
    "delay_ms",
    "topic_matches",
]
