"""The ``routes.yaml`` schema, its loader, and policy resolution.

Users edit one YAML file; this module turns it into validated, immutable values.
Errors name the file, the line and the field (``routes.yaml:12: routes[0].match.path:
...``) so a typo is found at a glance, and a bad file never replaces a good one.

Policies resolve *route over service over defaults*, field by field: a route that
sets only ``timeout.total`` keeps the service's ``connect`` and the defaults' rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .balancer import EjectionConfig
from .breaker import BreakerConfig
from .retry import IDEMPOTENT_METHODS, RetryPolicy
from .yamlfile import load_yaml_model, parse_yaml_model

__all__ = [
    "AuthPolicySpec",
    "GatewayConfig",
    "RouteConfig",
    "RoutePolicy",
    "ServiceConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_RETRY_TOKENS = frozenset({"connect-error", "timeout", "reset", "5xx"})


def parse_duration(value: Any) -> float:
    """``250ms``, ``15s``, ``2m``, ``1h`` or a bare number of seconds, as float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms or 15s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 250ms or 15s, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """``512KiB``, ``10MB``, ``1048576`` as a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 10MB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()]
    else:
        raise ValueError(f"expected a size such as 64KiB or 10MB, got {value!r}")
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutSpec(_Model):
    """Timeouts, each optional so a layer can override only some."""

    connect: float | None = None
    per_try: float | None = None
    total: float | None = None

    _durations = field_validator("connect", "per_try", "total", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    @model_validator(mode="after")
    def _positive(self) -> TimeoutSpec:
        for name in ("connect", "per_try", "total"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be more than 0")
        return self


class BackoffSpec(_Model):
    initial: float | None = None
    max: float | None = None

    _durations = field_validator("initial", "max", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class RetrySpec(_Model):
    attempts: int | None = Field(default=None, ge=1, le=10)
    backoff: BackoffSpec | None = None
    on: list[str] | None = None
    methods: list[str] | None = None

    @field_validator("on", mode="before")
    @classmethod
    def _on(cls, v: Any) -> Any:
        return None if v is None else _outcome_tokens(v)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return None if v is None else _normalise_methods(v)


class BreakerSpec(_Model):
    failures: int | None = Field(default=None, ge=1)
    reset_after: float | None = None
    half_open_probes: int | None = Field(default=None, ge=1)
    successes_to_close: int | None = Field(default=None, ge=1)
    count: list[str] | None = None

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return None if v is None else _outcome_tokens(v)

    _durations = field_validator("reset_after", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class EjectionSpec(_Model):
    failures: int | None = Field(default=None, ge=1)
    cooldown: float | None = None

    _durations = field_validator("cooldown", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class LimitsSpec(_Model):
    max_body: int | None = None
    max_headers: int | None = None

    _sizes = field_validator("max_body", "max_headers", mode="before")(
        lambda v: None if v is None else parse_size(v)
    )


def _outcome_tokens(v: Any) -> list[str]:
    """``[connect-error, timeout, reset, 5xx, 503, ...]``: what retries and breakers react to."""
    if not isinstance(v, list):
        raise ValueError("expected a list such as [connect-error, 502, 503]")
    tokens = []
    for item in v:
        token = str(item).strip().lower()
        if token not in _RETRY_TOKENS and not (token.isdigit() and 400 <= int(token) <= 599):
            raise ValueError(
                f"unknown outcome {item!r}: use connect-error, timeout, reset, "
                "5xx or a status code 400-599"
            )
        tokens.append(token)
    return tokens


def _normalise_methods(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ValueError("expected a list of HTTP methods such as [GET, POST]")
    methods = []
    for item in v:
        method = str(item).upper()
        if method not in _METHODS:
            raise ValueError(f"unknown HTTP method {item!r}")
        methods.append(method)
    return methods


class _PolicyLayer(_Model):
    """What defaults, a service and a route may each set."""

    timeout: TimeoutSpec | None = None
    retry: RetrySpec | None = None
    limits: LimitsSpec | None = None


class AuthPolicySpec(_Model):
    """A named forward-auth policy: ask ``service`` at ``path`` whether to let the request in.

    The gateway sends the client's ``Authorization`` header; a 2xx answer admits the
    request and the headers listed in ``forward_headers`` are copied from the answer
    onto the upstream request. Those headers are always stripped from what the
    client sent, so a client can never claim an identity.
    """

    service: str
    path: str = "/auth/validate"
    cache_ttl: float = 5.0
    cache_size: int = Field(default=10_000, ge=0)
    forward_headers: list[str] = Field(default_factory=lambda: ["X-User-Id", "X-Key-Id"])
    timeout: float = 2.0

    _durations = field_validator("cache_ttl", "timeout", mode="before")(parse_duration)


class Defaults(_PolicyLayer):
    breaker: BreakerSpec | None = None
    ejection: EjectionSpec | None = None
    auth: str | None = None


class ServiceConfig(_PolicyLayer):
    discovery: Literal["static", "consul"] = "static"
    instances: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    breaker: BreakerSpec | None = None
    ejection: EjectionSpec | None = None

    @field_validator("instances")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            if not re.match(r"^https?://[^/\s]+$", url.rstrip("/")):
                raise ValueError(f"instance {url!r} must look like http://host:port")
            out.append(url.rstrip("/"))
        return out


class MatchSpec(_Model):
    path: str | None = None
    prefix: str | None = None
    methods: list[str] | None = None
    host: str | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return None if v is None else _normalise_methods(v)

    @model_validator(mode="after")
    def _one_of(self) -> MatchSpec:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("give exactly one of path or prefix")
        value = self.path if self.path is not None else self.prefix
        if not value or not value.startswith("/"):
            raise ValueError("path and prefix must start with /")
        return self


class RewriteSpec(_Model):
    strip_prefix: bool = False
    replace_prefix: str | None = None

    @model_validator(mode="after")
    def _one(self) -> RewriteSpec:
        if self.strip_prefix and self.replace_prefix is not None:
            raise ValueError("use either strip_prefix or replace_prefix, not both")
        if self.replace_prefix is not None and not self.replace_prefix.startswith("/"):
            raise ValueError("replace_prefix must start with /")
        return self


class RouteConfig(_PolicyLayer):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    match: MatchSpec
    service: str
    rewrite: RewriteSpec | None = None
    auth: str | None = None
    #: thresholds of a breaker of this route's own (``service:route`` in the admin API);
    #: without it the route shares its service's breaker
    breaker: BreakerSpec | None = None

    @model_validator(mode="after")
    def _rewrite_needs_prefix(self) -> RouteConfig:
        if self.rewrite and self.match.prefix is None:
            raise ValueError("rewrite applies to prefix routes only")
        return self


class GatewayConfig(_Model):
    """The whole file."""

    defaults: Defaults = Field(default_factory=Defaults)
    auth_policies: dict[str, AuthPolicySpec] = Field(default_factory=dict)
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)

    def reference_problems(self) -> list[tuple[tuple, str]]:
        """Names that point nowhere, as (location, message) pairs."""
        problems: list[tuple[tuple, str]] = []
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                problems.append((("routes", i, "name"), f"two routes are named {route.name!r}"))
            seen.add(route.name)
            if route.service not in self.services:
                known = ", ".join(sorted(self.services)) or "none"
                problems.append(
                    (
                        ("routes", i, "service"),
                        f"service {route.service!r} is not under services: (known: {known})",
                    )
                )
            auth = route.auth if route.auth is not None else self.defaults.auth
            if auth not in (None, "none") and auth not in self.auth_policies:
                where = ("routes", i, "auth") if route.auth is not None else ("defaults", "auth")
                problems.append((where, f"auth {auth!r} is not under auth_policies:"))
        for name, policy in self.auth_policies.items():
            if policy.service not in self.services:
                problems.append(
                    (
                        ("auth_policies", name, "service"),
                        f"service {policy.service!r} is not under services:",
                    )
                )
        return problems

    def route_policy(self, route: RouteConfig) -> RoutePolicy:
        return resolve_policy(self, route)


# --- resolved, immutable policies -------------------------------------------------

DEFAULT_CONNECT = 1.0
DEFAULT_PER_TRY = 15.0
DEFAULT_TOTAL = 30.0
DEFAULT_MAX_BODY = 10 * 1024**2
DEFAULT_MAX_HEADERS = 32 * 1024


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything the proxy needs for one route, resolved route > service > defaults."""

    connect_timeout: float
    per_try_timeout: float
    total_timeout: float
    retry: RetryPolicy
    max_body: int
    max_headers: int
    auth: str | None


