"""Coalesced acknowledgements: one ``basic.ack(multiple=True)`` for many deliveries.

Consumers commit deliveries in batches (see :mod:`.consumer`), so many deliveries of
one channel become ackable in the same event-loop turn. Sending one ack frame each
costs a socket write each, on our side and on the broker's; an ack with
``multiple=True`` settles every unacked delivery up to its tag at once. That is only
safe below the lowest delivery still being worked on (or left unsettled after a
cancelled handler): such a delivery must stay unacked so the broker redelivers it.
:func:`plan` makes that decision; :class:`ChannelAcks` keeps the state of one channel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def plan(ready: Iterable[int], unsettled: Iterable[int]) -> tuple[int | None, list[int]]:
    """Which acks to send: ``(multiple_up_to, single_tags)``.

    ``ready``: tags whose effect is committed and that want an ack. ``unsettled``: tags
    delivered and not yet acked, nacked or ready (their handler still runs, or never
    finished). Every ready tag below the lowest unsettled one goes in one multiple
    ack (its highest tag); the ones above it are acked one by one.
    """
    tags = sorted(ready)
    floor = min(unsettled, default=None)
    below = [t for t in tags if floor is None or t < floor]
    above = [t for t in tags if floor is not None and t > floor]
    if len(below) == 1:
        return None, below + above
    return (below[-1] if below else None), above


@dataclass
class ChannelAcks:
    """Delivery-tag bookkeeping for one AMQP channel (tags restart on a new channel)."""

    unsettled: set[int] = field(default_factory=set)
    ready: dict[int, Any] = field(default_factory=dict)
    flush_scheduled: bool = False

    def delivered(self, tag: int) -> None:
        self.unsettled.add(tag)

    def settled(self, tag: int) -> None:
        """Nacked or rejected on its own: no longer blocks multiple acks."""
        self.unsettled.discard(tag)

    def want_ack(self, tag: int, message: Any) -> None:
        self.unsettled.discard(tag)
        self.ready[tag] = message

    def take(self) -> list[tuple[Any, bool]]:
        """The (message, multiple) acks to send now; clears what it returns."""
        multiple, singles = plan(self.ready, self.unsettled)
        sends = [(self.ready[multiple], True)] if multiple is not None else []
        sends += [(self.ready[t], False) for t in singles]
        self.ready.clear()
        return sends


__all__ = ["ChannelAcks", "plan"]
