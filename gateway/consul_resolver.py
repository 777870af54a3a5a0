"""Instances from Consul: one blocking-query watcher per service, answers from memory.

Each followed service has a background task that long-polls
``/v1/health/service/<name>?passing`` (Consul's "blocking queries") and keeps
the latest healthy instances in memory, so :meth:`ConsulResolver.resolve` (on
the proxy's hot path) never waits for Consul except for a service's very first
answer. The index rules are Consul's documented ones: start at 0, reset to 0 if
the index goes backwards, never block on an index below 1, and rate-limit the
loop. On errors the watcher backs off (jittered, capped) and the last known
instances keep being served; ``status()`` says how stale they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, Gauge

from .clock import Clock, SystemClock
from .consul import (
    RETRY_INITIAL,
    RETRY_MAX,
    ConsulClient,
    ConsulError,
    ConsulSettings,
    backoff_delays,
)
from .discovery import (
    DiscoveryRouter,
    Instance,
    Resolver,
    ServiceDiscovery,
    StaticResolver,
    UpstreamStatus,
)

__all__ = [
    "DISCOVERY_INSTANCES",
    "DISCOVERY_STALENESS",
    "ConsulResolver",
    "build_resolver",
    "instances_from_entries",
]

log = logging.getLogger(__name__)

SOURCE = "consul"


def _gauge(name: str, documentation: str) -> Gauge:
    """A module-level gauge that survives the module being imported twice (reloads, tests)."""
    try:
        return Gauge(name, documentation, ["service", "source"])
    except ValueError:  # already registered in the default registry
        existing = REGISTRY._names_to_collectors.get(name)  # type: ignore[attr-defined]
        if isinstance(existing, Gauge):
            return existing
        raise


DISCOVERY_STALENESS = _gauge(
    "aiagg_gateway_discovery_staleness_seconds",
    "Seconds since discovery last heard from its source while that source fails; 0 when fresh.",
)
DISCOVERY_INSTANCES = _gauge(
    "aiagg_gateway_discovery_instances",
    "Healthy instances currently known per service.",
)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def instances_from_entries(entries: Sequence[Mapping[str, Any]]) -> tuple[Instance, ...]:
    """Health entries -> instances: ``Service.Address`` (or ``Node.Address``) and ``Service.Port``.

    Entries without an address or a port cannot be called and are skipped.
    """
    found: list[Instance] = []
    for entry in entries:
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        addr = svc.get("Address") or node.get("Address")
        port = svc.get("Port")
        if not addr or not isinstance(port, int) or port <= 0:
            log.debug("consul: skipping an entry without address/port: %r", svc.get("ID"))
            continue
        found.append(
            Instance(
                url=f"http://{_host(addr)}:{port}",
                id=svc.get("ID") or None,
                tags=tuple(svc.get("Tags") or ()),
                meta=dict(svc.get("Meta") or {}),
            )
        )
    found.sort(key=lambda i: (i.url, i.id or ""))
    return tuple(found)


@dataclass(eq=False)
class _Watch:
    sd: ServiceDiscovery
    started_mono: float
    instances: tuple[Instance, ...] = ()
    index: int = 0
    updated_at: datetime | None = None
    last_ok_mono: float | None = None
    error: str | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ConsulResolver(Resolver):
    """Follows services in Consul; the resolver owns ``client`` and closes it in :meth:`close`.

    ``resolve`` waits up to ``first_answer_timeout`` for a service's first outcome
    (an answer, or a first failure: then it returns what it has, possibly nothing).
    """

    def __init__(
        self,
        client: ConsulClient,
        clock: Clock | None = None,
        first_answer_timeout: float = 2.0,
        wait: float = 30.0,
        *,
        backoff_initial: float = RETRY_INITIAL,
        backoff_max: float = RETRY_MAX,
        backoff_factor: float = 2.0,
        min_interval: float = 0.1,
        stale_update_every: float = 5.0,
    ) -> None:
        self._client = client
        self._clock: Clock = clock or SystemClock()
        self.first_answer_timeout = first_answer_timeout
        self.wait = wait
        self._backoff = (backoff_initial, backoff_max, backoff_factor)
        self._min_interval = min_interval
        self._stale_every = stale_update_every
        self._watches: dict[str, _Watch] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    # -- Resolver -----------------------------------------------------------------------

    async def configure(self, services: Mapping[str, ServiceDiscovery]) -> None:
        async with self._lock:
            if self._closed:
                raise RuntimeError("ConsulResolver is closed")
            stopping: list[_Watch] = []
            for name in list(self._watches):
                old = self._watches[name]
                new = services.get(name)
                if new is None or tuple(new.tags) != tuple(old.sd.tags):
                    stopping.append(self._watches.pop(name))
                    self._forget_metrics(name)
                else:
                    old.sd = new
            await _cancel(w.task for w in stopping)
            for name, sd in services.items():
                if name not in self._watches:
                    watch = _Watch(sd=sd, started_mono=self._clock.monotonic())
                    watch.task = asyncio.create_task(self._run(watch), name=f"consul-watch:{name}")
                    self._watches[name] = watch
            if stopping or services:
                log.debug("consul: following %s", ", ".join(sorted(self._watches)) or "nothing")

    async def resolve(self, service: str) -> Sequence[Instance]:
        watch = self._watches.get(service)
        if watch is None:
            return ()
        if not watch.settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.settled.wait(), self.first_answer_timeout)
        return watch.instances

    def status(self) -> dict[str, UpstreamStatus]:
        return {
            name: UpstreamStatus(
                service=name,
                source=SOURCE,
                instances=list(w.instances),
                updated_at=w.updated_at,
                stale_seconds=self._stale_seconds(w),
                error=w.error,
                index=w.index,
            )
            for name, w in self._watches.items()
        }

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            watches = list(self._watches.values())
            self._watches.clear()
            for w in watches:
                self._forget_metrics(w.sd.name)
            await _cancel(w.task for w in watches)
        await self._client.close()

    # -- the watcher --------------------------------------------------------------------

    def _stale_seconds(self, w: _Watch) -> float:
        if w.error is None:
            return 0.0
        since = w.last_ok_mono if w.last_ok_mono is not None else w.started_mono
        return max(0.0, self._clock.monotonic() - since)

    def _publish(self, w: _Watch) -> None:
        name = w.sd.name
        DISCOVERY_STALENESS.labels(name, SOURCE).set(self._stale_seconds(w))
        DISCOVERY_INSTANCES.labels(name, SOURCE).set(len(w.instances))

    @staticmethod
    def _forget_metrics(name: str) -> None:
        for gauge in (DISCOVERY_STALENESS, DISCOVERY_INSTANCES):
            with contextlib.suppress(KeyError):
                gauge.remove(name, SOURCE)

    async def _run(self, w: _Watch) -> None:
        name = w.sd.name
        loop = asyncio.get_running_loop()
        delays = backoff_delays(*self._backoff)
        failing = False
        last_start = None
        index = 0  # 0: a plain (non-blocking) read; the first one, after a reset or an error
        while True:
            if last_start is not None:  # Consul's advice: rate-limit the blocking loop
                pause = self._min_interval - (loop.time() - last_start)
                if pause > 0:
                    await asyncio.sleep(pause)
            last_start = loop.time()
            try:
                new_index, entries = await self._client.health_service(
                    name,
                    passing=True,
                    tags=w.sd.tags,
                    index=index if index > 0 else None,
                    wait=self.wait if index > 0 else None,
                )
                instances = instances_from_entries(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                text = str(exc) if isinstance(exc, ConsulError) else f"{type(exc).__name__}: {exc}"
                w.error = text
                w.settled.set()
                if not failing:
                    failing = True
                    log.warning(
                        "consul: watching %r failed: %s; serving the %d last known instance(s)",
                        name,
                        text,
                        len(w.instances),
                    )
                else:
                    log.debug("consul: watching %r still failing: %s", name, text)
                if not isinstance(exc, ConsulError):
                    log.debug("consul: unexpected error watching %r", name, exc_info=True)
                index = 0  # after an outage, read the current state at once
                await self._sleep_stale(w, next(delays))
                continue

            # Consul's documented index rules.
            if new_index < index:
                log.info(
                    "consul: index for %r went backwards (%d -> %d): restarting the watch",
                    name,
                    index,
                    new_index,
                )
                index = 0
            else:
                index = max(new_index, 1)
            if failing:
                log.info("consul: watching %r works again (%d instance(s))", name, len(instances))
                failing = False
                delays = backoff_delays(*self._backoff)
            if instances != w.instances:
                log.info(
                    "consul: %r now has %d healthy instance(s): %s",
                    name,
                    len(instances),
                    ", ".join(i.url for i in instances) or "-",
                )
            w.instances = instances
            w.index = new_index
            w.error = None
            w.updated_at = self._clock.now()
            w.last_ok_mono = self._clock.monotonic()
            w.settled.set()
            self._publish(w)

    async def _sleep_stale(self, w: _Watch, delay: float) -> None:
        """Back off, refreshing the staleness gauge every few seconds meanwhile."""
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while True:
            self._publish(w)
            left = end - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self._stale_every))


async def _cancel(tasks: Any) -> None:
    pending = [t for t in tasks if t is not None and not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def build_resolver(
    settings: ConsulSettings | None = None, clock: Clock | None = None
) -> DiscoveryRouter:
    """The gateway's resolver: static always, plus Consul when ``CONSUL_HTTP_ADDR`` is set."""
    settings = settings if settings is not None else ConsulSettings()
    static = StaticResolver(clock)
    if not settings.enabled:
        log.info(
            "discovery: static only (CONSUL_HTTP_ADDR is not set); services with "
            "'discovery: consul' use the instances written in routes.yaml"
        )
        return DiscoveryRouter(static, None)
    client = settings.client()
    log.info(
        "discovery: Consul at %s for services with 'discovery: consul'%s",
        client.base_url,
        " (with ACL token)" if settings.http_token else "",
    )
    return DiscoveryRouter(static, ConsulResolver(client, clock))
