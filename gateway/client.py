"""Service-to-service calls with the gateway's own machinery.

A service that calls a peer (the orchestrator calling billing, say) builds one
:class:`~gateway.forwarder.ServiceClient` here. It reads the same ``routes.yaml``
(``GATEWAY_ROUTES_FILE``) for each peer's discovery mode, static instances,
breaker and ejection thresholds, and resolves through Consul when
``CONSUL_HTTP_ADDR`` is set, so no service holds a hard-coded peer URL.
"""

from __future__ import annotations

from . import metrics
from .balancer import EjectionConfig
from .config import GatewayConfig, breaker_config, ejection_config, load_config, service_policy
from .discovery import Resolver, discovery_from_config
from .forwarder import CallPolicy, ServiceClient, Upstreams, new_connection_pool
from .settings import GatewaySettings


async def open_service_client(
    routes_file: str | None = None,
    *,
    config: GatewayConfig | None = None,
    resolver: Resolver | None = None,
    policy: CallPolicy | None = None,
) -> ServiceClient:
    """A ready client; ``await client.close()`` when done.

    Each peer's calls get that service's timeouts and retries from routes.yaml
    (service over defaults) unless ``policy`` is given, which then applies to all.
    """
    if config is None:
        config = load_config(routes_file or GatewaySettings().routes_file)
    if resolver is None:
        from .consul_resolver import build_resolver

        resolver = build_resolver()
    await resolver.configure(discovery_from_config(config.services))
    upstreams = Upstreams(
        resolver,
        new_connection_pool(),
        **metrics.UPSTREAM_HOOKS,
    )
    upstreams.configure(
        {name: breaker_config(config, name) for name in config.services},
        {name: EjectionConfig(*ejection_config(config, name)) for name in config.services},
    )
    per_service = {}
    for name in config.services:
        p = service_policy(config, name)
        per_service[name] = CallPolicy(
            connect_timeout=p.connect_timeout,
            per_try_timeout=p.per_try_timeout,
            total_timeout=p.total_timeout,
            retry=p.retry,
        )
    return ServiceClient(upstreams, policy, per_service=per_service)