def _layered(layers: list[BaseModel | None], name: str) -> Any:
    """The last layer that set ``name``, or None."""
    value = None
    for layer in layers:
        if layer is not None and getattr(layer, name) is not None:
            value = getattr(layer, name)
    return value


def resolve_policy(cfg: GatewayConfig, route: RouteConfig) -> RoutePolicy:
    """A route's policy: route over its service over the defaults."""
    auth = route.auth if route.auth is not None else cfg.defaults.auth
    return _resolve([cfg.defaults, cfg.services[route.service], route], auth)


def service_policy(cfg: GatewayConfig, service: str) -> RoutePolicy:
    """A service-to-service call's policy: the service over the defaults (no route)."""
    return _resolve([cfg.defaults, cfg.services[service]], None)


def _resolve(layers: list[_PolicyLayer], auth: str | None) -> RoutePolicy:
    timeouts = [layer.timeout for layer in layers]
    retries = [layer.retry for layer in layers]
    limits = [layer.limits for layer in layers]
    backoffs = [r.backoff if r else None for r in retries]

    total = _layered(timeouts, "total") or DEFAULT_TOTAL
    per_try = _layered(timeouts, "per_try") or min(DEFAULT_PER_TRY, total)
    on = _layered(retries, "on")
    methods = _layered(retries, "methods")
    default_retry = RetryPolicy()
    retry = RetryPolicy(
        attempts=_layered(retries, "attempts") or default_retry.attempts,
        backoff_initial=_pick(_layered(backoffs, "initial"), default_retry.backoff_initial),
        backoff_max=_pick(_layered(backoffs, "max"), default_retry.backoff_max),
        on=frozenset(on) if on is not None else default_retry.on,
        methods=frozenset(methods) if methods is not None else IDEMPOTENT_METHODS,
    )
    return RoutePolicy(
        connect_timeout=_layered(timeouts, "connect") or DEFAULT_CONNECT,
        per_try_timeout=min(per_try, total),
        total_timeout=total,
        retry=retry,
        max_body=_layered(limits, "max_body") or DEFAULT_MAX_BODY,
        max_headers=_layered(limits, "max_headers") or DEFAULT_MAX_HEADERS,
        auth=None if auth in (None, "none") else auth,
    )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def breaker_key(route: RouteConfig) -> str:
    """The breaker a route uses: its own when it sets ``breaker:``, else its service's."""
    return f"{route.service}:{route.name}" if route.breaker is not None else route.service


