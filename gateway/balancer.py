"""Round-robin choice among a service's instances, with passive ejection.

One :class:`Balancer` per service. Instances are plain strings (e.g. base URLs) and
the list is passed on every pick, because discovery may change it at any moment;
callers should pass it in a stable order (e.g. sorted) for round robin to be fair.

Passive ejection (like Envoy's outlier detection): ``failures`` consecutive failures
of one instance eject it for ``cooldown`` seconds; reports about an instance while
it is ejected are ignored (the ejection runs its course), and it comes back with a
clean count. When every candidate is ejected, the balancer panics and returns the
one whose ejection ends first, so a wholly ejected service is still tried instead
of refused. Pure: time comes from the injected clock; one event loop, no locks.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.clock import Clock, wall_at


@dataclass(frozen=True, slots=True)
class EjectionConfig:
    """When an instance is taken out of rotation, and for how long."""

    failures: int = 3
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        f = self.failures
        if isinstance(f, bool) or not isinstance(f, int) or f <= 0:
            raise ValueError(f"ejection failures must be a positive integer, got {f!r}")
        c = self.cooldown
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0:
            raise ValueError(f"ejection cooldown must be a finite number >= 0, got {c!r}")


@dataclass(slots=True)
class _Health:
    failures: int = 0
    ejected_until: float | None = None  # monotonic


def _iso_utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Balancer:
    """Round robin over the given instances, skipping ejected and excluded ones."""

    def __init__(self, config: EjectionConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._next = 0  # index into the current list, taken modulo its length
        self._health: dict[str, _Health] = {}

    def pick(self, instances: Sequence[str], exclude: Collection[str] = ()) -> str | None:
        """The next instance to try, or None when all are excluded (or there are none).

        ``exclude`` holds the instances already tried by this request.
        """
        n = len(instances)
        if n == 0:
            return None
        now = self._clock.monotonic()
        health = self._health
        start = self._next % n
        panic: str | None = None
        panic_until = math.inf
        for k in range(n):
            i = (start + k) % n
            instance = instances[i]
            if instance in exclude:
                continue
            h = health.get(instance)
            if h is not None and h.ejected_until is not None:
                if now < h.ejected_until:
                    if panic is None or h.ejected_until < panic_until:
                        panic, panic_until = instance, h.ejected_until
                    continue
                h.ejected_until, h.failures = None, 0  # cooldown over: back, clean
            self._next = i + 1
            return instance
        return panic

    def report(self, instance: str, ok: bool) -> None:
        """Record how a call to ``instance`` went (ignored while it is ejected)."""
        h = self._health.get(instance)
        if h is None:
            if ok:
                return  # nothing to clear; don't grow state for healthy instances
            h = self._health[instance] = _Health()
        now = self._clock.monotonic()
        if h.ejected_until is not None:
            if now < h.ejected_until:
                return
            h.ejected_until, h.failures = None, 0
        if ok:
            h.failures = 0
            return
        h.failures += 1
        if h.failures >= self.config.failures:
            h.ejected_until = now + self.config.cooldown

    def is_ejected(self, instance: str) -> bool:
        h = self._health.get(instance)
        return (
            h is not None
            and h.ejected_until is not None
            and self._clock.monotonic() < h.ejected_until
        )

    def forget(self, keep: Collection[str]) -> None:
        """Drop the state of instances that are no longer in discovery."""
        keep_set = keep if isinstance(keep, set | frozenset) else set(keep)
        for instance in [i for i in self._health if i not in keep_set]:
            del self._health[instance]

    def snapshot(self, instances: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Per-instance health for the admin API: every known instance plus ``instances``."""
        now = self._clock.monotonic()
        out: dict[str, dict[str, Any]] = {}
        names = list(self._health)
        names.extend(i for i in instances if i not in self._health)
        for instance in names:
            h = self._health.get(instance)
            if h is not None and h.ejected_until is not None and now >= h.ejected_until:
                h.ejected_until, h.failures = None, 0
            until = None if h is None else h.ejected_until
            out[instance] = {
                "consecutive_failures": 0 if h is None else h.failures,
                "ejected": until is not None,
                "ejected_until": None if until is None else _iso_utc(wall_at(self._clock, until)),
            }
        return out
