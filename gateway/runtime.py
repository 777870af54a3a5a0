"""A loaded routes file, compiled into what the request path reads.

A :class:`Runtime` is immutable. Reload builds a new one and swaps a single
reference, so a request in flight finishes on the runtime it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .auth import ForwardAuth
from .balancer import EjectionConfig
from .clock import Clock
from .config import (
    GatewayConfig,
    RoutePolicy,
    breaker_configs,
    breaker_key,
    ejection_config,
    resolve_policy,
)
from .forwarder import CallPolicy, Upstreams
from .routing import RouteTable, Rule


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    service: str
    policy: RoutePolicy
    call: CallPolicy
    auth: ForwardAuth | None


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    table: RouteTable
    routes: dict[str, CompiledRoute]
    auth: dict[str, ForwardAuth]
    source: str
    loaded_at: datetime
    # Identity headers any auth policy may set: stripped from every client request,
    # on every route, so no client can claim an identity anywhere.
    identity_headers: frozenset[str] = frozenset()

    def describe_routes(self) -> list[dict[str, Any]]:
        out = []
        for route_cfg in self.config.routes:
            compiled = self.routes[route_cfg.name]
            p = compiled.policy
            out.append(
                {
                    "name": route_cfg.name,
                    "match": route_cfg.match.model_dump(exclude_none=True),
                    "rewrite": route_cfg.rewrite.model_dump(exclude_none=True)
                    if route_cfg.rewrite
                    else None,
                    "service": compiled.service,
                    "auth": p.auth,
                    "timeout": {
                        "connect": p.connect_timeout,
                        "per_try": p.per_try_timeout,
                        "total": p.total_timeout,
                    },
                    "retry": {
                        "attempts": p.retry.attempts,
                        "backoff": {"initial": p.retry.backoff_initial, "max": p.retry.backoff_max},
                        "on": sorted(p.retry.on),
                        "methods": sorted(p.retry.methods),
                    },
                    "breaker": compiled.call.breaker or compiled.service,
                    "limits": {"max_body": p.max_body, "max_headers": p.max_headers},
                }
            )
        return out


def compile_runtime(
    cfg: GatewayConfig,
    upstreams: Upstreams,
    clock: Clock,
    *,
    source: str,
    previous: Runtime | None = None,
    auth_metrics: Any = None,
) -> Runtime:
    """Build a runtime and apply its breaker/ejection thresholds to ``upstreams``."""
    auth: dict[str, ForwardAuth] = {}
    for name, spec in cfg.auth_policies.items():
        old = previous.auth.get(name) if previous else None
        auth[name] = (
            old
            if old is not None and old.spec == spec
            else ForwardAuth(name, spec, upstreams, clock, auth_metrics)
        )
    routes: dict[str, CompiledRoute] = {}
    rules: list[Rule] = []
    for route_cfg in cfg.routes:
        policy = resolve_policy(cfg, route_cfg)
        compiled = CompiledRoute(
            name=route_cfg.name,
            service=route_cfg.service,
            policy=policy,
            call=CallPolicy(
                connect_timeout=policy.connect_timeout,
                per_try_timeout=policy.per_try_timeout,
                total_timeout=policy.total_timeout,
                retry=policy.retry,
                breaker=breaker_key(route_cfg) if route_cfg.breaker is not None else None,
            ),
            auth=auth[policy.auth] if policy.auth else None,
        )
        routes[route_cfg.name] = compiled
        rewrite = route_cfg.rewrite
        rules.append(
            Rule(
                name=route_cfg.name,
                path=route_cfg.match.path,
                prefix=route_cfg.match.prefix,
                methods=frozenset(route_cfg.match.methods) if route_cfg.match.methods else None,
                host=route_cfg.match.host,
                strip_prefix=bool(rewrite and rewrite.strip_prefix),
                replace_prefix=rewrite.replace_prefix if rewrite else None,
                payload=compiled,
            )
        )
    table = RouteTable(rules)
    upstreams.configure(
        breaker_configs(cfg),
        {name: EjectionConfig(*ejection_config(cfg, name)) for name in cfg.services},
    )
    identity = frozenset(
        h.lower() for spec in cfg.auth_policies.values() for h in spec.forward_headers
    )
    return Runtime(
        config=cfg,
        table=table,
        routes=routes,
        auth=auth,
        source=source,
        loaded_at=clock.now(),
        identity_headers=identity,
    )
