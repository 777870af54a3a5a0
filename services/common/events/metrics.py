"""Prometheus collectors of the event backbone (default registry, ``aiagg_events_`` prefix).

The collectors are looked up in the registry before being created, so importing this
module twice (``python -m`` runs a module a second time as ``__main__``) never raises
"Duplicated timeseries".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


def _metric(kind: type[M], name: str, doc: str, labels: Sequence[str] = ()) -> M:
    existing = REGISTRY._names_to_collectors.get(name)  # no public lookup exists
    if existing is not None:
        if not isinstance(existing, kind):
            raise TypeError(f"metric {name} is already registered as {type(existing).__name__}")
        return existing
    return kind(name, doc, list(labels))


PUBLISHED = _metric(
    Counter, "aiagg_events_published", "Events handed to the broker for publishing", ["type"]
)
CONFIRMED = _metric(
    Counter, "aiagg_events_confirmed", "Publishes the broker confirmed (acked)", ["type"]
)
PUBLISH_FAILED = _metric(
    Counter,
    "aiagg_events_publish_failed",
    "Publishes that failed: nack, unroutable (returned) or connection trouble",
    ["type", "reason"],
)
OUTBOX_BACKLOG = _metric(
    Gauge, "aiagg_events_outbox_backlog", "Outbox rows not yet published", ["outbox"]
)
OUTBOX_RELAYED = _metric(
    Counter, "aiagg_events_outbox_relayed", "Outbox rows published and marked sent", ["outbox"]
)
CONSUMED = _metric(
    Counter,
    "aiagg_events_consumed",
    "Deliveries whose handler succeeded and that were acknowledged",
    ["queue", "type"],
)
DUPLICATES = _metric(
    Counter,
    "aiagg_events_duplicates",
    "Deliveries skipped because the consumer had already processed the event",
    ["consumer"],
)
RETRIED = _metric(
    Counter,
    "aiagg_events_retried",
    "Deliveries sent to a retry queue after a handler error",
    ["queue"],
)
DEAD_LETTERED = _metric(
    Counter,
    "aiagg_events_dead_lettered",
    "Deliveries moved to the dead-letter queue",
    ["queue", "reason"],
)
QUEUE_DEPTH = _metric(
    Gauge, "aiagg_events_queue_depth", "Messages ready in a queue (last refresh)", ["queue"]
)
DLQ_DEPTH = _metric(
    Gauge, "aiagg_events_dlq_depth", "Messages in a dead-letter queue (last refresh)", ["queue"]
)


__all__ = [
    "CONFIRMED",
    "CONSUMED",
    "DEAD_LETTERED",
    "DLQ_DEPTH",
    "DUPLICATES",
    "OUTBOX_BACKLOG",
    "OUTBOX_RELAYED",
    "PUBLISHED",
    "PUBLISH_FAILED",
    "QUEUE_DEPTH",
    "RETRIED",
]
