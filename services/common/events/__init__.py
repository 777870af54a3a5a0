"""The event backbone: envelope, buses (RabbitMQ and in-process), outbox, idempotent consumers.

A service author needs only this surface; see the README, "Events".
"""

from .bus import DeadLetter, EventBus, Handler, PublishError, refresh_queue_depths
from .consumer import BatchHandler, Consumer, SessionHandler, run_handler, subscribe
from .envelope import (
    APIKEY_CREATED,
    APIKEY_REVOKED,
    EVENT_TYPES,
    PAYMENT_RECEIVED,
    ROUTE_DECIDED,
    TRANSACTION_CREATED,
    USAGE_RECORDED,
    Event,
    PoisonMessage,
)
from .factory import build_bus
from .inprocess import InProcessBus
from .outbox import (
    OutboxRelay,
    event_outbox,
    outbox_metadata,
    processed_events,
    record,
    record_event,
)
from .rabbit import RabbitBus
from .settings import EventSettings, in_process_warning, warn_in_process
from .topology import (
    ANALYTICS_EVENTS,
    BILLING_USAGE,
    EXCHANGE,
    STANDARD_QUEUES,
    QueueSpec,
    Topology,
    topic_matches,
)

__all__ = [
    "ANALYTICS_EVENTS",
    "APIKEY_CREATED",
    "APIKEY_REVOKED",
    "BILLING_USAGE",
    "EVENT_TYPES",
    "EXCHANGE",
    "PAYMENT_RECEIVED",
    "ROUTE_DECIDED",
    "STANDARD_QUEUES",
    "TRANSACTION_CREATED",
    "USAGE_RECORDED",
    "BatchHandler",
    "Consumer",
    "DeadLetter",
    "Event",
    "EventBus",
    "EventSettings",
    "Handler",
    "InProcessBus",
    "OutboxRelay",
    "PoisonMessage",
    "PublishError",
    "QueueSpec",
    "RabbitBus",
    "SessionHandler",
    "Topology",
    "build_bus",
    "event_outbox",
    "in_process_warning",
    "outbox_metadata",
    "processed_events",
    "record",
    "record_event",
    "refresh_queue_depths",
    "run_handler",
    "subscribe",
    "topic_matches",
    "warn_in_process",
]
