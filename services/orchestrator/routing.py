"""Which provider serves a request: priority, then weight, among healthy ones.

Pure policy (time from an injected clock, randomness from an injected callable):

* the candidates for a model are the providers serving it, minus those cooling down;
* they are ordered by ``priority`` (lower first); among providers of the same priority
  the order is a weighted random shuffle (a provider with weight 3 comes first three
  times as often as one with weight 1);
* each provider has a :class:`gateway.breaker.CircuitBreaker`: ``cooldown.failures``
  CONSECUTIVE failures (not one) set it aside for ``cooldown.duration``; then one
  probe request is let through (half-open): its success brings the provider back,
  its failure starts another cool-down. A success resets the count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

from gateway.breaker import BreakerConfig, BreakerOpenError, BreakerState, CircuitBreaker, Permit
from gateway.clock import Clock, SystemClock
from services.providers.config import Catalog, ModelRoute

__all__ = ["BreakerOpenError", "ProviderPool", "weighted_order"]


def weighted_order(
    routes: Sequence[ModelRoute], rand: Callable[[], float] = random.random
) -> list[ModelRoute]:
    """A weighted random permutation (weights are positive integers)."""
    pool = list(routes)
    out: list[ModelRoute] = []
    while len(pool) > 1:
        total = sum(r.weight for r in pool)
        point = rand() * total
        index = len(pool) - 1
        for i, route in enumerate(pool):
            point -= route.weight
            if point < 0:
                index = i
                break
        out.append(pool.pop(index))
    return out + pool


class ProviderPool:
    """One breaker per provider of the catalog; plans the order of tries for a model."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.catalog = catalog
        self.clock = clock or SystemClock()
        self.rand = rand
        self.breakers: dict[str, CircuitBreaker] = {}
        for name in catalog.providers:
            cooldown = catalog.cooldown(name)
            self.breakers[name] = CircuitBreaker(
                name,
                BreakerConfig(failures=cooldown.failures, reset_after=cooldown.duration),
                self.clock,
            )

    def cooling_down(self, provider: str) -> bool:
        return self.breakers[provider].state is BreakerState.OPEN

    def plan(self, model: str) -> list[ModelRoute]:
        """The providers to try for ``model``, in order (empty: unknown or all cooling)."""
        healthy = [r for r in self.catalog.routes(model) if not self.cooling_down(r.provider)]
        ordered: list[ModelRoute] = []
        for _, group in groupby(healthy, key=lambda r: r.priority):
            ordered.extend(weighted_order(list(group), self.rand))
        return ordered

    def acquire(self, provider: str) -> Permit:
        """A permit to try ``provider``; :class:`BreakerOpenError` when it must be skipped."""
        return self.breakers[provider].acquire()

    def retry_after(self, model: str) -> float:
        """Seconds until the first provider of ``model`` comes out of its cool-down."""
        waits = []
        now = self.clock.monotonic()
        for route in self.catalog.routes(model):
            breaker = self.breakers[route.provider]
            if breaker.opened_at is not None:
                waits.append(max(0.0, breaker.opened_at + breaker.config.reset_after - now))
        return min(waits, default=1.0)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {**self.breakers[name].snapshot(), "provider": name}
            for name in sorted(self.breakers)
        ]