def breaker_configs(cfg: GatewayConfig) -> dict[str, BreakerConfig]:
    """Every breaker the file asks for: one per service, one per route with ``breaker:``."""
    out = {name: breaker_config(cfg, name) for name in cfg.services}
    for route in cfg.routes:
        if route.breaker is not None:
            out[breaker_key(route)] = breaker_config(cfg, route.service, route)
    return out


def breaker_config(
    cfg: GatewayConfig, service: str, route: RouteConfig | None = None
) -> BreakerConfig:
    """route over service over defaults, field by field."""
    layers = [cfg.defaults.breaker, cfg.services[service].breaker]
    if route is not None:
        layers.append(route.breaker)
    base = BreakerConfig()
    return BreakerConfig(
        failures=_pick(_layered(layers, "failures"), base.failures),
        reset_after=_pick(_layered(layers, "reset_after"), base.reset_after),
        half_open_probes=_pick(_layered(layers, "half_open_probes"), base.half_open_probes),
        successes_to_close=_pick(_layered(layers, "successes_to_close"), base.successes_to_close),
        count=frozenset(_pick(_layered(layers, "count"), base.count)),
    )


def ejection_config(cfg: GatewayConfig, service: str) -> tuple[int, float]:
    """(consecutive failures, cooldown seconds) for passive ejection of one instance."""
    layers = [cfg.defaults.ejection, cfg.services[service].ejection]
    return (_pick(_layered(layers, "failures"), 3), _pick(_layered(layers, "cooldown"), 10.0))


# --- loading -------------------------------------------------------------------------


def _reference_problems(config: BaseModel) -> list[tuple[tuple, str]]:
    """Dangling names, then policies that cannot be built (e.g. backoff initial > max)."""
    assert isinstance(config, GatewayConfig)
    problems = config.reference_problems()
    if problems:
        return problems
    for name in config.services:
        try:
            breaker_config(config, name)
            EjectionConfig(*ejection_config(config, name))
        except ValueError as exc:
            problems.append((("services", name), str(exc)))
    for i, route in enumerate(config.routes):
        try:
            resolve_policy(config, route)
            breaker_config(config, route.service, route)
        except ValueError as exc:
            problems.append((("routes", i), str(exc)))
    return problems


def parse_config(text: str, source: str = "routes.yaml") -> GatewayConfig:
    """Parse and validate YAML text; raise :class:`ConfigError` naming file:line and field."""
    return parse_yaml_model(text, source, GatewayConfig, _reference_problems)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a routes file."""
    return load_yaml_model(path, GatewayConfig, _reference_problems, what="routes file")
