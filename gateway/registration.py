"""Self-registration in Consul, the same for every service.

A service registers ``{Name, ID: <name>-<host>-<port>, Address, Port, Tags,
Meta: {version}}`` with an HTTP check on its ``GET /health`` when it starts, and
deregisters when it stops::

    reg = ServiceRegistration("billing", 3004, version="0.1.0")
    app.cleanup_ctx.append(registration_ctx(reg))

Registration runs in a background task that retries with backoff while Consul is
not up, so a service starts even when Consul is late. Once registered, it looks
every ``recheck_interval`` seconds whether the agent still knows the service (an
agent restarted without its data forgets it) and registers again if not.
Without ``CONSUL_HTTP_ADDR`` nothing is registered and that is said once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .consul import (
    RETRY_INITIAL,
    RETRY_MAX,
    ConsulClient,
    ConsulError,
    ConsulSettings,
    backoff_delays,
)

__all__ = ["RegistrationSettings", "ServiceRegistration", "registration_ctx"]

log = logging.getLogger(__name__)

_off_logged = False  # "registration is off" is said once per process


class RegistrationSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    service_advertise_host: str = Field(
        default="127.0.0.1",
        description="SERVICE_ADVERTISE_HOST: the address other processes reach this service at",
    )


class ServiceRegistration:
    """One service instance's registration with the local Consul agent."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        host: str | None = None,
        version: str,
        tags: Iterable[str] = (),
        check_path: str = "/health",
        check_interval: str = "10s",
        check_timeout: str = "2s",
        deregister_after: str = "1m",
        settings: ConsulSettings | None = None,
        backoff_initial: float = RETRY_INITIAL,
        backoff_max: float = RETRY_MAX,
        stop_timeout: float = 2.0,
        recheck_interval: float | None = 10.0,
    ) -> None:
        if not name:
            raise ValueError("a service needs a name to register")
        if not 0 < port < 65536:
            raise ValueError(f"{name}: port {port} is not a TCP port")
        self.name = name
        self.port = port
        self.host = host or RegistrationSettings().service_advertise_host
        if self.host in ("0.0.0.0", "::", "[::]", ""):
            log.warning(
                "%s: advertising %r in Consul, which no one can connect to: set "
                "SERVICE_ADVERTISE_HOST to this machine's reachable address",
                name,
                self.host,
            )
        self.version = version
        self.tags = tuple(tags)
        self.check_path = check_path if check_path.startswith("/") else "/" + check_path
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.deregister_after = deregister_after
        self.settings = settings if settings is not None else ConsulSettings()
        self._backoff = (backoff_initial, backoff_max)
        self._stop_timeout = stop_timeout
        self._recheck = recheck_interval
        self._client: ConsulClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._sent = False  # a register request went out (so stop() deregisters)

    @property
    def instance_id(self) -> str:
        return f"{self.name}-{self.host}-{self.port}"

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def payload(self) -> dict[str, Any]:
        """The body of ``PUT /v1/agent/service/register``."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return {
            "Name": self.name,
            "ID": self.instance_id,
            "Address": self.host,
            "Port": self.port,
            "Tags": list(self.tags),
            "Meta": {"version": self.version},
            "Check": {
                "HTTP": f"http://{host}:{self.port}{self.check_path}",
                "Interval": self.check_interval,
                "Timeout": self.check_timeout,
                "DeregisterCriticalServiceAfter": self.deregister_after,
            },
        }

    async def start(self) -> None:
        """Begin registering in the background; returns at once."""
        global _off_logged
        if not self.settings.enabled:
            if not _off_logged:
                _off_logged = True
                log.info(
                    "Consul registration is off: CONSUL_HTTP_ADDR is not set, so services "
                    "are reached through the static instances in routes.yaml"
                )
            return
        if self._task is not None and not self._task.done():
            return
        if self._client is None:
            self._client = self.settings.client()
        self._task = asyncio.create_task(
            self._keep_registered(), name=f"consul-register:{self.name}"
        )

    async def wait_registered(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """True once Consul has accepted the registration (False after ``timeout``)."""
        if not self.settings.enabled:
            return False
        try:
            await asyncio.wait_for(self._registered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop retrying and deregister (best effort, within ``stop_timeout`` seconds)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._sent:
                try:
                    await asyncio.wait_for(
                        client.agent_service_deregister(self.instance_id), self._stop_timeout
                    )
                    log.info("consul: deregistered %s", self.instance_id)
                except ConsulError as exc:
                    if exc.status == 404:
                        log.info("consul: %s was already gone", self.instance_id)
                    else:
                        log.warning(
                            "consul: could not deregister %s: %s "
                            "(Consul removes it after its check stays critical for %s)",
                            self.instance_id,
                            exc,
                            self.deregister_after,
                        )
                except TimeoutError:
                    log.warning(
                        "consul: deregistering %s timed out after %gs",
                        self.instance_id,
                        self._stop_timeout,
                    )
        finally:
            self._sent = False
            self._registered.clear()
            await client.close()

    async def _register_until_done(self, client: ConsulClient) -> None:
        delays = backoff_delays(self._backoff[0], self._backoff[1])
        attempt = 0
        while True:
            attempt += 1
            try:
                await client.agent_service_register(self.payload())
            except asyncio.CancelledError:
                self._sent = True  # the request may have reached Consul: stop() deregisters
                raise
            except ConsulError as exc:
                delay = next(delays)
                log.warning(
                    "consul: registering %s failed (try %d, next in %.2gs): %s",
                    self.instance_id,
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self._sent = True
            log.info("consul: registered %s at %s:%d", self.instance_id, self.host, self.port)
            self._registered.set()
            return

    async def _keep_registered(self) -> None:
        client = self._client
        assert client is not None
        await self._register_until_done(client)
        if self._recheck is None:
            return
        while True:
            await asyncio.sleep(self._recheck)
            try:
                known = await client.agent_service(self.instance_id)
            except ConsulError as exc:
                log.debug("consul: cannot check registration of %s: %s", self.instance_id, exc)
                continue
            if known is None:
                log.warning("consul: the agent forgot %s; registering again", self.instance_id)
                self._registered.clear()
                await self._register_until_done(client)


def registration_ctx(
    reg: ServiceRegistration,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """For ``app.cleanup_ctx.append(...)``: register on startup, deregister on cleanup.

    ``web.run_app`` runs the cleanup on SIGINT/SIGTERM, so a stopped service leaves Consul.
    """

    async def _ctx(app: web.Application) -> AsyncIterator[None]:
        await reg.start()
        try:
            yield
        finally:
            await reg.stop()

    return _ctx
