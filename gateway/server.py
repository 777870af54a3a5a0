"""The gateway process: public listener, admin listener, reload, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import metrics
from .accesslog import AccessLog
from .admin import build_admin_app
from .clock import Clock, SystemClock
from .config import GatewayConfig, load_config
from .dashboard import install_dashboard
from .discovery import Resolver, discovery_from_config
from .errors import ConfigError
from .forwarder import ServiceClient, Upstreams, new_connection_pool
from .gctune import tune_gc
from .proxy import GatewayServer, ProxyHandler
from .runtime import Runtime, compile_runtime
from .settings import GatewaySettings

log = logging.getLogger("gateway")


def default_resolver() -> Resolver:
    """Consul when ``CONSUL_HTTP_ADDR`` is set, else the static instances in routes.yaml."""
    from .consul_resolver import build_resolver

    return build_resolver()


class Gateway:
    """Owns the runtime (swapped atomically on reload) and both listeners."""

    def __init__(
        self,
        settings: GatewaySettings | None = None,
        *,
        resolver: Resolver | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self.clock = clock or SystemClock()
        self._resolver = resolver
        self._runtime: Runtime | None = None
        self._reload_lock = asyncio.Lock()
        self._runners: list[web.BaseRunner] = []
        self._admin_extensions: list[Callable[[web.Application], None]] = []
        self.add_admin_extension(install_dashboard)
        self.upstreams: Upstreams
        self.public_port: int | None = None
        self._access_log: AccessLog | None = None
        self.admin_port: int | None = None

    # --- the runtime --------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the gateway has not loaded its routes yet")
        return self._runtime

    def _get_runtime(self) -> Runtime:
        return self._runtime  # type: ignore[return-value]

    async def _apply(self, cfg: GatewayConfig) -> Runtime:
        runtime = compile_runtime(
            cfg,
            self.upstreams,
            self.clock,
            source=self.settings.routes_file,
            previous=self._runtime,
            auth_metrics=metrics.AUTH_CACHE,
        )
        await self.upstreams.resolver.configure(discovery_from_config(cfg.services))
        self._runtime = runtime
        return runtime

    async def reload(self) -> dict[str, Any]:
        """Validate the file, then swap; a bad file leaves the running config untouched."""
        async with self._reload_lock:
            metrics.LAST_RELOAD_TIME.set_to_current_time()
            try:
                cfg = load_config(self.settings.routes_file)
                runtime = await self._apply(cfg)
            except ConfigError as exc:
                metrics.RELOADS.labels("error").inc()
                metrics.LAST_RELOAD_OK.set(0)
                log.error("reload refused, still serving the previous routes:\n%s", exc.message)
                return {
                    "reloaded": False,
                    "error": {"type": exc.type, "message": exc.message, "problems": exc.problems},
                }
            metrics.RELOADS.labels("ok").inc()
            metrics.LAST_RELOAD_OK.set(1)
            log.info("reloaded %s: %d routes", runtime.source, len(runtime.routes))
            return {"reloaded": True, "routes": len(runtime.routes), "source": runtime.source}

    # --- reports for the admin API --------------------------------------------------

    def upstream_report(self, service: str | None = None) -> list[dict[str, Any]]:
        statuses = self.upstreams.resolver.status()
        out = []
        for name in sorted(self.runtime.config.services):
            if service is not None and name != service:
                continue
            status = statuses.get(name)
            entry: dict[str, Any] = (
                status.to_json()
                if status
                else {"service": name, "source": "unknown", "instances": []}
            )
            balancer = self.upstreams.balancers.get(name)
            health = balancer.snapshot() if balancer else {}
            for inst in entry["instances"]:
                inst["passive"] = health.get(inst["url"])
            breaker = self.upstreams.breakers.get(name)
            entry["breaker"] = breaker.snapshot()["state"] if breaker else None
            out.append(entry)
        return out

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self._runtime is None:
            return False, {"ready": False, "reason": "routes not loaded"}
        statuses = self.upstreams.resolver.status()
        empty = sorted(n for n, s in statuses.items() if not s.instances)
        return True, {
            "ready": True,
            "routes": len(self._runtime.routes),
            "services_without_instances": empty,
        }

    def extend_admin(self, app: web.Application) -> None:
        for extend in self._admin_extensions:
            extend(app)

    def add_admin_extension(self, extend: Callable[[web.Application], None]) -> None:
        self._admin_extensions.append(extend)

    def service_client(self) -> ServiceClient:
        return ServiceClient(self.upstreams)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load routes (a bad file stops startup, loudly), then open both listeners."""
        cfg = load_config(self.settings.routes_file)
        try:
            await self._start(cfg)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, cfg: GatewayConfig) -> None:
        pool = new_connection_pool()
        self.upstreams = Upstreams(
            self._resolver or default_resolver(),
            pool,
            clock=self.clock,
            **metrics.UPSTREAM_HOOKS,
        )
        await self._apply(cfg)
        metrics.LAST_RELOAD_OK.set(1)
        s = self.settings
        self._access_log = AccessLog() if s.access_log else None
        if self._access_log is not None:
            self._access_log.start()
        handler = ProxyHandler(self._get_runtime, self.upstreams, access_log=self._access_log)
        public = GatewayServer(
            handler, access_log=None, max_line_size=s.max_line_size, max_field_size=s.max_field_size
        )
        public_runner = web.ServerRunner(public, shutdown_timeout=s.shutdown_grace)
        await public_runner.setup()
        public_site = web.TCPSite(public_runner, s.host, s.port, reuse_port=s.reuse_port)
        await public_site.start()
        self._runners.append(public_runner)
        self.public_port = _bound_port(public_runner, s.port)

        admin_runner = web.AppRunner(
            build_admin_app(self, s.admin_token), access_log=None, shutdown_timeout=2.0
        )
        await admin_runner.setup()
        await web.TCPSite(admin_runner, s.admin_host, s.admin_port).start()
        self._runners.append(admin_runner)
        self.admin_port = _bound_port(admin_runner, s.admin_port)
        log.info(
            "gateway listening on http://%s:%s, admin on http://%s:%s",
            s.host,
            self.public_port,
            s.admin_host,
            self.admin_port,
        )

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._access_log is not None:
            await self._access_log.stop()
        if hasattr(self, "upstreams"):
            await self.upstreams.pool.close()
            await self.upstreams.resolver.close()


def _bound_port(runner: web.BaseRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback


async def serve(settings: GatewaySettings | None = None) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads routes.yaml."""
    gw = Gateway(settings)
    await gw.start()
    if gw.settings.gc_tune:
        tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(gw.reload()))
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping")
        await gw.stop()
