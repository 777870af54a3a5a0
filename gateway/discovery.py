"""Where a service's instances come from: the resolver seam.

The proxy path asks one :class:`Resolver` for a service's instances and never
knows whether they came from ``routes.yaml`` (static) or from Consul. A new
source plugs in by implementing :class:`Resolver`; :class:`DiscoveryRouter`
sends each service to the source its ``discovery:`` setting names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .clock import Clock, SystemClock

Mode = Literal["static", "consul"]


@dataclass(frozen=True, slots=True)
class Instance:
    """One reachable copy of a service."""

    url: str
    id: str | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceDiscovery:
    """What a resolver must know about one service (taken from ``routes.yaml``)."""

    name: str
    mode: Mode = "static"
    instances: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


@dataclass(slots=True)
class UpstreamStatus:
    """Where a service's list came from and how fresh it is, for ``GET /upstreams``."""

    service: str
    source: str
    instances: list[Instance]
    updated_at: datetime | None = None
    stale_seconds: float | None = None
    error: str | None = None
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "source": self.source,
            "instances": [
                {"url": i.url, "id": i.id, "tags": list(i.tags), "meta": dict(i.meta)}
                for i in self.instances
            ],
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "stale_seconds": self.stale_seconds,
            "error": self.error,
            "index": self.index,
        }


class Resolver(ABC):
    """A source of instances. ``resolve`` is on the hot path: answer from memory."""

    @abstractmethod
    async def configure(self, services: Mapping[str, ServiceDiscovery]) -> None:
        """Start (or stop) following exactly these services; called on load and reload."""

    @abstractmethod
    async def resolve(self, service: str) -> Sequence[Instance]:
        """The current healthy instances, possibly empty."""

    @abstractmethod
    def status(self) -> dict[str, UpstreamStatus]:
        """One entry per followed service."""

    async def close(self) -> None:  # noqa: B027 - most resolvers have nothing to stop
        """Stop background work."""


class StaticResolver(Resolver):
    """Instances written in ``routes.yaml``; never stale."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._lists: dict[str, tuple[Instance, ...]] = {}
        self._loaded_at: datetime | None = None

    async def configure(self, services: Mapping[str, ServiceDiscovery]) -> None:
        self._lists = {
            name: tuple(Instance(url=url, id=f"{name}-{i}") for i, url in enumerate(sd.instances))
            for name, sd in services.items()
        }
        self._loaded_at = self._clock.now()

    async def resolve(self, service: str) -> Sequence[Instance]:
        return self._lists.get(service, ())

    def status(self) -> dict[str, UpstreamStatus]:
        return {
            name: UpstreamStatus(name, "static", list(items), self._loaded_at, 0.0)
            for name, items in self._lists.items()
        }


class DiscoveryRouter(Resolver):
    """Sends each service to the static resolver or the Consul one, per its ``discovery:``.

    A service that asks for Consul while no Consul is configured (no
    ``CONSUL_HTTP_ADDR``) uses its static instances: the embedded defaults of the
    local platform.
    """

    def __init__(self, static: StaticResolver, consul: Resolver | None = None) -> None:
        self._static = static
        self._consul = consul
        self._owner: dict[str, Resolver] = {}

    async def configure(self, services: Mapping[str, ServiceDiscovery]) -> None:
        to_consul = {
            n: sd for n, sd in services.items() if sd.mode == "consul" and self._consul is not None
        }
        to_static = {n: sd for n, sd in services.items() if n not in to_consul}
        await self._static.configure(to_static)
        if self._consul is not None:
            await self._consul.configure(to_consul)
        owner: dict[str, Resolver] = dict.fromkeys(to_static, self._static)
        if self._consul is not None:
            owner.update(dict.fromkeys(to_consul, self._consul))
        self._owner = owner

    async def resolve(self, service: str) -> Sequence[Instance]:
        owner = self._owner.get(service)
        return await owner.resolve(service) if owner else ()

    def status(self) -> dict[str, UpstreamStatus]:
        merged = self._static.status()
        if self._consul is not None:
            merged.update(self._consul.status())
        return {name: merged[name] for name in self._owner if name in merged}

    async def close(self) -> None:
        await self._static.close()
        if self._consul is not None:
            await self._consul.close()


def discovery_from_config(services: Mapping[str, Any]) -> dict[str, ServiceDiscovery]:
    """Build the resolver's view from ``GatewayConfig.services``."""
    return {
        name: ServiceDiscovery(
            name=name,
            mode=svc.discovery,
            instances=tuple(svc.instances),
            tags=tuple(svc.tags),
        )
        for name, svc in services.items()
    }
