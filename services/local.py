"""``make run``: the whole platform in one foreground process, on embedded defaults.

The gateway (3000, admin 127.0.0.1:9901) and the five services on their
ARCHITECTURE ports, static discovery from ``routes.yaml``, a SQLite file per
service under ``AIAGG_DATA_DIR`` (``./var/data``), the ``mock`` provider, and one
in-process event bus shared by all services unless ``AMQP_URL`` is set. Setting
``CONSUL_HTTP_ADDR``, ``AMQP_URL`` or ``<SERVICE>_DATABASE_URL`` switches a part to
the real server.

On start it prints the URLs, a bootstrap API key whose user has a starting
balance, and examples to paste. Ctrl-C (or SIGTERM) stops the gateway first, then
lets the services publish their outboxes and the bus deliver what it holds,
then closes everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.server import Gateway
from gateway.settings import GatewaySettings

log = logging.getLogger("aiagg.local")

BOOTSTRAP_USER = "demo"
BOOTSTRAP_CREDIT = "10.00"
DRAIN_SECONDS = 10.0


def _service_builders() -> list[tuple[str, Callable[..., web.Application], Any]]:
    """(name, create_app, settings) for the five services, in start order."""
    from services.analytics.app import create_app as analytics_app
    from services.analytics.settings import AnalyticsSettings
    from services.auth.app import create_app as auth_app
    from services.auth.settings import AuthSettings
    from services.billing.app import create_app as billing_app
    from services.billing.settings import BillingSettings
    from services.orchestrator.app import create_app as orchestrator_app
    from services.orchestrator.settings import OrchestratorSettings
    from services.proxy.app import create_app as proxy_app
    from services.proxy.settings import ProxySettings

    return [
        ("analytics", analytics_app, AnalyticsSettings()),
        ("billing", billing_app, BillingSettings()),
        ("auth", auth_app, AuthSettings()),
        ("proxy", proxy_app, ProxySettings()),
        ("orchestrator", orchestrator_app, OrchestratorSettings()),
    ]


def master_key(data_dir: Path) -> tuple[str, bool]:
    """``MASTER_KEY`` from the environment, else one kept in the data dir (made once)."""
    given = os.environ.get("MASTER_KEY")
    if given:
        return given, False
    path = data_dir / "master_key"
    if path.exists():
        return path.read_text().strip(), False
    key = "sk-master-" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, True


class LocalPlatform:
    def __init__(self) -> None:
        self.data_dir = Path(os.environ.get("AIAGG_DATA_DIR", "./var/data"))
        self.runners: list[tuple[str, web.AppRunner]] = []
        self.gateway: Gateway | None = None
        self.bus: Any = None
        self.master = ""

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.master, _ = master_key(self.data_dir)
        os.environ["MASTER_KEY"] = self.master  # every service's settings read it
        if not os.environ.get("AMQP_URL"):
            from services.common.events import InProcessBus

            self.bus = InProcessBus()
            await self.bus.start()
            log.info("events: one in-process bus for all services (set AMQP_URL for RabbitMQ)")
        for name, build, settings in _service_builders():
            app = build(settings, bus=self.bus) if self.bus is not None else build(settings)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
            await runner.setup()
            await web.TCPSite(runner, settings.host, settings.port).start()
            self.runners.append((name, runner))
            log.info("%s on http://%s:%s", name, settings.host, settings.port)
        self.gateway = Gateway(GatewaySettings())
        await self.gateway.start()

    async def bootstrap(self) -> dict[str, Any]:
        """A fresh API key for the demo user, and a one-time starting balance."""
        assert self.gateway is not None
        base = f"http://127.0.0.1:{self.gateway.public_port}"
        admin = {"Authorization": f"Bearer {self.master}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/auth/api-keys",
                json={"user_id": BOOTSTRAP_USER, "name": "make run bootstrap"},
                headers=admin,
            ) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"could not create the bootstrap key: {r.status} {body}")
                key = body["key"]
            async with http.post(
                f"{base}/billing/top-up",
                json={
                    "user_id": BOOTSTRAP_USER,
                    "amount": BOOTSTRAP_CREDIT,
                    "idempotency_key": "make-run-bootstrap-credit",
                },
                headers=admin,
            ) as r:
                if r.status not in (200, 201):
                    raise RuntimeError(
                        f"could not credit the demo user: {r.status} {await r.text()}"
                    )
            async with http.get(f"{base}/billing/balance/{BOOTSTRAP_USER}", headers=admin) as r:
                balance = (await r.json()).get("balance")
        return {"key": key, "user_id": BOOTSTRAP_USER, "balance": balance, "base": base}

    async def stop(self) -> None:
        """Gateway first (no new work), then services (relays flush), then the bus."""
        if self.gateway is not None:
            await self.gateway.stop()
        if self.bus is not None and hasattr(self.bus, "drain"):
            await self.bus.drain(DRAIN_SECONDS)
        for _name, runner in reversed(self.runners):
            await runner.cleanup()
        if self.bus is not None:
            await self.bus.close()


def banner(info: dict[str, Any], master: str, admin_port: int | None) -> str:
    base, key = info["base"], info["key"]
    chat = json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": "Hello!"}]})
    return f"""
AI Aggregator Platform is running (Ctrl-C to stop).

  gateway        {base}
  admin + dashboard  http://127.0.0.1:{admin_port}/   (gatewayctl breakers, gatewayctl routes)
  master key     {master}
  API key        {key}   (user {info["user_id"]}, balance {info["balance"]})

Try it:

  curl -s {base}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{chat}'

  curl -s {base}/billing/balance/{info["user_id"]} -H 'Authorization: Bearer {key}'

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(
    model="mock-small", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)
PY
"""


async def run() -> int:
    platform = LocalPlatform()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await platform.start()
        info = await platform.bootstrap()
        assert platform.gateway is not None
        print(banner(info, platform.master, platform.gateway.admin_port), flush=True)
        await stop.wait()
        print("stopping: gateway, then services (outboxes flushed), then the event bus", flush=True)
    except OSError as exc:
        print(f"make run: cannot start: {exc} (is another copy running?)", file=sys.stderr)
        return 2
    finally:
        await platform.stop()
    print("stopped cleanly", flush=True)
    return 0


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:  # the services run on uvloop when it is installed (it is a dependency)
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
