"""Settings of the event backbone, from the environment (pydantic-settings).

Durations are written ``250ms``, ``1s``, ``1.5s``, ``2m``, ``1h`` or ``7d``; a bare
number is seconds.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25; ``"2m"`` → 120.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (write e.g. 250ms, 1s, 2m)")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


def parse_durations(value: Any) -> tuple[float, ...]:
    """``"1s,5s,30s"`` (or a list of durations) → ``(1.0, 5.0, 30.0)``."""
    if isinstance(value, str):
        items: list[Any] = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [value]
    return tuple(parse_duration(item) for item in items)


#: a duration setting: ``250ms``, ``1s``, ... or a bare number of seconds
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class EventSettings(BaseSettings):
    """Everything the buses, the relay and the consumers read from the environment."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    #: broker URL; unset → the caller decides (in-process bus for the local launcher)
    amqp_url: str | None = None
    #: unacknowledged deliveries per consumer (AMQP basic.qos prefetch count)
    amqp_prefetch: int = Field(32, ge=1, le=65535)
    #: pause between reconnection attempts of the robust connection
    amqp_reconnect_interval: Duration = 2.0
    #: how long ``bus.start()`` waits for the first connection before going on in background
    amqp_connect_timeout: Duration = 10.0
    #: how long a publish waits for the broker's confirm
    events_publish_timeout: Duration = 10.0
    #: delay before each retry of a failed handler (the last one repeats if needed)
    events_retry_delays: Annotated[tuple[float, ...], NoDecode] = (1.0, 5.0, 30.0)
    #: handler attempts in all (first delivery included) before the dead-letter queue
    events_max_attempts: int = Field(4, ge=1)
    #: how long a consumer waits for more deliveries before committing a batch: a few
    #: milliseconds of delay buy batches several times larger (fewer transactions and
    #: ack frames); 0 commits whatever is there at once
    events_consumer_linger: Duration = 0.01
    #: prefix of every exchange and queue name ("" → the exact contract names)
    events_namespace: str = ""
    #: the relay's poll period when nobody notifies it
    events_outbox_poll_interval: Duration = 1.0
    events_outbox_batch_size: int = Field(100, ge=1)
    #: how long a relay woken by a commit waits for more before it reads the outbox: at
    #: moderate load one drain (a SELECT, the publishes, one mark-sent UPDATE, the
    #: confirms' wake-ups) then serves several events instead of one each
    events_outbox_linger: Duration = 0.01
    #: the relay's back-off after broker trouble: first pause and cap (jittered)
    events_outbox_backoff_initial: Duration = 0.5
    events_outbox_backoff_max: Duration = 30.0
    #: sent outbox rows and consumers' inbox marks older than this are deleted, hourly
    #: (0 keeps them forever)
    events_outbox_retention: Duration = 7 * 86400.0

    @field_validator("events_retry_delays", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> tuple[float, ...]:
        delays = parse_durations(value)
        if not delays:
            raise ValueError("EVENTS_RETRY_DELAYS needs at least one delay")
        return delays

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("events_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("EVENTS_NAMESPACE may hold letters, digits, '_', '-', '.' only")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> EventSettings:
        if self.events_outbox_backoff_max < self.events_outbox_backoff_initial:
            raise ValueError("EVENTS_OUTBOX_BACKOFF_MAX is below EVENTS_OUTBOX_BACKOFF_INITIAL")
        return self

    def retry_delay(self, failed_attempt: int) -> float | None:
        """Seconds to wait after failed attempt number ``failed_attempt`` (1-based).

        None when that attempt was the last one: the message goes to the dead-letter queue.
        """
        if failed_attempt >= self.events_max_attempts:
            return None
        delays = self.events_retry_delays
        return delays[min(failed_attempt, len(delays)) - 1]

    def retry_delays_in_use(self) -> tuple[float, ...]:
        """The distinct delays a message can wait (one retry queue each), in order."""
        seen: list[float] = []
        for attempt in range(1, self.events_max_attempts):
            delay = self.retry_delay(attempt)
            if delay is not None and delay not in seen:
                seen.append(delay)
        return tuple(seen)


IN_PROCESS_WARNING = (
    "AMQP_URL is not set: the events of %s stay inside this process (in-process bus). "
    "Other services will not receive them and this service will not receive theirs. "
    "Set AMQP_URL=amqp://user:password@host:5672/ to use RabbitMQ."
)


def in_process_warning(service: str) -> str:
    """The sentence a service started alone logs when AMQP_URL is unset."""
    return IN_PROCESS_WARNING % service


def warn_in_process(service: str, logger: logging.Logger | None = None) -> None:
    """Log :func:`in_process_warning` at WARNING level."""
    (logger or logging.getLogger("aiagg.events")).warning(IN_PROCESS_WARNING, service)


__all__ = [
    "IN_PROCESS_WARNING",
    "EventSettings",
    "in_process_warning",
    "parse_duration",
    "parse_durations",
    "warn_in_process",
]
