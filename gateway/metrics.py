"""Prometheus metrics of the gateway (default registry, served on the admin port)."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

from .breaker import BreakerState

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

REQUESTS = Counter(
    "aiagg_gateway_requests_total",
    "Requests answered by the gateway, by route, service and status code.",
    ["route", "service", "status"],
)
LATENCY = Histogram(
    "aiagg_gateway_request_duration_seconds",
    "Time from request arrival to the end of the response, by route.",
    ["route"],
    buckets=_BUCKETS,
)
RETRIES = Counter(
    "aiagg_gateway_retries_total",
    "Upstream attempts repeated after a failure, by service and reason.",
    ["service", "reason"],
)
UPSTREAM_FAILURES = Counter(
    "aiagg_gateway_upstream_failures_total",
    "Failed upstream attempts, by service and kind (connect-error, timeout, reset, 5xx).",
    ["service", "kind"],
)
BREAKER_STATE = Gauge(
    "aiagg_gateway_breaker_state",
    "Circuit breaker state per service: 0 closed, 1 half-open, 2 open.",
    ["service"],
)
BREAKER_TRANSITIONS = Counter(
    "aiagg_gateway_breaker_transitions_total",
    "Circuit breaker state changes.",
    ["service", "from_state", "to_state"],
)
RELOADS = Counter(
    "aiagg_gateway_config_reloads_total", "Reloads of routes.yaml by result.", ["result"]
)
LAST_RELOAD_OK = Gauge(
    "aiagg_gateway_config_last_reload_successful", "1 if the last reload succeeded, else 0."
)
LAST_RELOAD_TIME = Gauge(
    "aiagg_gateway_config_last_reload_timestamp_seconds", "Unix time of the last reload attempt."
)
AUTH_CACHE = Counter(
    "aiagg_gateway_auth_cache_total", "Forward-auth cache lookups.", ["policy", "result"]
)

_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def breaker_transition(service: str, old: BreakerState, new: BreakerState) -> None:
    BREAKER_STATE.labels(service).set(_STATE_VALUE[new])
    BREAKER_TRANSITIONS.labels(service, old.value, new.value).inc()


def count_retry(service: str, reason: str) -> None:
    RETRIES.labels(service, reason).inc()


def count_failure(service: str, kind: str) -> None:
    UPSTREAM_FAILURES.labels(service, kind).inc()


#: ``Upstreams(..., **UPSTREAM_HOOKS)``: the same counters for the gateway's upstreams
#: and for a service's calls to its peers.
UPSTREAM_HOOKS = {
    "on_breaker_transition": breaker_transition,
    "on_retry": count_retry,
    "on_failure": count_failure,
}


class RequestMetrics:
    """Caches labelled children: ``labels()`` is a dict lookup plus a lock, per call."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, int], object] = {}
        self._histograms: dict[str, object] = {}

    def observe(self, route: str, service: str, status: int, seconds: float) -> None:
        key = (route, service, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(route, service, str(status))
        counter.inc()
        hist = self._histograms.get(route)
        if hist is None:
            hist = self._histograms[route] = LATENCY.labels(route)
        hist.observe(seconds)


def render() -> bytes:
    return generate_latest(REGISTRY)
